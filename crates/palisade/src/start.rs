//! `palisade start`: run one node until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use palisade_server::{Node, NodeConfig, parse_peers};

#[derive(Args)]
pub struct StartArgs {
    /// This node's id (1 or more). Required with --peers; with --join the
    /// cluster picks one when it is not given. A data directory remembers
    /// its node's id.
    #[arg(long, env = "PALISADE_ID", default_value_t = 0)]
    pub id: u64,
    /// Address to listen on, e.g. 127.0.0.1:7001.
    #[arg(long, env = "PALISADE_LISTEN")]
    pub listen: SocketAddr,
    /// Bootstrap a new cluster: every node of it as ID=HOST:PORT,
    /// comma-separated, this node included (its entry is the address others
    /// use to reach it). Every node of the new cluster gets the same list.
    #[arg(long, env = "PALISADE_PEERS", value_parser = parse_peers_arg, conflicts_with = "join")]
    pub peers: Option<std::collections::BTreeMap<u64, String>>,
    /// Join a running cluster through any of these nodes (comma-separated
    /// HOST:PORT). The node starts with no replicas; the cluster moves some
    /// to it once it has joined.
    #[arg(long, env = "PALISADE_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// With --join: join as a read replica, a non-voting learner of the
    /// data groups (see --learner-groups) that serves SESSION,
    /// BOUNDED_STALENESS, STALE and at-revision reads locally.
    #[arg(long, env = "PALISADE_LEARNER", requires = "join")]
    pub learner: bool,
    /// With --learner: the data groups to replicate, comma-separated
    /// (default: all).
    #[arg(long, env = "PALISADE_LEARNER_GROUPS", value_delimiter = ',')]
    pub learner_groups: Vec<u64>,
    /// The address other nodes and clients reach this node at (default:
    /// its --peers entry, else --listen).
    #[arg(long, env = "PALISADE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Placement labels: voters of a group go to distinct zones when they
    /// can.
    #[arg(long, env = "PALISADE_REGION", default_value = "")]
    pub region: String,
    #[arg(long, env = "PALISADE_ZONE", default_value = "")]
    pub zone: String,
    /// Voters per data group, chosen when the cluster is bootstrapped.
    #[arg(long, env = "PALISADE_REPLICAS", default_value_t = palisade_server::config::DEFAULT_REPLICAS)]
    pub replicas: u32,
    /// How long a node may be unreachable before the cluster re-creates its
    /// replicas on the others (e.g. 300s, 5m).
    #[arg(long, env = "PALISADE_DOWN_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub down_after: Duration,
    /// MVCC history kept per group, in revisions; older history is
    /// compacted automatically (0: keep everything until `cluster compact`).
    #[arg(long, env = "PALISADE_HISTORY_RETENTION", default_value_t = palisade_server::config::DEFAULT_HISTORY_RETENTION)]
    pub history_retention: u64,
    /// Free space kept in reserve on the data filesystem, in MiB: below
    /// it, writes that add data are refused (RESOURCE_EXHAUSTED) until
    /// space is freed; reads, deletes and compaction go on.
    #[arg(long, env = "PALISADE_DISK_RESERVE_MB", default_value_t = palisade_server::config::DEFAULT_DISK_RESERVE_BYTES / (1024 * 1024))]
    pub disk_reserve_mb: u64,
    /// Lift the quarantine of replicas whose log was found corrupt, without
    /// waiting for a leader to give back what they lost: only when no
    /// healthy replica can (a group whose only voter is damaged, or a
    /// majority damaged) and losing those entries is accepted.
    #[arg(long)]
    pub accept_log_damage: bool,
    /// Directory for this node's data (created if missing).
    #[arg(long, env = "PALISADE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Data groups to create at bootstrap (fixed once the cluster exists).
    #[arg(long, env = "PALISADE_GROUPS", default_value_t = palisade_server::config::DEFAULT_DATA_GROUPS)]
    pub groups: u64,
    /// Build a snapshot every this many applied entries per group.
    #[arg(long, env = "PALISADE_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for slow followers.
    #[arg(long, env = "PALISADE_KEEP_LOGS", default_value_t = 1_000)]
    pub keep_logs: u64,
    /// Largest key accepted, in bytes.
    #[arg(long, env = "PALISADE_MAX_KEY_BYTES", default_value_t = palisade_server::config::DEFAULT_MAX_KEY_BYTES)]
    pub max_key_bytes: usize,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "PALISADE_MAX_VALUE_BYTES", default_value_t = palisade_server::config::DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_bytes: usize,
    /// TEST ONLY: answer reads from local state without ReadIndex (stale,
    /// not linearizable). Used by jepsen-lite's positive control.
    #[arg(long, hide = true)]
    pub unsafe_local_reads: bool,
}

fn parse_peers_arg(s: &str) -> Result<std::collections::BTreeMap<u64, String>, String> {
    parse_peers(s)
}

/// Parses `500ms`, `30s`, `5m` or a number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s or 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

pub async fn run(args: StartArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let peers = args.peers.clone().unwrap_or_default();
    let mut config = NodeConfig::new(args.id, args.listen, peers, args.data_dir);
    config.data_groups = args.groups;
    config.replicas = args.replicas;
    config.join = args.join.clone();
    config.learner = args.learner;
    config.read_groups = args.learner_groups.clone();
    config.region = args.region.clone();
    config.zone = args.zone.clone();
    config.coordinator.down_after = args.down_after;
    config.history_retention = args.history_retention;
    config.disk_reserve_bytes = args.disk_reserve_mb.saturating_mul(1024 * 1024);
    config.accept_log_damage = args.accept_log_damage;
    if let Some(a) = &args.advertise {
        config.advertise = a.clone();
    }
    config.snapshot_every = args.snapshot_every;
    config.keep_logs = args.keep_logs;
    config.limits.max_key_bytes = args.max_key_bytes;
    config.limits.max_value_bytes = args.max_value_bytes;
    config.unsafe_local_reads = args.unsafe_local_reads;
    if config.unsafe_local_reads {
        tracing::warn!("--unsafe-local-reads: reads skip ReadIndex and may be stale (test only)");
    }
    config.validate()?;
    // Bind first: a taken port should fail before storage is touched.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // A joining node asks the cluster for its id while opening; the cluster
    // starts replicating to it once it serves, so both run at once.
    let node = Node::open(config).await.context("cannot open the node")?;
    node.serve(listener, shutdown_signal()).await?;
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
