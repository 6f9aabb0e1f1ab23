//! The Peer service: Raft messages from other nodes, routed by group id.

use std::sync::Arc;

use palisade_group::{NodeId, TypeConfig};
use palisade_proto::v1 as pb;
use palisade_proto::v1::peer_server::Peer;
use palisade_proto::v1::{
    NodeStatusRequest, NodeStatusResponse, RaftMessage, ReadIndexRequest, ReadIndexResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::node::Node;

pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn decode<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, Status> {
    bincode::serde::decode_from_slice(&msg.payload, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| {
            Status::invalid_argument(format!(
                "undecodable raft message for group {}: {e}",
                msg.group_id
            ))
        })
}

fn reply<T: Serialize>(group_id: u64, value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| Status::internal(format!("encoding raft reply: {e}")))?;
    Ok(Response::new(RaftMessage { group_id, payload }))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let group = self.node.group(msg.group_id)?;
        let req: openraft::raft::AppendEntriesRequest<TypeConfig> = decode(&msg)?;
        let result = group.raft().append_entries(req).await;
        reply(msg.group_id, &result)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let group = self.node.group(msg.group_id)?;
        let req: openraft::raft::VoteRequest<NodeId> = decode(&msg)?;
        let result = group.raft().vote(req).await;
        reply(msg.group_id, &result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let group = self.node.group(msg.group_id)?;
        let req: openraft::raft::InstallSnapshotRequest<TypeConfig> = decode(&msg)?;
        let result = group.raft().install_snapshot(req).await;
        reply(msg.group_id, &result)
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let group = self.node.group(request.get_ref().group_id)?;
        let index = group
            .leader_read_index(self.node.config.read_timeout)
            .await
            .map_err(crate::error::ServerError::from)?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    async fn wait_applied(
        &self,
        request: Request<pb::WaitAppliedRequest>,
    ) -> Result<Response<pb::WaitAppliedResponse>, Status> {
        let req = request.into_inner();
        let group = self.node.group(req.group_id)?;
        // Bounded by our own deadline too, so a bad timeout cannot pin a task.
        let wait = std::time::Duration::from_millis(req.timeout_ms).min(self.node.peer_timeout());
        group.wait_applied(req.revision, wait).await;
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
}
