//! The `lock` workload: many clients take one lock (with a kept-alive lease)
//! and do a fenced read-modify-write on a counter guarded by it, while the
//! nemesis kills, partitions and pauses nodes.
//!
//! Every 10th holder of each worker "pauses" (like a GC pause or a frozen
//! VM: its keep-alives stop too) past its lease's TTL between reading the
//! counter and writing it, so the fence is exercised: by then another
//! holder may own the lock, and the late write must be refused.
//!
//! What must hold at the end, after healing:
//!
//! - the counter's retained history (MVCC `History`) is exactly 1, 2, …, C:
//!   every increment was applied on top of the previous one, so no fenced
//!   write with a superseded token ever applied (two holders interleaving
//!   would write the same value twice or skip one);
//! - acknowledged increments ≤ C ≤ acknowledged + unknown-outcome ones
//!   (nothing acknowledged was lost);
//! - fencing tokens increase: an acquisition that completed before another
//!   began has the smaller token.

use std::sync::Mutex;
use std::time::Duration;

use palisade_client::{Client, ClientConfig, stale_fence_detail};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Name of the drill's lock; the counter shares its hash tag (group).
pub const LOCK: &str = "{lockdrill}lock";
/// The counter the holders increment.
pub const COUNTER: &str = "{lockdrill}counter";

/// One lock acquisition: when it was asked for and granted, and its token.
#[derive(Debug, Clone, Copy)]
pub struct Acquisition {
    pub invoked: Instant,
    pub granted: Instant,
    pub token: u64,
}

/// What the workers saw.
#[derive(Debug, Default)]
pub struct LockStats {
    pub acquisitions: Vec<Acquisition>,
    pub lock_failures: u64,
    /// Increments acknowledged (fenced put ok).
    pub acked: u64,
    /// Fenced puts refused because the token was superseded.
    pub fenced_off: u64,
    /// Increments with an unknown outcome (may or may not have applied).
    pub unknown: u64,
    /// Reads of the counter that failed (the increment was skipped).
    pub read_failures: u64,
}

fn client_config(endpoints: &[String]) -> ClientConfig {
    let mut c = ClientConfig::new(endpoints.iter().cloned());
    c.request_timeout = Duration::from_secs(3);
    c.attempt_timeout = Duration::from_secs(1);
    c
}

/// One holder's loop: lock, read, fenced write of read + 1, release.
/// `unfenced` (the positive control) writes without the fence: the paused
/// holders' late writes then overwrite newer increments, which the check
/// must catch.
pub async fn worker(
    endpoints: Vec<String>,
    stop: &std::sync::atomic::AtomicBool,
    stats: &Mutex<LockStats>,
    unfenced: bool,
) -> u64 {
    use std::sync::atomic::Ordering;
    let Ok(client) = Client::with_config(client_config(&endpoints)).await else {
        return 0;
    };
    let mut acked = 0u64;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let invoked = Instant::now();
        let guard = match client
            .lock_with_lease(LOCK, Duration::from_secs(2), Duration::from_secs(2))
            .await
        {
            Ok(g) => g,
            Err(_) => {
                stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lock_failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let token = guard.token().clone();
        stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .acquisitions
            .push(Acquisition {
                invoked,
                granted: Instant::now(),
                token: token.token,
            });
        let current = match client.get(COUNTER).await {
            Ok(r) => {
                r.kv.and_then(|kv| String::from_utf8(kv.value).ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            }
            Err(_) => {
                stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read_failures += 1;
                let _ = guard.release().await;
                continue;
            }
        };
        // A paused holder: no keep-alives, past the TTL, then the write.
        let guard = if round.is_multiple_of(10) {
            drop(guard);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            None
        } else {
            Some(guard)
        };
        let outcome = if unfenced {
            client.put(COUNTER, (current + 1).to_string()).await
        } else {
            client
                .put_fenced(COUNTER, (current + 1).to_string(), &token)
                .await
        };
        {
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            match &outcome {
                Ok(_) => {
                    s.acked += 1;
                    acked += 1;
                }
                Err(e) if stale_fence_detail(e).is_some() => s.fenced_off += 1,
                Err(palisade_client::Error::InvalidArgument(_)) => s.read_failures += 1,
                Err(_) => s.unknown += 1,
            }
        }
        if let Some(guard) = guard {
            let _ = guard.release().await;
        }
    }
    acked
}

/// The verdict of a lock drill.
pub struct LockVerdict {
    pub ok: bool,
    pub problems: Vec<String>,
    pub summary: Value,
}

/// Checks the end state against what the workers saw (see the module doc).
pub async fn check(endpoints: &[String], stats: &LockStats) -> LockVerdict {
    let mut problems = Vec::new();
    let client = match Client::connect(endpoints.to_vec()).await {
        Ok(c) => c,
        Err(e) => {
            return LockVerdict {
                ok: false,
                problems: vec![format!("cannot reach the cluster for the final check: {e}")],
                summary: json!({}),
            };
        }
    };
    let final_value = match client.get(COUNTER).await {
        Ok(r) => {
            r.kv.and_then(|kv| String::from_utf8(kv.value).ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        }
        Err(e) => {
            problems.push(format!("final read of the counter failed: {e}"));
            0
        }
    };
    let mut versions = Vec::new();
    match client
        .history(COUNTER, palisade_client::ReadOptions::default())
        .await
    {
        Ok(h) => {
            for v in h.versions {
                let value =
                    v.kv.filter(|_| !v.deleted)
                        .and_then(|kv| String::from_utf8(kv.value).ok())
                        .and_then(|s| s.parse::<u64>().ok());
                versions.push(value);
            }
            let expected: Vec<Option<u64>> = (1..=final_value).map(Some).collect();
            if versions != expected {
                let first_bad = versions
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(versions.len().min(expected.len()));
                problems.push(format!(
                    "counter history is not 1..={final_value}: {} versions, first difference at #{first_bad}: {:?}",
                    versions.len(),
                    &versions[first_bad.saturating_sub(2)..(first_bad + 3).min(versions.len())]
                ));
            }
        }
        Err(e) => problems.push(format!("History of the counter failed: {e}")),
    }
    if final_value < stats.acked {
        problems.push(format!(
            "lost increments: {} acknowledged but the counter is {final_value}",
            stats.acked
        ));
    }
    if final_value > stats.acked + stats.unknown {
        problems.push(format!(
            "phantom increments: counter {final_value} > {} acknowledged + {} unknown",
            stats.acked, stats.unknown
        ));
    }
    // Tokens: an acquisition granted before another was invoked has the
    // smaller token.
    let mut by_grant = stats.acquisitions.clone();
    by_grant.sort_by_key(|a| a.granted);
    let mut by_invoke = stats.acquisitions.clone();
    by_invoke.sort_by_key(|a| a.invoked);
    let mut max_before = 0u64;
    let mut g = 0;
    let mut order_violations = 0;
    for a in &by_invoke {
        while g < by_grant.len() && by_grant[g].granted < a.invoked {
            max_before = max_before.max(by_grant[g].token);
            g += 1;
        }
        if a.token <= max_before {
            order_violations += 1;
        }
    }
    if order_violations > 0 {
        problems.push(format!(
            "{order_violations} acquisitions got a token not above one granted before they began"
        ));
    }
    let summary = json!({
        "acquisitions": stats.acquisitions.len(),
        "lock_failures": stats.lock_failures,
        "increments_acked": stats.acked,
        "increments_fenced_off": stats.fenced_off,
        "increments_unknown": stats.unknown,
        "read_failures": stats.read_failures,
        "final_counter": final_value,
        "history_versions": versions.len(),
        "token_order_violations": order_violations,
        "max_token": stats.acquisitions.iter().map(|a| a.token).max().unwrap_or(0),
    });
    LockVerdict {
        ok: problems.is_empty(),
        problems,
        summary,
    }
}
