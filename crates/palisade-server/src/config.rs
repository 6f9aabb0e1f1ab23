//! Node configuration: one struct, validated once at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ServerError;

/// Default maximum key size (bytes).
pub const DEFAULT_MAX_KEY_BYTES: usize = 4 * 1024;
/// Default maximum value size (bytes).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Default maximum request size (bytes).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Default number of data groups created at bootstrap.
pub const DEFAULT_DATA_GROUPS: u64 = 4;
/// Default number of keys a scan returns when the request sets no limit.
pub const DEFAULT_SCAN_LIMIT: usize = 1000;
/// Default MVCC history retention per group, in revisions.
pub const DEFAULT_HISTORY_RETENTION: u64 = 100_000;
/// Upper bound on a scan's limit, so one request cannot pin a node.
pub const MAX_SCAN_LIMIT: usize = 100_000;
/// Default voters per data group.
pub const DEFAULT_REPLICAS: u32 = 3;
/// Default time a node may be unreachable before its replicas are moved
/// elsewhere.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(300);

/// Raft timings. Short enough that a killed leader is replaced within about a
/// second; long enough that a loaded two-core machine does not flap.
#[derive(Debug, Clone)]
pub struct RaftTimings {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
}

impl Default for RaftTimings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
        }
    }
}

/// Request size limits; over a limit → `INVALID_ARGUMENT`, nothing written.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// How the cluster's coordinator (on the meta group's leader) paces itself.
#[derive(Debug, Clone)]
pub struct CoordinatorTimings {
    /// How often it probes the nodes and plans the next changes.
    pub interval: Duration,
    /// A node unreachable this long is drained (its replicas re-created
    /// from the others).
    pub down_after: Duration,
    /// How long a new replica may take to catch up before its change is
    /// rolled back.
    pub catchup_timeout: Duration,
    /// Replica changes carried out at once (on distinct groups).
    pub max_concurrent_changes: usize,
    /// Most slots one move carries.
    pub max_move_slots: usize,
    /// Least time between two leader transfers of one group.
    pub transfer_cooldown: Duration,
}

impl Default for CoordinatorTimings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            down_after: DEFAULT_DOWN_AFTER,
            catchup_timeout: Duration::from_secs(120),
            max_concurrent_changes: 2,
            max_move_slots: 256,
            transfer_cooldown: Duration::from_secs(10),
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (0: unknown yet: a node joining with `--join` gets one
    /// from the cluster). Once a data directory has an id, it keeps it.
    pub id: u64,
    /// Address to bind.
    pub listen: SocketAddr,
    /// The address peers and clients reach this node at (empty: `peers[id]`
    /// when bootstrapping, else `listen`).
    pub advertise: String,
    /// Bootstrap: every node of the initial cluster, id → advertised
    /// `host:port`. Empty when joining a running cluster.
    pub peers: BTreeMap<u64, String>,
    /// Join: addresses of some nodes of a running cluster.
    pub join: Vec<String>,
    /// Placement labels.
    pub region: String,
    pub zone: String,
    pub data_dir: PathBuf,
    /// Data groups to create at bootstrap (the group count changes later
    /// with `cluster set-groups`).
    pub data_groups: u64,
    /// Voters per data group, chosen at bootstrap.
    pub replicas: u32,
    pub coordinator: CoordinatorTimings,
    pub limits: Limits,
    pub timings: RaftTimings,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Log entries to keep behind a snapshot for slow followers.
    pub keep_logs: u64,
    /// How long a write may wait for commit before its outcome is unknown.
    pub write_timeout: Duration,
    /// How long a read may wait for the leader to confirm its leadership.
    pub read_timeout: Duration,
    /// Deadline of a forwarded request or a status probe to another node.
    pub peer_timeout: Duration,
    /// sled page cache bound.
    pub cache_bytes: u64,
    /// TEST ONLY: answer `Get` from this node's local state, skipping
    /// ReadIndex. Reads become stale and non-linearizable; jepsen-lite's
    /// positive control uses this to prove its checker catches that.
    pub unsafe_local_reads: bool,
    /// How writes are made durable: a group-commit thread (production) or
    /// synchronously on the caller (deterministic simulation).
    pub flush_mode: palisade_storage::FlushMode,
    /// How long a SESSION (or min_revision) read waits for this replica to
    /// catch up before forwarding or answering UNAVAILABLE.
    pub session_wait: Duration,
    /// How long an `ack = ALL` write waits for every replica to apply it.
    pub ack_all_wait: Duration,
    /// MVCC history kept per group, in revisions: the group leader compacts
    /// history older than this many revisions behind the newest (0: never
    /// compact automatically).
    pub history_retention: u64,
    /// Join as a read replica: learners only, of `read_groups` (empty: all).
    pub learner: bool,
    pub read_groups: Vec<u64>,
    /// What to do when a group's Raft stops on its own (a storage error, a
    /// panic): by default the process exits (see [`FatalHook`]).
    pub on_fatal: FatalHook,
    /// Free space kept in reserve on the data filesystem (see
    /// `palisade_storage::space`; 0: no alarm).
    pub disk_reserve_bytes: u64,
    /// Lift every quarantine of a damaged log at open (the operator accepts
    /// that what the damage took may be lost; see `RaftGroup::accept_log_damage`).
    pub accept_log_damage: bool,
}

/// Default free space kept in reserve on the data filesystem, in bytes.
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = palisade_storage::space::DEFAULT_RESERVE_BYTES;

/// Called once when one of the node's groups stops on its own, with a
/// description. A group that stopped cannot serve or vote; a process that
/// kept running with it would answer `UNAVAILABLE` forever (a zombie), so
/// the default is crash-only: log it and exit non-zero, and let the
/// supervisor restart the node (everything acknowledged is on disk). A
/// simulation passes its own hook (its hosts share one process).
#[derive(Clone)]
pub struct FatalHook(pub std::sync::Arc<dyn Fn(&str) + Send + Sync>);

impl FatalHook {
    /// Exit code of a crash-only exit.
    pub const EXIT_CODE: i32 = 70;

    /// Logs `what` and exits the process.
    pub fn exit_process() -> Self {
        Self(std::sync::Arc::new(|what: &str| {
            tracing::error!(
                "{what}; exiting (crash-only: restart the node; everything it acknowledged is on disk)"
            );
            eprintln!("palisade: fatal: {what}");
            std::process::exit(Self::EXIT_CODE);
        }))
    }
}

impl std::fmt::Debug for FatalHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FatalHook")
    }
}

impl NodeConfig {
    /// A config with defaults for everything but identity and membership.
    pub fn new(
        id: u64,
        listen: SocketAddr,
        peers: BTreeMap<u64, String>,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            id,
            listen,
            advertise: String::new(),
            peers,
            join: Vec::new(),
            region: String::new(),
            zone: String::new(),
            data_dir,
            data_groups: DEFAULT_DATA_GROUPS,
            replicas: DEFAULT_REPLICAS,
            coordinator: CoordinatorTimings::default(),
            limits: Limits::default(),
            timings: RaftTimings::default(),
            snapshot_every: 10_000,
            keep_logs: 1_000,
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(5),
            cache_bytes: palisade_storage::DEFAULT_CACHE_BYTES,
            unsafe_local_reads: false,
            flush_mode: palisade_storage::FlushMode::Thread,
            session_wait: Duration::from_secs(1),
            ack_all_wait: Duration::from_secs(2),
            history_retention: DEFAULT_HISTORY_RETENTION,
            learner: false,
            read_groups: Vec::new(),
            on_fatal: FatalHook::exit_process(),
            disk_reserve_bytes: DEFAULT_DISK_RESERVE_BYTES,
            accept_log_damage: false,
        }
    }

    /// Checks the config; the error names the offending setting.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        if self.id >= palisade_shard::FIRST_ADDED_REPLICA_ID {
            return bad(format!(
                "--id must be below {}",
                palisade_shard::FIRST_ADDED_REPLICA_ID
            ));
        }
        if !self.peers.is_empty() {
            if self.id == 0 {
                return bad("--id must be at least 1 when bootstrapping with --peers".into());
            }
            if !self.peers.contains_key(&self.id) {
                return bad(format!(
                    "--peers must include this node's own id {}",
                    self.id
                ));
            }
            if !self.join.is_empty() {
                return bad(
                    "--peers (bootstrap a cluster) and --join (join one) exclude each other".into(),
                );
            }
        }
        if self.replicas == 0 || self.replicas > 7 {
            return bad(format!(
                "--replicas must be between 1 and 7, got {}",
                self.replicas
            ));
        }
        if self.coordinator.down_after < Duration::from_secs(1) {
            return bad("--down-after must be at least 1s".into());
        }
        if self.data_groups == 0 || self.data_groups > 256 {
            return bad(format!(
                "--groups must be between 1 and 256, got {}",
                self.data_groups
            ));
        }
        if self.timings.election_min <= self.timings.heartbeat * 2
            || self.timings.election_max <= self.timings.election_min
        {
            return bad("election timeouts must exceed twice the heartbeat, min < max".into());
        }
        if self.snapshot_every == 0 {
            return bad("--snapshot-every must be at least 1".into());
        }
        if self.limits.max_key_bytes == 0 || self.limits.max_value_bytes == 0 {
            return bad("key and value limits must be positive".into());
        }
        Ok(())
    }

    /// The leader lease for LEASE reads: the minimum election timeout minus a
    /// margin of 30% of it for clock-rate drift and scheduling delays.
    /// Followers that acknowledged the leader do not elect another one sooner
    /// than the minimum election timeout after that, and the lease starts
    /// before the quorum round that confirmed it.
    pub fn lease(&self) -> Duration {
        self.timings.election_min.mul_f64(0.7)
    }

    /// This node's advertised address.
    pub fn advertise_addr(&self) -> String {
        if !self.advertise.is_empty() {
            return self.advertise.clone();
        }
        self.peers
            .get(&self.id)
            .cloned()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub(crate) fn raft_config(&self) -> Result<openraft::Config, ServerError> {
        let config = openraft::Config {
            cluster_name: "palisade".into(),
            heartbeat_interval: self.timings.heartbeat.as_millis() as u64,
            election_timeout_min: self.timings.election_min.as_millis() as u64,
            election_timeout_max: self.timings.election_max.as_millis() as u64,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| ServerError::Config(e.to_string()))
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("peer '{part}' is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("peer id '{id}' is not a number"))?;
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("peer address '{addr}' is not HOST:PORT"));
        }
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(format!("peer id {id} appears twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peer_lists() {
        let p = parse_peers("1=127.0.0.1:7001, 2=localhost:7002").unwrap();
        assert_eq!(p[&1], "127.0.0.1:7001");
        assert_eq!(p[&2], "localhost:7002");
        assert!(parse_peers("1=a:1,1=b:2").unwrap_err().contains("twice"));
        assert!(parse_peers("x=a:1").unwrap_err().contains("not a number"));
        assert!(parse_peers("1=a").unwrap_err().contains("HOST:PORT"));
        assert!(parse_peers("").is_err());
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let peers = parse_peers("1=127.0.0.1:7001").unwrap();
        let mut c = NodeConfig::new(1, "127.0.0.1:7001".parse().unwrap(), peers, "/tmp/x".into());
        assert!(c.validate().is_ok());
        c.id = 2;
        assert!(c.validate().unwrap_err().to_string().contains("own id 2"));
        c.id = 1;
        c.join = vec!["a:1".into()];
        assert!(c.validate().unwrap_err().to_string().contains("--join"));
        c.join.clear();
        c.replicas = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--replicas"));
        c.replicas = 3;
        c.id = 1;
        c.data_groups = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--groups"));
    }
}
