//! Rust client for palisade.
//!
//! [`Client`] connects to a list of endpoints, caches the cluster map
//! (`GetClusterMap`: which group owns each hash slot, the groups' epochs,
//! where their replicas are, node addresses), and sends each request
//! straight to the leader of the group that owns its key when it knows it
//! (any node accepts any request and forwards it, so a wrong guess costs one
//! hop). Every request names the group and map epoch it was routed with
//! (`x-palisade-route`); a server whose group no longer serves the key
//! answers `WrongGroup`, and the client refreshes its map — only ever to a
//! newer epoch — and retries.
//!
//! # Retries
//!
//! One function decides what to do after a failed attempt:
//! [`retry::decide`] (its table is in that module). In short: leader hints
//! are followed at once, stale routes refresh the map, moving slots and
//! elections are waited out with exponential backoff and full jitter, and
//! writes carry a [`RequestId`](pb::RequestId) (a random client id and a
//! sequence number) that the server applies at most once, so a write
//! retried after an ambiguous failure cannot apply twice. If the deadline
//! passes after such a failure, the write fails with
//! [`Error::UnknownOutcome`]: it may or may not have applied. Definite
//! refusals (`INVALID_ARGUMENT`, a stale fence, a held lock…) return at
//! once.

pub mod retry;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::kv_client::KvClient;
use palisade_proto::v1::lease_client::LeaseClient;
use palisade_proto::v1::lock_client::LockClient;
use palisade_shard::{LeaseHome, lease_home, slot_of};
use prost::Message;
use rand::Rng;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

pub use palisade_proto::v1 as proto;
pub use tonic::Code;

/// Client errors, shaped by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or over a limit; retrying will not help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No node could serve the request before the deadline; nothing was
    /// applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A write may or may not have applied (its last attempt failed in an
    /// ambiguous way and the deadline passed).
    #[error("outcome unknown: {0}")]
    UnknownOutcome(String),
    /// An `ack = ALL` write is committed (durable on a majority, it will
    /// not be lost) but some replicas had not applied it in time. Not
    /// retried: the write happened.
    #[error("committed at revision {revision} but not yet applied on nodes {lagging:?}")]
    NotEverywhere { revision: u64, lagging: Vec<u64> },
    /// A lock stayed held by another lease for the whole wait; nothing was
    /// applied.
    #[error("lock is held with lease {lease} (token {token})")]
    LockHeld { lease: u64, token: u64 },
    /// Any other status from the server (e.g. `OUT_OF_RANGE` for a read at a
    /// compacted revision; see [`compacted_detail`]).
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("bad endpoint {0}")]
    Endpoint(String),
}

impl Error {
    /// The gRPC code this error corresponds to.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Unavailable(_) => Code::Unavailable,
            Error::UnknownOutcome(_) | Error::NotEverywhere { .. } => Code::DeadlineExceeded,
            Error::LockHeld { .. } => Code::FailedPrecondition,
            Error::Status(s) => s.code(),
            Error::Endpoint(_) => Code::InvalidArgument,
        }
    }
}

/// A lock's fencing token: the log index of the entry that granted the
/// lock. Send it with writes (`fence()`) or hand it to other services,
/// which can check it with [`Client::check_fence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencingToken {
    pub lock: Vec<u8>,
    pub token: u64,
    /// Raft term of the granting entry (informational).
    pub term: u64,
}

impl FencingToken {
    /// The fence to attach to a write guarded by this lock.
    pub fn fence(&self) -> pb::Fence {
        pb::Fence {
            lock: self.lock.clone(),
            token: self.token,
        }
    }

    /// `NAME:TOKEN`, as the CLI prints and accepts it.
    pub fn to_text(&self) -> String {
        format!("{}:{}", String::from_utf8_lossy(&self.lock), self.token)
    }

    /// Parses `NAME:TOKEN` (the name may itself contain `:`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, token) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("fence {text:?} is not NAME:TOKEN"))?;
        let token = token
            .parse()
            .map_err(|_| format!("fencing token {token:?} is not a number"))?;
        if name.is_empty() {
            return Err("fence has an empty lock name".into());
        }
        Ok(Self {
            lock: name.as_bytes().to_vec(),
            token,
            term: 0,
        })
    }
}

/// A held lock whose lease a background task keeps alive.
pub struct LockGuard {
    client: Client,
    token: FencingToken,
    lease: u64,
    lost: Arc<std::sync::atomic::AtomicBool>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    pub fn token(&self) -> &FencingToken {
        &self.token
    }

    pub fn lease(&self) -> u64 {
        self.lease
    }

    /// Whether the lease is known to have ended (the lock may be someone
    /// else's now; fenced writes with this token will be refused).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Releases the lock and revokes its lease.
    pub async fn release(self) -> Result<(), Error> {
        self.keepalive.abort();
        let unlocked = self.client.unlock(&self.token).await;
        let revoked = self.client.lease_revoke(self.lease).await;
        unlocked.and(revoked)
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Without keep-alives the lease, and the lock, end within one TTL.
        self.keepalive.abort();
    }
}

/// The `StaleFence` detail of a `FAILED_PRECONDITION` error: the lock's
/// current token.
pub fn stale_fence_detail(err: &Error) -> Option<pb::StaleFence> {
    let Error::Status(s) = err else { return None };
    match pb::ErrorDetail::decode(s.details()).ok()?.kind? {
        pb::error_detail::Kind::StaleFence(f) => Some(f),
        _ => None,
    }
}

/// The `DiskFull` detail of a `RESOURCE_EXHAUSTED` error: a write that adds
/// data was refused because disks are below their reserve (nothing was
/// applied; it fails the same way until space is freed).
pub fn disk_full_detail(err: &Error) -> Option<pb::DiskFull> {
    let Error::Status(s) = err else { return None };
    match pb::ErrorDetail::decode(s.details()).ok()?.kind? {
        pb::error_detail::Kind::DiskFull(d) => Some(d),
        _ => None,
    }
}

/// Where a lease lives: with a hash slot (leases of this version), or in
/// a group (leases granted before the cluster map).
pub fn lease_location(id: u64) -> Option<LeaseHome> {
    lease_home(id)
}

/// The `Compacted` detail of an `OUT_OF_RANGE` error: the revision asked
/// for and the oldest one still readable.
pub fn compacted_detail(err: &Error) -> Option<pb::Compacted> {
    let Error::Status(s) = err else { return None };
    match pb::ErrorDetail::decode(s.details()).ok()?.kind? {
        pb::error_detail::Kind::Compacted(c) => Some(c),
        _ => None,
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` (or `http://host:port`) of some nodes.
    pub endpoints: Vec<String>,
    /// Deadline of one attempt. Longer than the server's write timeout (5 s)
    /// so the server, not the client, decides when a write is stuck.
    pub attempt_timeout: Duration,
    /// Deadline of a whole request, retries included.
    pub request_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl ClientConfig {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            attempt_timeout: Duration::from_secs(6),
            request_timeout: Duration::from_secs(15),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(250),
        }
    }
}

/// How fresh a read must be (see `ReadConsistency` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    pub consistency: pb::ReadConsistency,
    /// For `BoundedStaleness`.
    pub max_staleness: Duration,
    /// Wait for (or be forwarded to) a replica that applied this revision.
    pub min_revision: u64,
    /// Read the state as of this revision of the key's group (0: latest).
    /// Any replica that has applied it answers.
    pub at_revision: u64,
}

impl ReadOptions {
    pub fn linearizable() -> Self {
        Self::default()
    }
    pub fn lease() -> Self {
        Self::level(pb::ReadConsistency::Lease)
    }
    /// Read-your-writes and monotonic reads within this client's session.
    pub fn session() -> Self {
        Self::level(pb::ReadConsistency::Session)
    }
    pub fn stale() -> Self {
        Self::level(pb::ReadConsistency::Stale)
    }
    pub fn bounded(max_staleness: Duration) -> Self {
        Self {
            max_staleness,
            ..Self::level(pb::ReadConsistency::BoundedStaleness)
        }
    }
    /// The state as of `revision` (exact; served by any replica).
    pub fn at_revision(revision: u64) -> Self {
        Self {
            at_revision: revision,
            ..Self::default()
        }
    }
    fn level(consistency: pb::ReadConsistency) -> Self {
        Self {
            consistency,
            ..Self::default()
        }
    }
    /// Whether the leader must answer (else any replica may).
    fn needs_leader(&self) -> bool {
        self.at_revision == 0
            && matches!(
                self.consistency,
                pb::ReadConsistency::Linearizable | pb::ReadConsistency::Lease
            )
    }
}

/// Renders a session token as `group:revision,...` (for the CLI).
pub fn format_session(token: &pb::SessionToken) -> String {
    token
        .revisions
        .iter()
        .map(|r| format!("{}:{}", r.group_id, r.revision))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `group:revision,...`.
pub fn parse_session(text: &str) -> Result<pb::SessionToken, String> {
    let mut revisions = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (g, r) = part
            .split_once(':')
            .ok_or_else(|| format!("session entry '{part}' is not GROUP:REVISION"))?;
        let group_id = g
            .parse()
            .map_err(|_| format!("group '{g}' is not a number"))?;
        let revision = r
            .parse()
            .map_err(|_| format!("revision '{r}' is not a number"))?;
        revisions.push(pb::GroupRevision { group_id, revision });
    }
    Ok(pb::SessionToken { revisions })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

/// What a request is routed by.
#[derive(Debug, Clone)]
enum Route {
    /// The group owning `key`; to its leader when `leader`.
    Key { key: Vec<u8>, leader: bool },
    /// A lease's group (its leader).
    Lease(u64),
    /// Any node.
    Any,
}

/// The client's copy of the cluster map: enough to route.
#[derive(Debug, Default)]
struct RouteTable {
    epoch: u64,
    /// slot → group.
    route: Vec<u64>,
    /// group → (epoch, nodes of its voters).
    groups: BTreeMap<u64, (u64, Vec<u64>)>,
}

impl RouteTable {
    fn from_proto(map: &pb::ClusterMap) -> Self {
        let mut route = vec![0; palisade_shard::SLOTS as usize];
        for run in &map.route {
            for s in run.first..run.first.saturating_add(run.count) {
                if let Some(g) = route.get_mut(s as usize) {
                    *g = run.group_id;
                }
            }
        }
        let groups = map
            .groups
            .iter()
            .map(|g| {
                let voters = g
                    .replicas
                    .iter()
                    .filter(|r| r.role == pb::ReplicaRole::Voter as i32)
                    .map(|r| r.node_id)
                    .collect();
                (g.id, (g.epoch, voters))
            })
            .collect();
        Self {
            epoch: map.epoch,
            route,
            groups,
        }
    }

    fn group_for_key(&self, key: &[u8]) -> Option<u64> {
        self.route
            .get(slot_of(key) as usize)
            .copied()
            .filter(|g| *g != 0)
    }
}

/// A palisade client. Cheap to clone; clones share connections and caches.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    channels: Mutex<BTreeMap<String, Channel>>,
    /// Group → address of its last known leader.
    leaders: Mutex<BTreeMap<u64, String>>,
    /// Node id → address, from the cluster map.
    nodes: Mutex<BTreeMap<u64, String>>,
    map: Mutex<RouteTable>,
    /// A background map refresh is running.
    refreshing: std::sync::atomic::AtomicBool,
    client_id: u64,
    next_seq: AtomicU64,
    /// Seqs of writes not yet completed; the lowest is reported to servers so
    /// they can forget older results.
    inflight: Mutex<BTreeSet<u64>>,
    next_endpoint: AtomicUsize,
    /// Highest revision seen per group (writes and reads): the session.
    session: Mutex<BTreeMap<u64, u64>>,
}

fn normalize(addr: &str) -> String {
    addr.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

impl Client {
    /// Connects to the cluster behind `endpoints` and learns its shard map.
    pub async fn connect(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, Error> {
        Self::with_config(ClientConfig::new(endpoints)).await
    }

    pub async fn with_config(mut config: ClientConfig) -> Result<Client, Error> {
        config.endpoints = config
            .endpoints
            .iter()
            .map(|e| normalize(e))
            .filter(|e| !e.is_empty())
            .collect();
        if config.endpoints.is_empty() {
            return Err(Error::Endpoint("no endpoints given".into()));
        }
        for e in &config.endpoints {
            Endpoint::from_shared(format!("http://{e}"))
                .map_err(|err| Error::Endpoint(format!("{e}: {err}")))?;
        }
        let client = Client {
            inner: Arc::new(Inner {
                config,
                channels: Mutex::default(),
                leaders: Mutex::default(),
                nodes: Mutex::default(),
                map: Mutex::default(),
                refreshing: std::sync::atomic::AtomicBool::new(false),
                client_id: rand::thread_rng().gen_range(1..u64::MAX),
                next_seq: AtomicU64::new(1),
                inflight: Mutex::default(),
                next_endpoint: AtomicUsize::new(0),
                session: Mutex::default(),
            }),
        };
        client.refresh_map(0).await?;
        Ok(client)
    }

    /// Fetches the cluster map from the first endpoint (or known node) that
    /// has one at least `min_epoch` new, and adopts it if it is newer than
    /// the one cached (a map never goes backwards).
    pub async fn refresh_map(&self, min_epoch: u64) -> Result<u64, Error> {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut attempt = 0;
        loop {
            let addr = self.next_endpoint();
            let mut request = Request::new(pb::GetClusterMapRequest { min_epoch });
            request.set_timeout(config.attempt_timeout);
            let mut admin = AdminClient::new(self.channel(&addr)?);
            let last =
                match tokio::time::timeout(config.attempt_timeout, admin.get_cluster_map(request))
                    .await
                {
                    Ok(Ok(resp)) => {
                        let resp = resp.into_inner();
                        if let Some(map) = resp.map {
                            let epoch = self.adopt_map(&map);
                            let nodes = Self::guard(&self.inner.nodes).clone();
                            let mut leaders = Self::guard(&self.inner.leaders);
                            for l in resp.leaders {
                                if let Some(a) = nodes.get(&l.node_id) {
                                    leaders.entry(l.group_id).or_insert_with(|| a.clone());
                                }
                            }
                            if epoch >= min_epoch {
                                return Ok(epoch);
                            }
                        }
                        format!("{addr}: map older than epoch {min_epoch}")
                    }
                    Ok(Err(s)) if s.code() == Code::Unimplemented => {
                        return Err(Error::Status(s));
                    }
                    Ok(Err(s)) => {
                        self.drop_channel(&addr);
                        format!("{addr}: {}: {}", s.code(), s.message())
                    }
                    Err(_) => {
                        self.drop_channel(&addr);
                        format!("{addr}: no reply")
                    }
                };
            let pause = self.backoff(attempt);
            attempt += 1;
            if Instant::now() + pause >= deadline {
                return Err(Error::Unavailable(last));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Asks each known node once (briefly) for a map at least `min_epoch`
    /// new; adopts the newest it gets.
    async fn refresh_map_once(&self, min_epoch: u64) {
        let mut addrs: Vec<String> = Self::guard(&self.inner.nodes).values().cloned().collect();
        for e in &self.inner.config.endpoints {
            if !addrs.contains(e) {
                addrs.push(e.clone());
            }
        }
        for addr in addrs {
            let Ok(channel) = self.channel(&addr) else {
                continue;
            };
            let mut request = Request::new(pb::GetClusterMapRequest { min_epoch });
            let timeout = Duration::from_millis(1500);
            request.set_timeout(timeout);
            let mut admin = AdminClient::new(channel);
            if let Ok(Ok(resp)) =
                tokio::time::timeout(timeout, admin.get_cluster_map(request)).await
                && let Some(map) = resp.into_inner().map
                && self.adopt_map(&map) >= min_epoch
            {
                return;
            }
        }
    }

    /// Refreshes the map in the background when a response shows a newer
    /// one than the cached map (at most one refresh at a time).
    fn notice_map_epoch(&self, epoch: u64) {
        if epoch <= self.map_epoch() || self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            client.refresh_map_once(epoch).await;
            client.inner.refreshing.store(false, Ordering::Release);
        });
    }

    /// Caches `map` if it is newer than the cached one; returns the cached
    /// epoch.
    fn adopt_map(&self, map: &pb::ClusterMap) -> u64 {
        let mut table = Self::guard(&self.inner.map);
        if map.epoch > table.epoch {
            *table = RouteTable::from_proto(map);
            *Self::guard(&self.inner.nodes) = map
                .nodes
                .iter()
                .filter(|n| n.state != pb::NodeState::Removed as i32)
                .map(|n| (n.id, n.addr.clone()))
                .collect();
        }
        table.epoch
    }

    /// The epoch of the cached cluster map.
    pub fn map_epoch(&self) -> u64 {
        Self::guard(&self.inner.map).epoch
    }

    fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut channels = Self::guard(&self.inner.channels);
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Endpoint(format!("{addr}: {e}")))?
            .connect_timeout(Duration::from_millis(1000))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn drop_channel(&self, addr: &str) {
        Self::guard(&self.inner.channels).remove(addr);
    }

    fn next_endpoint(&self) -> String {
        let eps = &self.inner.config.endpoints;
        let i = self.inner.next_endpoint.fetch_add(1, Ordering::Relaxed);
        eps[i % eps.len()].clone()
    }

    /// The group a request goes to (with its epoch), and the address to
    /// send it to: the group's known leader, else one of its voters, else
    /// any endpoint.
    fn target(&self, route: &Route, attempt: u32) -> (Option<(u64, u64)>, String) {
        let table = Self::guard(&self.inner.map);
        let (group, leader) = match route {
            Route::Key { key, leader } => (table.group_for_key(key), *leader),
            Route::Lease(id) => (
                match lease_home(*id) {
                    Some(LeaseHome::Slot(s)) => table.route.get(s as usize).copied(),
                    Some(LeaseHome::LegacyGroup(g)) => Some(g),
                    None => None,
                },
                true,
            ),
            Route::Any => (None, false),
        };
        let hint = group.map(|g| (g, table.groups.get(&g).map_or(0, |(e, _)| *e)));
        let addr = if leader && let Some(g) = group {
            let known = Self::guard(&self.inner.leaders).get(&g).cloned();
            known.or_else(|| {
                let voters = &table.groups.get(&g)?.1;
                let node = voters.get(attempt as usize % voters.len().max(1))?;
                Self::guard(&self.inner.nodes).get(node).cloned()
            })
        } else {
            None
        };
        drop(table);
        (hint, addr.unwrap_or_else(|| self.next_endpoint()))
    }

    /// The data group that owns `key`, by the cached map.
    pub fn group_for_key(&self, key: &[u8]) -> Option<u64> {
        Self::guard(&self.inner.map).group_for_key(key)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let c = &self.inner.config;
        let cap = c
            .backoff_base
            .saturating_mul(1 << attempt.min(16))
            .min(c.backoff_max);
        Duration::from_micros(rand::thread_rng().gen_range(0..=cap.as_micros() as u64))
    }

    /// Remembers the node that answered a leader-only request as its
    /// group's leader.
    fn remember_leader(&self, header: Option<&pb::ResponseHeader>) {
        let Some(h) = header else { return };
        if h.group_id == 0 {
            return;
        }
        if let Some(addr) = Self::guard(&self.inner.nodes).get(&h.node_id).cloned() {
            Self::guard(&self.inner.leaders).insert(h.group_id, addr);
        }
    }

    /// Merges a revision the client has seen into its session (and notices
    /// a newer cluster map).
    fn observe(&self, header: Option<&pb::ResponseHeader>) {
        if let Some(h) = header {
            self.notice_map_epoch(h.map_epoch);
        }
        if let Some(h) = header
            && h.group_id != 0
        {
            let mut session = Self::guard(&self.inner.session);
            let r = session.entry(h.group_id).or_default();
            *r = (*r).max(h.revision);
        }
    }

    /// This client's session token: the highest revision it has written or
    /// read in each group. SESSION reads send it automatically.
    pub fn session_token(&self) -> pb::SessionToken {
        pb::SessionToken {
            revisions: Self::guard(&self.inner.session)
                .iter()
                .map(|(g, r)| pb::GroupRevision {
                    group_id: *g,
                    revision: *r,
                })
                .collect(),
        }
    }

    /// Adds a token (e.g. from another client or process) to the session.
    pub fn merge_session(&self, token: &pb::SessionToken) {
        let mut session = Self::guard(&self.inner.session);
        for r in &token.revisions {
            let e = session.entry(r.group_id).or_default();
            *e = (*e).max(r.revision);
        }
    }

    fn begin_write(&self) -> pb::RequestId {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut inflight = Self::guard(&self.inner.inflight);
        inflight.insert(seq);
        let first = *inflight.first().unwrap_or(&seq);
        pb::RequestId {
            client_id: self.inner.client_id,
            seq,
            first_incomplete_seq: first,
        }
    }

    fn end_write(&self, id: &pb::RequestId) {
        Self::guard(&self.inner.inflight).remove(&id.seq);
    }

    /// Runs one Kv request with routing and retries.
    async fn call<Req, Resp, F, Fut>(
        &self,
        route: Route,
        kind: Kind,
        req: Req,
        send: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.call_on(route, kind, req, |ch, r| {
            send(KvClient::new(ch).max_decoding_message_size(usize::MAX), r)
        })
        .await
    }

    /// Runs one request of any service with routing and retries (see
    /// [`retry::decide`]).
    async fn call_on<Req, Resp, F, Fut>(
        &self,
        route: Route,
        kind: Kind,
        req: Req,
        send: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut maybe_applied = false;
        let mut attempt = 0u32;
        let mut redirect: Option<String> = None;
        loop {
            let (hint, routed) = self.target(&route, attempt);
            let addr = redirect.take().unwrap_or(routed);
            let mut request = Request::new(req.clone());
            request.set_timeout(config.attempt_timeout);
            if let Some((g, epoch)) = hint
                && let Ok(v) = format!("{g}:{epoch}").parse()
            {
                request.metadata_mut().insert("x-palisade-route", v);
            }
            let outcome =
                tokio::time::timeout(config.attempt_timeout, send(self.channel(&addr)?, request))
                    .await;
            let status = match outcome {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!(
                    "no reply within {:?}",
                    config.attempt_timeout
                )),
            };
            let last_error = format!("{addr}: {:?}: {}", status.code(), status.message());
            let mut pause = None;
            match retry::decide(&status, &addr) {
                retry::Decision::GiveUp => return Err(error_from(status)),
                retry::Decision::RetryAt { group, addr: to } => {
                    Self::guard(&self.inner.leaders).insert(group, to.clone());
                    if attempt == 0 {
                        pause = Some(Duration::ZERO);
                    }
                    redirect = Some(to);
                }
                retry::Decision::RefreshMap { min_epoch } => {
                    if let Some((g, _)) = hint {
                        Self::guard(&self.inner.leaders).remove(&g);
                    }
                    // One round over the nodes; a map that has not moved
                    // on yet (the route switches a moment after a slot
                    // stops being served) is waited out with backoff.
                    let before = self.map_epoch();
                    self.refresh_map_once(min_epoch.max(before + 1)).await;
                    if self.map_epoch() > before {
                        pause = Some(Duration::ZERO);
                    }
                }
                retry::Decision::RetryLater {
                    maybe_applied: applied,
                    forget_leader,
                    reconnect,
                    after,
                } => {
                    maybe_applied |= applied;
                    if reconnect {
                        self.drop_channel(&addr);
                    }
                    if forget_leader && let Some((g, _)) = hint {
                        Self::guard(&self.inner.leaders).remove(&g);
                    }
                    pause = after;
                }
            }
            let pause = pause.unwrap_or_else(|| self.backoff(attempt));
            attempt += 1;
            if Instant::now() + pause >= deadline {
                return Err(if kind == Kind::Write && maybe_applied {
                    Error::UnknownOutcome(last_error)
                } else {
                    Error::Unavailable(last_error)
                });
            }
            tracing::debug!(attempt, error = %last_error, "retrying");
            tokio::time::sleep(pause).await;
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<pb::PutResponse, Error> {
        self.put_request(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
    }

    /// Sets `key` to `value` only if `token` is still its lock's current
    /// token (`FAILED_PRECONDITION` otherwise, see [`stale_fence_detail`]).
    pub async fn put_fenced(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        token: &FencingToken,
    ) -> Result<pb::PutResponse, Error> {
        self.put_request(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            fence: Some(token.fence()),
            ..Default::default()
        })
        .await
    }

    /// Sends a put request (its request id is filled in).
    pub async fn put_request(&self, mut req: pb::PutRequest) -> Result<pb::PutResponse, Error> {
        let id = self.begin_write();
        req.request_id = Some(id);
        let route = Route::Key {
            key: req.key.clone(),
            leader: true,
        };
        let res = self
            .call(
                route,
                Kind::Write,
                req,
                |mut c, r| async move { c.put(r).await },
            )
            .await;
        self.end_write(&id);
        if let Ok(r) = &res {
            self.observe(r.header.as_ref());
            if let Some(t) = &r.session {
                self.merge_session(t);
            }
            self.remember_leader(r.header.as_ref());
        }
        res
    }

    /// Reads `key` (linearizable).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<pb::GetResponse, Error> {
        self.get_with(key, ReadOptions::default()).await
    }

    /// Reads `key` at the given consistency. SESSION reads carry this
    /// client's session token; reads that need no leader go to any node.
    pub async fn get_with(
        &self,
        key: impl Into<Vec<u8>>,
        opts: ReadOptions,
    ) -> Result<pb::GetResponse, Error> {
        let req = pb::GetRequest {
            key: key.into(),
            consistency: opts.consistency as i32,
            max_staleness_ms: opts.max_staleness.as_millis() as u64,
            session: (opts.consistency == pb::ReadConsistency::Session)
                .then(|| self.session_token()),
            min_revision: opts.min_revision,
            at_revision: opts.at_revision,
        };
        let route = Route::Key {
            key: req.key.clone(),
            leader: opts.needs_leader(),
        };
        let res = self
            .call(
                route,
                Kind::Read,
                req,
                |mut c, r| async move { c.get(r).await },
            )
            .await;
        if let Ok(r) = &res {
            // Monotonic reads: later SESSION reads never go below this.
            self.observe(r.header.as_ref());
            if opts.needs_leader() {
                self.remember_leader(r.header.as_ref());
            }
        }
        res
    }

    /// The retained versions of `key` (oldest first, tombstones included),
    /// read at the given consistency (`at_revision` is ignored).
    pub async fn history(
        &self,
        key: impl Into<Vec<u8>>,
        opts: ReadOptions,
    ) -> Result<pb::HistoryResponse, Error> {
        let req = pb::HistoryRequest {
            key: key.into(),
            consistency: opts.consistency as i32,
            max_staleness_ms: opts.max_staleness.as_millis() as u64,
            session: (opts.consistency == pb::ReadConsistency::Session)
                .then(|| self.session_token()),
            min_revision: opts.min_revision,
        };
        let route = Route::Key {
            key: req.key.clone(),
            leader: opts.needs_leader(),
        };
        let res = self
            .call(route, Kind::Read, req, |mut c, r| async move {
                c.history(r).await
            })
            .await;
        if let Ok(r) = &res {
            self.observe(r.header.as_ref());
        }
        res
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<pb::DeleteResponse, Error> {
        self.delete_request(pb::DeleteRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
    }

    /// Sends a delete request (its request id is filled in).
    pub async fn delete_request(
        &self,
        mut req: pb::DeleteRequest,
    ) -> Result<pb::DeleteResponse, Error> {
        let id = self.begin_write();
        req.request_id = Some(id);
        let route = Route::Key {
            key: req.key.clone(),
            leader: true,
        };
        let res = self
            .call(route, Kind::Write, req, |mut c, r| async move {
                c.delete(r).await
            })
            .await;
        self.end_write(&id);
        if let Ok(r) = &res {
            self.observe(r.header.as_ref());
            if let Some(t) = &r.session {
                self.merge_session(t);
            }
        }
        res
    }

    /// Scans a range or prefix across all groups. A SESSION scan without a
    /// token gets this client's session token.
    pub async fn scan(&self, mut req: pb::ScanRequest) -> Result<pb::ScanResponse, Error> {
        if req.consistency == pb::ReadConsistency::Session as i32 && req.session.is_none() {
            req.session = Some(self.session_token());
        }
        let res = self
            .call(Route::Any, Kind::Read, req, |mut c, r| async move {
                c.scan(r).await
            })
            .await;
        if let Ok(r) = &res {
            for h in &r.group_headers {
                self.observe(Some(h));
            }
        }
        res
    }

    /// All keys starting with `prefix`, up to `limit` (0: server default).
    pub async fn scan_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
        limit: u32,
    ) -> Result<pb::ScanResponse, Error> {
        self.scan(pb::ScanRequest {
            key: prefix.into(),
            prefix: true,
            limit,
            ..Default::default()
        })
        .await
    }

    /// Runs a transaction (its request id is filled in).
    pub async fn txn(&self, mut req: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        let id = self.begin_write();
        req.request_id = Some(id);
        let key = req
            .compare
            .first()
            .map(|c| c.key.clone())
            .or_else(|| req.success.iter().chain(&req.failure).find_map(op_key));
        let route = match key {
            Some(key) => Route::Key { key, leader: true },
            None => Route::Any,
        };
        let res = self
            .call(
                route,
                Kind::Write,
                req,
                |mut c, r| async move { c.txn(r).await },
            )
            .await;
        self.end_write(&id);
        if let Ok(r) = &res {
            self.observe(r.header.as_ref());
            if let Some(t) = &r.session {
                self.merge_session(t);
            }
        }
        res
    }

    /// Sets `key` to `new` if its value is `expected` (`None`: if it does not
    /// exist). Returns whether the swap happened and the key's value when it
    /// did not.
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Vec<u8>>,
        expected: Option<Vec<u8>>,
        new: impl Into<Vec<u8>>,
    ) -> Result<(bool, pb::TxnResponse), Error> {
        use pb::compare::{Op, Operand, Target};
        let key = key.into();
        let compare = match expected {
            Some(v) => pb::Compare {
                key: key.clone(),
                target: Target::Value as i32,
                op: Op::Equal as i32,
                operand: Some(Operand::Value(v)),
            },
            None => pb::Compare {
                key: key.clone(),
                target: Target::Exists as i32,
                op: Op::Equal as i32,
                operand: Some(Operand::Exists(false)),
            },
        };
        let op = |r| pb::RequestOp { request: Some(r) };
        let resp = self
            .txn(pb::TxnRequest {
                compare: vec![compare],
                success: vec![op(pb::request_op::Request::Put(pb::PutRequest {
                    key: key.clone(),
                    value: new.into(),
                    ..Default::default()
                }))],
                failure: vec![op(pb::request_op::Request::Get(pb::GetRequest {
                    key,
                    ..Default::default()
                }))],
                ..Default::default()
            })
            .await?;
        Ok((resp.succeeded, resp))
    }

    /// Creates a lease of `ttl` living with the hash slot of `key` (locks
    /// held with it and keys attached to it must be in that slot: use a
    /// hash tag); returns its id.
    pub async fn lease_grant(&self, ttl: Duration, key: &[u8]) -> Result<u64, Error> {
        let req = pb::LeaseGrantRequest {
            ttl_ms: ttl.as_millis() as u64,
            key: key.to_vec(),
        };
        let route = Route::Key {
            key: key.to_vec(),
            leader: true,
        };
        let r = self
            .call_on(route, Kind::Write, req, |ch, r| async move {
                LeaseClient::new(ch).lease_grant(r).await
            })
            .await?;
        Ok(r.lease_id)
    }

    /// Restarts lease `id`'s TTL; returns the TTL.
    pub async fn lease_keep_alive(&self, id: u64) -> Result<Duration, Error> {
        let r = self
            .call_on(
                Route::Lease(id),
                Kind::Read,
                pb::LeaseKeepAliveRequest { lease_id: id },
                |ch, r| async move { LeaseClient::new(ch).lease_keep_alive(r).await },
            )
            .await?;
        Ok(Duration::from_millis(r.ttl_ms))
    }

    /// Ends lease `id` now: its keys are deleted, its locks released.
    pub async fn lease_revoke(&self, id: u64) -> Result<(), Error> {
        self.call_on(
            Route::Lease(id),
            Kind::Write,
            pb::LeaseRevokeRequest { lease_id: id },
            |ch, r| async move { LeaseClient::new(ch).lease_revoke(r).await },
        )
        .await
        .map(|_| ())
    }

    /// Lease `id`'s TTL, time left, keys and locks.
    pub async fn lease_time_to_live(&self, id: u64) -> Result<pb::LeaseTimeToLiveResponse, Error> {
        self.call_on(
            Route::Lease(id),
            Kind::Read,
            pb::LeaseTimeToLiveRequest { lease_id: id },
            |ch, r| async move { LeaseClient::new(ch).lease_time_to_live(r).await },
        )
        .await
    }

    /// Takes lock `name` with lease `lease`, waiting up to `wait` for it.
    pub async fn lock(
        &self,
        name: impl Into<Vec<u8>>,
        lease: u64,
        wait: Duration,
    ) -> Result<FencingToken, Error> {
        let name = name.into();
        let req = pb::LockRequest {
            name: name.clone(),
            lease_id: lease,
            wait_ms: wait.as_millis() as u64,
        };
        let r = self
            .call_on(
                Route::Key {
                    key: name.clone(),
                    leader: true,
                },
                Kind::Write,
                req,
                |ch, r| async move { LockClient::new(ch).lock(r).await },
            )
            .await?;
        let t = r.token.unwrap_or_default();
        Ok(FencingToken {
            lock: name,
            token: t.token,
            term: t.term,
        })
    }

    /// Releases a lock held with `token`.
    pub async fn unlock(&self, token: &FencingToken) -> Result<(), Error> {
        let req = pb::UnlockRequest {
            name: token.lock.clone(),
            token: token.token,
        };
        self.call_on(
            Route::Key {
                key: token.lock.clone(),
                leader: true,
            },
            Kind::Write,
            req,
            |ch, r| async move { LockClient::new(ch).unlock(r).await },
        )
        .await
        .map(|_| ())
    }

    /// Whether `token` is its lock's current token; with the current one.
    pub async fn check_fence(&self, token: &FencingToken) -> Result<(bool, u64), Error> {
        let req = pb::CheckFenceRequest {
            name: token.lock.clone(),
            token: token.token,
        };
        let r = self
            .call_on(
                Route::Key {
                    key: token.lock.clone(),
                    leader: true,
                },
                Kind::Read,
                req,
                |ch, r| async move { LockClient::new(ch).check_fence(r).await },
            )
            .await?;
        Ok((r.valid, r.current_token))
    }

    /// Takes lock `name` with a fresh lease of `ttl` that a background task
    /// keeps alive (every `ttl / 3`) until the guard is released or dropped.
    pub async fn lock_with_lease(
        &self,
        name: impl Into<Vec<u8>>,
        ttl: Duration,
        wait: Duration,
    ) -> Result<LockGuard, Error> {
        let name = name.into();
        let lease = self.lease_grant(ttl, &name).await?;
        // Keep the lease alive while waiting, too: the wait may outlast it.
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keepalive = {
            let client = self.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    if let Err(e) = client.lease_keep_alive(lease).await {
                        tracing::warn!(lease, error = %e, "lease keep-alive failed");
                        if e.code() == Code::NotFound {
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
        };
        let token = match self.lock(name, lease, wait).await {
            Ok(t) => t,
            Err(e) => {
                keepalive.abort();
                let _ = self.lease_revoke(lease).await;
                return Err(e);
            }
        };
        Ok(LockGuard {
            client: self.clone(),
            token,
            lease,
            lost,
            keepalive,
        })
    }

    /// Runs an admin call at the first endpoint that answers (nodes forward
    /// it to the group leader that must run it).
    async fn admin<Resp, F, Fut>(&self, call: F) -> Result<Resp, Error>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut attempt = 0;
        loop {
            let addr = self.next_endpoint();
            let admin = AdminClient::new(self.channel(&addr)?);
            let last = match tokio::time::timeout(config.attempt_timeout, call(admin)).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(s)) if s.code() == Code::InvalidArgument => {
                    return Err(Error::InvalidArgument(s.message().to_string()));
                }
                Ok(Err(s)) if s.code() != Code::Unavailable => return Err(Error::Status(s)),
                Ok(Err(s)) => format!("{addr}: {}: {}", s.code(), s.message()),
                Err(_) => {
                    self.drop_channel(&addr);
                    format!("{addr}: no reply")
                }
            };
            let pause = self.backoff(attempt);
            attempt += 1;
            if Instant::now() + pause >= deadline {
                return Err(Error::Unavailable(last));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Drops `group`'s history below `revision`; returns the group's new
    /// compaction point.
    pub async fn compact(&self, group: u64, revision: u64) -> Result<u64, Error> {
        let r = self
            .admin(|mut a| async move {
                a.compact(pb::CompactRequest {
                    group_id: group,
                    revision,
                })
                .await
            })
            .await?;
        Ok(r.compact_revision)
    }

    /// Moves every replica off node `id` and then removes it from the
    /// cluster (`dead`: the node is gone; its groups are re-replicated from
    /// the others). Returns once the drain is recorded.
    pub async fn drain_node(&self, id: u64, dead: bool) -> Result<pb::DrainNodeResponse, Error> {
        self.admin(|mut a| async move {
            a.drain_node(pb::DrainNodeRequest { node_id: id, dead })
                .await
        })
        .await
    }

    /// Sets the number of data groups of the hash keyspace (slots move
    /// online). Returns once recorded.
    pub async fn set_groups(&self, groups: u32) -> Result<pb::SetGroupsResponse, Error> {
        self.admin(|mut a| async move { a.set_groups(pb::SetGroupsRequest { groups }).await })
            .await
    }

    /// Hands `group`'s leadership to its replica on node `node`.
    pub async fn transfer_leader(
        &self,
        group: u64,
        node: u64,
    ) -> Result<pb::TransferLeaderResponse, Error> {
        self.admin(|mut a| async move {
            a.transfer_leader(pb::TransferLeaderRequest {
                group_id: group,
                node_id: node,
            })
            .await
        })
        .await
    }

    /// Moves `group`'s voter on node `from` to node `to`; returns once
    /// recorded (the new replica's id).
    pub async fn move_replica(&self, group: u64, from: u64, to: u64) -> Result<u64, Error> {
        let r = self
            .admin(|mut a| async move {
                a.move_replica(pb::MoveReplicaRequest {
                    group_id: group,
                    from_node: from,
                    to_node: to,
                })
                .await
            })
            .await?;
        Ok(r.replica_id)
    }

    /// The cluster map as some node holds it (newer than the cached one, or
    /// the cached one's epoch when none is).
    pub async fn cluster_map(&self) -> Result<pb::ClusterMap, Error> {
        let r = self
            .admin(|mut a| async move {
                a.get_cluster_map(pb::GetClusterMapRequest { min_epoch: 0 })
                    .await
            })
            .await?;
        let map = r
            .map
            .ok_or_else(|| Error::Unavailable("the node sent no map".into()))?;
        self.adopt_map(&map);
        Ok(map)
    }

    /// Adds node `id` at `addr` as a learner of `groups` (empty: all).
    pub async fn add_learner(
        &self,
        id: u64,
        addr: &str,
        groups: &[u64],
    ) -> Result<Vec<u64>, Error> {
        let r = self
            .admin(|mut a| {
                let req = pb::AddLearnerRequest {
                    node_id: id,
                    addr: addr.to_string(),
                    group_ids: groups.to_vec(),
                };
                async move { a.add_learner(req).await }
            })
            .await?;
        Ok(r.group_ids)
    }

    /// Cluster status from the first endpoint that answers; refreshes the
    /// client's map when the answer's is newer.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut attempt = 0;
        loop {
            let addr = self.next_endpoint();
            let mut request = Request::new(pb::ClusterStatusRequest {});
            request.set_timeout(config.attempt_timeout);
            let mut admin = AdminClient::new(self.channel(&addr)?);
            let last =
                match tokio::time::timeout(config.attempt_timeout, admin.cluster_status(request))
                    .await
                {
                    Ok(Ok(resp)) => {
                        let status = resp.into_inner();
                        if let Some(map) = &status.map {
                            self.adopt_map(map);
                        }
                        return Ok(status);
                    }
                    Ok(Err(s)) => {
                        self.drop_channel(&addr);
                        format!("{addr}: {}: {}", s.code(), s.message())
                    }
                    Err(_) => {
                        self.drop_channel(&addr);
                        format!("{addr}: no reply")
                    }
                };
            let pause = self.backoff(attempt);
            attempt += 1;
            if Instant::now() + pause >= deadline {
                return Err(Error::Unavailable(last));
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// The client error a status the client gives up on stands for.
fn error_from(status: Status) -> Error {
    use pb::error_detail::Kind as D;
    match (status.code(), retry::detail(&status)) {
        (Code::InvalidArgument, _) => Error::InvalidArgument(status.message().to_string()),
        (_, Some(D::NotEverywhere(n))) => Error::NotEverywhere {
            revision: n.revision,
            lagging: n.lagging_node_ids,
        },
        (Code::FailedPrecondition, Some(D::LockHeld(h))) => Error::LockHeld {
            lease: h.lease_id,
            token: h.token,
        },
        _ => Error::Status(status),
    }
}

fn op_key(op: &pb::RequestOp) -> Option<Vec<u8>> {
    use pb::request_op::Request;
    match op.request.as_ref()? {
        Request::Put(p) => Some(p.key.clone()),
        Request::Delete(d) => Some(d.key.clone()),
        Request::Get(g) => Some(g.key.clone()),
    }
}
