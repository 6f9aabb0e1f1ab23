//! Request routing: which group a request belongs to, and whether it runs
//! here or one hop away at that group's leader. Every service (Kv, Lease,
//! Lock, Admin) goes through [`Node::dispatch`]; there is one forward path and
//! one rule for what a failed forward means ([`is_transport_failure`]).
//!
//! 1. **Which group.** A key's slot is routed by the node's copy of the
//!    cluster map. A request may carry a route hint
//!    (`x-palisade-route: GROUP:EPOCH`, set by the client library and by
//!    forwarding nodes): when this node hosts the hinted group, the request
//!    runs there, whatever this node's (maybe older) map says — the group's
//!    own ownership record is the authority, and a group that does not serve
//!    the key refuses it (`WrongGroup`). A hint naming a group epoch newer
//!    than this node knows, for a group it does not host, is refused with
//!    `EpochMismatch` rather than forwarded by a stale map.
//! 2. **Where.** If this node hosts a replica of the group, the service's
//!    local handler runs (it may answer `NotLeader`, e.g. a write on a
//!    follower). Otherwise, or on `NotLeader` with a leader hint, the request
//!    is forwarded once, marked `x-palisade-forwarded`; a node that receives a
//!    forwarded request never forwards it again (it answers with its hint), so
//!    requests never loop.
//! 3. **What a failure means.** A forwarded write whose call failed in
//!    transit may have applied: `UnknownOutcome`. A read: `NotLeader`
//!    (retryable). An answer from the other node goes back as it is.
//!
//! A request refused with `WrongGroup` naming the slot's new owner is
//! re-routed there once before the refusal goes back to the client.

use std::future::Future;
use std::sync::Arc;

use palisade_group::{GroupError, GroupId, RaftGroup};
use palisade_shard::{ClusterMap, NodeId, Role};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::{ServerError, is_transport_failure, not_leader_status, unknown_outcome_status};
use crate::node::Node;

/// Metadata header marking a request forwarded by another node.
pub const FORWARDED: &str = "x-palisade-forwarded";
/// Metadata header naming the group (and its map epoch) a request was
/// routed to: `GROUP:EPOCH`.
pub const ROUTE: &str = "x-palisade-route";

/// Whether a request changes state (its failure in transit leaves the
/// outcome unknown) or only reads (safe to report as unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

/// What the caller said about routing, from the request metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteInfo {
    pub forwarded: bool,
    /// The group and its map epoch the sender routed to.
    pub hint: Option<(GroupId, u64)>,
}

impl RouteInfo {
    pub fn of(metadata: &MetadataMap) -> Self {
        let hint = metadata
            .get(ROUTE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(':'))
            .and_then(|(g, e)| Some((g.parse().ok()?, e.parse().ok()?)));
        Self {
            forwarded: metadata.contains_key(FORWARDED),
            hint,
        }
    }
}

/// A node to send a request to.
#[derive(Debug, Clone)]
pub struct Peer {
    pub node: NodeId,
    pub addr: String,
}

impl Node {
    /// The group a request for `key` runs in (see the module doc).
    pub(crate) fn group_for_key(
        &self,
        key: &[u8],
        route: &RouteInfo,
    ) -> Result<GroupId, ServerError> {
        // A removed node says so first (typed: the client moves on), not
        // that its copy of the map is behind — it never catches up.
        self.check_serving()?;
        let map = self.map();
        if let Some((group, epoch)) = route.hint {
            if self.registry.get(group).is_some() {
                return Ok(group);
            }
            // A group this map has dropped (ids are never reused): the
            // sender's map is the older one; route by ours.
            let dropped = map.is_bootstrapped()
                && !map.groups.contains_key(&group)
                && group < map.next_group_id;
            let known = map.groups.get(&group).map_or(0, |g| g.epoch);
            if epoch > known && !dropped {
                return Err(ServerError::EpochMismatch {
                    group,
                    request_epoch: epoch,
                    current_epoch: known,
                });
            }
        }
        self.map_group_for_key(&map, key)
    }

    /// The group the map routes `key` to; before the map exists, the
    /// layout of a data directory from before the map.
    pub(crate) fn map_group_for_key(
        &self,
        map: &ClusterMap,
        key: &[u8],
    ) -> Result<GroupId, ServerError> {
        if map.is_bootstrapped() {
            return map.group_for_key(key).ok_or(ServerError::MapNotReady);
        }
        match self.legacy_groups() {
            Some(n) if n > 0 => Ok(1 + u64::from(palisade_shard::slot_of(key)) % n),
            _ => Err(ServerError::MapNotReady),
        }
    }

    /// Runs a request for `group`: `local` on this node's replica when it
    /// hosts one, else `remote` one hop away (see the module doc).
    pub(crate) async fn dispatch<Req, Resp, L, LF, R, RF>(
        &self,
        group: GroupId,
        kind: Kind,
        route: RouteInfo,
        req: Req,
        mut local: L,
        remote: R,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        L: FnMut(Arc<RaftGroup>) -> LF,
        LF: Future<Output = Result<Resp, ServerError>>,
        R: Fn(Channel, Request<Req>) -> RF,
        RF: Future<Output = Result<Response<Resp>, Status>>,
    {
        tracing::trace!(
            node = self.id(),
            group,
            forwarded = route.forwarded,
            "dispatching"
        );
        self.check_serving().map_err(|e| self.to_status(e))?;
        let mut group = group;
        // The refusal that re-routed the request, returned if the re-route
        // goes nowhere (this node's map may not know the new owner yet).
        let mut refused: Option<ServerError> = None;
        loop {
            let Some(replica) = self.registry.get(group) else {
                if route.forwarded {
                    if let Some(e) = refused {
                        return Err(self.to_status(e));
                    }
                    return Err(not_leader_status(
                        group,
                        self.leader_hint(group).map(|p| (p.node, Some(p.addr))),
                        format!("node {} does not host group {group}", self.id()),
                    ));
                }
                let peer = match (self.pick_peer(group), refused) {
                    (Ok(p), _) => p,
                    (Err(_), Some(e)) => return Err(self.to_status(e)),
                    (Err(e), None) => return Err(self.to_status(e)),
                };
                tracing::debug!(node = self.id(), group, to = peer.node, addr = %peer.addr, "forwarding to a node of the group");
                return self.forward(group, &peer, kind, req, &remote).await;
            };
            let err = match local(replica.clone()).await {
                Ok(resp) => return Ok(Response::new(resp)),
                Err(e) => e,
            };
            tracing::debug!(node = self.id(), group, error = %err, forwarded = route.forwarded, "refused here");
            if let Some(owner) = err.moved_to()
                && refused.is_none()
                && owner != group
            {
                group = owner;
                refused = Some(err);
                continue;
            }
            if let ServerError::Group(GroupError::NotLeader {
                leader: Some((leader, Some(addr))),
                ..
            }) = &err
                && *leader != replica.replica_id()
                && !route.forwarded
            {
                let node = self.map().node_of(group, *leader).unwrap_or(0);
                let peer = Peer {
                    node,
                    addr: addr.clone(),
                };
                tracing::debug!(node = self.id(), group, to = node, %addr, "forwarding to the leader");
                return self.forward(group, &peer, kind, req, &remote).await;
            }
            return Err(self.to_status(err));
        }
    }

    /// Sends `req` one hop to `peer` for `group`.
    async fn forward<Req, Resp, R, RF>(
        &self,
        group: GroupId,
        peer: &Peer,
        kind: Kind,
        req: Req,
        remote: &R,
    ) -> Result<Response<Resp>, Status>
    where
        R: Fn(Channel, Request<Req>) -> RF,
        RF: Future<Output = Result<Response<Resp>, Status>>,
    {
        let (channel, dial) = self.channels.get_tagged(&peer.addr).map_err(|e| {
            Status::internal(format!(
                "bad address {} of node {}: {e}",
                peer.addr, peer.node
            ))
        })?;
        let mut request = Request::new(req);
        let md = request.metadata_mut();
        md.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        let epoch = self.map().groups.get(&group).map_or(0, |g| g.epoch);
        if let Ok(v) = format!("{group}:{epoch}").parse() {
            md.insert(ROUTE, v);
        }
        let timeout = self.peer_timeout();
        request.set_timeout(timeout);
        let mut watch = ForwardWatch {
            node: self,
            addr: &peer.addr,
            dial,
            started: tokio::time::Instant::now(),
            done: false,
        };
        let outcome = tokio::time::timeout(timeout, remote(channel, request)).await;
        watch.done = true;
        match outcome {
            Ok(Ok(resp)) => {
                if peer.node != 0 {
                    self.leaders.remember(group, peer.clone());
                }
                Ok(resp)
            }
            Ok(Err(status)) if !is_transport_failure(&status) => {
                // The other node answered for itself.
                if let Some(palisade_proto::v1::error_detail::Kind::NotLeader(nl)) =
                    crate::error::error_detail(&status)
                {
                    // A hint naming the node just asked (which does not
                    // lead) or this one teaches nothing.
                    let useless = nl.leader_id == peer.node
                        || nl.leader_id == self.id()
                        || nl.leader_addr == peer.addr;
                    if nl.leader_id != 0 && !nl.leader_addr.is_empty() && !useless {
                        self.leaders.remember(
                            group,
                            Peer {
                                node: nl.leader_id,
                                addr: nl.leader_addr.clone(),
                            },
                        );
                    } else {
                        self.leaders.forget(group);
                    }
                }
                Err(status)
            }
            failed => {
                tracing::debug!(
                    node = self.id(),
                    group,
                    to = peer.node,
                    "forward failed in transit"
                );
                self.channels.drop_dial(&peer.addr, dial);
                self.leaders.forget(group);
                let why = match failed {
                    Ok(Err(status)) => status.message().to_string(),
                    _ => "no reply in time".into(),
                };
                let msg = format!(
                    "forwarding to node {} ({}) for group {group} failed: {why}",
                    peer.node, peer.addr
                );
                Err(match kind {
                    Kind::Write => unknown_outcome_status(group, msg),
                    Kind::Read => not_leader_status(group, None, msg),
                })
            }
        }
    }

    /// Where to send a request for a group this node does not host: its
    /// last known leader, else a voter of the map (which forwards no
    /// further, but answers with its leader hint).
    pub(crate) fn pick_peer(&self, group: GroupId) -> Result<Peer, ServerError> {
        if let Some(p) = self.leader_hint(group) {
            return Ok(p);
        }
        let map = self.map();
        let info = map.groups.get(&group).ok_or(if map.is_bootstrapped() {
            ServerError::UnknownGroup(group)
        } else {
            ServerError::MapNotReady
        })?;
        // Rotate over the voters so repeated misses spread.
        let voters: Vec<NodeId> = info
            .replicas
            .values()
            .filter(|r| r.role == Role::Voter && r.node != self.id())
            .map(|r| r.node)
            .collect();
        let pick = self.leaders.next_probe() % voters.len().max(1);
        voters
            .get(pick)
            .and_then(|n| {
                Some(Peer {
                    node: *n,
                    addr: map.addr_of(*n)?.to_string(),
                })
            })
            .ok_or_else(|| {
                ServerError::Group(GroupError::NotLeader {
                    group,
                    leader: None,
                })
            })
    }

    /// The leader of `group` this node knows of: its own replica's view, or
    /// what forwarding taught it.
    pub(crate) fn leader_hint(&self, group: GroupId) -> Option<Peer> {
        if let Some(g) = self.registry.get(group)
            && let Some((replica, Some(addr))) = g.leader()
        {
            let node = self.map().node_of(group, replica).unwrap_or(0);
            return Some(Peer { node, addr });
        }
        // What forwarding learned, unless it names this node: it was
        // learned while this node hosted the group, which it no longer
        // does (forwarding to itself would only bounce back).
        self.leaders
            .get(group)
            .filter(|p| p.node != self.id() && p.addr != self.config.advertise_addr())
    }

    /// Maps an error to its status; leader hints name nodes (not replica
    /// ids), as the API documents.
    pub(crate) fn to_status(&self, err: ServerError) -> Status {
        let err = match err {
            ServerError::Group(GroupError::NotLeader {
                group,
                leader: Some((replica, addr)),
            }) => {
                let node = self.map().node_of(group, replica).unwrap_or(replica);
                ServerError::Group(GroupError::NotLeader {
                    group,
                    leader: Some((node, addr)),
                })
            }
            ServerError::WrongGroup {
                slot,
                group,
                owner,
                map_epoch: 0,
            } => ServerError::WrongGroup {
                slot,
                group,
                owner,
                map_epoch: self.map().epoch,
            },
            // Member ids are replica ids; the API speaks of nodes.
            ServerError::Group(GroupError::DiskFull { group, replicas }) => {
                let map = self.map();
                ServerError::Group(GroupError::DiskFull {
                    group,
                    replicas: replicas
                        .into_iter()
                        .map(|r| map.node_of(group, r).unwrap_or(r))
                        .collect(),
                })
            }
            other => other,
        };
        err.into()
    }
}

/// How long a forward may be in flight before its caller giving up on it
/// counts as a sign that the connection is stuck.
const STUCK_FORWARD: std::time::Duration = std::time::Duration::from_secs(1);

/// Watches one forward: if the caller gives up on it (the request future
/// is dropped, e.g. on the client's own deadline) after it was in flight
/// for [`STUCK_FORWARD`], the channel to that peer is dropped, so the next
/// forward dials afresh. Without this, a connection that stopped
/// delivering (frames lost across a partition) would be kept for as long
/// as every caller's deadline is shorter than the forward's own timeout,
/// whose expiry is what otherwise drops it.
struct ForwardWatch<'a> {
    node: &'a Node,
    addr: &'a str,
    /// The dial of the channel used: a channel dialed since is kept.
    dial: u64,
    started: tokio::time::Instant,
    done: bool,
}

impl Drop for ForwardWatch<'_> {
    fn drop(&mut self) {
        if !self.done && self.started.elapsed() >= STUCK_FORWARD {
            tracing::debug!(
                node = self.node.id(),
                addr = self.addr,
                "abandoned forward: redialing next time"
            );
            self.node.channels.drop_dial(self.addr, self.dial);
        }
    }
}

/// What forwarding learned about group leaders (node and address), for
/// groups this node does not host.
#[derive(Default)]
pub struct LeaderCache {
    leaders: std::sync::Mutex<std::collections::BTreeMap<GroupId, Peer>>,
    probes: std::sync::atomic::AtomicUsize,
}

impl LeaderCache {
    pub fn get(&self, group: GroupId) -> Option<Peer> {
        self.lock().get(&group).cloned()
    }

    pub fn remember(&self, group: GroupId, peer: Peer) {
        self.lock().insert(group, peer);
    }

    pub fn forget(&self, group: GroupId) {
        self.lock().remove(&group);
    }

    /// Every known leader, by group.
    pub fn all(&self) -> Vec<(GroupId, Peer)> {
        self.lock().iter().map(|(g, p)| (*g, p.clone())).collect()
    }

    fn next_probe(&self) -> usize {
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<GroupId, Peer>> {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_headers_parse() {
        let mut md = MetadataMap::new();
        assert!(!RouteInfo::of(&md).forwarded);
        md.insert(FORWARDED, "1".parse().unwrap());
        md.insert(ROUTE, "7:12".parse().unwrap());
        let r = RouteInfo::of(&md);
        assert!(r.forwarded);
        assert_eq!(r.hint, Some((7, 12)));
        md.insert(ROUTE, "garbage".parse().unwrap());
        assert_eq!(RouteInfo::of(&md).hint, None);
    }
}
