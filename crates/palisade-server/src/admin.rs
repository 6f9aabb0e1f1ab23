//! The Admin service: cluster-wide status, gathered from every node.

use std::collections::BTreeMap;
use std::sync::Arc;

use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_server::Admin;
use palisade_proto::v1::peer_client::PeerClient;
use tonic::{Request, Response, Status};

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

#[tonic::async_trait]
impl Admin for AdminService {
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
            let mut counters = (0, 0);
            let (reachable, error) = match probe {
                Ok(status) => {
                    counters = (status.flushes, status.flush_waiters);
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
            });
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            header: Some(pb::ResponseHeader {
                node_id: self.node.id(),
                ..Default::default()
            }),
            data_groups: self.node.shard_map().data_groups() as u32,
            nodes: node_infos,
            groups: groups.into_values().collect(),
        }))
    }
}
