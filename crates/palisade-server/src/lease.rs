//! Lease time: a lease's record (TTL, attached keys, locks held with it)
//! is replicated state; its *deadline* is not: only the leader of the
//! lease's group measures time, on its monotonic clock, in a [`LeaseClock`].
//! When a deadline passes, the leader proposes `LeaseRevoke` (a Raft write),
//! so every replica ends the lease at the same log position. A node that
//! becomes leader — or whose group takes the lease's slot over in a move —
//! starts every lease's deadline afresh (now + TTL), so neither a leader
//! change nor a move ever shortens a holder's time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_group::{Command, CommandOp, RaftGroup};
use tokio::time::Instant;

use crate::node::Node;

/// Shortest lease TTL accepted: shorter than a few election timeouts would
/// expire leases during an ordinary failover.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// Longest lease TTL accepted.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default and maximum time a Lock call waits for the lock.
pub(crate) const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);
pub(crate) const MAX_LOCK_WAIT: Duration = Duration::from_secs(60);
/// How often the leader checks lease deadlines.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Lease deadlines of the groups this node leads, per group.
#[derive(Default)]
pub struct LeaseClock {
    groups: Mutex<BTreeMap<u64, GroupDeadlines>>,
}

struct GroupDeadlines {
    /// The term these deadlines were measured in; a new term starts afresh.
    term: u64,
    deadlines: BTreeMap<u64, Instant>,
}

impl LeaseClock {
    fn with<T>(
        &self,
        group: u64,
        term: u64,
        f: impl FnOnce(&mut BTreeMap<u64, Instant>) -> T,
    ) -> T {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let entry = groups.entry(group).or_insert_with(|| GroupDeadlines {
            term,
            deadlines: BTreeMap::new(),
        });
        if entry.term != term {
            entry.term = term;
            entry.deadlines.clear();
        }
        f(&mut entry.deadlines)
    }

    pub(crate) fn forget(&self, group: u64) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }

    /// Restarts lease `id`'s TTL.
    pub(crate) fn renew(&self, group: u64, term: u64, id: u64, ttl: Duration) {
        self.with(group, term, |d| d.insert(id, Instant::now() + ttl));
    }

    /// Time left on lease `id`, if this node tracks it.
    pub(crate) fn remaining(&self, group: u64, term: u64, id: u64) -> Option<Duration> {
        self.with(group, term, |d| {
            d.get(&id)
                .map(|t| t.saturating_duration_since(Instant::now()))
        })
    }
}

pub(crate) fn term_of(group: &RaftGroup) -> u64 {
    group.raft().metrics().borrow().current_term
}

/// One expiry pass over a group this node leads: track every lease in the
/// state (new ones get a full TTL from now), drop ended ones, and revoke
/// those whose deadline passed.
async fn expire_leases(node: &Node, group: &RaftGroup) {
    if !group.is_leader() {
        node.lease_clock.forget(group.id());
        return;
    }
    let term = term_of(group);
    let Ok(leases) = group.state().leases() else {
        return;
    };
    let now = Instant::now();
    let expired: Vec<u64> = node.lease_clock.with(group.id(), term, |deadlines| {
        deadlines.retain(|id, _| leases.iter().any(|(l, _)| l == id));
        for (id, record) in &leases {
            deadlines
                .entry(*id)
                .or_insert_with(|| now + Duration::from_millis(record.ttl_ms));
        }
        deadlines
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| *id)
            .collect()
    });
    for id in expired {
        let cmd = Command {
            request_id: None,
            op: CommandOp::LeaseRevoke { id },
        };
        match group.write(cmd, node.config.write_timeout).await {
            Ok(_) => tracing::info!(group = group.id(), lease = id, "lease expired"),
            Err(e) => {
                tracing::debug!(group = group.id(), lease = id, error = %e, "lease expiry not committed")
            }
        }
    }
}

/// Runs lease expiry for every data group this node leads, until the node
/// shuts down.
pub(crate) fn spawn_expiry(node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    node.tasks()
        .spawn("lease expiry", move |mut shutdown| async move {
            while shutdown.sleep(EXPIRY_TICK).await {
                let Some(node) = weak.upgrade() else { return };
                for (id, group) in node.groups() {
                    if id != palisade_shard::META_GROUP {
                        expire_leases(&node, &group).await;
                    }
                }
            }
        });
}
