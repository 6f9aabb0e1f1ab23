//! A palisade node: the sled store, every Raft group it hosts, and the gRPC
//! server that fronts them.
//!
//! Lifecycle: [`Node::open`] opens storage and starts every group (group 0,
//! the meta group, and data groups `1..=N`); on a fresh data directory it
//! initializes each group with the configured peers as voters (every node
//! does this with the same membership, which openraft accepts; on restart it
//! is a no-op). [`Node::serve`] runs the Kv, Admin and Peer services on one
//! listener until the shutdown future resolves; [`Node::shutdown`] stops the
//! groups and flushes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use palisade_group::{
    Connector, GroupId, NodeId, PeerChannels, RaftGroup, ReplicaState, TcpConnector,
};
use palisade_proto::v1 as pb;
use palisade_proto::v1::admin_server::AdminServer;
use palisade_proto::v1::kv_server::KvServer;
use palisade_proto::v1::lease_server::LeaseServer;
use palisade_proto::v1::lock_server::LockServer;
use palisade_proto::v1::peer_server::PeerServer;
use palisade_shard::ShardMap;
use palisade_storage::NodeStore;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::config::NodeConfig;
use crate::error::ServerError;
use crate::{admin, kv, lock, peer};

/// Node-level fact: number of data groups fixed at bootstrap.
const DATA_GROUPS_FACT: &str = "data_groups";

/// Largest peer message (an append batch or a snapshot chunk).
const MAX_PEER_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

pub struct Node {
    pub(crate) config: NodeConfig,
    store: NodeStore,
    groups: BTreeMap<GroupId, Arc<RaftGroup>>,
    shard: ShardMap,
    pub(crate) channels: PeerChannels,
    /// Lease deadlines of the groups this node leads.
    pub(crate) lease_clock: crate::lock::LeaseClock,
    /// Per group: the newest leader read index this node fetched, with the
    /// instant the fetch began (shared by BOUNDED_STALENESS reads).
    read_indexes: std::sync::Mutex<BTreeMap<GroupId, (std::time::Instant, u64)>>,
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
        let data_groups = match store.node_fact(DATA_GROUPS_FACT)? {
            Some(n) => {
                if n != config.data_groups {
                    tracing::warn!(
                        recorded = n,
                        requested = config.data_groups,
                        "data group count is fixed at bootstrap; using the recorded count"
                    );
                }
                n
            }
            None => {
                store.set_node_fact(DATA_GROUPS_FACT, config.data_groups)?;
                config.data_groups
            }
        };
        let shard = ShardMap::new(data_groups).ok_or_else(|| {
            ServerError::Config(format!(
                "recorded data group count {data_groups} is invalid"
            ))
        })?;
        let raft_config = Arc::new(config.raft_config()?);
        let channels = PeerChannels::new(connector);
        let members: BTreeMap<NodeId, BasicNode> = config
            .peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        let mut groups = BTreeMap::new();
        for id in std::iter::once(palisade_shard::META_GROUP).chain(shard.groups()) {
            let group =
                RaftGroup::open(config.id, id, &store, raft_config.clone(), channels.clone())
                    .await?;
            // A learner waits to be added by the cluster instead.
            if !config.learner {
                group.initialize(members.clone()).await?;
            }
            groups.insert(id, Arc::new(group));
        }
        tracing::info!(
            node = config.id,
            groups = groups.len(),
            addr = config.advertise_addr(),
            "node open"
        );
        let node = Arc::new(Node {
            config,
            store,
            groups,
            shard,
            channels,
            lease_clock: crate::lock::LeaseClock::default(),
            read_indexes: std::sync::Mutex::new(BTreeMap::new()),
        });
        spawn_history_retention(&node);
        crate::lock::spawn_lease_expiry(&node);
        Ok(node)
    }

    /// Serves the Kv, Admin and Peer services on `listener` until `shutdown`.
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
        let kv =
            KvServer::new(kv::KvService::new(self.clone())).max_decoding_message_size(max_request);
        let admin = AdminServer::new(admin::AdminService::new(self.clone()));
        let lease = LeaseServer::new(lock::LeaseService::new(self.clone()));
        let lock = LockServer::new(lock::LockService::new(self.clone()));
        let peer = PeerServer::new(peer::PeerService::new(self.clone()))
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

    /// Stops every group and flushes storage.
    pub async fn shutdown(&self) {
        for group in self.groups.values() {
            group.shutdown().await;
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn shard_map(&self) -> ShardMap {
        self.shard
    }

    /// A group hosted here, or `NOT_FOUND`.
    pub fn group(&self, id: GroupId) -> Result<&Arc<RaftGroup>, ServerError> {
        self.groups.get(&id).ok_or(ServerError::UnknownGroup(id))
    }

    /// The data group that owns `key`.
    pub fn group_for_key(&self, key: &[u8]) -> Result<&Arc<RaftGroup>, ServerError> {
        self.group(self.shard.group_for_key(key))
    }

    /// Every group hosted here, by id.
    pub fn groups(&self) -> &BTreeMap<GroupId, Arc<RaftGroup>> {
        &self.groups
    }

    /// Every node of the cluster as the meta group knows it (falling back to
    /// the configured peers before the meta group has a membership).
    pub fn cluster_nodes(&self) -> BTreeMap<NodeId, String> {
        let from_meta = self
            .groups
            .get(&palisade_shard::META_GROUP)
            .map(|g| g.member_addrs())
            .unwrap_or_default();
        if from_meta.is_empty() {
            self.config.peers.clone()
        } else {
            from_meta
        }
    }

    /// This node's view of each of its groups.
    pub async fn local_status(&self) -> pb::NodeStatusResponse {
        let mut groups = Vec::with_capacity(self.groups.len());
        for group in self.groups.values() {
            // A learner hosts every group but replicates only those it was
            // added to.
            if !group.has_member(self.config.id) {
                continue;
            }
            let st = group.replica_state().await;
            groups.push(pb::LocalGroupStatus {
                group_id: st.group,
                leader_id: st.leader.unwrap_or(0),
                replica: Some(replica_status(&st)),
            });
        }
        let (flushes, flush_waiters) = self.flush_stats();
        pb::NodeStatusResponse {
            node_id: self.config.id,
            groups,
            flushes,
            flush_waiters,
            rss_bytes: rss_bytes().unwrap_or(0),
            disk_bytes: self.store.size_on_disk().unwrap_or(0),
            write_bytes: write_bytes().unwrap_or(0),
        }
    }

    /// The newest leader read index fetched for `group`, with when the
    /// fetch began.
    pub(crate) fn cached_read_index(&self, group: GroupId) -> Option<(std::time::Instant, u64)> {
        self.read_indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
    }

    /// Remembers a read index fetched from `t0` on, unless a newer fetch
    /// already did.
    pub(crate) fn cache_read_index(&self, group: GroupId, t0: std::time::Instant, index: u64) {
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
        use std::sync::atomic::Ordering;
        let s = self.store.flusher().stats();
        (
            s.flushes.load(Ordering::Relaxed),
            s.completions.load(Ordering::Relaxed),
        )
    }
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
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            for id in node.shard.groups() {
                let Some(group) = node.groups.get(&id) else {
                    continue;
                };
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
                    Ok(_) => tracing::debug!(group = id, revision = target, "history compacted"),
                    Err(e) => tracing::debug!(group = id, error = %e, "history compaction skipped"),
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

fn replica_status(st: &ReplicaState) -> pb::ReplicaStatus {
    pb::ReplicaStatus {
        node_id: st.node,
        role: st.role.to_string(),
        term: st.term,
        last_log_index: st.last_log_index,
        commit_index: st.commit_index,
        applied_index: st.applied_index,
        snapshot_index: st.snapshot_index,
        purged_index: st.purged_index,
        snapshots_installed: st.snapshots_installed,
        voters: st.voters.clone(),
        key_count: st.key_count,
        learners: st.learners.clone(),
        compact_revision: st.compacted,
        lag: 0,
        history_records: st.history_records,
        progress: st
            .matched
            .iter()
            .map(|(id, index)| pb::Progress {
                node_id: *id,
                matched_index: *index,
            })
            .collect(),
    }
}
