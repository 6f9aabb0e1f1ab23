//! The Admin service: cluster-wide status gathered from every node, adding
//! read replicas (learners), and MVCC compaction.
//!
//! Membership changes and compactions are Raft writes, so they run on the
//! group's leader: a node that does not lead forwards the call there once
//! (marked with the same `x-palisade-forwarded` header as Kv requests).

use std::collections::BTreeMap;
use std::sync::Arc;

use palisade_group::{Command, CommandOp, GroupError, RaftGroup};
use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::admin_server::Admin;
use palisade_proto::v1::peer_client::PeerClient;
use palisade_storage::StoreError;
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::kv::FORWARDED;
use crate::node::Node;

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    async fn probe(&self, id: u64, addr: &str) -> Result<pb::NodeStatusResponse, String> {
        if id == self.node.id() {
            return Ok(self.node.local_status().await);
        }
        let channel = self
            .node
            .channels
            .get(id, addr)
            .map_err(|e| e.to_string())?;
        let mut request = Request::new(pb::NodeStatusRequest {});
        let timeout = self
            .node
            .peer_timeout()
            .min(std::time::Duration::from_secs(2));
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, PeerClient::new(channel).node_status(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => {
                self.node.channels.drop_channel(id);
                Err(format!("{}: {}", status.code(), status.message()))
            }
            Err(_) => {
                self.node.channels.drop_channel(id);
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}

impl AdminService {
    /// An Admin client for the leader named in `err`, or `err` as a status
    /// when there is none to forward to (or the call was forwarded already).
    fn leader_client(
        &self,
        err: GroupError,
        forwarded: bool,
    ) -> Result<AdminClient<tonic::transport::Channel>, Status> {
        match &err {
            GroupError::NotLeader {
                leader: Some((id, Some(addr))),
                ..
            } if *id != self.node.id() && !forwarded => {
                let channel = self
                    .node
                    .channels
                    .get(*id, addr)
                    .map_err(|e| Status::internal(format!("bad leader address {addr}: {e}")))?;
                Ok(AdminClient::new(channel))
            }
            _ => Err(ServerError::Group(err).into()),
        }
    }

    fn forwarded_request<T>(&self, msg: T) -> Request<T> {
        let mut request = Request::new(msg);
        request
            .metadata_mut()
            .insert(FORWARDED, "1".parse().expect("static header"));
        request.set_timeout(self.node.peer_timeout());
        request
    }

    /// Adds `node` as a learner of `group`, at its leader.
    async fn add_learner_to(
        &self,
        group: &RaftGroup,
        node: u64,
        addr: &str,
        forwarded: bool,
    ) -> Result<(), Status> {
        let timeout = self.node.config.write_timeout;
        match group.add_learner(node, addr.to_string(), timeout).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let mut client = self.leader_client(e, forwarded)?;
                let req = self.forwarded_request(pb::AddLearnerRequest {
                    node_id: node,
                    addr: addr.to_string(),
                    group_ids: vec![group.id()],
                });
                client.add_learner(req).await.map(|_| ())
            }
        }
    }

    /// The data group a compaction names, checked.
    fn data_group(&self, id: u64) -> Result<&Arc<RaftGroup>, ServerError> {
        if id == palisade_shard::META_GROUP || !self.node.shard_map().has_group(id) {
            return Err(ServerError::UnknownGroup(id));
        }
        self.node.group(id)
    }
}

/// Fills in each replica's lag: entries its group's leader has committed
/// that the replica has not applied.
fn fill_lag(group: &mut pb::GroupStatus) {
    let Some(leader) = group
        .replicas
        .iter()
        .find(|r| r.node_id == group.leader_id && r.role == "leader")
        .cloned()
    else {
        return;
    };
    for r in &mut group.replicas {
        r.lag = leader.commit_index.saturating_sub(r.applied_index);
    }
    // Members that did not answer: what the leader knows it sent them.
    for p in &leader.progress {
        if !group.replicas.iter().any(|r| r.node_id == p.node_id) {
            group.replicas.push(pb::ReplicaStatus {
                node_id: p.node_id,
                role: "unreachable".into(),
                applied_index: p.matched_index,
                lag: leader.commit_index.saturating_sub(p.matched_index),
                ..Default::default()
            });
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::AddLearnerResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let req = request.into_inner();
        if req.node_id == 0 {
            return Err(ServerError::InvalidArgument("node_id must be at least 1".into()).into());
        }
        if crate::config::parse_peers(&format!("{}={}", req.node_id, req.addr)).is_err() {
            return Err(ServerError::InvalidArgument(format!(
                "addr {:?} is not HOST:PORT",
                req.addr
            ))
            .into());
        }
        let shard = self.node.shard_map();
        for g in &req.group_ids {
            let known = if forwarded {
                self.node.group(*g).is_ok()
            } else {
                shard.has_group(*g)
            };
            if !known {
                return Err(ServerError::UnknownGroup(*g).into());
            }
        }
        if let Some((g, _)) = self
            .node
            .groups()
            .iter()
            .find(|(_, g)| g.voter_ids().contains(&req.node_id))
        {
            return Err(ServerError::FailedPrecondition(format!(
                "node {} is a voter of group {g}; a voter cannot become a learner",
                req.node_id
            ))
            .into());
        }
        // The meta group first: it is where the cluster learns the node's
        // address (ClusterStatus lists the meta group's members).
        let groups: Vec<u64> = if forwarded {
            req.group_ids.clone()
        } else if req.group_ids.is_empty() {
            std::iter::once(palisade_shard::META_GROUP)
                .chain(shard.groups())
                .collect()
        } else {
            std::iter::once(palisade_shard::META_GROUP)
                .chain(req.group_ids.iter().copied())
                .collect()
        };
        for g in &groups {
            let group = self.node.group(*g)?;
            self.add_learner_to(group, req.node_id, &req.addr, forwarded)
                .await?;
        }
        tracing::info!(node = req.node_id, addr = %req.addr, ?groups, "learner added");
        Ok(Response::new(pb::AddLearnerResponse { group_ids: groups }))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let req = request.into_inner();
        let group = self.data_group(req.group_id)?;
        if req.revision == 0 {
            return Err(ServerError::InvalidArgument("revision must be at least 1".into()).into());
        }
        if !group.is_leader() {
            let err = GroupError::NotLeader {
                group: group.id(),
                leader: group.leader(),
            };
            let mut client = self.leader_client(err, forwarded)?;
            return client.compact(self.forwarded_request(req)).await;
        }
        let state = group.state();
        let revision_error = |source| ServerError::Revision {
            group: group.id(),
            source,
        };
        if req.revision > state.revision() {
            return Err(revision_error(StoreError::FutureRevision {
                requested: req.revision,
                current: state.revision(),
            })
            .into());
        }
        if req.revision <= state.compacted() {
            return Err(revision_error(StoreError::Compacted {
                requested: req.revision,
                oldest: state.compacted(),
            })
            .into());
        }
        let cmd = Command {
            request_id: None,
            op: CommandOp::Compact {
                revision: req.revision,
            },
        };
        let res = group
            .write(cmd, self.node.config.write_timeout)
            .await
            .map_err(ServerError::from)?;
        Ok(Response::new(pb::CompactResponse {
            header: Some(pb::ResponseHeader {
                node_id: self.node.id(),
                group_id: group.id(),
                revision: res.revision,
                ..Default::default()
            }),
            compact_revision: state.compacted(),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let nodes = self.node.cluster_nodes();
        let probes =
            futures::future::join_all(nodes.iter().map(|(id, addr)| self.probe(*id, addr))).await;
        let mut node_infos = Vec::new();
        let mut groups: BTreeMap<u64, pb::GroupStatus> = BTreeMap::new();
        for ((id, addr), probe) in nodes.iter().zip(probes) {
            let mut counters = (0, 0, 0, 0, 0);
            let (reachable, error) = match probe {
                Ok(status) => {
                    counters = (
                        status.flushes,
                        status.flush_waiters,
                        status.rss_bytes,
                        status.disk_bytes,
                        status.write_bytes,
                    );
                    for g in status.groups {
                        let entry = groups.entry(g.group_id).or_insert_with(|| pb::GroupStatus {
                            group_id: g.group_id,
                            ..Default::default()
                        });
                        if let Some(replica) = g.replica {
                            // The group's leader is the one a replica that
                            // *is* leader claims, at the highest term seen.
                            if replica.role == "leader" && replica.term >= entry.term {
                                entry.leader_id = replica.node_id;
                                entry.term = replica.term;
                            }
                            entry.replicas.push(replica);
                        }
                    }
                    (true, String::new())
                }
                Err(e) => (false, e),
            };
            node_infos.push(pb::NodeInfo {
                id: *id,
                addr: addr.clone(),
                reachable,
                error,
                flushes: counters.0,
                flush_waiters: counters.1,
                rss_bytes: counters.2,
                disk_bytes: counters.3,
                write_bytes: counters.4,
            });
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            header: Some(pb::ResponseHeader {
                node_id: self.node.id(),
                ..Default::default()
            }),
            data_groups: self.node.shard_map().data_groups() as u32,
            nodes: node_infos,
            groups: groups
                .into_values()
                .map(|mut g| {
                    fill_lag(&mut g);
                    g
                })
                .collect(),
        }))
    }
}
