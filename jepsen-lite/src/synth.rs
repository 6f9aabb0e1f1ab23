//! Synthetic histories: a simulated atomic register per key, driven by many
//! concurrent processes with a seeded RNG. Every generated history is
//! linearizable by construction (each op takes effect at one instant between
//! its invoke and completion), so it serves the checker's benchmark and, with
//! [`corrupt`], its differential tests.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::history::{Event, F, Kind};

/// Shape of a synthetic history.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Operations to invoke in total.
    pub ops: usize,
    /// Distinct keys (each used for about ops/keys operations).
    pub keys: usize,
    /// Processes per key at once (bounds the operations in flight per key).
    pub concurrency: usize,
    /// Keys in use at the same time.
    pub active_keys: usize,
    /// Probability that an operation ends `info` (taking effect or not).
    pub info_rate: f64,
    pub seed: u64,
}

impl SynthConfig {
    pub fn new(ops: usize, keys: usize, concurrency: usize, seed: u64) -> Self {
        Self {
            ops,
            keys,
            concurrency,
            active_keys: keys.clamp(1, 50),
            info_rate: 0.02,
            seed,
        }
    }
}

enum Proc {
    Idle,
    /// Invoked op; `effect` is the completion type and value once it took effect.
    Pending {
        f: F,
        key: String,
        value: Value,
        effect: Option<(Kind, Value)>,
    },
}

/// Generates a linearizable history.
pub fn linearizable_history(cfg: &SynthConfig) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let slots = cfg.active_keys.max(1);
    let conc = cfg.concurrency.max(1);
    let ops_per_key = (cfg.ops / cfg.keys.max(1)).max(1);
    let mut procs: Vec<(u64, Proc)> = (0..slots * conc).map(|p| (p as u64, Proc::Idle)).collect();
    let mut next_pid = procs.len() as u64;
    let mut slot_ops = vec![0usize; slots];
    let mut registers: std::collections::HashMap<String, Value> = Default::default();
    let mut events = Vec::new();
    let mut invoked = 0usize;
    let mut next_value = 1u64;
    let mut pending = 0usize;
    let emit = |events: &mut Vec<Event>, process, kind, f, key: &str, value: Value| {
        let index = events.len() as u64;
        events.push(Event {
            index,
            process,
            kind,
            f,
            key: Value::String(key.to_string()),
            value,
            time_ns: Some(index * 100),
            revision: None,
        });
    };
    while invoked < cfg.ops || pending > 0 {
        let p = rng.gen_range(0..procs.len());
        let slot = p / conc;
        let (pid, state) = &mut procs[p];
        match state {
            Proc::Idle => {
                if invoked >= cfg.ops {
                    continue;
                }
                let key_index = slot + slots * (slot_ops[slot] / ops_per_key);
                slot_ops[slot] += 1;
                let key = format!("k{key_index}");
                let current = registers.get(&key).cloned().unwrap_or(Value::Null);
                let (f, value) = match rng.gen_range(0..10) {
                    0..=4 => (F::Read, Value::Null),
                    5..=7 => {
                        next_value += 1;
                        (F::Write, json!(next_value))
                    }
                    _ => {
                        next_value += 1;
                        let expected = if rng.gen_bool(0.6) {
                            current
                        } else {
                            json!(rng.gen_range(0..next_value))
                        };
                        (F::Cas, json!([expected, next_value]))
                    }
                };
                emit(&mut events, *pid, Kind::Invoke, f, &key, value.clone());
                *state = Proc::Pending {
                    f,
                    key,
                    value,
                    effect: None,
                };
                invoked += 1;
                pending += 1;
            }
            Proc::Pending {
                f,
                key,
                value,
                effect,
            } => {
                let (f, key) = (*f, key.clone());
                match effect.take() {
                    None if rng.gen_bool(cfg.info_rate / 2.0) && f != F::Read => {
                        // Timed out without ever taking effect.
                        emit(&mut events, *pid, Kind::Info, f, &key, value.clone());
                        *pid = next_pid;
                        next_pid += 1;
                        *state = Proc::Idle;
                        pending -= 1;
                    }
                    None => {
                        // The linearization point.
                        let reg = registers.entry(key).or_insert(Value::Null);
                        *effect = Some(match f {
                            F::Read => (Kind::Ok, reg.clone()),
                            F::Write => {
                                *reg = value.clone();
                                (Kind::Ok, value.clone())
                            }
                            F::Cas => {
                                if *reg == value[0] {
                                    *reg = value[1].clone();
                                    (Kind::Ok, value.clone())
                                } else {
                                    (Kind::Fail, value.clone())
                                }
                            }
                        });
                    }
                    Some((kind, result)) => {
                        let kind = if rng.gen_bool(cfg.info_rate / 2.0) {
                            Kind::Info
                        } else {
                            kind
                        };
                        emit(&mut events, *pid, kind, f, &key, result);
                        if kind == Kind::Info {
                            *pid = next_pid;
                            next_pid += 1;
                        }
                        *state = Proc::Idle;
                        pending -= 1;
                    }
                }
            }
        }
    }
    events
}

/// Replaces the value of about `rate` of the ok reads with a random small
/// value, which may or may not break linearizability.
pub fn corrupt(events: &mut [Event], rate: f64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for e in events.iter_mut() {
        if e.kind == Kind::Ok && e.f == F::Read && rng.gen_bool(rate) {
            e.value = if rng.gen_bool(0.2) {
                Value::Null
            } else {
                json!(rng.gen_range(0..6))
            };
        }
    }
}
