//! The Admin service: the cluster map and status, nodes joining and
//! leaving, the group count, leader transfer, learners and compaction.
//!
//! Changes to the cluster's shape are map commands: they run on the meta
//! group's leader (the router forwards them there) and return once
//! *recorded*; the coordinator carries them out.

use std::collections::BTreeMap;
use std::sync::Arc;

use palisade_group::{Command, CommandOp, GroupError, RaftGroup, Rejection};
use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::admin_server::Admin;
use palisade_proto::v1::peer_client::PeerClient;
use palisade_shard::{ClusterMap, META_GROUP, MapCommand, MapResult, NodeKind, NodeState, Role};
use palisade_storage::StoreError;
use tonic::{Request, Response, Status};

use crate::coordinator::{propose_map_typed, transfer_leader};
use crate::error::ServerError;
use crate::node::Node;
use crate::router::{Kind, RouteInfo};

pub struct AdminService {
    node: Arc<Node>,
}

/// Runs `local` on the meta group's leader (forwarding there with `remote`).
macro_rules! on_meta_leader {
    ($self:ident, $request:ident, $local:expr, $remote:ident) => {{
        let route = RouteInfo::of($request.metadata());
        let req = $request.into_inner();
        let node = &$self.node;
        let r = &req;
        node.dispatch(
            META_GROUP,
            Kind::Write,
            route,
            Clone::clone(&req),
            |meta: Arc<RaftGroup>| async move {
                if !meta.is_leader() {
                    return Err(ServerError::Group(GroupError::NotLeader {
                        group: META_GROUP,
                        leader: meta.leader(),
                    }));
                }
                #[allow(clippy::redundant_closure_call)]
                ($local)(node, r).await
            },
            |c, q| async move { AdminClient::new(c).$remote(q).await },
        )
        .await
    }};
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    async fn probe(&self, id: u64, addr: &str) -> Result<pb::NodeStatusResponse, String> {
        if id == self.node.id() {
            return Ok(self.node.local_status().await);
        }
        let channel = self.node.channels.get(addr).map_err(|e| e.to_string())?;
        let mut request = Request::new(pb::NodeStatusRequest {});
        let timeout = self
            .node
            .peer_timeout()
            .min(std::time::Duration::from_secs(2));
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, PeerClient::new(channel).node_status(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => {
                self.node.channels.drop_channel(addr);
                Err(format!("{}: {}", status.code(), status.message()))
            }
            Err(_) => {
                self.node.channels.drop_channel(addr);
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}

/// A map command's result. The map's refusal is `FAILED_PRECONDITION`
/// (with its reason); a lost meta leadership or quorum stays retryable.
async fn change_map(node: &Arc<Node>, cmd: MapCommand) -> Result<MapResult, ServerError> {
    propose_map_typed(node, cmd).await.map_err(|e| match e {
        // The first map is not written yet (a cluster still starting):
        // retryable, unlike the map's other refusals.
        GroupError::Rejected(Rejection::Map(palisade_shard::MapError::NotBootstrapped)) => {
            ServerError::MapNotReady
        }
        other => ServerError::Group(other),
    })
}

fn node_state(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Joining => pb::NodeState::Joining,
        NodeState::Serving => pb::NodeState::Serving,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Removed => pb::NodeState::Removed,
    }
}

/// The map as the API shows it.
pub fn map_to_proto(map: &ClusterMap) -> pb::ClusterMap {
    let nodes = map
        .nodes
        .iter()
        .map(|(id, n)| {
            let (read_replica, read_groups) = match &n.kind {
                NodeKind::Voting => (false, Vec::new()),
                NodeKind::ReadReplica { groups } => (true, groups.clone()),
            };
            pb::MapNode {
                id: *id,
                addr: n.addr.clone(),
                region: n.region.clone(),
                zone: n.zone.clone(),
                state: node_state(n.state) as i32,
                read_replica,
                read_groups,
                incarnation: n.incarnation,
            }
        })
        .collect();
    let groups = map
        .groups
        .iter()
        .map(|(id, g)| pb::MapGroup {
            id: *id,
            epoch: g.epoch,
            replicas: g
                .replicas
                .iter()
                .map(|(r, rep)| pb::MapReplica {
                    replica_id: *r,
                    node_id: rep.node,
                    role: match rep.role {
                        Role::Voter => pb::ReplicaRole::Voter,
                        Role::Learner => pb::ReplicaRole::Learner,
                    } as i32,
                })
                .collect(),
            change: g.change.map(|c| change_text(&c)).unwrap_or_default(),
            slots: map.route.iter().filter(|x| *x == id).count() as u32,
        })
        .collect();
    let mut route = Vec::new();
    for (slot, g) in map.route.iter().enumerate() {
        match route.last_mut() {
            Some(pb::SlotRun {
                group_id, count, ..
            }) if group_id == g => *count += 1,
            _ => route.push(pb::SlotRun {
                first: slot as u32,
                count: 1,
                group_id: *g,
            }),
        }
    }
    pb::ClusterMap {
        cluster_id: map.cluster_id,
        epoch: map.epoch,
        replication: map.replication,
        target_groups: map.target_groups,
        nodes,
        groups,
        route,
        moving: map.moving.as_ref().map(|m| pb::SlotMove {
            id: m.id,
            from_group: m.from,
            to_group: m.to,
            slots: m.slots.ranges_text(),
            slot_count: m.slots.len() as u32,
            phase: m.phase.name().into(),
        }),
    }
}

fn change_text(c: &palisade_shard::ReplicaChange) -> String {
    let mut parts = Vec::new();
    if let Some(a) = c.add {
        parts.push(format!(
            "add {} {} on node {}",
            a.role.name(),
            a.replica,
            a.node
        ));
    }
    if let Some(r) = c.remove {
        parts.push(format!("remove {r}"));
    }
    if let Some(p) = c.promote {
        parts.push(format!("promote {p}"));
    }
    if let Some(d) = c.demote {
        parts.push(format!("demote {d}"));
    }
    parts.join(", ")
}

/// Fills in each replica's lag: entries its group's leader has committed
/// that the replica has not applied.
fn fill_lag(group: &mut pb::GroupStatus) {
    let leader_role = pb::RaftRole::Leader as i32;
    let Some(leader) = group
        .replicas
        .iter()
        .find(|r| r.node_id == group.leader_id && r.role == leader_role)
        .cloned()
    else {
        return;
    };
    for r in &mut group.replicas {
        r.lag = leader.commit_index.saturating_sub(r.applied_index);
    }
    // Members that did not answer: what the leader knows it sent them.
    for p in &leader.progress {
        if !group.replicas.iter().any(|r| r.replica_id == p.replica_id) {
            group.replicas.push(pb::ReplicaStatus {
                node_id: p.node_id,
                replica_id: p.replica_id,
                role: pb::RaftRole::Unreachable as i32,
                applied_index: p.matched_index,
                lag: leader.commit_index.saturating_sub(p.matched_index),
                ..Default::default()
            });
        }
    }
}

fn check_addr(addr: &str) -> Result<(), ServerError> {
    if crate::config::parse_peers(&format!("1={addr}")).is_err() {
        return Err(ServerError::InvalidArgument(format!(
            "addr {addr:?} is not HOST:PORT"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_cluster_map(
        &self,
        request: Request<pb::GetClusterMapRequest>,
    ) -> Result<Response<pb::GetClusterMapResponse>, Status> {
        let min = request.into_inner().min_epoch;
        let map = self
            .node
            .wait_map(min, std::time::Duration::from_secs(1))
            .await;
        if !map.is_bootstrapped() {
            return Err(self.node.to_status(ServerError::MapNotReady));
        }
        let mut leaders: BTreeMap<u64, u64> = BTreeMap::new();
        for (g, peer) in self.node.leaders.all() {
            if peer.node != 0 {
                leaders.insert(g, peer.node);
            }
        }
        for (g, group) in self.node.groups() {
            if let Some(p) = self.node.leader_hint(g)
                && p.node != 0
            {
                leaders.insert(g, p.node);
            }
            let _ = group;
        }
        Ok(Response::new(pb::GetClusterMapResponse {
            map: Some(map_to_proto(&map)),
            leaders: leaders
                .into_iter()
                .map(|(group_id, node_id)| pb::GroupLeader { group_id, node_id })
                .collect(),
        }))
    }

    async fn join_node(
        &self,
        request: Request<pb::JoinNodeRequest>,
    ) -> Result<Response<pb::JoinNodeResponse>, Status> {
        {
            let r = request.get_ref();
            check_addr(&r.addr)?;
            if r.node_id >= palisade_shard::FIRST_ADDED_REPLICA_ID {
                return Err(ServerError::InvalidArgument(format!(
                    "node ids must be below {}",
                    palisade_shard::FIRST_ADDED_REPLICA_ID
                ))
                .into());
            }
        }
        on_meta_leader!(
            self,
            request,
            |node: &Arc<Node>, r: &pb::JoinNodeRequest| {
                let cmd = MapCommand::RegisterNode {
                    id: r.node_id,
                    addr: r.addr.clone(),
                    region: r.region.clone(),
                    zone: r.zone.clone(),
                    kind: if r.read_replica {
                        NodeKind::ReadReplica {
                            groups: r.read_groups.clone(),
                        }
                    } else {
                        NodeKind::Voting
                    },
                };
                let node = node.clone();
                let offered = r.incarnation;
                async move {
                    let id = match change_map(&node, cmd).await? {
                        MapResult::Node(id) => id,
                        other => {
                            return Err(ServerError::FailedPrecondition(format!(
                                "registering the node gave {other:?}"
                            )));
                        }
                    };
                    let map = node.map();
                    let recorded = map.nodes.get(&id).map_or(0, |n| n.incarnation);
                    if offered != 0 && recorded != 0 && recorded != offered {
                        return Err(ServerError::FailedPrecondition(format!(
                            "node {id} already ran from another data directory (incarnation \
                             {recorded:#x}); this one ({offered:#x}) is new, so the node lost its \
                             state and must not come back under id {id}: remove it \
                             (`palisade node remove {id}`) and join without --id to get a new one"
                        )));
                    }
                    tracing::info!(
                        node = id,
                        "node registered; it joins as a meta learner first"
                    );
                    Ok(pb::JoinNodeResponse {
                        node_id: id,
                        cluster_id: map.cluster_id,
                        map: Some(map_to_proto(&map)),
                    })
                }
            },
            join_node
        )
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        on_meta_leader!(
            self,
            request,
            |node: &Arc<Node>, r: &pb::DrainNodeRequest| {
                let node = node.clone();
                let (id, dead) = (r.node_id, r.dead);
                async move {
                    let map = node.map();
                    let info = map
                        .nodes
                        .get(&id)
                        .ok_or_else(|| ServerError::UnknownNode(id))?;
                    if info.state != NodeState::Removed && info.state != NodeState::Draining {
                        change_map(
                            &node,
                            MapCommand::SetNodeState {
                                node: id,
                                state: NodeState::Draining,
                            },
                        )
                        .await?;
                        tracing::warn!(
                            node = id,
                            dead,
                            "draining node: its replicas move to the others"
                        );
                    }
                    let map = node.map();
                    Ok(pb::DrainNodeResponse {
                        state: map
                            .nodes
                            .get(&id)
                            .map_or(pb::NodeState::Unspecified, |n| node_state(n.state))
                            as i32,
                        map_epoch: map.epoch,
                    })
                }
            },
            drain_node
        )
    }

    async fn set_groups(
        &self,
        request: Request<pb::SetGroupsRequest>,
    ) -> Result<Response<pb::SetGroupsResponse>, Status> {
        let n = request.get_ref().groups;
        if n == 0 || u64::from(n) > palisade_shard::MAX_GROUPS {
            return Err(ServerError::InvalidArgument(format!(
                "groups must be between 1 and {}, got {n}",
                palisade_shard::MAX_GROUPS
            ))
            .into());
        }
        on_meta_leader!(
            self,
            request,
            |node: &Arc<Node>, r: &pb::SetGroupsRequest| {
                let node = node.clone();
                let groups = r.groups;
                async move {
                    change_map(&node, MapCommand::SetTargetGroups { groups }).await?;
                    Ok(pb::SetGroupsResponse {
                        groups,
                        map_epoch: node.map().epoch,
                    })
                }
            },
            set_groups
        )
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        {
            let r = request.get_ref();
            let map = self.node.map();
            let group = map
                .groups
                .get(&r.group_id)
                .ok_or(ServerError::UnknownGroup(r.group_id))?;
            let voter = group
                .replicas
                .values()
                .any(|rep| rep.node == r.node_id && rep.role == Role::Voter);
            if !voter {
                return Err(ServerError::FailedPrecondition(format!(
                    "node {} holds no voter of group {}",
                    r.node_id, r.group_id
                ))
                .into());
            }
        }
        on_meta_leader!(
            self,
            request,
            |node: &Arc<Node>, r: &pb::TransferLeaderRequest| {
                let node = node.clone();
                let (group, to) = (r.group_id, r.node_id);
                async move {
                    transfer_leader(&node, group, to).await.map_err(|e| {
                        ServerError::Group(GroupError::Membership { group, reason: e })
                    })?;
                    let term = node
                        .group(group)
                        .map_or(0, |g| g.raft().metrics().borrow().current_term);
                    Ok(pb::TransferLeaderResponse {
                        leader_id: to,
                        term,
                    })
                }
            },
            transfer_leader
        )
    }

    async fn move_replica(
        &self,
        request: Request<pb::MoveReplicaRequest>,
    ) -> Result<Response<pb::MoveReplicaResponse>, Status> {
        {
            let r = request.get_ref();
            if r.group_id == META_GROUP {
                return Err(ServerError::InvalidArgument(
                    "the meta group's replicas follow the nodes; drain a node instead".into(),
                )
                .into());
            }
        }
        on_meta_leader!(
            self,
            request,
            |node: &Arc<Node>, r: &pb::MoveReplicaRequest| {
                let node = node.clone();
                let (group, from, to) = (r.group_id, r.from_node, r.to_node);
                async move {
                    let map = node.map();
                    let info = map
                        .groups
                        .get(&group)
                        .ok_or(ServerError::UnknownGroup(group))?;
                    let replica = info
                        .replicas
                        .iter()
                        .find(|(_, rep)| rep.node == from && rep.role == Role::Voter)
                        .map(|(id, _)| *id)
                        .ok_or_else(|| {
                            ServerError::FailedPrecondition(format!(
                                "node {from} holds no voter of group {group}"
                            ))
                        })?;
                    let added = change_map(
                        &node,
                        MapCommand::BeginReplicaChange {
                            group,
                            add: Some((to, Role::Voter)),
                            remove: Some(replica),
                            promote: None,
                            demote: None,
                        },
                    )
                    .await?;
                    let MapResult::Replica(replica_id) = added else {
                        return Err(ServerError::FailedPrecondition(format!(
                            "recording the move gave {added:?}"
                        )));
                    };
                    let epoch = node.map().groups.get(&group).map_or(0, |g| g.epoch);
                    Ok(pb::MoveReplicaResponse {
                        replica_id,
                        group_epoch: epoch,
                    })
                }
            },
            move_replica
        )
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::AddLearnerResponse>, Status> {
        {
            let r = request.get_ref();
            if r.node_id == 0 {
                return Err(
                    ServerError::InvalidArgument("node_id must be at least 1".into()).into(),
                );
            }
            check_addr(&r.addr)?;
            let map = self.node.map();
            if let Some(g) = r.group_ids.iter().find(|g| {
                **g == META_GROUP || (map.is_bootstrapped() && !map.groups.contains_key(g))
            }) {
                return Err(ServerError::UnknownGroup(*g).into());
            }
            if let Some((g, _)) = map
                .groups
                .iter()
                .find(|(_, info)| info.voter_nodes().contains(&r.node_id))
            {
                return Err(ServerError::FailedPrecondition(format!(
                    "node {} is a voter of group {g}; a voter cannot become a learner",
                    r.node_id
                ))
                .into());
            }
        }
        on_meta_leader!(
            self,
            request,
            |node: &Arc<Node>, r: &pb::AddLearnerRequest| {
                let node = node.clone();
                let cmd = MapCommand::RegisterNode {
                    id: r.node_id,
                    addr: r.addr.clone(),
                    region: String::new(),
                    zone: String::new(),
                    kind: NodeKind::ReadReplica {
                        groups: r.group_ids.clone(),
                    },
                };
                let wanted = r.group_ids.clone();
                async move {
                    change_map(&node, cmd).await?;
                    let map = node.map();
                    let groups = std::iter::once(META_GROUP)
                        .chain(
                            map.data_groups()
                                .filter(|g| wanted.is_empty() || wanted.contains(g)),
                        )
                        .collect();
                    Ok(pb::AddLearnerResponse { group_ids: groups })
                }
            },
            add_learner
        )
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let map = self.node.map();
        let known =
            map.groups.contains_key(&req.group_id) || self.node.group(req.group_id).is_some();
        if req.group_id == META_GROUP || !known {
            return Err(ServerError::UnknownGroup(req.group_id).into());
        }
        if req.revision == 0 {
            return Err(ServerError::InvalidArgument("revision must be at least 1".into()).into());
        }
        let node = &self.node;
        let r = &req;
        node.dispatch(
            req.group_id,
            Kind::Write,
            route,
            Clone::clone(&req),
            |group| async move {
                if !group.is_leader() {
                    return Err(ServerError::Group(GroupError::NotLeader {
                        group: group.id(),
                        leader: group.leader(),
                    }));
                }
                let state = group.state();
                let revision_error = |source| ServerError::Revision {
                    group: group.id(),
                    source,
                };
                if r.revision > state.revision() {
                    return Err(revision_error(StoreError::FutureRevision {
                        requested: r.revision,
                        current: state.revision(),
                    }));
                }
                if r.revision <= state.compacted() {
                    return Err(revision_error(StoreError::Compacted {
                        requested: r.revision,
                        oldest: state.compacted(),
                    }));
                }
                let cmd = Command {
                    request_id: None,
                    op: CommandOp::Compact {
                        revision: r.revision,
                    },
                };
                let res = group.write(cmd, node.config.write_timeout).await?;
                Ok(pb::CompactResponse {
                    header: Some(pb::ResponseHeader {
                        node_id: node.id(),
                        group_id: group.id(),
                        revision: res.revision,
                        ..Default::default()
                    }),
                    compact_revision: state.compacted(),
                })
            },
            |c, q| async move { AdminClient::new(c).compact(q).await },
        )
        .await
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let map = self.node.map();
        let nodes = self.node.cluster_nodes();
        let probes =
            futures::future::join_all(nodes.iter().map(|(id, addr)| self.probe(*id, addr))).await;
        let mut node_infos = Vec::new();
        let mut groups: BTreeMap<u64, pb::GroupStatus> = BTreeMap::new();
        for ((id, addr), probe) in nodes.iter().zip(probes) {
            let mut info = pb::NodeInfo {
                id: *id,
                addr: addr.clone(),
                ..Default::default()
            };
            if let Some(n) = map.nodes.get(id) {
                info.state = node_state(n.state) as i32;
                info.region = n.region.clone();
                info.zone = n.zone.clone();
                info.read_replica = n.is_read_replica();
            }
            match probe {
                Ok(status) => {
                    info.reachable = true;
                    info.flushes = status.flushes;
                    info.flush_waiters = status.flush_waiters;
                    info.rss_bytes = status.rss_bytes;
                    info.disk_bytes = status.disk_bytes;
                    info.write_bytes = status.write_bytes;
                    info.disk_free_bytes = status.disk_free_bytes;
                    info.disk_full = status.disk_full;
                    for g in status.groups {
                        let entry = groups.entry(g.group_id).or_insert_with(|| pb::GroupStatus {
                            group_id: g.group_id,
                            ..Default::default()
                        });
                        if let Some(replica) = g.replica {
                            // The group's leader is the one a replica that
                            // *is* leader claims, at the highest term seen.
                            if replica.role == pb::RaftRole::Leader as i32
                                && replica.term >= entry.term
                            {
                                entry.leader_id = replica.node_id;
                                entry.term = replica.term;
                            }
                            entry.replicas.push(replica);
                        }
                    }
                }
                Err(e) => info.error = e,
            }
            node_infos.push(info);
        }
        let data_groups = if map.is_bootstrapped() {
            map.data_groups().count()
        } else {
            self.node.legacy_groups().unwrap_or(0) as usize
        };
        Ok(Response::new(pb::ClusterStatusResponse {
            header: Some(pb::ResponseHeader {
                node_id: self.node.id(),
                map_epoch: map.epoch,
                ..Default::default()
            }),
            data_groups: data_groups as u32,
            nodes: node_infos,
            groups: groups
                .into_values()
                .map(|mut g| {
                    fill_lag(&mut g);
                    if let Some(info) = map.groups.get(&g.group_id) {
                        g.epoch = info.epoch;
                        g.slots = map.route.iter().filter(|x| **x == g.group_id).count() as u32;
                    }
                    g
                })
                .collect(),
            map: map.is_bootstrapped().then(|| map_to_proto(&map)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_shard::SLOTS;

    #[test]
    fn the_route_is_sent_as_runs_covering_every_slot() {
        let nodes: BTreeMap<u64, String> = (1..=3).map(|i| (i, format!("n{i}:1"))).collect();
        let mut map = ClusterMap::bootstrap(1, &nodes, 2, 3).unwrap();
        for s in 0..100 {
            map.route[s] = 1;
        }
        let p = map_to_proto(&map);
        assert_eq!(p.route.iter().map(|r| r.count).sum::<u32>(), SLOTS as u32);
        assert_eq!(p.route[0].count, 101, "slots 0..=100 are group 1");
        let g1 = p.groups.iter().find(|g| g.id == 1).unwrap();
        assert_eq!(g1.slots, 100 + (SLOTS as u32 - 100).div_ceil(2));
    }
}
