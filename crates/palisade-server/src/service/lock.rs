//! The Lease and Lock services.
//!
//! A lease lives with the hash slot of the key it was granted with (and
//! moves with it); locks held with it and keys attached to it must be in
//! that slot (use a hash tag). Lease and lock calls run on the leader of
//! the group that serves the slot: the router forwards them there.
//!
//! Lock, Unlock and fenced writes are Raft writes checked by the state
//! machine (see `palisade-group`); the fencing token is the revision of the
//! entry that took the lock, increasing per lock across holders, leader
//! changes and moves of its slot.

use std::sync::Arc;
use std::time::Duration;

use palisade_group::{Command, CommandOp, GroupError, GroupId, OpResult, RaftGroup, Rejection};
use palisade_proto::v1 as pb;
use palisade_proto::v1::lease_client::LeaseClient;
use palisade_proto::v1::lease_server::Lease;
use palisade_proto::v1::lock_client::LockClient;
use palisade_proto::v1::lock_server::Lock;
use palisade_shard::{LeaseHome, lease_home, slot_of};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::error::ServerError;
use crate::lease::{DEFAULT_LOCK_WAIT, MAX_LEASE_TTL, MAX_LOCK_WAIT, MIN_LEASE_TTL, term_of};
use crate::node::Node;
use crate::router::{Kind, RouteInfo};
use crate::service::kv::header;
use crate::validate;

pub struct LeaseService {
    node: Arc<Node>,
}

impl LeaseService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

pub struct LockService {
    node: Arc<Node>,
}

impl LockService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// The leader check every lease and lock call starts with.
fn must_lead(group: &RaftGroup) -> Result<(), ServerError> {
    if group.is_leader() {
        Ok(())
    } else {
        Err(ServerError::Group(GroupError::NotLeader {
            group: group.id(),
            leader: group.leader(),
        }))
    }
}

/// The group lease `id` lives in, by this node's map.
fn lease_group(node: &Node, id: u64, route: &RouteInfo) -> Result<GroupId, ServerError> {
    let not_ours =
        || ServerError::InvalidArgument(format!("{id} is not a lease id of this cluster"));
    match lease_home(id).ok_or_else(not_ours)? {
        LeaseHome::Slot(slot) => {
            if let Some((g, _)) = route.hint
                && node.group(g).is_some()
            {
                return Ok(g);
            }
            let map = node.map();
            if map.is_bootstrapped() {
                map.group_of_slot(slot).ok_or(ServerError::MapNotReady)
            } else {
                Err(ServerError::MapNotReady)
            }
        }
        LeaseHome::LegacyGroup(g) => {
            let map = node.map();
            let known = map.groups.contains_key(&g) || node.legacy_groups().is_some_and(|n| g <= n);
            if known { Ok(g) } else { Err(not_ours()) }
        }
    }
}

/// Lease `id`'s record, read after a ReadIndex round: only a confirmed
/// leader's view (and clock) counts — a deposed leader must not tell a
/// holder its lease was renewed, or how long it has left.
async fn confirmed_lease(
    node: &Node,
    group: &RaftGroup,
    id: u64,
) -> Result<palisade_storage::LeaseRecord, ServerError> {
    group.read_index(node.config.read_timeout).await?;
    group
        .state()
        .lease(id)
        .map_err(|e| ServerError::from_store(group.id(), e))?
        .ok_or(ServerError::Group(GroupError::Rejected(
            Rejection::LeaseNotFound { id },
        )))
}

/// Proposes `op` on `group` and returns its result, refusals as errors.
async fn propose(
    node: &Node,
    group: &RaftGroup,
    op: CommandOp,
) -> Result<palisade_group::CommandResult, ServerError> {
    let res = group
        .write(
            Command {
                request_id: None,
                op,
            },
            node.config.write_timeout,
        )
        .await?;
    match res.rejected {
        Some(r) => Err(ServerError::Group(GroupError::Rejected(r))),
        None => Ok(res),
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let ttl = Duration::from_millis(req.ttl_ms);
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
            return Err(ServerError::InvalidArgument(format!(
                "ttl_ms must be between {} and {}, got {}",
                MIN_LEASE_TTL.as_millis(),
                MAX_LEASE_TTL.as_millis(),
                req.ttl_ms
            ))
            .into());
        }
        if !req.key.is_empty() {
            validate::check_key(&self.node.config.limits, &req.key)?;
        }
        let node = &self.node;
        let group = node
            .group_for_key(&req.key, &route)
            .map_err(|e| node.to_status(e))?;
        let slot = slot_of(&req.key);
        let ttl_ms = req.ttl_ms;
        node.dispatch(
            group,
            Kind::Write,
            route,
            req.clone(),
            |g| async move {
                must_lead(&g)?;
                let term = term_of(&g);
                let res = propose(node, &g, CommandOp::LeaseGrantIn { ttl_ms, slot }).await?;
                let Some(OpResult::LeaseGranted { id, ttl_ms }) = res.results.first().cloned()
                else {
                    return Err(ServerError::FailedPrecondition(
                        "lease grant produced no lease".into(),
                    ));
                };
                node.lease_clock.renew(g.id(), term, id, ttl);
                Ok(pb::LeaseGrantResponse {
                    header: Some(header(node, &g, res.revision)),
                    lease_id: id,
                    ttl_ms,
                })
            },
            |c, r| async move { LeaseClient::new(c).lease_grant(r).await },
        )
        .await
    }

    async fn lease_keep_alive(
        &self,
        request: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let id = req.lease_id;
        let node = &self.node;
        let group = lease_group(node, id, &route).map_err(|e| node.to_status(e))?;
        node.dispatch(
            group,
            Kind::Read,
            route,
            req,
            |g| async move {
                must_lead(&g)?;
                let term = term_of(&g);
                let record = confirmed_lease(node, &g, id).await?;
                let ttl = Duration::from_millis(record.ttl_ms);
                node.lease_clock.renew(g.id(), term, id, ttl);
                Ok(pb::LeaseKeepAliveResponse {
                    header: Some(header(node, &g, g.state().revision())),
                    ttl_ms: record.ttl_ms,
                })
            },
            |c, r| async move { LeaseClient::new(c).lease_keep_alive(r).await },
        )
        .await
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let id = req.lease_id;
        let node = &self.node;
        let group = lease_group(node, id, &route).map_err(|e| node.to_status(e))?;
        node.dispatch(
            group,
            Kind::Write,
            route,
            req,
            |g| async move {
                must_lead(&g)?;
                let res = propose(node, &g, CommandOp::LeaseRevoke { id }).await?;
                Ok(pb::LeaseRevokeResponse {
                    header: Some(header(node, &g, res.revision)),
                })
            },
            |c, r| async move { LeaseClient::new(c).lease_revoke(r).await },
        )
        .await
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        let id = req.lease_id;
        let node = &self.node;
        let group = lease_group(node, id, &route).map_err(|e| node.to_status(e))?;
        node.dispatch(
            group,
            Kind::Read,
            route,
            req,
            |g| async move {
                must_lead(&g)?;
                let term = term_of(&g);
                let record = confirmed_lease(node, &g, id).await?;
                let remaining = node
                    .lease_clock
                    .remaining(g.id(), term, id)
                    .unwrap_or(Duration::from_millis(record.ttl_ms));
                Ok(pb::LeaseTimeToLiveResponse {
                    header: Some(header(node, &g, g.state().revision())),
                    granted_ttl_ms: record.ttl_ms,
                    remaining_ms: remaining.as_millis() as u64,
                    keys: record.keys.into_iter().collect(),
                    locks: record.locks.into_iter().collect(),
                })
            },
            |c, r| async move { LeaseClient::new(c).lease_time_to_live(r).await },
        )
        .await
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(
        &self,
        request: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.name)?;
        let node = &self.node;
        let group = node
            .group_for_key(&req.name, &route)
            .map_err(|e| node.to_status(e))?;
        crate::service::kv::check_lease_for_key(node, req.lease_id, &req.name, group)
            .map_err(|e| node.to_status(e))?;
        let wait = match req.wait_ms {
            0 => DEFAULT_LOCK_WAIT,
            ms => Duration::from_millis(ms).min(MAX_LOCK_WAIT),
        };
        let r = &req;
        node.dispatch(
            group,
            Kind::Write,
            route,
            req.clone(),
            |g| async move {
                let deadline = Instant::now() + wait;
                loop {
                    must_lead(&g)?;
                    // Propose only when the lock looks free (or ours):
                    // waiting callers poll the leader's local state, not the
                    // log.
                    let (held, _) = g
                        .state()
                        .lock(&r.name)
                        .map_err(|e| ServerError::from_store(g.id(), e))?;
                    let free = held.as_ref().is_none_or(|l| l.lease == r.lease_id);
                    if free {
                        let op = CommandOp::Lock {
                            name: r.name.clone(),
                            lease: r.lease_id,
                        };
                        match propose(node, &g, op).await {
                            Ok(res) => {
                                let Some(OpResult::LockAcquired { token, term }) =
                                    res.results.first()
                                else {
                                    return Err(ServerError::FailedPrecondition(
                                        "lock produced no token".into(),
                                    ));
                                };
                                return Ok(pb::LockResponse {
                                    header: Some(header(node, &g, res.revision)),
                                    token: Some(pb::FencingToken {
                                        token: *token,
                                        term: *term,
                                    }),
                                });
                            }
                            Err(ServerError::Group(GroupError::Rejected(
                                Rejection::LockHeld { .. },
                            ))) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if Instant::now() >= deadline {
                        let (lease, token) = held.map_or((0, 0), |l| (l.lease, l.token));
                        return Err(ServerError::LockHeld {
                            name: r.name.clone(),
                            lease,
                            token,
                            waited_ms: wait.as_millis() as u64,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            |c, r| async move { LockClient::new(c).lock(r).await },
        )
        .await
    }

    async fn unlock(
        &self,
        request: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.name)?;
        let node = &self.node;
        let group = node
            .group_for_key(&req.name, &route)
            .map_err(|e| node.to_status(e))?;
        let r = &req;
        node.dispatch(
            group,
            Kind::Write,
            route,
            req.clone(),
            |g| async move {
                must_lead(&g)?;
                let op = CommandOp::Unlock {
                    name: r.name.clone(),
                    token: r.token,
                };
                let res = propose(node, &g, op).await?;
                Ok(pb::UnlockResponse {
                    header: Some(header(node, &g, res.revision)),
                })
            },
            |c, r| async move { LockClient::new(c).unlock(r).await },
        )
        .await
    }

    async fn check_fence(
        &self,
        request: Request<pb::CheckFenceRequest>,
    ) -> Result<Response<pb::CheckFenceResponse>, Status> {
        let route = RouteInfo::of(request.metadata());
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.name)?;
        let node = &self.node;
        let group = node
            .group_for_key(&req.name, &route)
            .map_err(|e| node.to_status(e))?;
        let r = &req;
        node.dispatch(
            group,
            Kind::Read,
            route,
            req.clone(),
            |g| async move {
                must_lead(&g)?;
                g.read_index(node.config.read_timeout).await?;
                let (held, revision) = g
                    .state()
                    .lock(&r.name)
                    .map_err(|e| ServerError::from_store(g.id(), e))?;
                let current = held.map_or(0, |l| l.token);
                Ok(pb::CheckFenceResponse {
                    header: Some(header(node, &g, revision)),
                    valid: current != 0 && current == r.token,
                    current_token: current,
                })
            },
            |c, r| async move { LockClient::new(c).check_fence(r).await },
        )
        .await
    }
}
