//! `palisade`: run a node, a whole local demo cluster, or talk to a cluster.
//!
//! The binary is thin: argument parsing and output formatting live here; the
//! node is `palisade-server` and the client is `palisade-client`.

mod client_cmd;
mod compare;
mod demo;
mod start;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc's allocator took about a fifth of a node's CPU under write load
/// (many short-lived buffers freed on other threads); mimalloc's per-thread
/// heaps cost a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// palisade: a Raft-replicated key-value database.
#[derive(Parser)]
#[command(name = "palisade", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Start(start::StartArgs),
    /// Run a whole local cluster on loopback until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Read a key (linearizable unless told otherwise; or at a revision).
    Get(client_cmd::GetArgs),
    /// List the retained versions of a key (MVCC history).
    History(client_cmd::HistoryArgs),
    /// Set a key.
    Put(client_cmd::PutArgs),
    /// Delete a key.
    Del(client_cmd::DelArgs),
    /// List keys in a range or with a prefix, across all groups.
    Scan(client_cmd::ScanArgs),
    /// Transactions (compare-and-swap).
    Txn(client_cmd::TxnArgs),
    /// Cluster-wide commands: status, group count, leader transfer,
    /// learners, compaction.
    Cluster(client_cmd::ClusterArgs),
    /// Node membership: drain a live node, remove a dead one.
    Node(client_cmd::NodeArgs),
    /// Leases: grant, keepalive, revoke, ttl.
    Lease(client_cmd::LeaseArgs),
    /// Hold a lock (with a kept-alive lease) while running a command; the
    /// command gets the fencing token in $PALISADE_FENCE.
    Lock(client_cmd::LockArgs),
    /// Load generator: closed or open loop, YCSB-style workloads, latency
    /// percentiles and server counters; `bench compare` runs palisade and
    /// etcd side by side.
    Bench(BenchCmd),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCmd {
    #[command(subcommand)]
    sub: Option<BenchSub>,
    #[command(flatten)]
    args: palisade_bench::BenchArgs,
}

#[derive(Subcommand)]
enum BenchSub {
    /// Start 3-node palisade and etcd clusters on loopback, run the same
    /// workload matrix against each in alternation, write a ratio table,
    /// JSON and SVG charts (needs a build with `--features etcd`; see
    /// scripts/bench-compare.sh).
    Compare(compare::CompareArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Start(args) => start::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Get(args) => client_cmd::get(args).await,
            Command::History(args) => client_cmd::history(args).await,
            Command::Put(args) => client_cmd::put(args).await,
            Command::Del(args) => client_cmd::del(args).await,
            Command::Scan(args) => client_cmd::scan(args).await,
            Command::Txn(args) => client_cmd::txn(args).await,
            Command::Cluster(args) => client_cmd::cluster(args).await,
            Command::Node(args) => client_cmd::node(args).await,
            Command::Lease(args) => client_cmd::lease(args).await,
            Command::Lock(args) => client_cmd::lock(args).await,
            Command::Bench(BenchCmd {
                sub: Some(BenchSub::Compare(args)),
                ..
            }) => compare::run(args).await,
            Command::Bench(BenchCmd { args, .. }) => palisade_bench::run(args)
                .await
                .map(|_| std::process::ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
