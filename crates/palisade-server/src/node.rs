//! A palisade node: its identity, its storage, the replicas it hosts, its
//! copy of the cluster map, and the gRPC server that fronts them.
//!
//! # Lifecycle
//!
//! [`Node::open`] opens storage and settles the node's identity:
//! - a data directory that has one keeps it (`--id`, if given, must match);
//! - a data directory written before the cluster map existed (it records the
//!   number of data groups) takes `--id`; its groups open as they are and
//!   the meta leader derives the map from their layout (see `coordinator`);
//! - a new node with `--peers` bootstraps: the first 5, 3 or 1 nodes (by id)
//!   create the meta group, whose leader then writes the first map;
//! - a new node with `--join` asks the cluster for an id first.
//!
//! It then opens the meta group (this node's replica of it always has the
//! node's id) and every replica the map or the disk says it holds, and
//! starts the background tasks: the reconciler (opens and closes replicas as
//! the map changes), the coordinator (active on the meta leader), lease
//! expiry and history retention. [`Node::serve`] runs the gRPC services
//! until shutdown; [`Node::shutdown`] stops the tasks and the groups and
//! flushes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::BasicNode;
use palisade_group::{
    Connector, GroupId, MapState, NodeId, PeerChannels, RaftGroup, ReplicaId, ReplicaState,
    TcpConnector,
};
use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_server::AdminServer;
use palisade_proto::v1::kv_server::KvServer;
use palisade_proto::v1::lease_server::LeaseServer;
use palisade_proto::v1::lock_server::LockServer;
use palisade_proto::v1::peer_server::PeerServer;
use palisade_shard::{ClusterMap, META_GROUP, NodeState, meta_voter_target};
use palisade_storage::{NodeStore, ReplicaRecord};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::config::NodeConfig;
use crate::error::{ServerError, error_detail};
use crate::registry::GroupRegistry;
use crate::router::LeaderCache;
use crate::service;
use crate::tasks::Tasks;

/// Node fact: the node's id.
const NODE_ID_FACT: &str = "node_id";
/// Node fact: the cluster's id (learned when joining).
const CLUSTER_ID_FACT: &str = "cluster_id";
/// Node fact: the incarnation of this data directory (see
/// `NodeInfo::incarnation`), drawn when the directory is first opened.
const INCARNATION_FACT: &str = "incarnation";
/// Node fact written by versions before the cluster map: the number of data
/// groups fixed at bootstrap.
const LEGACY_GROUPS_FACT: &str = "data_groups";

/// Largest peer message (an append batch or a snapshot chunk).
const MAX_PEER_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// How long a joining node keeps asking the cluster to register it.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Node {
    pub(crate) config: NodeConfig,
    id: NodeId,
    /// This data directory's incarnation (see `NodeInfo::incarnation`).
    incarnation: u64,
    store: NodeStore,
    raft_config: Arc<openraft::Config>,
    pub(crate) channels: PeerChannels,
    pub(crate) registry: GroupRegistry,
    /// The meta group's state machine publishes every map version here.
    map_tx: watch::Sender<Arc<ClusterMap>>,
    map_rx: watch::Receiver<Arc<ClusterMap>>,
    pub(crate) leaders: LeaderCache,
    /// Lease deadlines of the groups this node leads.
    pub(crate) lease_clock: crate::lease::LeaseClock,
    /// Per group: the newest leader read index this node fetched, with the
    /// instant the fetch began (shared by BOUNDED_STALENESS reads).
    read_indexes: std::sync::Mutex<BTreeMap<GroupId, (tokio::time::Instant, u64)>>,
    /// The data group count of a data directory from before the cluster
    /// map (`None` for clusters that started with the map).
    legacy_groups: Option<u64>,
    /// Set once the map says this node was removed.
    removed: AtomicBool,
    tasks: Tasks,
    /// Serializes reconciliation passes.
    pub(crate) reconciling: tokio::sync::Mutex<()>,
}

impl Node {
    /// Opens storage and starts every group, talking to peers over TCP.
    pub async fn open(config: NodeConfig) -> Result<Arc<Node>, ServerError> {
        // Bind outgoing peer connections to our own address when it is a
        // loopback address other than 127.0.0.1: several nodes then share one
        // host, and drills partition them with per-address packet filters.
        let local_ip = config
            .advertise_addr()
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| ip.is_loopback() && *ip != std::net::IpAddr::from([127, 0, 0, 1]));
        Self::open_with(config, Arc::new(TcpConnector { local_ip })).await
    }

    /// Opens storage and starts every group, reaching peers through
    /// `connector` (a simulation passes its own network here).
    pub async fn open_with(
        config: NodeConfig,
        connector: Arc<dyn Connector>,
    ) -> Result<Arc<Node>, ServerError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)?;
        let store = NodeStore::open_with(
            &config.data_dir.join("db"),
            config.cache_bytes,
            config.flush_mode,
        )?;
        let channels = PeerChannels::new(connector);
        let legacy_groups = match store.node_fact(NODE_ID_FACT)? {
            Some(_) => None,
            None => store.node_fact(LEGACY_GROUPS_FACT)?,
        };
        let incarnation = data_incarnation(&store)?;
        let id = resolve_identity(&config, &store, &channels, incarnation).await?;
        let raft_config = Arc::new(config.raft_config()?);
        let (map_tx, map_rx) = watch::channel(Arc::new(ClusterMap::default()));
        let node = Arc::new(Node {
            config,
            id,
            incarnation,
            store,
            raft_config,
            channels,
            registry: GroupRegistry::default(),
            map_tx,
            map_rx,
            leaders: LeaderCache::default(),
            lease_clock: crate::lease::LeaseClock::default(),
            read_indexes: std::sync::Mutex::new(BTreeMap::new()),
            legacy_groups,
            removed: AtomicBool::new(false),
            tasks: Tasks::default(),
            reconciling: tokio::sync::Mutex::new(()),
        });
        node.open_meta().await?;
        node.reconcile().await;
        tracing::info!(
            node = node.id,
            groups = node.registry.ids().len(),
            addr = %node.config.advertise_addr(),
            legacy = legacy_groups.is_some(),
            "node open"
        );
        spawn_disk_watch(&node);
        crate::reconcile::spawn(&node);
        crate::coordinator::spawn(&node);
        crate::lease::spawn_expiry(&node);
        spawn_history_retention(&node);
        Ok(node)
    }

    /// Opens this node's replica of the meta group; on a fresh bootstrap,
    /// the first nodes create it.
    async fn open_meta(self: &Arc<Self>) -> Result<(), ServerError> {
        let fresh = self.store.replica_record(META_GROUP)?.is_none();
        let meta = self.open_replica(META_GROUP, self.id, 0).await?;
        if fresh && !self.config.peers.is_empty() && self.legacy_groups.is_none() {
            let k = meta_voter_target(self.config.peers.len());
            let voters: BTreeMap<NodeId, BasicNode> = self
                .config
                .peers
                .iter()
                .take(k)
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            if voters.contains_key(&self.id) {
                meta.initialize(voters).await?;
            }
        }
        Ok(())
    }

    /// Opens replica `replica` of `group` and registers it. `added_epoch`
    /// is recorded with a replica opened for the first time (see
    /// [`ReplicaRecord`]).
    pub(crate) async fn open_replica(
        self: &Arc<Self>,
        group: GroupId,
        replica: ReplicaId,
        added_epoch: u64,
    ) -> Result<Arc<RaftGroup>, ServerError> {
        if let Some(g) = self.registry.get(group) {
            return Ok(g);
        }
        match self.store.replica_record(group)? {
            None => self.store.set_replica_record(
                group,
                &ReplicaRecord {
                    replica,
                    added_epoch,
                },
            )?,
            Some(r) if r.replica == 0 && replica == self.id => {}
            Some(r) if r.replica == replica => {}
            Some(r) => {
                return Err(ServerError::Config(format!(
                    "group {group}: storage holds replica {} but replica {replica} was asked for",
                    r.replica
                )));
            }
        }
        let map = (group == META_GROUP).then(|| MapState::new(self.map_tx.clone()));
        let g = RaftGroup::open(
            self.id,
            replica,
            group,
            &self.store,
            self.raft_config.clone(),
            self.channels.clone(),
            map,
        )
        .await?;
        let g = Arc::new(g);
        if self.config.accept_log_damage {
            g.accept_log_damage().await;
        }
        self.registry.insert(g.clone());
        self.watch_for_fatal_stop(&g);
        tracing::info!(node = self.id, group, replica, "replica open");
        Ok(g)
    }

    /// Calls the fatal hook if `group`'s Raft stops other than by a
    /// shutdown (a storage error, a panic in its core).
    fn watch_for_fatal_stop(&self, group: &Arc<RaftGroup>) {
        let mut metrics = group.raft().metrics();
        let hook = self.config.on_fatal.clone();
        let (node, id) = (self.id, group.id());
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                if metrics.borrow().running_state.is_err() {
                    break;
                }
            }
            let why = match &metrics.borrow().running_state {
                Err(openraft::error::Fatal::Stopped) => return,
                Err(e) => e.to_string(),
                Ok(()) => "its Raft core ended without a word (a panic)".to_string(),
            };
            hook.0(&format!("node {node}: group {id} stopped: {why}"));
        });
    }

    /// Closes the local replica of `group` (if open) and deletes its data.
    pub(crate) async fn destroy_replica(&self, group: GroupId) -> Result<(), ServerError> {
        if let Some(g) = self.registry.remove(group) {
            g.shutdown().await;
        }
        self.lease_clock.forget(group);
        self.store.destroy_group(group)?;
        tracing::info!(
            node = self.id,
            group,
            "replica removed and its data deleted"
        );
        Ok(())
    }

    /// The replica record of `group` on this node's disk.
    pub(crate) fn replica_record(&self, group: GroupId) -> Option<ReplicaRecord> {
        self.store.replica_record(group).ok().flatten()
    }

    /// Groups this node has storage for.
    pub(crate) fn stored_groups(&self) -> Vec<GroupId> {
        self.store.stored_groups()
    }

    /// Serves the Kv, Admin, Lease, Lock and Peer services on `listener`
    /// until `shutdown`.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        // The builder's tcp_nodelay only covers sockets it binds itself;
        // without it here, Nagle + delayed ACK add ~40 ms stalls.
        self.serve_with_incoming(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
    }

    /// Serves on connections from `incoming` (a simulation passes its own
    /// network's listener here).
    pub async fn serve_with_incoming<I, IO, IE>(
        self: &Arc<Self>,
        incoming: I,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError>
    where
        I: tokio_stream::Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max_request = self.config.limits.max_request_bytes + 64 * 1024;
        let kv = KvServer::new(service::kv::KvService::new(self.clone()))
            .max_decoding_message_size(max_request);
        let admin = AdminServer::new(service::admin::AdminService::new(self.clone()));
        let lease = LeaseServer::new(service::lock::LeaseService::new(self.clone()));
        let lock = LockServer::new(service::lock::LockService::new(self.clone()));
        let peer = PeerServer::new(service::peer::PeerService::new(self.clone()))
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(kv)
            .add_service(admin)
            .add_service(lease)
            .add_service(lock)
            .add_service(peer)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }

    /// Stops the background tasks and every group, and flushes storage.
    pub async fn shutdown(&self) {
        self.tasks.stop().await;
        for (_, group) in self.registry.all() {
            group.shutdown().await;
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    /// Whether this node's disk-space alarm is on.
    pub fn disk_full(&self) -> bool {
        self.store.disk().is_full()
    }

    /// Whether this node's free space is below the floor where it stores
    /// no new data (see `palisade_storage::space`).
    pub fn disk_below_floor(&self) -> bool {
        self.store.disk().below_floor()
    }

    /// This data directory's incarnation (see `NodeInfo::incarnation`).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// This node's copy of the cluster map (empty until bootstrapped).
    pub fn map(&self) -> Arc<ClusterMap> {
        self.map_rx.borrow().clone()
    }

    /// A receiver of every new version of the map.
    pub fn watch_map(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.map_rx.clone()
    }

    /// Waits up to `timeout` until the map's epoch is at least `epoch`.
    pub(crate) async fn wait_map(&self, epoch: u64, timeout: Duration) -> Arc<ClusterMap> {
        let mut rx = self.map_rx.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|m| m.epoch >= epoch)).await;
        self.map()
    }

    /// The data group count of a data directory from before the cluster
    /// map, if this is one.
    pub fn legacy_groups(&self) -> Option<u64> {
        self.legacy_groups
    }

    /// The meta group's replica here.
    pub(crate) fn meta(&self) -> Option<Arc<RaftGroup>> {
        self.registry.get(META_GROUP)
    }

    /// Whether this node leads the meta group (and so runs the coordinator).
    pub fn is_meta_leader(&self) -> bool {
        self.meta().is_some_and(|m| m.is_leader())
    }

    /// Every group hosted here, by id.
    pub fn groups(&self) -> Vec<(GroupId, Arc<RaftGroup>)> {
        self.registry.all()
    }

    /// The local replica of `group`, if hosted here.
    pub fn group(&self, id: GroupId) -> Option<Arc<RaftGroup>> {
        self.registry.get(id)
    }

    /// Refuses requests once the map says this node was removed.
    pub(crate) fn check_serving(&self) -> Result<(), ServerError> {
        if self.removed.load(Ordering::Relaxed) {
            Err(ServerError::NodeRemoved(self.id))
        } else {
            Ok(())
        }
    }

    pub(crate) fn mark_removed(&self) {
        if !self.removed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                node = self.id,
                "this node was removed from the cluster; it serves nothing now and may be stopped"
            );
        }
    }

    /// Every node of the cluster, id → address: from the map, or before it
    /// exists, from the meta group's membership and the bootstrap peers.
    pub fn cluster_nodes(&self) -> BTreeMap<NodeId, String> {
        let map = self.map();
        if map.is_bootstrapped() {
            return map
                .nodes
                .iter()
                .filter(|(_, n)| n.state != NodeState::Removed)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
        }
        let mut nodes = self.config.peers.clone();
        if let Some(meta) = self.meta() {
            nodes.extend(meta.member_addrs());
        }
        nodes.insert(self.id, self.config.advertise_addr());
        nodes
    }

    /// This node's view of each of its groups.
    pub async fn local_status(&self) -> pb::NodeStatusResponse {
        let map = self.map();
        let mut groups = Vec::new();
        for (id, group) in self.registry.all() {
            let st = group.replica_state().await;
            let leader_node = st
                .leader
                .map(|r| {
                    map.node_of(id, r)
                        .unwrap_or(if map.is_bootstrapped() { 0 } else { r })
                })
                .unwrap_or(0);
            groups.push(pb::LocalGroupStatus {
                group_id: st.group,
                leader_id: leader_node,
                replica: Some(replica_status(&map, &st)),
            });
        }
        let (flushes, flush_waiters) = self.flush_stats();
        pb::NodeStatusResponse {
            node_id: self.id,
            groups,
            flushes,
            flush_waiters,
            rss_bytes: rss_bytes().unwrap_or(0),
            disk_bytes: self.store.size_on_disk().unwrap_or(0),
            write_bytes: write_bytes().unwrap_or(0),
            incarnation: self.incarnation,
            disk_free_bytes: self.store.disk().free_bytes(),
            disk_full: self.store.disk().is_full(),
        }
    }

    /// The newest leader read index fetched for `group`, with when the
    /// fetch began.
    pub(crate) fn cached_read_index(&self, group: GroupId) -> Option<(tokio::time::Instant, u64)> {
        self.read_indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
    }

    /// Remembers a read index fetched from `t0` on, unless a newer fetch
    /// already did.
    pub(crate) fn cache_read_index(&self, group: GroupId, t0: tokio::time::Instant, index: u64) {
        let mut cache = self.read_indexes.lock().unwrap_or_else(|p| p.into_inner());
        let newer = cache.get(&group).is_none_or(|(t, _)| *t < t0);
        if newer {
            cache.insert(group, (t0, index));
        }
    }

    /// Deadline for calls to other nodes.
    pub fn peer_timeout(&self) -> Duration {
        self.config.peer_timeout
    }

    /// Flush counters of this node's group-commit flusher.
    pub fn flush_stats(&self) -> (u64, u64) {
        let s = self.store.flusher().stats();
        (
            s.flushes.load(Ordering::Relaxed),
            s.completions.load(Ordering::Relaxed),
        )
    }
}

/// This data directory's incarnation: drawn (from the runtime's random
/// source, which a simulation seeds) and recorded the first time.
fn data_incarnation(store: &NodeStore) -> Result<u64, ServerError> {
    if let Some(i) = store.node_fact(INCARNATION_FACT)? {
        return Ok(i);
    }
    let incarnation = {
        use openraft::async_runtime::AsyncRuntime;
        use rand::Rng;
        let mut rng = palisade_group::runtime::PalisadeRuntime::thread_rng();
        rng.gen_range(1..=u64::MAX)
    };
    store.set_node_fact(INCARNATION_FACT, incarnation)?;
    Ok(incarnation)
}

/// How long a node with a new data directory waits for each of its
/// `--peers` to say whether they already know it (see
/// [`refuse_lost_identity`]).
const IDENTITY_CHECK: Duration = Duration::from_secs(1);

/// Refuses to start node `id` on a new data directory (incarnation
/// `incarnation`) when a peer's cluster map shows the node already ran with
/// another one: the node's votes and log are gone, and a replica that
/// forgot them could vote twice in a term or count toward a quorum for
/// entries it no longer has. One round of questions: peers that do not
/// answer within [`IDENTITY_CHECK`] are skipped (in a cluster starting for
/// the first time nobody is listening yet, and nobody waits for anybody);
/// the coordinator refuses such a process later as well.
async fn refuse_lost_identity(
    config: &NodeConfig,
    channels: &PeerChannels,
    id: NodeId,
    incarnation: u64,
) -> Result<(), ServerError> {
    use palisade_proto::v1::admin_client::AdminClient;
    let peers: Vec<String> = config
        .peers
        .iter()
        .filter(|(p, _)| **p != id)
        .map(|(_, addr)| addr.clone())
        .collect();
    // `None`: no answer; `Some(None)`: the peer answered without a map (a
    // typed refusal: it has none yet).
    let ask = |addr: String| async move {
        let channel = channels.connector().channel(&addr).ok()?;
        let mut client = AdminClient::new(channel);
        let mut request = tonic::Request::new(pb::GetClusterMapRequest { min_epoch: 0 });
        request.set_timeout(IDENTITY_CHECK);
        match tokio::time::timeout(IDENTITY_CHECK, client.get_cluster_map(request))
            .await
            .ok()?
        {
            Ok(reply) => Some(reply.into_inner().map.map(|m| (addr, m))),
            Err(status) => error_detail(&status).is_some().then_some(None),
        }
    };
    {
        let replies = futures::future::join_all(peers.iter().cloned().map(ask)).await;
        for (addr, map) in replies.into_iter().flatten().flatten() {
            let known = map.nodes.iter().find(|n| n.id == id);
            if let Some(n) = known
                && n.incarnation != 0
                && n.incarnation != incarnation
            {
                return Err(ServerError::Config(format!(
                    "node {id} is a member of cluster {:#x} (the map at {addr} lists it, from \
                     data directory incarnation {:#x}), but {} is a new data directory: this \
                     node lost its state (votes and log). It must not run under id {id} \
                     again. Replace it: `palisade node remove {id} --endpoints {addr}`, then \
                     start this node with an empty data directory and `--join {addr}` (without \
                     --id or --peers: it gets a new id). If the old data directory still \
                     exists, start the node on it instead.",
                    map.cluster_id,
                    n.incarnation,
                    config.data_dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// The node's id: kept from its data directory, taken from the config, or
/// given by the cluster it joins (see the module doc).
async fn resolve_identity(
    config: &NodeConfig,
    store: &NodeStore,
    channels: &PeerChannels,
    incarnation: u64,
) -> Result<NodeId, ServerError> {
    if let Some(id) = store.node_fact(NODE_ID_FACT)? {
        if config.id != 0 && config.id != id {
            return Err(ServerError::Config(format!(
                "this data directory belongs to node {id}, not --id {}",
                config.id
            )));
        }
        return Ok(id);
    }
    let legacy = store.node_fact(LEGACY_GROUPS_FACT)?.is_some();
    let id = if legacy {
        if config.id == 0 {
            return Err(ServerError::Config(
                "this data directory was written by an earlier version: give its node's --id"
                    .into(),
            ));
        }
        config.id
    } else if !config.peers.is_empty() {
        refuse_lost_identity(config, channels, config.id, incarnation).await?;
        config.id
    } else if !config.join.is_empty() {
        let (id, cluster) = join_cluster(config, channels, incarnation).await?;
        store.set_node_fact(CLUSTER_ID_FACT, cluster)?;
        id
    } else {
        return Err(ServerError::Config(
            "a new node needs --peers (to bootstrap a cluster) or --join (to join one)".into(),
        ));
    };
    store.set_node_fact(NODE_ID_FACT, id)?;
    Ok(id)
}

/// Registers this node with the cluster behind `config.join` (any node
/// forwards it to the meta leader); returns its id and the cluster's.
async fn join_cluster(
    config: &NodeConfig,
    channels: &PeerChannels,
    incarnation: u64,
) -> Result<(NodeId, u64), ServerError> {
    use palisade_proto::v1::admin_client::AdminClient;
    let req = pb::JoinNodeRequest {
        incarnation,
        node_id: config.id,
        addr: config.advertise_addr(),
        region: config.region.clone(),
        zone: config.zone.clone(),
        read_replica: config.learner,
        read_groups: config.read_groups.clone(),
    };
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let mut attempt = 0usize;
    loop {
        let addr = &config.join[attempt % config.join.len()];
        attempt += 1;
        let result = async {
            let channel = channels.connector().channel(addr)?;
            let mut client = AdminClient::new(channel);
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(config.peer_timeout);
            Ok::<_, ServerError>(
                tokio::time::timeout(config.peer_timeout, client.join_node(request)).await,
            )
        }
        .await;
        let why = match result {
            Ok(Ok(Ok(resp))) => {
                let r = resp.into_inner();
                tracing::info!(node = r.node_id, cluster = r.cluster_id, via = %addr, "joined the cluster");
                return Ok((r.node_id, r.cluster_id));
            }
            Ok(Ok(Err(status)))
                if let Some(pb::error_detail::Kind::NodeRemoved(r)) = error_detail(&status) =>
            {
                return Err(ServerError::NodeRemoved(r.node_id));
            }
            Ok(Ok(Err(status)))
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ) =>
            {
                return Err(ServerError::Config(format!(
                    "the cluster at {addr} refused to register this node: {}",
                    status.message()
                )));
            }
            Ok(Ok(Err(status))) => status.message().to_string(),
            Ok(Err(_)) => "no answer in time".to_string(),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ServerError::Config(format!(
                "could not join the cluster at {}: {why}",
                config.join.join(",")
            )));
        }
        tracing::warn!(via = %addr, error = %why, "joining the cluster failed; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How often the free space of the data filesystem is measured.
const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Measures the data filesystem's free space and raises or clears the
/// disk-space alarm (see `palisade_storage::space`).
fn spawn_disk_watch(node: &Arc<Node>) {
    let disk = node.store.disk().clone();
    disk.set_reserve(node.config.disk_reserve_bytes);
    if node.config.disk_reserve_bytes == 0 {
        return;
    }
    let id = node.id;
    let weak = Arc::downgrade(node);
    node.tasks
        .spawn("disk space", move |mut shutdown| async move {
            use palisade_storage::space::AlarmChange;
            let mut failing = false;
            loop {
                let change = disk.check();
                if matches!(change, Ok(AlarmChange::Raised | AlarmChange::Cleared))
                    && let Some(node) = weak.upgrade()
                {
                    // A full node's replicas stop campaigning (see
                    // `RaftGroup::apply_elections`), and start again.
                    for (_, group) in node.registry.all() {
                        group.apply_elections();
                    }
                }
                match change {
                    Ok(palisade_storage::space::AlarmChange::Raised) => tracing::error!(
                        node = id,
                        free = disk.free_bytes(),
                        reserve = disk.reserve(),
                        "disk almost full: refusing writes that add data until space is freed (reads, deletes and compaction go on)"
                    ),
                    Ok(palisade_storage::space::AlarmChange::Cleared) => tracing::warn!(
                        node = id,
                        free = disk.free_bytes(),
                        "disk space freed: taking writes again"
                    ),
                    Ok(_) => {}
                    Err(e) if !failing => {
                        tracing::warn!(node = id, error = %e, "cannot measure free disk space");
                        failing = true;
                    }
                    Err(_) => {}
                }
                if !shutdown.sleep(DISK_CHECK_INTERVAL).await {
                    return;
                }
            }
        });
}

/// Keeps each group's MVCC history within the configured retention: every
/// second, the leader of a group whose history grew a tenth past the window
/// proposes a compaction (a Raft write, so every replica compacts alike).
fn spawn_history_retention(node: &Arc<Node>) {
    let retention = node.config.history_retention;
    if retention == 0 {
        return;
    }
    let slack = (retention / 10).max(1);
    let weak = Arc::downgrade(node);
    node.tasks
        .spawn("history retention", move |mut shutdown| async move {
            while shutdown.sleep(Duration::from_secs(1)).await {
                let Some(node) = weak.upgrade() else { return };
                for (id, group) in node.registry.all() {
                    if id == META_GROUP {
                        continue;
                    }
                    let state = group.state();
                    let target = state.revision().saturating_sub(retention);
                    if !group.is_leader() || target < state.compacted() + slack {
                        continue;
                    }
                    let cmd = palisade_group::Command {
                        request_id: None,
                        op: palisade_group::CommandOp::Compact { revision: target },
                    };
                    match group.write(cmd, node.config.write_timeout).await {
                        Ok(_) => {
                            tracing::debug!(group = id, revision = target, "history compacted")
                        }
                        Err(e) => {
                            tracing::debug!(group = id, error = %e, "history compaction skipped")
                        }
                    }
                }
            }
        });
}

/// This process's resident set size, from `/proc/self/status` (Linux).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes this process caused to be written to storage, from
/// `/proc/self/io` (Linux, with task I/O accounting).
fn write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let line = io.lines().find(|l| l.starts_with("write_bytes:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn raft_role(role: palisade_group::RaftRole) -> pb::RaftRole {
    use palisade_group::RaftRole as R;
    match role {
        R::Leader => pb::RaftRole::Leader,
        R::Follower => pb::RaftRole::Follower,
        R::Candidate => pb::RaftRole::Candidate,
        R::Learner => pb::RaftRole::Learner,
        R::Shutdown => pb::RaftRole::Shutdown,
    }
}

fn replica_status(map: &ClusterMap, st: &ReplicaState) -> pb::ReplicaStatus {
    // Member ids are replica ids; the API speaks of nodes.
    let node_of = |r: ReplicaId| {
        map.node_of(st.group, r)
            .unwrap_or(if map.is_bootstrapped() { 0 } else { r })
    };
    pb::ReplicaStatus {
        node_id: st.node,
        role: raft_role(st.role) as i32,
        term: st.term,
        last_log_index: st.last_log_index,
        commit_index: st.commit_index,
        applied_index: st.applied_index,
        snapshot_index: st.snapshot_index,
        purged_index: st.purged_index,
        snapshots_installed: st.snapshots_installed,
        voters: st.voters.iter().map(|r| node_of(*r)).collect(),
        key_count: st.key_count,
        learners: st.learners.iter().map(|r| node_of(*r)).collect(),
        compact_revision: st.compacted,
        lag: 0,
        history_records: st.history_records,
        progress: st
            .matched
            .iter()
            .map(|(id, index)| pb::Progress {
                node_id: node_of(*id),
                matched_index: *index,
                replica_id: *id,
            })
            .collect(),
        replica_id: st.replica,
        revision: st.revision,
        owned_slots: st.owned_slots.unwrap_or(0) as u32,
        serves_all: st.owned_slots.is_none(),
        quarantine: st.quarantine.clone().unwrap_or_default(),
    }
}
