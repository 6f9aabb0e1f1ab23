//! jepsen-lite: prove palisade correct on your own machine and in CI, the
//! way Jepsen proves databases.
//!
//! - [`history`]: the JSONL history format, parsed and validated.
//! - [`checker`]: a per-key linearizability checker for read/write/cas
//!   registers (Wing–Gong/Lowe search with memoization), parallel over keys,
//!   with a time budget per key that yields "unknown" instead of eating the machine.
//! - [`session`]: read-your-writes and monotonic-reads checks per process,
//!   for drills that read at `SESSION` consistency.
//! - [`report`]: a self-contained HTML timeline report.
//! - [`synth`]: synthetic linearizable histories (benchmarks, tests).
//! - [`lockwork`]: the lock workload (fenced counter increments) and its
//!   end-state checks.
//! - [`drill`]: the drill runner — a real cluster of processes, concurrent
//!   clients, faults from a seeded schedule, recorded history, verdict.

pub mod checker;
pub mod drill;
pub mod history;
pub mod lockwork;
pub mod report;
pub mod session;
pub mod synth;

use std::process::ExitCode;
use std::time::Instant;

/// Exit code: linearizable.
pub const EXIT_OK: u8 = 0;
/// Exit code: not linearizable (or, for drills, data lost / no recovery).
pub const EXIT_VIOLATION: u8 = 1;
/// Exit code: unknown (budget exceeded) or invalid input.
pub const EXIT_UNKNOWN: u8 = 2;

/// Checks a history text: prints a one-line verdict (and, on a violation,
/// the key, the last linearizable prefix and the operation that cannot be
/// placed), optionally writes the HTML report, and returns the exit code.
pub fn check_and_report(
    text: &str,
    html: Option<&std::path::Path>,
    budget: checker::Budget,
    threads: usize,
) -> ExitCode {
    let start = Instant::now();
    let history = match history::parse(text) {
        Ok(h) => h,
        Err(e) => {
            println!("invalid history: {e}");
            return ExitCode::from(EXIT_UNKNOWN);
        }
    };
    let report = checker::check(&history, budget, threads);
    let took = start.elapsed();
    if let Some(path) = html
        && let Err(e) = std::fs::write(
            path,
            report::html(&report, "jepsen-lite: linearizability report"),
        )
    {
        eprintln!("cannot write {}: {e}", path.display());
    }
    let summary = format!(
        "{} ops over {} keys, checked in {:.3} s",
        history.ops.len(),
        report.keys.len(),
        took.as_secs_f64()
    );
    if let Some(bad) = report.first_violation() {
        println!("NOT linearizable: {}", describe_violation(bad));
        println!("({summary})");
        return ExitCode::from(EXIT_VIOLATION);
    }
    let unknown: Vec<&str> = report.unknown().map(|k| k.key).collect();
    if !unknown.is_empty() {
        println!(
            "unknown: search budget exceeded on {} key(s): {} ({summary})",
            unknown.len(),
            unknown.join(", ")
        );
        return ExitCode::from(EXIT_UNKNOWN);
    }
    println!("linearizable: {summary}");
    ExitCode::from(EXIT_OK)
}

/// One paragraph describing a non-linearizable key.
pub fn describe_violation(k: &checker::KeyResult<'_>) -> String {
    let checker::KeyVerdict::NotLinearizable(c) = &k.verdict else {
        return format!("key {} is not a violation", k.key);
    };
    let show = |i: usize| {
        let op = k.ops[i];
        format!(
            "{:?} {} by process {} (lines {}–{}, {:?})",
            op.f,
            op.value,
            op.process,
            op.invoke_line,
            op.complete_line.map_or("none".into(), |l| l.to_string()),
            op.outcome
        )
    };
    let prefix: Vec<String> = c
        .prefix
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|i| show(*i))
        .collect();
    format!(
        "key {:?}: the longest linearizable prefix has {} ops ending [{}] and leaves the value {}; cannot place {}",
        k.key,
        c.prefix.len(),
        prefix.join("; "),
        c.state,
        show(c.stuck)
    )
}
