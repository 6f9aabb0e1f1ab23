//! The history format: a JSONL event log, one event per line (Jepsen style).
//!
//! ```text
//! {"index":0,"process":3,"type":"invoke","f":"write","key":"k7","value":12,"time_ns":1200}
//! {"index":1,"process":3,"type":"ok","f":"write","key":"k7","value":12,"time_ns":1900}
//! ```
//!
//! `f` is `read`, `write` or `cas` (value `[expected, new]`); a completion's
//! optional `revision` is the database's version of the key the op saw or
//! made (for palisade: a read's `mod_revision`, 0 when absent; a write's
//! revision), used by the session checker; a completion's
//! `type` is `ok` (happened), `fail` (definitely did not happen) or `info`
//! (unknown: may take effect at any point after its invoke, or never). An
//! invoke without a completion counts as `info`. A process that got `info`
//! never invokes again.
//!
//! [`parse`] validates all of this and pairs invokes with completions into
//! [`Op`]s; every error names the line and what is wrong.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Operation kinds of the register model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    Read,
    Write,
    Cas,
}

/// Event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub f: F,
    pub key: Value,
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// How an operation completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// An invoke paired with its completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub process: u64,
    pub f: F,
    /// The key, canonically rendered (a JSON string's contents, or the JSON
    /// text of a number).
    pub key: String,
    /// write: the value; cas: `[expected, new]`; read: what was read (from
    /// the completion; `null` = absent).
    pub value: Value,
    pub outcome: Outcome,
    /// Position of the invoke and completion among all events (file order
    /// sorted by `index`); `None` when there was no completion.
    pub invoke_pos: usize,
    pub complete_pos: Option<usize>,
    /// 1-based line numbers, for messages.
    pub invoke_line: usize,
    pub complete_line: Option<usize>,
    pub invoke_time_ns: Option<u64>,
    pub complete_time_ns: Option<u64>,
    /// The completion's revision, when it reported one.
    pub revision: Option<u64>,
}

/// A validation error, with the line it concerns.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct InvalidHistory {
    pub line: usize,
    pub message: String,
}

fn invalid(line: usize, message: impl Into<String>) -> InvalidHistory {
    InvalidHistory {
        line,
        message: message.into(),
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A parsed, validated history.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
    /// Number of events (lines) read.
    pub events: usize,
}

impl History {
    /// Operations grouped by key, each group in invoke order.
    pub fn by_key(&self) -> BTreeMap<&str, Vec<&Op>> {
        let mut map: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            map.entry(op.key.as_str()).or_default().push(op);
        }
        map
    }
}

/// Parses and validates JSONL text.
pub fn parse(text: &str) -> Result<History, InvalidHistory> {
    let mut events: Vec<(usize, Event)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let ev: Event = serde_json::from_str(line)
            .map_err(|e| invalid(n, format!("not a valid event: {e}")))?;
        events.push((n, ev));
    }
    from_events(events)
}

/// Validates events (with their line numbers) and pairs them into ops.
pub fn from_events(mut events: Vec<(usize, Event)>) -> Result<History, InvalidHistory> {
    events.sort_by_key(|(_, e)| e.index);
    for w in events.windows(2) {
        if w[0].1.index == w[1].1.index {
            return Err(invalid(
                w[1].0,
                format!(
                    "index {} appears twice (also line {})",
                    w[1].1.index, w[0].0
                ),
            ));
        }
    }
    let mut ops: Vec<Op> = Vec::new();
    // process → (op position, line) of its pending invoke
    let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
    // process → line where it got an info
    let mut crashed: BTreeMap<u64, usize> = BTreeMap::new();
    for (pos, (line, ev)) in events.iter().enumerate() {
        let line = *line;
        let key =
            key_string(&ev.key).ok_or_else(|| invalid(line, "key must be a string or a number"))?;
        match ev.kind {
            Kind::Invoke => {
                if let Some(prev) = pending.get(&ev.process) {
                    return Err(invalid(
                        line,
                        format!(
                            "process {} invokes again while its op from line {} is pending",
                            ev.process, ops[*prev].invoke_line
                        ),
                    ));
                }
                if let Some(at) = crashed.get(&ev.process) {
                    return Err(invalid(
                        line,
                        format!(
                            "process {} invokes again after an info completion at line {at}; use a fresh process id",
                            ev.process
                        ),
                    ));
                }
                match ev.f {
                    F::Read => {}
                    F::Write => {
                        if !is_scalar(&ev.value) || ev.value.is_null() {
                            return Err(invalid(
                                line,
                                "a write's value must be a non-null JSON scalar",
                            ));
                        }
                    }
                    F::Cas => {
                        let ok = matches!(&ev.value, Value::Array(a) if a.len() == 2 && is_scalar(&a[0]) && is_scalar(&a[1]) && !a[1].is_null());
                        if !ok {
                            return Err(invalid(
                                line,
                                "a cas value must be [expected, new] with scalar values and a non-null new",
                            ));
                        }
                    }
                }
                pending.insert(ev.process, ops.len());
                ops.push(Op {
                    process: ev.process,
                    f: ev.f,
                    key,
                    value: ev.value.clone(),
                    outcome: Outcome::Info,
                    invoke_pos: pos,
                    complete_pos: None,
                    invoke_line: line,
                    complete_line: None,
                    invoke_time_ns: ev.time_ns,
                    complete_time_ns: None,
                    revision: None,
                });
            }
            kind => {
                let Some(i) = pending.remove(&ev.process) else {
                    return Err(invalid(
                        line,
                        format!(
                            "completion for process {} without a pending invoke",
                            ev.process
                        ),
                    ));
                };
                let op = &mut ops[i];
                if op.f != ev.f || op.key != key {
                    return Err(invalid(
                        line,
                        format!(
                            "completion does not match the invoke at line {} (f or key differs)",
                            op.invoke_line
                        ),
                    ));
                }
                op.outcome = match kind {
                    Kind::Ok => Outcome::Ok,
                    Kind::Fail => Outcome::Fail,
                    _ => Outcome::Info,
                };
                op.complete_pos = Some(pos);
                op.complete_line = Some(line);
                op.complete_time_ns = ev.time_ns;
                op.revision = ev.revision;
                match op.f {
                    F::Read if kind == Kind::Ok => {
                        if !is_scalar(&ev.value) {
                            return Err(invalid(
                                line,
                                "a read's completion value must be a JSON scalar (null when absent)",
                            ));
                        }
                        op.value = ev.value.clone();
                    }
                    F::Write | F::Cas if kind != Kind::Info && ev.value != op.value => {
                        return Err(invalid(
                            line,
                            format!(
                                "completion value differs from the invoke at line {}",
                                op.invoke_line
                            ),
                        ));
                    }
                    _ => {}
                }
                if kind == Kind::Info {
                    crashed.insert(ev.process, line);
                }
            }
        }
    }
    Ok(History {
        ops,
        events: events.len(),
    })
}

/// Renders events as JSONL.
pub fn to_jsonl(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        out.push_str(&serde_json::to_string(e).unwrap_or_default());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_invokes_and_completions() {
        let h = parse(
            r#"{"index":0,"process":3,"type":"invoke","f":"write","key":"k7","value":12,"time_ns":1200}
{"index":1,"process":3,"type":"ok","f":"write","key":"k7","value":12,"time_ns":1900}
{"index":2,"process":4,"type":"invoke","f":"read","key":"k7","value":null,"time_ns":2000}
{"index":3,"process":4,"type":"ok","f":"read","key":"k7","value":12,"time_ns":2400}
{"index":4,"process":5,"type":"invoke","f":"cas","key":"k7","value":[12,13],"time_ns":2500}
{"index":5,"process":5,"type":"info","f":"cas","key":"k7","value":[12,13],"time_ns":9000}
{"index":6,"process":6,"type":"invoke","f":"write","key":"k7","value":14}"#,
        )
        .unwrap();
        assert_eq!(h.ops.len(), 4);
        assert_eq!(
            h.ops[1].value,
            serde_json::json!(12),
            "a read takes its completion's value"
        );
        assert_eq!(h.ops[2].outcome, Outcome::Info);
        assert_eq!(
            (h.ops[3].outcome, h.ops[3].complete_pos),
            (Outcome::Info, None),
            "no completion → info"
        );
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn rejects_malformed_histories_with_the_line() {
        assert!(err("{not json").starts_with("line 1:"));
        let double = r#"{"index":0,"process":1,"type":"invoke","f":"read","key":"k","value":null}
{"index":1,"process":1,"type":"invoke","f":"read","key":"k","value":null}"#;
        assert!(err(double).contains("line 2: process 1 invokes again while"));
        let orphan = r#"{"index":0,"process":1,"type":"ok","f":"read","key":"k","value":null}"#;
        assert!(err(orphan).contains("without a pending invoke"));
        let after_info = r#"{"index":0,"process":1,"type":"invoke","f":"write","key":"k","value":1}
{"index":1,"process":1,"type":"info","f":"write","key":"k","value":1}
{"index":2,"process":1,"type":"invoke","f":"read","key":"k","value":null}"#;
        assert!(err(after_info).contains("line 3: process 1 invokes again after an info"));
        let bad_cas = r#"{"index":0,"process":1,"type":"invoke","f":"cas","key":"k","value":[1]}"#;
        assert!(err(bad_cas).contains("[expected, new]"));
        let mismatch = r#"{"index":0,"process":1,"type":"invoke","f":"write","key":"k","value":1}
{"index":1,"process":1,"type":"ok","f":"read","key":"k","value":1}"#;
        assert!(err(mismatch).contains("does not match"));
        let dup = r#"{"index":0,"process":1,"type":"invoke","f":"write","key":"k","value":1}
{"index":0,"process":2,"type":"invoke","f":"write","key":"k","value":1}"#;
        assert!(err(dup).contains("appears twice"));
        let null_write =
            r#"{"index":0,"process":1,"type":"invoke","f":"write","key":"k","value":null}"#;
        assert!(err(null_write).contains("non-null"));
        let bad_key =
            r#"{"index":0,"process":1,"type":"invoke","f":"read","key":[1],"value":null}"#;
        assert!(err(bad_key).contains("key must be"));
    }
}
