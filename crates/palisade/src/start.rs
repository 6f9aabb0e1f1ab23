//! `palisade start`: run one node until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use palisade_server::{Node, NodeConfig, parse_peers};

#[derive(Args)]
pub struct StartArgs {
    /// This node's id (1 or more); must appear in --peers.
    #[arg(long, env = "PALISADE_ID")]
    pub id: u64,
    /// Address to listen on, e.g. 127.0.0.1:7001.
    #[arg(long, env = "PALISADE_LISTEN")]
    pub listen: SocketAddr,
    /// Every node of the initial cluster as ID=HOST:PORT, comma-separated,
    /// this node included (its entry is the address others use to reach it).
    /// Not used with --learner.
    #[arg(long, env = "PALISADE_PEERS", value_parser = parse_peers_arg, required_unless_present = "learner")]
    pub peers: Option<std::collections::BTreeMap<u64, String>>,
    /// Start as a read replica: a non-voting learner that joins the cluster
    /// reachable at --join and serves SESSION, BOUNDED_STALENESS, STALE and
    /// at-revision reads locally.
    #[arg(long, env = "PALISADE_LEARNER", requires = "join")]
    pub learner: bool,
    /// With --learner: addresses of some nodes of the cluster to join,
    /// comma-separated (any one that answers will do).
    #[arg(long, env = "PALISADE_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// With --learner: the data groups to replicate, comma-separated
    /// (default: all).
    #[arg(long, env = "PALISADE_LEARNER_GROUPS", value_delimiter = ',')]
    pub learner_groups: Vec<u64>,
    /// With --learner: the address other nodes and clients reach this node
    /// at (default: --listen).
    #[arg(long, env = "PALISADE_ADVERTISE")]
    pub advertise: Option<String>,
    /// MVCC history kept per group, in revisions; older history is
    /// compacted automatically (0: keep everything until `cluster compact`).
    #[arg(long, env = "PALISADE_HISTORY_RETENTION", default_value_t = palisade_server::config::DEFAULT_HISTORY_RETENTION)]
    pub history_retention: u64,
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
    let peers = match (&args.peers, args.learner) {
        (_, true) => {
            let advertise = args
                .advertise
                .clone()
                .unwrap_or_else(|| args.listen.to_string());
            std::collections::BTreeMap::from([(args.id, advertise)])
        }
        (Some(p), false) => p.clone(),
        (None, false) => anyhow::bail!("--peers is required (unless --learner)"),
    };
    let mut config = NodeConfig::new(args.id, args.listen, peers, args.data_dir);
    config.data_groups = args.groups;
    config.learner = args.learner;
    config.history_retention = args.history_retention;
    let join = args.join.clone();
    if args.learner {
        // A learner hosts the cluster's groups: ask how many there are.
        config.data_groups = cluster_data_groups(&join)
            .await
            .with_context(|| format!("cannot reach the cluster to join at {}", join.join(",")))?;
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
    let learner = config
        .learner
        .then(|| (config.id, config.advertise_addr().to_string()));
    let node = Node::open(config).await.context("cannot open the node")?;
    let serving = node.serve(listener, shutdown_signal());
    let Some((id, addr)) = learner else {
        serving.await?;
        node.shutdown().await;
        return Ok(ExitCode::SUCCESS);
    };
    // Serve first: the leaders start replicating as soon as the membership
    // change commits.
    tokio::pin!(serving);
    let register = register_learner(&join, id, &addr, &args.learner_groups);
    tokio::select! {
        r = &mut serving => {
            r?;
            node.shutdown().await;
            return Ok(ExitCode::SUCCESS);
        }
        r = register => {
            if let Err(e) = r {
                node.shutdown().await;
                return Err(e.context(format!(
                    "cannot join the cluster at {} as a learner",
                    join.join(",")
                )));
            }
        }
    }
    serving.await?;
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn endpoint(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The number of data groups of the cluster at `join` (the first node that
/// answers).
async fn cluster_data_groups(join: &[String]) -> anyhow::Result<u64> {
    use palisade_proto::v1::admin_client::AdminClient;
    let mut last = anyhow::anyhow!("no --join address given");
    for addr in join {
        let attempt = async {
            let mut client = AdminClient::connect(endpoint(addr)).await?;
            let status = client
                .cluster_status(palisade_proto::v1::ClusterStatusRequest {})
                .await?
                .into_inner();
            anyhow::Ok(u64::from(status.data_groups))
        };
        match attempt.await {
            Ok(n) => return Ok(n),
            Err(e) => last = e.context(format!("asking {addr}")),
        }
    }
    Err(last)
}

/// Asks the cluster to add this node as a learner, retrying for a while
/// (leaders may be in an election).
async fn register_learner(
    join: &[String],
    id: u64,
    addr: &str,
    groups: &[u64],
) -> anyhow::Result<()> {
    use palisade_proto::v1::admin_client::AdminClient;
    anyhow::ensure!(!join.is_empty(), "--join needs at least one address");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut round = 0usize;
    loop {
        let target = &join[round % join.len()];
        round += 1;
        let attempt = async {
            let mut client = AdminClient::connect(endpoint(target)).await?;
            let r = client
                .add_learner(palisade_proto::v1::AddLearnerRequest {
                    node_id: id,
                    addr: addr.to_string(),
                    group_ids: groups.to_vec(),
                })
                .await?;
            anyhow::Ok(r.into_inner().group_ids)
        };
        match attempt.await {
            Ok(joined) => {
                tracing::info!(?joined, "joined the cluster as a learner");
                return Ok(());
            }
            Err(e) => {
                let permanent = e.downcast_ref::<tonic::Status>().is_some_and(|s| {
                    matches!(
                        s.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::NotFound
                            | tonic::Code::FailedPrecondition
                    )
                });
                if permanent || tokio::time::Instant::now() > deadline {
                    return Err(e);
                }
                tracing::warn!(error = %e, "joining as a learner failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}
