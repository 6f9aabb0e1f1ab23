//! The checker must reject each classic anomaly, accept correct concurrent
//! histories (with indeterminate operations), and agree with a brute-force
//! checker on thousands of small random histories.

use jepsen_lite::checker::{self, KeyVerdict};
use jepsen_lite::history::{self, Event, F, History, Kind, Op, Outcome};
use jepsen_lite::synth;
use serde_json::{Value, json};

/// Builds a history from compact steps: (process, kind, f, value).
fn hist(steps: &[(u64, Kind, F, Value)]) -> History {
    let events = steps
        .iter()
        .enumerate()
        .map(|(i, (p, k, f, v))| {
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
                    revision: None,
                },
            )
        })
        .collect();
    history::from_events(events).expect("valid history")
}

fn verdict(h: &History) -> KeyVerdict {
    let report = checker::check(h, checker::Budget::steps(1_000_000), 2);
    report
        .keys
        .into_iter()
        .next()
        .map_or(KeyVerdict::Linearizable, |k| k.verdict)
}

fn linearizable(h: &History) -> bool {
    verdict(h) == KeyVerdict::Linearizable
}

use F::{Cas, Read, Write};
use Kind::{Fail, Info, Invoke, Ok as Done};

#[test]
fn stale_read_after_a_completed_write_is_rejected() {
    let h = hist(&[
        (1, Invoke, Write, json!(1)),
        (1, Done, Write, json!(1)),
        (1, Invoke, Write, json!(2)),
        (1, Done, Write, json!(2)),
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, json!(1)),
    ]);
    match verdict(&h) {
        KeyVerdict::NotLinearizable(c) => {
            assert_eq!(c.prefix.len(), 2, "both writes linearize first");
            assert_eq!(c.state, json!(2));
            assert_eq!(h.ops[c.stuck].f, Read, "the stale read cannot be placed");
        }
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn lost_acknowledged_write_is_rejected() {
    let h = hist(&[
        (1, Invoke, Write, json!(7)),
        (1, Done, Write, json!(7)),
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, Value::Null),
    ]);
    assert!(!linearizable(&h));
}

#[test]
fn value_never_written_is_rejected() {
    let h = hist(&[
        (1, Invoke, Write, json!(1)),
        (2, Invoke, Read, Value::Null),
        (1, Done, Write, json!(1)),
        (2, Done, Read, json!(99)),
    ]);
    assert!(!linearizable(&h));
}

#[test]
fn read_from_the_future_is_rejected() {
    let h = hist(&[
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, json!(3)),
        (1, Invoke, Write, json!(3)),
        (1, Done, Write, json!(3)),
    ]);
    assert!(!linearizable(&h));
}

#[test]
fn a_failed_write_that_is_later_read_is_rejected() {
    let h = hist(&[
        (1, Invoke, Write, json!(5)),
        (1, Fail, Write, json!(5)),
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, json!(5)),
    ]);
    assert!(!linearizable(&h));
}

#[test]
fn a_failed_cas_does_not_write() {
    let h = hist(&[
        (1, Invoke, Write, json!(1)),
        (1, Done, Write, json!(1)),
        (2, Invoke, Cas, json!([9, 2])),
        (2, Fail, Cas, json!([9, 2])),
        (3, Invoke, Read, Value::Null),
        (3, Done, Read, json!(2)),
    ]);
    assert!(!linearizable(&h));
}

#[test]
fn concurrent_operations_may_take_effect_in_either_order() {
    // The read overlaps both writes: it may see either, or the first.
    for seen in [json!(1), json!(2)] {
        let h = hist(&[
            (1, Invoke, Write, json!(1)),
            (2, Invoke, Read, Value::Null),
            (3, Invoke, Write, json!(2)),
            (1, Done, Write, json!(1)),
            (3, Done, Write, json!(2)),
            (2, Done, Read, seen.clone()),
        ]);
        assert!(linearizable(&h), "read of {seen} must be accepted");
    }
    let cas = hist(&[
        (1, Invoke, Write, json!(1)),
        (1, Done, Write, json!(1)),
        (2, Invoke, Cas, json!([1, 2])),
        (3, Invoke, Read, Value::Null),
        (3, Done, Read, json!(2)),
        (2, Done, Cas, json!([1, 2])),
    ]);
    assert!(linearizable(&cas));
}

#[test]
fn info_operations_may_take_effect_later_or_never() {
    // The info write becomes visible long after its invoke...
    let later = hist(&[
        (1, Invoke, Write, json!(4)),
        (1, Info, Write, json!(4)),
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, Value::Null),
        (3, Invoke, Read, Value::Null),
        (3, Done, Read, json!(4)),
    ]);
    assert!(linearizable(&later));
    // ...or never; an invoke with no completion is info too.
    let never = hist(&[
        (1, Invoke, Write, json!(4)),
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, Value::Null),
    ]);
    assert!(linearizable(&never));
    // But not before its invoke.
    let early = hist(&[
        (2, Invoke, Read, Value::Null),
        (2, Done, Read, json!(4)),
        (1, Invoke, Write, json!(4)),
        (1, Info, Write, json!(4)),
    ]);
    assert!(!linearizable(&early));
}

#[test]
fn synthetic_histories_are_linearizable_and_their_corruptions_are_caught() {
    let cfg = synth::SynthConfig::new(20_000, 100, 8, 7);
    let events = synth::linearizable_history(&cfg);
    let h = history::parse(&history::to_jsonl(&events)).unwrap();
    let report = checker::check(&h, checker::Budget::default(), 2);
    assert!(
        report.linearizable(),
        "{:?}",
        report.first_violation().map(|k| &k.verdict)
    );
    let mut bad = events.clone();
    synth::corrupt(&mut bad, 0.05, 3);
    let h = history::parse(&history::to_jsonl(&bad)).unwrap();
    assert!(
        checker::check(&h, checker::Budget::default(), 2)
            .first_violation()
            .is_some()
    );
}

#[test]
fn the_budget_turns_a_long_search_into_unknown() {
    let cfg = synth::SynthConfig::new(400, 1, 8, 11);
    let events = synth::linearizable_history(&cfg);
    let h = history::parse(&history::to_jsonl(&events)).unwrap();
    let report = checker::check(&h, checker::Budget::steps(10), 1);
    assert!(matches!(
        report.keys[0].verdict,
        KeyVerdict::Unknown {
            exhausted: checker::Exhausted::Steps,
            ..
        }
    ));
}

/// The default budget is time, not steps: a long single-key history that
/// needs many steps is still decided, and a budget of no time is not.
#[test]
fn a_long_single_key_history_is_decided_within_the_time_budget() {
    let cfg = synth::SynthConfig::new(8_000, 1, 10, 5);
    let events = synth::linearizable_history(&cfg);
    let h = history::parse(&history::to_jsonl(&events)).unwrap();
    let t = std::time::Instant::now();
    let report = checker::check(&h, checker::Budget::default(), 1);
    assert_eq!(report.keys[0].verdict, KeyVerdict::Linearizable);
    println!(
        "8,000 ops on one key: {} steps in {:?}",
        report.keys[0].steps,
        t.elapsed()
    );
    let none = checker::Budget::time(std::time::Duration::ZERO);
    let cut = checker::check(&h, none, 1);
    assert!(
        report.keys[0].steps > 4096,
        "the history must need a real search"
    );
    assert!(matches!(
        cut.keys[0].verdict,
        KeyVerdict::Unknown {
            exhausted: checker::Exhausted::Time,
            ..
        }
    ));
}

/// Linearizable by exhaustive search: every subset of info writes/cas, every
/// order consistent with real time.
fn brute_force(ops: &[&Op]) -> bool {
    let kept: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.outcome != Outcome::Fail && !(o.f == Read && o.outcome == Outcome::Info))
        .collect();
    let infos: Vec<usize> = (0..kept.len())
        .filter(|i| kept[*i].outcome == Outcome::Info)
        .collect();
    for mask in 0..(1u32 << infos.len()) {
        let chosen: Vec<&Op> = kept
            .iter()
            .enumerate()
            .filter(|(i, _)| match infos.iter().position(|j| j == i) {
                Some(bit) => mask & (1 << bit) != 0,
                None => true,
            })
            .map(|(_, o)| *o)
            .collect();
        let mut used = vec![false; chosen.len()];
        if search(&chosen, &mut used, Value::Null, 0) {
            return true;
        }
    }
    false
}

fn search(ops: &[&Op], used: &mut [bool], state: Value, placed: usize) -> bool {
    if placed == ops.len() {
        return true;
    }
    for i in 0..ops.len() {
        if used[i] {
            continue;
        }
        // i can go next only if no unplaced op completed before i's invoke.
        let blocked = (0..ops.len()).any(|j| {
            j != i
                && !used[j]
                && ops[j].outcome == Outcome::Ok
                && ops[j].complete_pos.is_some_and(|c| c < ops[i].invoke_pos)
        });
        if blocked {
            continue;
        }
        let op = ops[i];
        let next = match op.f {
            Read => (op.value == state).then(|| state.clone()),
            Write => Some(op.value.clone()),
            Cas => (op.value[0] == state).then(|| op.value[1].clone()),
        };
        if let Some(next) = next {
            used[i] = true;
            if search(ops, used, next, placed + 1) {
                return true;
            }
            used[i] = false;
        }
    }
    false
}

#[test]
fn agrees_with_brute_force_on_small_random_histories() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let (mut yes, mut no) = (0, 0);
    for case in 0..4000u64 {
        let mut cfg = synth::SynthConfig::new(rng.gen_range(2..8), 1, rng.gen_range(1..4), case);
        cfg.info_rate = 0.3;
        let mut events = synth::linearizable_history(&cfg);
        if rng.gen_bool(0.6) {
            synth::corrupt(&mut events, 0.4, case);
        }
        let h = history::parse(&history::to_jsonl(&events)).unwrap();
        let ops: Vec<&Op> = h.ops.iter().collect();
        let expected = brute_force(&ops);
        let (got, _) = checker::check_key(&ops, checker::Budget::steps(1_000_000));
        assert_eq!(
            got == KeyVerdict::Linearizable,
            expected,
            "case {case}: checker says {got:?}, brute force says {expected}\n{}",
            history::to_jsonl(&events)
        );
        if expected { yes += 1 } else { no += 1 }
    }
    assert!(
        yes > 500 && no > 500,
        "differential test is lopsided: {yes} linearizable, {no} not"
    );
}

#[test]
fn check_and_report_exit_codes() {
    use std::process::ExitCode;
    let ok = history::to_jsonl(&synth::linearizable_history(&synth::SynthConfig::new(
        200, 4, 3, 5,
    )));
    assert_eq!(
        jepsen_lite::check_and_report(&ok, None, checker::Budget::steps(1_000_000), 2),
        ExitCode::from(0)
    );
    let bad = r#"{"index":0,"process":1,"type":"invoke","f":"write","key":"k","value":5}
{"index":1,"process":1,"type":"fail","f":"write","key":"k","value":5}
{"index":2,"process":2,"type":"invoke","f":"read","key":"k","value":null}
{"index":3,"process":2,"type":"ok","f":"read","key":"k","value":5}"#;
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("r.html");
    assert_eq!(
        jepsen_lite::check_and_report(bad, Some(&html), checker::Budget::steps(1_000_000), 2),
        ExitCode::from(1)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("NOT linearizable") && page.contains("<svg"));
    assert_eq!(
        jepsen_lite::check_and_report("{oops", None, checker::Budget::steps(1_000_000), 2),
        ExitCode::from(2)
    );
}
