//! `jepsen-lite`: `check` a history, `run` a fault drill, or `synth` a
//! synthetic history for benchmarking the checker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jepsen_lite::{checker, drill, history, synth};

/// Fault drills against real palisade clusters, and a linearizability checker.
#[derive(Parser)]
#[command(name = "jepsen-lite", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a JSONL history. Exit 0: linearizable; 1: not; 2: unknown or invalid input.
    Check {
        history: PathBuf,
        /// Write a self-contained HTML timeline report here.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Search time per key before its verdict becomes "unknown" (s).
        #[arg(long, default_value_t = 60.0)]
        budget_secs: f64,
        /// Also stop a key's search after this many steps.
        #[arg(long)]
        budget_steps: Option<u64>,
        /// Threads checking keys in parallel (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Run a fault drill against a real palisade cluster.
    Run(drill::DrillArgs),
    /// Write a synthetic linearizable history (for benchmarking the checker).
    Synth {
        #[arg(long, default_value_t = 100_000)]
        ops: usize,
        #[arg(long, default_value_t = 500)]
        keys: usize,
        /// Processes per key (bounds the operations in flight per key).
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Keys in use at the same time.
        #[arg(long)]
        active_keys: Option<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            history,
            html,
            budget_secs,
            budget_steps,
            threads,
        } => {
            if !(budget_secs.is_finite() && budget_secs > 0.0) {
                println!("--budget-secs must be a positive number of seconds");
                return ExitCode::from(jepsen_lite::EXIT_UNKNOWN);
            }
            let budget = checker::Budget {
                time: std::time::Duration::from_secs_f64(budget_secs),
                steps: budget_steps.unwrap_or(u64::MAX),
                ..checker::Budget::default()
            };
            let text = match std::fs::read_to_string(&history) {
                Ok(t) => t,
                Err(e) => {
                    println!("cannot read {}: {e}", history.display());
                    return ExitCode::from(jepsen_lite::EXIT_UNKNOWN);
                }
            };
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            jepsen_lite::check_and_report(&text, html.as_deref(), budget, threads)
        }
        Command::Run(args) => drill::main(args),
        Command::Synth {
            ops,
            keys,
            concurrency,
            active_keys,
            seed,
            out,
        } => {
            let mut cfg = synth::SynthConfig::new(ops, keys, concurrency, seed);
            if let Some(a) = active_keys {
                cfg.active_keys = a;
            }
            let events = synth::linearizable_history(&cfg);
            match std::fs::write(&out, history::to_jsonl(&events)) {
                Ok(()) => {
                    println!("wrote {} events to {}", events.len(), out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("cannot write {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
