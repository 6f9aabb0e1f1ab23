//! A self-contained HTML report: a verdict table and, per key, a timeline of
//! its operations (one row per process, a bar from invoke to completion), so
//! a person can see what went wrong. The operation that cannot be placed is
//! drawn red; the longest linearizable prefix found is outlined green.

use std::fmt::Write;

use crate::checker::{KeyResult, KeyVerdict, Report};
use crate::history::{F, Op, Outcome};

/// Timelines drawn at most (violations first), to keep reports small.
const MAX_TIMELINES: usize = 12;

/// Operations drawn per timeline: a window around the operation that cannot
/// be placed (or the key's first operations when there is none).
const WINDOW: usize = 40;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(op: &Op) -> String {
    let v = |v: &serde_json::Value| v.to_string();
    match op.f {
        F::Read => format!(
            "r {}",
            if op.outcome == Outcome::Ok {
                v(&op.value)
            } else {
                "?".into()
            }
        ),
        F::Write => format!("w {}", v(&op.value)),
        F::Cas => format!("cas {}→{}", v(&op.value[0]), v(&op.value[1])),
    }
}

fn timeline(out: &mut String, k: &KeyResult<'_>) {
    let (prefix, stuck): (Vec<usize>, Option<usize>) = match &k.verdict {
        KeyVerdict::NotLinearizable(c) => (c.prefix.clone(), Some(c.stuck)),
        _ => (Vec::new(), None),
    };
    // Ops are in invoke order; show a window around the stuck op.
    let centre = stuck.unwrap_or(WINDOW / 2);
    let first = centre.saturating_sub(WINDOW * 3 / 4);
    let last = (first + WINDOW).min(k.ops.len());
    let shown: Vec<usize> = (first..last).collect();
    if shown.len() < k.ops.len() {
        let _ = writeln!(
            out,
            "<p>Showing operations {}–{} of {} (hover a bar for its lines in the history).</p>",
            first + 1,
            last,
            k.ops.len()
        );
    }
    let mut procs: Vec<u64> = shown.iter().map(|i| k.ops[*i].process).collect();
    procs.sort_unstable();
    procs.dedup();
    let lo = shown
        .iter()
        .map(|i| k.ops[*i].invoke_pos)
        .min()
        .unwrap_or(0);
    let hi = shown
        .iter()
        .filter_map(|i| k.ops[*i].complete_pos)
        .max()
        .unwrap_or(lo)
        .max(lo + 1);
    let span = (hi - lo + 2) as f64;
    let (w, row) = (1100.0, 26.0);
    let height = procs.len() as f64 * row + 30.0;
    let _ = writeln!(
        out,
        "<svg width=\"{}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\" font-family=\"monospace\" font-size=\"11\">",
        w + 80.0
    );
    for (r, p) in procs.iter().enumerate() {
        let y = 20.0 + r as f64 * row;
        let _ = writeln!(out, "<text x=\"2\" y=\"{}\">p{p}</text>", y + 14.0);
    }
    for &i in &shown {
        let op = k.ops[i];
        let r = procs.iter().position(|p| *p == op.process).unwrap_or(0);
        let y = 20.0 + r as f64 * row;
        let x0 = 70.0 + (op.invoke_pos - lo) as f64 / span * w;
        let x1 = match op.complete_pos {
            Some(c) if c <= hi => 70.0 + (c - lo + 1) as f64 / span * w,
            _ => 70.0 + w,
        };
        let fill = match op.outcome {
            Outcome::Ok => "#cfe3ff",
            Outcome::Fail => "#eeeeee",
            Outcome::Info => "#ffe9b3",
        };
        let (stroke, sw) = if Some(i) == stuck {
            ("#d00000", 3)
        } else if prefix.contains(&i) {
            ("#0a8a0a", 2)
        } else {
            ("#555555", 1)
        };
        let title = format!(
            "{} {:?} lines {}–{}",
            label(op),
            op.outcome,
            op.invoke_line,
            op.complete_line.map_or("∞".to_string(), |l| l.to_string())
        );
        let _ = writeln!(
            out,
            "<g><title>{}</title><rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"18\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"{sw}\" rx=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text></g>",
            esc(&title),
            (x1 - x0).max(3.0),
            x0 + 3.0,
            y + 13.0,
            esc(&label(op))
        );
    }
    out.push_str("</svg>\n");
}

/// Renders the report.
pub fn html(report: &Report<'_>, title: &str) -> String {
    let mut out = String::new();
    let verdict = if report.linearizable() {
        "linearizable"
    } else if report.first_violation().is_some() {
        "NOT linearizable"
    } else {
        "unknown"
    };
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}\
.bad{{color:#d00000;font-weight:bold}} .ok{{color:#0a8a0a}} .unk{{color:#b07000}}</style></head><body>\
<h1>{t}</h1><p>Verdict: <b>{verdict}</b> — {n} keys, {ops} operations. Legend: blue ok, yellow info (unknown outcome), \
grey fail; red outline: the operation that cannot be placed; green outline: the longest linearizable prefix found.</p>",
        t = esc(title),
        n = report.keys.len(),
        ops = report.keys.iter().map(|k| k.ops.len()).sum::<usize>()
    );
    out.push_str("<table><tr><th>key</th><th>ops</th><th>verdict</th><th>search steps</th></tr>");
    let mut order: Vec<&KeyResult<'_>> = report.keys.iter().collect();
    order.sort_by_key(|k| match k.verdict {
        KeyVerdict::NotLinearizable(_) => 0,
        KeyVerdict::Unknown { .. } => 1,
        KeyVerdict::Linearizable => 2,
    });
    for k in order.iter().take(200) {
        let (class, text) = match &k.verdict {
            KeyVerdict::Linearizable => ("ok", "linearizable".to_string()),
            KeyVerdict::NotLinearizable(c) => (
                "bad",
                format!(
                    "NOT linearizable: after {} ops (value {}), cannot place {}",
                    c.prefix.len(),
                    c.state,
                    label(k.ops[c.stuck])
                ),
            ),
            KeyVerdict::Unknown { steps, exhausted } => (
                "unk",
                format!("unknown (the {exhausted} budget ran out after {steps} steps)"),
            ),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td>{}</td></tr>",
            esc(k.key),
            k.ops.len(),
            esc(&text),
            k.steps
        );
    }
    out.push_str("</table>");
    for k in order.iter().take(MAX_TIMELINES) {
        let _ = write!(out, "<h2>key {}</h2>", esc(k.key));
        timeline(&mut out, k);
    }
    out.push_str("</body></html>\n");
    out
}
