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
    #[arg(long, env = "PALISADE_PEERS", value_parser = parse_peers_arg)]
    pub peers: std::collections::BTreeMap<u64, String>,
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
    let mut config = NodeConfig::new(args.id, args.listen, args.peers, args.data_dir);
    config.data_groups = args.groups;
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
    let node = Node::open(config).await.context("cannot open the node")?;
    node.serve(listener, shutdown_signal()).await?;
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
