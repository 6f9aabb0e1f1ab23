//! The Lease and Lock services, and the leader's lease clock.
//!
//! A lease lives in one data group. Its record (TTL, attached keys, locks
//! held with it) is replicated state; its *deadline* is not: only the group
//! leader measures time, on its monotonic clock, in a [`LeaseClock`]. When a
//! deadline passes, the leader proposes `LeaseRevoke` (a Raft write), so
//! every replica ends the lease at the same log position. A node that
//! becomes leader starts every lease's deadline afresh (now + TTL), so a
//! leader change never shortens a holder's time.
//!
//! Lock, Unlock and fenced writes are Raft writes checked by the state
//! machine (see `palisade-group`); the fencing token is the log index of the
//! entry that took the lock. Lease and lock calls run on the group leader:
//! any other node forwards them there one hop (like Kv requests), or answers
//! `UNAVAILABLE` with a leader hint when it knows no leader.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_group::{Command, CommandOp, GroupError, OpResult, RaftGroup, Rejection, lease_group};
use palisade_proto::v1 as pb;
use palisade_proto::v1::lease_client::LeaseClient;
use palisade_proto::v1::lease_server::Lease;
use palisade_proto::v1::lock_client::LockClient;
use palisade_proto::v1::lock_server::Lock;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::error::{ServerError, error_detail, not_leader_status, unknown_outcome_status};
use crate::kv::FORWARDED;
use crate::node::Node;
use crate::validate;

/// Shortest lease TTL accepted: shorter than a few election timeouts would
/// expire leases during an ordinary failover.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// Longest lease TTL accepted.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default and maximum time a Lock call waits for the lock.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);
const MAX_LOCK_WAIT: Duration = Duration::from_secs(60);
/// How often the leader checks lease deadlines.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Lease deadlines of the groups this node leads, per group.
#[derive(Default)]
pub struct LeaseClock {
    groups: Mutex<BTreeMap<u64, GroupDeadlines>>,
}

struct GroupDeadlines {
    /// The term these deadlines were measured in; a new term starts afresh.
    term: u64,
    deadlines: BTreeMap<u64, Instant>,
}

impl LeaseClock {
    fn with<T>(
        &self,
        group: u64,
        term: u64,
        f: impl FnOnce(&mut BTreeMap<u64, Instant>) -> T,
    ) -> T {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let entry = groups.entry(group).or_insert_with(|| GroupDeadlines {
            term,
            deadlines: BTreeMap::new(),
        });
        if entry.term != term {
            entry.term = term;
            entry.deadlines.clear();
        }
        f(&mut entry.deadlines)
    }

    fn forget(&self, group: u64) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }

    /// Restarts lease `id`'s TTL.
    fn renew(&self, group: u64, term: u64, id: u64, ttl: Duration) {
        self.with(group, term, |d| d.insert(id, Instant::now() + ttl));
    }

    /// Time left on lease `id`, if this node tracks it.
    fn remaining(&self, group: u64, term: u64, id: u64) -> Option<Duration> {
        self.with(group, term, |d| {
            d.get(&id)
                .map(|t| t.saturating_duration_since(Instant::now()))
        })
    }
}

fn term_of(group: &RaftGroup) -> u64 {
    group.raft().metrics().borrow().current_term
}

/// One expiry pass over a group this node leads: track every lease in the
/// state (new ones get a full TTL from now), drop ended ones, and revoke
/// those whose deadline passed.
async fn expire_leases(node: &Node, group: &RaftGroup) {
    if !group.is_leader() {
        node.lease_clock.forget(group.id());
        return;
    }
    let term = term_of(group);
    let Ok(leases) = group.state().leases() else {
        return;
    };
    let now = Instant::now();
    let expired: Vec<u64> = node.lease_clock.with(group.id(), term, |deadlines| {
        deadlines.retain(|id, _| leases.iter().any(|(l, _)| l == id));
        for (id, record) in &leases {
            deadlines
                .entry(*id)
                .or_insert_with(|| now + Duration::from_millis(record.ttl_ms));
        }
        deadlines
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| *id)
            .collect()
    });
    for id in expired {
        let cmd = Command {
            request_id: None,
            op: CommandOp::LeaseRevoke { id },
        };
        match group.write(cmd, node.config.write_timeout).await {
            Ok(_) => tracing::info!(group = group.id(), lease = id, "lease expired"),
            Err(e) => {
                tracing::debug!(group = group.id(), lease = id, error = %e, "lease expiry not committed")
            }
        }
    }
}

/// Runs lease expiry for every data group this node leads, until the node
/// is dropped.
pub(crate) fn spawn_lease_expiry(node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            for id in node.shard_map().groups() {
                if let Ok(group) = node.group(id) {
                    expire_leases(&node, group).await;
                }
            }
        }
    });
}

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

fn header(node: &Node, group: &RaftGroup, revision: u64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        node_id: node.id(),
        group_id: group.id(),
        revision,
        term: term_of(group),
        ..Default::default()
    })
}

fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

/// Sends `req` one hop to `group`'s leader when this node does not lead it
/// and knows who does; `None`: handle it here (a forwarded call always is).
/// A failure in transit leaves a write's outcome unknown.
async fn relay<Req, Resp, F, Fut>(
    node: &Node,
    group: &RaftGroup,
    forwarded: bool,
    write: bool,
    req: &Req,
    timeout: Duration,
    call: F,
) -> Option<Result<Response<Resp>, Status>>
where
    Req: Clone,
    F: FnOnce(Channel, Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
{
    if forwarded || group.is_leader() {
        return None;
    }
    let (id, Some(addr)) = group.leader()? else {
        return None;
    };
    if id == node.id() {
        return None;
    }
    let channel = node.channels.get(id, &addr).ok()?;
    let mut request = Request::new(req.clone());
    request
        .metadata_mut()
        .insert(FORWARDED, "1".parse().expect("static header"));
    request.set_timeout(timeout);
    Some(
        match tokio::time::timeout(timeout, call(channel, request)).await {
            Ok(Ok(resp)) => Ok(resp),
            // The leader's own answers (including its errors) go back as they are.
            Ok(Err(status))
                if error_detail(&status).is_some()
                    || !matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) =>
            {
                Err(status)
            }
            failed => {
                node.channels.drop_channel(id);
                let why = match failed {
                    Ok(Err(status)) => status.message().to_string(),
                    _ => "no reply in time".into(),
                };
                let msg = format!(
                    "forwarding to leader {id} of group {} failed: {why}",
                    group.id()
                );
                Err(if write {
                    unknown_outcome_status(group.id(), msg)
                } else {
                    not_leader_status(group.id(), Some((id, Some(addr))), msg)
                })
            }
        },
    )
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

/// The group lease `id` lives in, checked.
fn lease_home(node: &Node, id: u64) -> Result<&Arc<RaftGroup>, ServerError> {
    let g = lease_group(id);
    if id == 0 || g == palisade_shard::META_GROUP || !node.shard_map().has_group(g) {
        return Err(ServerError::InvalidArgument(format!(
            "{id} is not a lease id of this cluster"
        )));
    }
    node.group(g)
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
        .lease(id)?
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
        let forwarded = is_forwarded(&request);
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
        let group = if req.key.is_empty() {
            self.node.group(1)?
        } else {
            validate::check_key(&self.node.config.limits, &req.key)?;
            self.node.group_for_key(&req.key)?
        };
        let timeout = self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            true,
            &req,
            timeout,
            |c, r| async move { LeaseClient::new(c).lease_grant(r).await },
        )
        .await
        {
            return r;
        }
        must_lead(group)?;
        let term = term_of(group);
        let res = propose(
            &self.node,
            group,
            CommandOp::LeaseGrant { ttl_ms: req.ttl_ms },
        )
        .await?;
        let Some(OpResult::LeaseGranted { id, ttl_ms }) = res.results.first().cloned() else {
            return Err(Status::internal("lease grant produced no lease"));
        };
        self.node.lease_clock.renew(group.id(), term, id, ttl);
        Ok(Response::new(pb::LeaseGrantResponse {
            header: header(&self.node, group, res.revision),
            lease_id: id,
            ttl_ms,
        }))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let id = req.lease_id;
        let group = lease_home(&self.node, id)?;
        let timeout = self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            false,
            &req,
            timeout,
            |c, r| async move { LeaseClient::new(c).lease_keep_alive(r).await },
        )
        .await
        {
            return r;
        }
        must_lead(group)?;
        let term = term_of(group);
        let record = confirmed_lease(&self.node, group, id).await?;
        let ttl = Duration::from_millis(record.ttl_ms);
        self.node.lease_clock.renew(group.id(), term, id, ttl);
        Ok(Response::new(pb::LeaseKeepAliveResponse {
            header: header(&self.node, group, group.state().revision()),
            ttl_ms: record.ttl_ms,
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let id = req.lease_id;
        let group = lease_home(&self.node, id)?;
        let timeout = self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            true,
            &req,
            timeout,
            |c, r| async move { LeaseClient::new(c).lease_revoke(r).await },
        )
        .await
        {
            return r;
        }
        must_lead(group)?;
        let res = propose(&self.node, group, CommandOp::LeaseRevoke { id }).await?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: header(&self.node, group, res.revision),
        }))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let id = req.lease_id;
        let group = lease_home(&self.node, id)?;
        let timeout = self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            false,
            &req,
            timeout,
            |c, r| async move { LeaseClient::new(c).lease_time_to_live(r).await },
        )
        .await
        {
            return r;
        }
        must_lead(group)?;
        let term = term_of(group);
        let record = confirmed_lease(&self.node, group, id).await?;
        let remaining = self
            .node
            .lease_clock
            .remaining(group.id(), term, id)
            .unwrap_or(Duration::from_millis(record.ttl_ms));
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: header(&self.node, group, group.state().revision()),
            granted_ttl_ms: record.ttl_ms,
            remaining_ms: remaining.as_millis() as u64,
            keys: record.keys.into_iter().collect(),
            locks: record.locks.into_iter().collect(),
        }))
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(
        &self,
        request: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.name)?;
        let group = self.node.group_for_key(&req.name)?;
        let home = lease_home(&self.node, req.lease_id)?;
        if home.id() != group.id() {
            return Err(ServerError::InvalidArgument(format!(
                "lease {} lives in group {} but lock {:?} is in group {}: grant the lease with the lock's name as its key",
                req.lease_id,
                home.id(),
                String::from_utf8_lossy(&req.name),
                group.id()
            ))
            .into());
        }
        let wait = match req.wait_ms {
            0 => DEFAULT_LOCK_WAIT,
            ms => Duration::from_millis(ms).min(MAX_LOCK_WAIT),
        };
        let timeout = wait + self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            true,
            &req,
            timeout,
            |c, r| async move { LockClient::new(c).lock(r).await },
        )
        .await
        {
            return r;
        }
        let deadline = Instant::now() + wait;
        loop {
            must_lead(group)?;
            // Propose only when the lock looks free (or ours): waiting
            // callers poll the leader's local state, not the log.
            let (held, _) = group.state().lock(&req.name).map_err(ServerError::from)?;
            let free = held.as_ref().is_none_or(|l| l.lease == req.lease_id);
            if free {
                let op = CommandOp::Lock {
                    name: req.name.clone(),
                    lease: req.lease_id,
                };
                match propose(&self.node, group, op).await {
                    Ok(res) => {
                        if let Some(OpResult::LockAcquired { token, term }) = res.results.first() {
                            return Ok(Response::new(pb::LockResponse {
                                header: header(&self.node, group, res.revision),
                                token: Some(pb::FencingToken {
                                    token: *token,
                                    term: *term,
                                }),
                            }));
                        }
                        return Err(Status::internal("lock produced no token"));
                    }
                    Err(ServerError::Group(GroupError::Rejected(Rejection::LockHeld {
                        ..
                    }))) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                let holder = held.map_or_else(String::new, |l| {
                    format!(" with lease {} (token {})", l.lease, l.token)
                });
                return Err(Status::deadline_exceeded(format!(
                    "lock {:?} is held{holder}; waited {wait:?}",
                    String::from_utf8_lossy(&req.name)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn unlock(
        &self,
        request: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.name)?;
        let group = self.node.group_for_key(&req.name)?;
        let timeout = self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            true,
            &req,
            timeout,
            |c, r| async move { LockClient::new(c).unlock(r).await },
        )
        .await
        {
            return r;
        }
        must_lead(group)?;
        let op = CommandOp::Unlock {
            name: req.name,
            token: req.token,
        };
        let res = propose(&self.node, group, op).await?;
        Ok(Response::new(pb::UnlockResponse {
            header: header(&self.node, group, res.revision),
        }))
    }

    async fn check_fence(
        &self,
        request: Request<pb::CheckFenceRequest>,
    ) -> Result<Response<pb::CheckFenceResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        validate::check_key(&self.node.config.limits, &req.name)?;
        let group = self.node.group_for_key(&req.name)?;
        let timeout = self.node.peer_timeout();
        if let Some(r) = relay(
            &self.node,
            group,
            forwarded,
            false,
            &req,
            timeout,
            |c, r| async move { LockClient::new(c).check_fence(r).await },
        )
        .await
        {
            return r;
        }
        must_lead(group)?;
        group
            .read_index(self.node.config.read_timeout)
            .await
            .map_err(ServerError::from)?;
        let (held, revision) = group.state().lock(&req.name).map_err(ServerError::from)?;
        let current = held.map_or(0, |l| l.token);
        Ok(Response::new(pb::CheckFenceResponse {
            header: header(&self.node, group, revision),
            valid: current != 0 && current == req.token,
            current_token: current,
        }))
    }
}
