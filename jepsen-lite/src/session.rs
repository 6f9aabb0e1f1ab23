//! Session guarantees: read-your-writes and monotonic reads, per process.
//!
//! A `SESSION` read promises less than linearizability: every process must
//! see its own acknowledged writes and must never see a key go back to an
//! older version than one it already saw. Those are checked here from the
//! revisions the database reports (a read's `mod_revision`, a write's
//! revision), which give the version order of each key without a search:
//!
//! - after a process's write or cas of key `k` completed `ok` at revision
//!   `r`, each of its later reads of `k` must report a revision ≥ `r`;
//! - after it read `k` at revision `r`, its later reads of `k` must report
//!   revisions ≥ `r`;
//! - a read's value must be the value written at the revision it reports
//!   (revision 0: absent), so a replica cannot claim a fresh revision for a
//!   stale value.
//!
//! A process runs one operation at a time, so its operations in history
//! order are its program order.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::history::{F, History, Op, Outcome};

/// One broken session guarantee.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionViolation {
    pub process: u64,
    pub key: String,
    /// Line of the offending read's completion.
    pub line: usize,
    pub message: String,
}

/// The outcome of [`check_sessions`].
#[derive(Debug, Clone, Default)]
pub struct SessionReport {
    /// `ok` reads that carried a revision and were checked.
    pub reads_checked: usize,
    /// `ok` reads without a revision (not checkable).
    pub reads_skipped: usize,
    pub violations: Vec<SessionViolation>,
}

impl SessionReport {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The value an `ok` write or cas stored.
fn written_value(op: &Op) -> Option<&Value> {
    match op.f {
        F::Write => Some(&op.value),
        F::Cas => op.value.get(1),
        F::Read => None,
    }
}

/// Checks read-your-writes and monotonic reads for every process.
pub fn check_sessions(history: &History) -> SessionReport {
    // (key, revision) → value written there, from every ok write and cas.
    let mut written: BTreeMap<(&str, u64), &Value> = BTreeMap::new();
    for op in &history.ops {
        if op.outcome == Outcome::Ok
            && let (Some(r), Some(v)) = (op.revision, written_value(op))
        {
            written.insert((op.key.as_str(), r), v);
        }
    }
    let mut report = SessionReport::default();
    // (process, key) → (revision floor, why)
    let mut floors: BTreeMap<(u64, &str), (u64, String)> = BTreeMap::new();
    for op in history.ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let slot = (op.process, op.key.as_str());
        let Some(rev) = op.revision else {
            if op.f == F::Read {
                report.reads_skipped += 1;
            }
            continue;
        };
        let line = op.complete_line.unwrap_or(op.invoke_line);
        if op.f != F::Read {
            let floor = floors.entry(slot).or_insert((0, String::new()));
            if rev >= floor.0 {
                *floor = (
                    rev,
                    format!("its own {:?} at line {line}", op.f).to_lowercase(),
                );
            }
            continue;
        }
        report.reads_checked += 1;
        let mut violate = |message: String| {
            report.violations.push(SessionViolation {
                process: op.process,
                key: op.key.clone(),
                line,
                message,
            })
        };
        if let Some((floor, why)) = floors.get(&slot)
            && rev < *floor
        {
            violate(format!(
                "process {} read revision {rev} ({}) of {:?}, older than revision {floor} from {why}",
                op.process, op.value, op.key
            ));
        }
        match (rev, written.get(&(op.key.as_str(), rev))) {
            (0, _) if !op.value.is_null() => violate(format!(
                "read {} of {:?} but reported the key absent (revision 0)",
                op.value, op.key
            )),
            (r, Some(v)) if r > 0 && **v != op.value => violate(format!(
                "read {} of {:?} at revision {r}, but revision {r} wrote {v}",
                op.value, op.key
            )),
            _ => {}
        }
        let floor = floors.entry(slot).or_insert((0, String::new()));
        if rev >= floor.0 {
            *floor = (rev, format!("its own read at line {line}"));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::history::{Event, Kind, from_events};

    /// (process, kind, f, value, revision)
    fn history(steps: &[(u64, Kind, F, Value, Option<u64>)]) -> History {
        let events = steps
            .iter()
            .enumerate()
            .map(|(i, (p, k, f, v, r))| {
                (
                    i + 1,
                    Event {
                        index: i as u64,
                        process: *p,
                        kind: *k,
                        f: *f,
                        key: json!("k"),
                        value: v.clone(),
                        time_ns: None,
                        revision: *r,
                    },
                )
            })
            .collect();
        from_events(events).unwrap()
    }

    use Kind::{Invoke as I, Ok as K};

    #[test]
    fn own_writes_and_newer_reads_pass() {
        let h = history(&[
            (1, I, F::Write, json!(1), None),
            (1, K, F::Write, json!(1), Some(5)),
            (2, I, F::Write, json!(2), None),
            (2, K, F::Write, json!(2), Some(7)),
            (1, I, F::Read, json!(null), None),
            (1, K, F::Read, json!(2), Some(7)),
            (2, I, F::Read, json!(null), None),
            (2, K, F::Read, json!(2), Some(7)),
        ]);
        let r = check_sessions(&h);
        assert!(r.holds(), "{:?}", r.violations);
        assert_eq!(r.reads_checked, 2);
    }

    #[test]
    fn reading_before_ones_own_write_is_caught() {
        let h = history(&[
            (1, I, F::Write, json!(1), None),
            (1, K, F::Write, json!(1), Some(5)),
            (1, I, F::Write, json!(2), None),
            (1, K, F::Write, json!(2), Some(9)),
            (1, I, F::Read, json!(null), None),
            (1, K, F::Read, json!(1), Some(5)),
        ]);
        let r = check_sessions(&h);
        assert_eq!(r.violations.len(), 1);
        assert!(r.violations[0].message.contains("older than revision 9"));
    }

    #[test]
    fn going_back_in_time_is_caught_and_other_processes_are_free() {
        let h = history(&[
            (3, I, F::Write, json!(1), None),
            (3, K, F::Write, json!(1), Some(5)),
            (3, I, F::Write, json!(2), None),
            (3, K, F::Write, json!(2), Some(6)),
            (1, I, F::Read, json!(null), None),
            (1, K, F::Read, json!(2), Some(6)),
            // Process 2 never saw 6: reading 5 is allowed for it.
            (2, I, F::Read, json!(null), None),
            (2, K, F::Read, json!(1), Some(5)),
            (1, I, F::Read, json!(null), None),
            (1, K, F::Read, json!(1), Some(5)),
        ]);
        let r = check_sessions(&h);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert_eq!(r.violations[0].process, 1);
    }

    #[test]
    fn a_value_that_does_not_match_its_revision_is_caught() {
        let h = history(&[
            (1, I, F::Cas, json!([null, 4]), None),
            (1, K, F::Cas, json!([null, 4]), Some(3)),
            (2, I, F::Read, json!(null), None),
            (2, K, F::Read, json!(9), Some(3)),
            (3, I, F::Read, json!(null), None),
            (3, K, F::Read, json!(9), Some(0)),
        ]);
        let r = check_sessions(&h);
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
    }
}
