//! Linearizability checking of a per-key register (read / write / cas).
//!
//! Linearizability is local: a history is linearizable iff each key's
//! sub-history is, so keys are checked independently and in parallel.
//!
//! Per key, the search is Wing & Gong's, as improved by Lowe ("Testing for
//! linearizability", 2017): events (calls and returns) sit in a doubly linked
//! list in history order; the search walks it, *linearizing* a call when the
//! register model accepts it (removing its call and return from the list)
//! and *backtracking* when it meets the return of an operation it has not
//! linearized. Configurations already explored — (set of linearized
//! operations, register value) — are memoized, which is what makes the
//! search fast on real histories. The set is hashed Zobrist-style into 128
//! bits (xor of a random value per operation), so memory per configuration
//! is constant; a false "already seen" needs a 128-bit collision.
//!
//! Operation outcomes:
//! - `ok`: must be linearized between its invoke and completion;
//! - `fail`: did not happen; dropped (for a cas: its comparison failed);
//! - `info` (or no completion): may take effect at any point after its
//!   invoke, or never. Its return is placed after every other event, and the
//!   search succeeds as soon as every `ok` operation is linearized. An `info`
//!   read constrains nothing and is dropped.
//!
//! A budget per key — time (60 s by default), and a cap on the memo so a
//! long search cannot exhaust memory — turns a runaway search into
//! `Unknown`. A time budget rather than a step count: hard but checkable
//! histories (8,000 operations on one key) need a few seconds of search,
//! which no fixed step count fits across machines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::history::{F, History, Op, Outcome};

/// How much search one key may take before its verdict is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Wall-clock time per key.
    pub time: std::time::Duration,
    /// Search steps per key.
    pub steps: u64,
    /// Configurations remembered per key (16 bytes each, plus the set's
    /// overhead): bounds the memory of one search.
    pub memo: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            time: std::time::Duration::from_secs(60),
            steps: u64::MAX,
            memo: 64 << 20,
        }
    }
}

impl Budget {
    /// The default budget with `time` per key.
    pub fn time(time: std::time::Duration) -> Self {
        Self {
            time,
            ..Self::default()
        }
    }

    /// The default budget, but at most `steps` steps per key.
    pub fn steps(steps: u64) -> Self {
        Self {
            steps,
            ..Self::default()
        }
    }
}

/// Which part of the budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Time,
    Steps,
    Memory,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exhausted::Time => "time",
            Exhausted::Steps => "steps",
            Exhausted::Memory => "memory",
        })
    }
}

/// The verdict for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyVerdict {
    Linearizable,
    /// No linearization exists.
    NotLinearizable(Counterexample),
    /// The budget ran out first.
    Unknown {
        steps: u64,
        exhausted: Exhausted,
    },
}

/// Why a key's history is not linearizable.
#[derive(Debug, Clone, PartialEq)]
pub struct Counterexample {
    /// The longest sequence of operations the search could linearize, in
    /// linearization order (indexes into the key's op list).
    pub prefix: Vec<usize>,
    /// The register value after that prefix (`null`: absent).
    pub state: Value,
    /// The operation whose completion came before it could be placed.
    pub stuck: usize,
}

/// The verdict for one key, with the key's operations for reporting.
#[derive(Debug, Clone)]
pub struct KeyResult<'h> {
    pub key: &'h str,
    pub ops: Vec<&'h Op>,
    pub verdict: KeyVerdict,
    pub steps: u64,
}

/// Outcome of checking a whole history.
#[derive(Debug, Clone)]
pub struct Report<'h> {
    pub keys: Vec<KeyResult<'h>>,
}

impl Report<'_> {
    pub fn linearizable(&self) -> bool {
        self.keys
            .iter()
            .all(|k| k.verdict == KeyVerdict::Linearizable)
    }

    pub fn first_violation(&self) -> Option<&KeyResult<'_>> {
        self.keys
            .iter()
            .find(|k| matches!(k.verdict, KeyVerdict::NotLinearizable(_)))
    }

    pub fn unknown(&self) -> impl Iterator<Item = &KeyResult<'_>> {
        self.keys
            .iter()
            .filter(|k| matches!(k.verdict, KeyVerdict::Unknown { .. }))
    }
}

/// Checks every key of `history`, using up to `threads` threads.
pub fn check(history: &History, budget: Budget, threads: usize) -> Report<'_> {
    let by_key: Vec<(&str, Vec<&Op>)> = history.by_key().into_iter().collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<KeyResult<'_>>>> = Mutex::new(vec![None; by_key.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(by_key.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, ops)) = by_key.get(i) else {
                        break;
                    };
                    let (verdict, steps) = check_key(ops, budget);
                    let r = KeyResult {
                        key,
                        ops: ops.clone(),
                        verdict,
                        steps,
                    };
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    let keys = results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect();
    Report { keys }
}

/// A register operation with values interned to small integers (0 = absent).
#[derive(Debug, Clone, Copy)]
enum ModelOp {
    Read(u32),
    Write(u32),
    Cas(u32, u32),
}

impl ModelOp {
    /// Applies the op to `state`: the new state, or `None` if it cannot
    /// happen in this state.
    fn step(self, state: u32) -> Option<u32> {
        match self {
            ModelOp::Read(v) => (v == state).then_some(state),
            ModelOp::Write(v) => Some(v),
            ModelOp::Cas(e, n) => (e == state).then_some(n),
        }
    }
}

#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    values: Vec<Value>,
}

impl Interner {
    fn new() -> Self {
        Self {
            ids: HashMap::new(),
            values: vec![Value::Null],
        }
    }

    fn id(&mut self, v: &Value) -> u32 {
        if v.is_null() {
            return 0;
        }
        let text = v.to_string();
        if let Some(id) = self.ids.get(&text) {
            return *id;
        }
        let id = self.values.len() as u32;
        self.values.push(v.clone());
        self.ids.insert(text, id);
        id
    }
}

/// One entry of the event list.
#[derive(Clone, Copy)]
struct Entry {
    /// Index into `ops` (the checked ops, not the key's full list).
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

/// Checks one key's operations; returns the verdict and steps taken.
pub fn check_key(ops: &[&Op], budget: Budget) -> (KeyVerdict, u64) {
    let started = std::time::Instant::now();
    let mut interner = Interner::new();
    let observed = observed_values(ops);
    // The ops that constrain the search, with their index in `ops`.
    let mut checked: Vec<(usize, ModelOp, bool)> = Vec::new(); // (orig index, op, is ok)
    for (i, op) in ops.iter().enumerate() {
        let written = match op.f {
            F::Write => Some(&op.value),
            F::Cas => op.value.get(1),
            F::Read => None,
        };
        let unobserved = written.is_some_and(|v| !observed.contains(&v.to_string()));
        let model = match (op.f, op.outcome) {
            (_, Outcome::Fail) | (F::Read, Outcome::Info) => continue,
            // An info write (or cas) whose value nobody ever observes can
            // always be taken as "never happened": in any linearization that
            // includes it, the next operation must overwrite its value
            // unseen, so removing it leaves a valid linearization. With
            // unique write values this removes almost every info op, which
            // is what keeps histories full of timeouts cheap to check.
            (F::Write | F::Cas, Outcome::Info) if unobserved => continue,
            (F::Read, _) => ModelOp::Read(interner.id(&op.value)),
            (F::Write, _) => ModelOp::Write(interner.id(&op.value)),
            (F::Cas, _) => {
                let (e, n) = match &op.value {
                    Value::Array(a) if a.len() == 2 => (interner.id(&a[0]), interner.id(&a[1])),
                    _ => continue, // rejected by the parser
                };
                ModelOp::Cas(e, n)
            }
        };
        checked.push((i, model, op.outcome == Outcome::Ok));
    }
    let n = checked.len();
    let must = checked.iter().filter(|c| c.2).count();
    if must == 0 {
        return (KeyVerdict::Linearizable, 0);
    }

    // Events in history order; info returns after everything else.
    let mut events: Vec<(usize, bool, usize)> = Vec::with_capacity(2 * n); // (position, is_call, op)
    for (j, (i, _, ok)) in checked.iter().enumerate() {
        let op = ops[*i];
        events.push((op.invoke_pos, true, j));
        let ret = if *ok {
            op.complete_pos.unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        events.push((ret, false, j));
    }
    events.sort_by_key(|(pos, is_call, op)| (*pos, !*is_call, *op));

    // Linked list with a sentinel head at index 0.
    let head = 0;
    let mut list: Vec<Entry> = Vec::with_capacity(events.len() + 1);
    list.push(Entry {
        op: usize::MAX,
        is_call: false,
        prev: usize::MAX,
        next: 1,
    });
    let mut call_of = vec![0usize; n];
    let mut ret_of = vec![0usize; n];
    for (k, (_, is_call, op)) in events.iter().enumerate() {
        let idx = k + 1;
        list.push(Entry {
            op: *op,
            is_call: *is_call,
            prev: idx - 1,
            next: if k + 1 < events.len() {
                idx + 1
            } else {
                usize::MAX
            },
        });
        if *is_call {
            call_of[*op] = idx;
        } else {
            ret_of[*op] = idx;
        }
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let zobrist: Vec<u128> = (0..n).map(|_| rng.r#gen::<u128>()).collect();

    let unlink = |list: &mut Vec<Entry>, e: usize| {
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = nx;
        if nx != usize::MAX {
            list[nx].prev = p;
        }
    };
    let relink = |list: &mut Vec<Entry>, e: usize| {
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = e;
        if nx != usize::MAX {
            list[nx].prev = e;
        }
    };

    let mut state: u32 = 0;
    let mut lin_hash: u128 = 0;
    let mut linearized = 0usize; // ok ops linearized
    let mut stack: Vec<(usize, u32)> = Vec::new(); // (op, state before)
    let mut seen: HashSet<u128> = HashSet::new();
    let mut best: (usize, Vec<usize>, u32, usize) = (0, Vec::new(), 0, usize::MAX); // (depth, prefix ops, state, stuck op)
    let mut steps: u64 = 0;
    let mut entry = list[head].next;
    loop {
        if linearized == must {
            return (KeyVerdict::Linearizable, steps);
        }
        steps += 1;
        let exhausted = if steps > budget.steps {
            Some(Exhausted::Steps)
        } else if seen.len() >= budget.memo {
            Some(Exhausted::Memory)
        } else if steps.is_multiple_of(4096) && started.elapsed() > budget.time {
            Some(Exhausted::Time)
        } else {
            None
        };
        if let Some(exhausted) = exhausted {
            return (KeyVerdict::Unknown { steps, exhausted }, steps);
        }
        // The list always ends with a return: ok returns come before info
        // returns, and reaching an info return means every ok op was
        // linearized (checked above). `usize::MAX` is defensive.
        let at_call = entry != usize::MAX && list[entry].is_call;
        if at_call {
            let e = list[entry];
            let op = e.op;
            if let Some(next_state) = checked[op].1.step(state) {
                let h = lin_hash ^ zobrist[op];
                let key = h
                    ^ (u128::from(next_state)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
                if seen.insert(key) {
                    stack.push((op, state));
                    state = next_state;
                    lin_hash = h;
                    if checked[op].2 {
                        linearized += 1;
                    }
                    unlink(&mut list, call_of[op]);
                    unlink(&mut list, ret_of[op]);
                    entry = list[head].next;
                    continue;
                }
            }
            entry = e.next;
        } else {
            // The return of an op not yet linearized: backtrack.
            if stack.len() > best.0 || best.3 == usize::MAX {
                let stuck = if entry == usize::MAX {
                    0
                } else {
                    list[entry].op
                };
                best = (
                    stack.len(),
                    stack.iter().map(|s| s.0).collect(),
                    state,
                    stuck,
                );
            }
            let Some((op, prev_state)) = stack.pop() else {
                let (_, prefix, st, stuck) = best;
                return (
                    KeyVerdict::NotLinearizable(Counterexample {
                        prefix: prefix.into_iter().map(|j| checked[j].0).collect(),
                        state: interner.values[st as usize].clone(),
                        stuck: checked[stuck].0,
                    }),
                    steps,
                );
            };
            relink(&mut list, ret_of[op]);
            relink(&mut list, call_of[op]);
            state = prev_state;
            lin_hash ^= zobrist[op];
            if checked[op].2 {
                linearized -= 1;
            }
            entry = list[call_of[op]].next;
        }
    }
}

/// Values some operation observes: read by an ok read, or expected by a
/// cas (rendered as JSON text).
fn observed_values(ops: &[&Op]) -> HashSet<String> {
    let mut seen = HashSet::new();
    for op in ops {
        match (op.f, op.outcome) {
            (F::Read, Outcome::Ok) => {
                seen.insert(op.value.to_string());
            }
            (F::Cas, Outcome::Ok | Outcome::Info) => {
                if let Some(e) = op.value.get(0) {
                    seen.insert(e.to_string());
                }
            }
            _ => {}
        }
    }
    seen
}

/// Keys that had too many operations in flight at once, for messages.
pub fn max_concurrency(ops: &[&Op]) -> usize {
    let mut events: BTreeMap<usize, i64> = BTreeMap::new();
    for op in ops {
        *events.entry(op.invoke_pos).or_default() += 1;
        *events
            .entry(op.complete_pos.unwrap_or(usize::MAX))
            .or_default() -= 1;
    }
    let mut cur = 0i64;
    let mut max = 0i64;
    for d in events.values() {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}
