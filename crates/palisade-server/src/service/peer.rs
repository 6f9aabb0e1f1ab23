//! The Peer service: Raft messages from other nodes, routed by group id to
//! the local replica they are addressed to, and the cluster-management
//! calls of the coordinator (see `manage`).

use std::sync::Arc;

use palisade_group::{NodeId, RaftGroup, TypeConfig};
use palisade_proto::v1 as pb;
use palisade_proto::v1::peer_server::Peer;
use palisade_proto::v1::{
    ManageMessage, NodeStatusRequest, NodeStatusResponse, RaftMessage, ReadIndexRequest,
    ReadIndexResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::manage::{ManageError, ManageRequest};
use crate::node::Node;

pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The local replica a Raft message is for. A message for another
    /// replica of the group (an old incarnation, or one not opened yet) is
    /// refused, so it can never touch this replica's log.
    fn target(&self, msg: &RaftMessage) -> Result<Arc<RaftGroup>, Status> {
        let group = self.node.group(msg.group_id).ok_or_else(|| {
            Status::not_found(format!(
                "group {} is not hosted on node {}",
                msg.group_id,
                self.node.id()
            ))
        })?;
        if msg.target_replica != 0 && msg.target_replica != group.replica_id() {
            return Err(Status::failed_precondition(format!(
                "node {} holds replica {} of group {}, not replica {}",
                self.node.id(),
                group.replica_id(),
                msg.group_id,
                msg.target_replica
            )));
        }
        Ok(group)
    }
}

impl PeerService {
    /// A node whose free space is below the floor (half its reserve)
    /// stores no entries that add data, and no snapshots: it lags behind
    /// them (heartbeats, deletes and the cluster's bookkeeping still go
    /// through, so its groups keep their leaders) and catches up once space
    /// is freed. Between the floor and the reserve it still stores them, so
    /// writes in flight when the alarm rose commit instead of holding up
    /// everything behind them. The leader counts the refusal
    /// (`RESOURCE_EXHAUSTED`) when deciding whether a write that adds data
    /// can commit.
    fn refuse_below_disk_floor(&self) -> Result<(), Status> {
        if self.node.disk_below_floor() {
            return Err(Status::resource_exhausted(format!(
                "node {}: disk almost full; storing no new entries until space is freed",
                self.node.id()
            )));
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(group: u64, payload: &[u8]) -> Result<T, Status> {
    bincode::serde::decode_from_slice(payload, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| {
            Status::invalid_argument(format!("undecodable peer message for group {group}: {e}"))
        })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| Status::internal(format!("encoding a peer reply: {e}")))
}

fn reply<T: Serialize>(group_id: u64, value: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage {
        group_id,
        payload: encode(value)?,
        target_replica: 0,
    }))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let group = self.target(&msg)?;
        let req: openraft::raft::AppendEntriesRequest<TypeConfig> =
            decode(msg.group_id, &msg.payload)?;
        let grows = req.entries.iter().any(|e| match &e.payload {
            openraft::EntryPayload::Normal(cmd) => cmd.op.grows_data(),
            _ => false,
        });
        if grows {
            self.refuse_below_disk_floor()?;
        }
        let result = group.append_entries(req).await;
        reply(msg.group_id, &result)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let group = self.target(&msg)?;
        let req: openraft::raft::VoteRequest<NodeId> = decode(msg.group_id, &msg.payload)?;
        let result = group.vote(req).await;
        reply(msg.group_id, &result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let group = self.target(&msg)?;
        let req: openraft::raft::InstallSnapshotRequest<TypeConfig> =
            decode(msg.group_id, &msg.payload)?;
        self.refuse_below_disk_floor()?;
        let result = group.raft().install_snapshot(req).await;
        reply(msg.group_id, &result)
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let id = request.get_ref().group_id;
        let group = self.node.group(id).ok_or(ServerError::UnknownGroup(id))?;
        let index = group
            .leader_read_index(self.node.config.read_timeout)
            .await
            .map_err(|e| self.node.to_status(e.into()))?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    async fn wait_applied(
        &self,
        request: Request<pb::WaitAppliedRequest>,
    ) -> Result<Response<pb::WaitAppliedResponse>, Status> {
        let req = request.into_inner();
        let group = self
            .node
            .group(req.group_id)
            .ok_or(ServerError::UnknownGroup(req.group_id))?;
        // Bounded by our own deadline too, so a bad timeout cannot pin a task.
        let wait = std::time::Duration::from_millis(req.timeout_ms).min(self.node.peer_timeout());
        group.wait_revision(req.revision, wait).await;
        Ok(Response::new(pb::WaitAppliedResponse {
            applied: group.state().revision(),
        }))
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Ok(Response::new(self.node.local_status().await))
    }

    async fn manage(
        &self,
        request: Request<ManageMessage>,
    ) -> Result<Response<ManageMessage>, Status> {
        let msg = request.into_inner();
        let req: ManageRequest = decode(msg.group_id, &msg.payload)?;
        let result: Result<_, ManageError> = self.node.handle_manage(msg.group_id, req).await;
        Ok(Response::new(ManageMessage {
            group_id: msg.group_id,
            payload: encode(&result)?,
        }))
    }
}
