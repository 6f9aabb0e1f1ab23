//! The drill runner: a real palisade cluster of separate processes,
//! concurrent clients recording a history, and faults injected on a
//! schedule drawn from a seed.
//!
//! # Faults (nemeses)
//!
//! - `kill`: `kill -9` a random node, the leader of a random group, or a
//!   minority; restart it on its own data directory when the fault heals.
//! - `pause`: `SIGSTOP` a random node or a leader; `SIGCONT` on heal.
//! - `partition`: cut real traffic between node processes. Each node
//!   listens on its own loopback address (127.A.B.n) and sends its peer
//!   traffic from it, so `iptables -A <chain> -s A -d B -j DROP` rules cut a
//!   link in one direction (two rules cut it both ways). Packets are
//!   dropped, not refused: a cut link looks like a dead network, not a dead
//!   process. Modes: isolate one node, isolate a leader, minority/majority
//!   halves, and for five nodes a majorities ring and a bridge. Needs root
//!   and `iptables`; the rules live in a chain of their own, removed at exit.
//!
//! # Workload
//!
//! A register per key: reads, writes of unique values, and compare-and-set,
//! each sent to a random node (which forwards to the leader) with a short
//! deadline. Keys rotate every few hundred operations so each key's history
//! stays small enough to check exactly. Outcomes: a reply is `ok`; a read
//! error, a refused write (`UNAVAILABLE` with a leader hint: nothing was
//! proposed) or a failed comparison is `fail`; anything else (timeout,
//! broken connection, unknown outcome) is `info`, and the process is retired
//! in favour of a fresh process id.
//!
//! Reads use `--read-consistency` (default `linearizable`). `lease` reads
//! are checked for linearizability like linearizable ones. `session` reads
//! carry each worker's session token (merged from its writes' and reads'
//! receipts) and are checked by [`crate::session`] (read-your-writes and
//! monotonic reads per process) instead: they are not linearizable by
//! design. `bounded` and `stale` reads promise neither; a drill with them
//! is a positive control (under partitions the checker should catch them).
//! `--learners N` adds read replicas that the workload also sends
//! operations to (faults hit only voters).
//!
//! - `membership`: change the cluster's shape while the workload runs —
//!   a spare node joins (`palisade start --join`), a node drains, a node is
//!   killed and removed (`node remove`), a replica moves, a leader is
//!   transferred, the hash group count changes (`set-groups`). Kills, pauses
//!   and partitions then hit whatever nodes are members at the time, and
//!   the changes themselves run in the background, interleaved with them.
//!
//! At the end every fault is healed, the runner waits for the cluster to
//! recover (and, with `membership`, for every recorded change to finish),
//! reads every key once more (so a lost acknowledged write shows up as a
//! violation), writes `history.jsonl`, `results.json` and `report.html`, and
//! exits non-zero if the history is not linearizable or the cluster did not
//! recover.
//!
//! # Honesty gates
//!
//! A drill that could not do what it claims fails (exit 1) instead of
//! passing vacuously: a scheduled fault that could not be applied (an
//! iptables rule that did not go in, an admin call the cluster never took),
//! no fault at all when a nemesis was asked for, a worker that never got an
//! answer, or fewer than `--min-ok` acknowledged operations.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use palisade_client::Client;
use palisade_proto::v1 as pb;
use palisade_proto::v1::kv_client::KvClient;
use palisade_tests::{ClusterOptions, TestCluster};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

use crate::checker;
use crate::history::{Event, F, Kind};

/// Operations per key before the workload moves to a fresh key.
const KEY_ROTATION: u64 = 300;

/// Arguments of `jepsen-lite run`.
#[derive(Args, Debug, Clone)]
pub struct DrillArgs {
    /// Cluster size (3 or 5).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// How long the workload runs, e.g. 60s or 2m.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub time: Duration,
    /// Faults to inject, comma-separated: kill, pause, partition (or none).
    #[arg(long, default_value = "kill,partition,pause", value_delimiter = ',')]
    pub nemesis: Vec<String>,
    /// The workload: `register` (reads, writes, cas; checked for
    /// linearizability or session guarantees) or `lock` (fenced
    /// read-modify-write of a counter under one lock; see `lockwork`).
    #[arg(long, default_value = "register")]
    pub workload: String,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 6)]
    pub concurrency: usize,
    /// Seed of the workload and fault schedule (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory for history.jsonl, results.json, report.html.
    #[arg(long, default_value = "jepsen-out")]
    pub out: PathBuf,
    /// Data groups in the cluster.
    #[arg(long, default_value_t = 2)]
    pub groups: u64,
    /// Deadline of one client operation, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub op_timeout_ms: u64,
    /// Positive control: run the nodes with --unsafe-local-reads (reads skip
    /// ReadIndex); with `--workload lock`, write the counter without the
    /// fence. The checker must then report a violation; the drill exits 1.
    #[arg(long)]
    pub positive_control: bool,
    /// Consistency of the workload's reads.
    #[arg(long, value_enum, default_value = "linearizable")]
    pub read_consistency: ReadLevel,
    /// For `--read-consistency bounded`: the staleness allowed.
    #[arg(long, default_value_t = 500)]
    pub max_staleness_ms: u64,
    /// Read replicas (learners) in the cluster; the workload uses them too.
    #[arg(long, default_value_t = 0)]
    pub learners: u64,
    /// With the `membership` nemesis: nodes that may join during the drill.
    #[arg(long, default_value_t = 2)]
    pub spare_nodes: u64,
    /// Fewest acknowledged operations for a drill to count (default: 100
    /// for `register`, 20 for `lock`, see [`DrillArgs::min_ok`]).
    #[arg(long = "min-ok")]
    pub min_ok: Option<u64>,
}

impl DrillArgs {
    /// The `--min-ok` gate in force. The lock workload is slow by design —
    /// one holder at a time, and every tenth holder stalls past its lease's
    /// TTL so the fence is exercised — so a 20 s lock drill acknowledges
    /// only some tens of increments even without faults; its default is
    /// scaled to that instead of the register workload's.
    pub fn min_ok(&self) -> u64 {
        self.min_ok
            .unwrap_or(if self.workload == "lock" { 20 } else { 100 })
    }
}

/// Read consistency levels a drill can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadLevel {
    Linearizable,
    Lease,
    Session,
    Bounded,
    Stale,
}

impl ReadLevel {
    pub fn proto(self) -> pb::ReadConsistency {
        match self {
            ReadLevel::Linearizable => pb::ReadConsistency::Linearizable,
            ReadLevel::Lease => pb::ReadConsistency::Lease,
            ReadLevel::Session => pb::ReadConsistency::Session,
            ReadLevel::Bounded => pb::ReadConsistency::BoundedStaleness,
            ReadLevel::Stale => pb::ReadConsistency::Stale,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ReadLevel::Linearizable => "linearizable",
            ReadLevel::Lease => "lease",
            ReadLevel::Session => "session",
            ReadLevel::Bounded => "bounded",
            ReadLevel::Stale => "stale",
        }
    }
}

/// How one client process reads, and the session it carries.
#[derive(Debug, Clone, Default)]
pub struct ReadSession {
    pub level: pb::ReadConsistency,
    pub max_staleness_ms: u64,
    /// Highest revision seen per group (sent with SESSION reads).
    seen: BTreeMap<u64, u64>,
}

impl ReadSession {
    pub fn new(level: pb::ReadConsistency, max_staleness_ms: u64) -> Self {
        Self {
            level,
            max_staleness_ms,
            seen: BTreeMap::new(),
        }
    }

    fn observe(&mut self, group: u64, revision: u64) {
        if group != 0 {
            let r = self.seen.entry(group).or_default();
            *r = (*r).max(revision);
        }
    }

    fn observe_header(&mut self, h: Option<&pb::ResponseHeader>) {
        if let Some(h) = h {
            self.observe(h.group_id, h.revision);
        }
    }

    fn token(&self) -> Option<pb::SessionToken> {
        (self.level == pb::ReadConsistency::Session).then(|| pb::SessionToken {
            revisions: self
                .seen
                .iter()
                .map(|(g, r)| pb::GroupRevision {
                    group_id: *g,
                    revision: *r,
                })
                .collect(),
        })
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s, 2m or 500ms"))?;
    if v.is_nan() || v <= 0.0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Entry point for `jepsen-lite run`.
pub fn main(args: DrillArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(crate::EXIT_UNKNOWN);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("drill error: {e:#}");
            ExitCode::from(crate::EXIT_UNKNOWN)
        }
    }
}

/// Records events with indexes and times from one monotonic clock.
struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn record(&self, process: u64, kind: Kind, f: F, key: &str, value: Value) {
        self.record_with(process, kind, f, key, value, None);
    }

    fn record_with(
        &self,
        process: u64,
        kind: Kind,
        f: F,
        key: &str,
        value: Value,
        revision: Option<u64>,
    ) {
        let time_ns = self.start.elapsed().as_nanos() as u64;
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let index = events.len() as u64;
        events.push(Event {
            index,
            process,
            kind,
            f,
            key: Value::String(key.to_string()),
            value,
            time_ns: Some(time_ns),
            revision,
        });
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A fault applied during the drill.
#[derive(Debug, Clone, serde::Serialize)]
struct Fault {
    kind: String,
    description: String,
    start_ns: u64,
    end_ns: u64,
}

/// iptables rules in a chain of our own, hooked into OUTPUT.
pub struct Firewall {
    chain: String,
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("iptables")
        .args(args)
        .output()
        .context("running iptables (install it; partitions need root and iptables)")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Firewall {
    /// Creates the chain; fails without root or iptables.
    pub fn new() -> anyhow::Result<Self> {
        // Unique per firewall: tests in one process may hold several at once.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let chain = format!(
            "PALISADE-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        iptables(&["-N", &chain])?;
        if let Err(e) = iptables(&["-I", "OUTPUT", "-j", &chain]) {
            let _ = iptables(&["-X", &chain]);
            return Err(e);
        }
        Ok(Self { chain })
    }

    /// Drops packets on each directed link (from, to), by node IP.
    pub fn cut(&self, ips: &BTreeMap<u64, String>, links: &[(u64, u64)]) -> anyhow::Result<()> {
        for (a, b) in links {
            iptables(&[
                "-A",
                &self.chain,
                "-s",
                &ips[a],
                "-d",
                &ips[b],
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Removes every rule: all links work again.
    pub fn heal(&self) -> anyhow::Result<()> {
        iptables(&["-F", &self.chain])
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}

/// Links (both directions) cut by a partition into `sides`.
pub fn links_between(sides: &[Vec<u64>]) -> Vec<(u64, u64)> {
    let mut links = Vec::new();
    for (i, a) in sides.iter().enumerate() {
        for (j, b) in sides.iter().enumerate() {
            if i != j {
                for x in a {
                    for y in b {
                        links.push((*x, *y));
                    }
                }
            }
        }
    }
    links
}

/// Directed links cut by a ring of majorities (each node talks to its
/// neighbours only) or a bridge (two halves joined by one node).
fn partition_plan(
    mode: &str,
    members: &[u64],
    target: u64,
    rng: &mut StdRng,
) -> (String, Vec<(u64, u64)>) {
    let all: Vec<u64> = members.to_vec();
    let n = all.len();
    match mode {
        "isolate" | "isolate-leader" => {
            let rest: Vec<u64> = all.iter().copied().filter(|x| *x != target).collect();
            (
                format!("{mode} node {target}"),
                links_between(&[vec![target], rest]),
            )
        }
        "halves" => {
            let mut shuffled = all.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.gen_range(0..=i));
            }
            let (minority, majority) = shuffled.split_at(n / 2);
            (
                format!("halves {minority:?} | {majority:?}"),
                links_between(&[minority.to_vec(), majority.to_vec()]),
            )
        }
        "ring" => {
            // Each node hears only from its two neighbours in the ring:
            // every node sees a majority (itself and two neighbours of
            // five), but no two majorities agree.
            let mut links = Vec::new();
            for (i, a) in all.iter().enumerate() {
                for (j, b) in all.iter().enumerate() {
                    let d = (i + n - j) % n;
                    if i != j && d != 1 && d != n - 1 {
                        links.push((*a, *b));
                    }
                }
            }
            ("majorities ring".into(), links)
        }
        _ => {
            // bridge: the lower and upper halves can't talk; the middle
            // node talks to everyone.
            let left: Vec<u64> = all.iter().copied().take(n / 2).collect();
            let right: Vec<u64> = all.iter().copied().skip(n / 2 + 1).collect();
            (
                format!("bridge {left:?} - {} - {right:?}", all[n / 2]),
                links_between(&[left, right]),
            )
        }
    }
}

struct Drill {
    args: DrillArgs,
    cluster: tokio::sync::Mutex<TestCluster>,
    /// Every node's client address, spares included (by id).
    addrs: BTreeMap<u64, String>,
    ips: BTreeMap<u64, String>,
    /// Nodes that are members now (serving or joining; not drained or
    /// removed): the ones faults hit and the workload talks to.
    members: Mutex<std::collections::BTreeSet<u64>>,
    /// Nodes that may still join.
    spares: Mutex<Vec<u64>>,
    /// Nodes drained or removed during the drill (stopped at the end).
    departed: Mutex<Vec<u64>>,
    /// Scheduled faults that could not be applied.
    fault_errors: Mutex<Vec<String>>,
    /// Acknowledged operations, in total and per worker.
    ok_ops: AtomicU64,
    worker_ok: Mutex<BTreeMap<usize, u64>>,
    recorder: Recorder,
    next_process: AtomicU64,
    ops_started: AtomicU64,
    stop: AtomicBool,
}

impl Drill {
    fn members(&self) -> Vec<u64> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Client addresses of the current members.
    fn endpoints(&self) -> Vec<String> {
        self.members()
            .iter()
            .filter_map(|id| self.addrs.get(id).cloned())
            .collect()
    }

    fn fault_error(&self, what: String) {
        eprintln!("FAULT NOT APPLIED: {what}");
        self.fault_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }
}

/// Lazily connected raw gRPC channels, one per node address: the workload
/// picks the node per operation.
struct Stubs {
    timeout: Duration,
    channels: BTreeMap<String, Channel>,
}

impl Stubs {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            channels: BTreeMap::new(),
        }
    }

    fn get(&mut self, addr: &str) -> anyhow::Result<Channel> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        self.channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// How a write's error is recorded: `fail` only when the write certainly
/// did not happen (a leader hint, a bad request, a connection that never
/// opened), `info` otherwise.
pub fn write_error_kind(status: &tonic::Status) -> Kind {
    let detail = pb::ErrorDetail::decode(status.details())
        .ok()
        .and_then(|d| d.kind);
    match (status.code(), detail) {
        // A leader hint means the write was never proposed.
        (tonic::Code::Unavailable, Some(pb::error_detail::Kind::NotLeader(_))) => Kind::Fail,
        (tonic::Code::InvalidArgument, _) => Kind::Fail,
        // The connection could not be opened: the request never left.
        (tonic::Code::Unavailable, None) if status.message().contains("tcp connect error") => {
            Kind::Fail
        }
        _ => Kind::Info,
    }
}

/// Runs one register operation against `kv` within `timeout` and classifies
/// its outcome for the history: a reply is `ok` (a read's value is what it
/// read); a failed read, a failed comparison or a write that certainly did
/// not happen ([`write_error_kind`]) is `fail`; anything else is `info`.
pub async fn run_register_op(
    kv: &mut KvClient<Channel>,
    f: F,
    key: &str,
    invoke: &Value,
    timeout: Duration,
) -> (Kind, Value) {
    let mut session = ReadSession::default();
    let (kind, value, _) = run_register_op_in(kv, f, key, invoke, timeout, &mut session).await;
    (kind, value)
}

/// Like [`run_register_op`], reading at `session`'s level (and merging the
/// receipts into it); also returns the revision the op saw or made (a
/// read's `mod_revision`, 0 when absent; a write's revision).
pub async fn run_register_op_in(
    kv: &mut KvClient<Channel>,
    f: F,
    key: &str,
    invoke: &Value,
    timeout: Duration,
    session: &mut ReadSession,
) -> (Kind, Value, Option<u64>) {
    match f {
        F::Read => {
            let req = pb::GetRequest {
                key: key.as_bytes().to_vec(),
                consistency: session.level as i32,
                max_staleness_ms: session.max_staleness_ms,
                session: session.token(),
                ..Default::default()
            };
            match tokio::time::timeout(timeout, kv.get(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    session.observe_header(r.header.as_ref());
                    let revision = r.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    let value = r.kv.map_or(Value::Null, |kv| decode_value(&kv.value));
                    (Kind::Ok, value, Some(revision))
                }
                // A read that failed had no effect.
                _ => (Kind::Fail, Value::Null, None),
            }
        }
        F::Write => {
            let req = pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: invoke.to_string().into_bytes(),
                ..Default::default()
            };
            match tokio::time::timeout(timeout, kv.put(req)).await {
                Ok(Ok(r)) => {
                    let h = r.into_inner().header;
                    session.observe_header(h.as_ref());
                    (Kind::Ok, invoke.clone(), h.map(|h| h.revision))
                }
                Ok(Err(status)) => (write_error_kind(&status), invoke.clone(), None),
                Err(_) => (Kind::Info, invoke.clone(), None),
            }
        }
        F::Cas => {
            let req = cas_request(key, &invoke[0], &invoke[1]);
            match tokio::time::timeout(timeout, kv.txn(req)).await {
                Ok(Ok(r)) if r.get_ref().succeeded => {
                    let h = r.into_inner().header;
                    session.observe_header(h.as_ref());
                    (Kind::Ok, invoke.clone(), h.map(|h| h.revision))
                }
                Ok(Ok(_)) => (Kind::Fail, invoke.clone(), None),
                Ok(Err(status)) => (write_error_kind(&status), invoke.clone(), None),
                Err(_) => (Kind::Info, invoke.clone(), None),
            }
        }
    }
}

/// The register workload's compare-and-set as a transaction: set `key` to
/// `new` if its value is `expected` (`null`: if the key does not exist).
/// Values are stored as their JSON text.
pub fn cas_request(key: &str, expected: &Value, new: &Value) -> pb::TxnRequest {
    use pb::compare::{Op, Operand, Target};
    let (target, operand) = if expected.is_null() {
        (Target::Exists, Operand::Exists(false))
    } else {
        (
            Target::Value,
            Operand::Value(expected.to_string().into_bytes()),
        )
    };
    pb::TxnRequest {
        compare: vec![pb::Compare {
            key: key.as_bytes().to_vec(),
            target: target as i32,
            op: Op::Equal as i32,
            operand: Some(operand),
        }],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::Put(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: new.to_string().into_bytes(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    }
}

/// A stored value as a history value (numbers stay numbers).
pub fn decode_value(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    match text.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => Value::String(text.into_owned()),
    }
}

impl Drill {
    fn key_name(&self) -> String {
        let n = self.ops_started.fetch_add(1, Ordering::Relaxed);
        format!("r{}", n / KEY_ROTATION)
    }

    /// One client process loop; returns when the drill stops.
    async fn worker(self: Arc<Self>, index: usize, seed: u64, values: Arc<AtomicU64>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let timeout = Duration::from_millis(self.args.op_timeout_ms);
        let mut stubs = Stubs::new(timeout);
        let mut process = self.next_process.fetch_add(1, Ordering::Relaxed);
        let mut last_seen: Value = Value::Null;
        let mut session = ReadSession::new(
            self.args.read_consistency.proto(),
            self.args.max_staleness_ms,
        );
        let mut ok = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let key = self.key_name();
            let endpoints = self.endpoints();
            let Some(addr) = endpoints.get(rng.gen_range(0..endpoints.len().max(1))) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(channel) = stubs.get(addr) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut kv = KvClient::new(channel);
            let roll = rng.gen_range(0..10);
            let (f, invoke_value) = match roll {
                0..=4 => (F::Read, Value::Null),
                5..=7 => (F::Write, json!(values.fetch_add(1, Ordering::Relaxed))),
                _ => {
                    let new = values.fetch_add(1, Ordering::Relaxed);
                    (F::Cas, json!([last_seen.clone(), new]))
                }
            };
            self.recorder
                .record(process, Kind::Invoke, f, &key, invoke_value.clone());
            let (kind, value, revision) =
                run_register_op_in(&mut kv, f, &key, &invoke_value, timeout, &mut session).await;
            if f == F::Read && kind == Kind::Ok {
                last_seen = value.clone();
            }
            if kind == Kind::Ok {
                ok += 1;
                self.ok_ops.fetch_add(1, Ordering::Relaxed);
            }
            self.recorder
                .record_with(process, kind, f, &key, value, revision);
            if kind == Kind::Info {
                // A fresh process starts a fresh session.
                process = self.next_process.fetch_add(1, Ordering::Relaxed);
                session = ReadSession::new(
                    self.args.read_consistency.proto(),
                    self.args.max_staleness_ms,
                );
            }
            if kind != Kind::Ok {
                // Don't hammer a cluster that is failing over.
                tokio::time::sleep(Duration::from_millis(rng.gen_range(5..50))).await;
            }
        }
        self.worker_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, ok);
    }

    /// A client of the current members (short deadlines).
    async fn admin_client(&self) -> Option<Client> {
        Client::with_config({
            let mut c = palisade_client::ClientConfig::new(self.endpoints());
            c.request_timeout = Duration::from_secs(3);
            c.attempt_timeout = Duration::from_millis(1500);
            c
        })
        .await
        .ok()
    }

    async fn leader_of_random_group(&self, rng: &mut StdRng) -> Option<u64> {
        let client = self.admin_client().await?;
        let status = client.cluster_status().await.ok()?;
        let members = self.members();
        let leaders: Vec<u64> = status
            .groups
            .iter()
            .map(|g| g.leader_id)
            .filter(|l| members.contains(l))
            .collect();
        (!leaders.is_empty()).then(|| leaders[rng.gen_range(0..leaders.len())])
    }

    /// Applies faults on a seeded schedule until the drill stops.
    async fn nemesis(self: Arc<Self>, seed: u64, firewall: Option<Arc<Firewall>>) -> Vec<Fault> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut faults = Vec::new();
        let kinds: Vec<String> = self
            .args
            .nemesis
            .iter()
            .filter(|k| k.as_str() != "none")
            .cloned()
            .collect();
        let deadline = self.recorder.start + self.args.time;
        loop {
            let quiet = Duration::from_millis(rng.gen_range(1500..3500));
            tokio::time::sleep(quiet).await;
            let hold = Duration::from_millis(rng.gen_range(3000..6000));
            if kinds.is_empty() || Instant::now() + hold + Duration::from_secs(1) > deadline {
                break;
            }
            let members = self.members();
            let n = members.len() as u64;
            let pick = |rng: &mut StdRng| members[rng.gen_range(0..members.len())];
            let kind = kinds[rng.gen_range(0..kinds.len())].clone();
            let start_ns = self.recorder.now_ns();
            let description = match kind.as_str() {
                "kill" => {
                    let targets: Vec<u64> = match rng.gen_range(0..3) {
                        0 => vec![pick(&mut rng)],
                        1 => vec![
                            self.leader_of_random_group(&mut rng)
                                .await
                                .unwrap_or_else(|| pick(&mut rng)),
                        ],
                        _ => {
                            let mut all = members.clone();
                            for i in (1..all.len()).rev() {
                                all.swap(i, rng.gen_range(0..=i));
                            }
                            all.truncate((n / 2) as usize);
                            all
                        }
                    };
                    {
                        let mut c = self.cluster.lock().await;
                        for t in &targets {
                            c.kill(*t);
                        }
                    }
                    tokio::time::sleep(hold).await;
                    let mut c = self.cluster.lock().await;
                    for t in &targets {
                        if self.members().contains(t) {
                            c.restart(*t);
                        }
                    }
                    format!("kill -9 {targets:?}, restart after {hold:?}")
                }
                "pause" => {
                    let target = if rng.gen_bool(0.5) {
                        self.leader_of_random_group(&mut rng)
                            .await
                            .unwrap_or_else(|| pick(&mut rng))
                    } else {
                        pick(&mut rng)
                    };
                    self.cluster.lock().await.pause(target);
                    tokio::time::sleep(hold).await;
                    self.cluster.lock().await.resume(target);
                    format!("SIGSTOP node {target} for {hold:?}")
                }
                "partition" => {
                    let Some(fw) = &firewall else { break };
                    let mut modes = vec!["isolate", "isolate-leader", "halves"];
                    if n >= 5 {
                        modes.extend(["ring", "bridge"]);
                    }
                    let mode = modes[rng.gen_range(0..modes.len())];
                    let target = if mode == "isolate-leader" {
                        self.leader_of_random_group(&mut rng)
                            .await
                            .unwrap_or_else(|| pick(&mut rng))
                    } else {
                        pick(&mut rng)
                    };
                    let (what, links) = partition_plan(mode, &members, target, &mut rng);
                    if let Err(e) = fw.cut(&self.ips, &links) {
                        self.fault_error(format!("partition {what}: {e:#}"));
                    }
                    tokio::time::sleep(hold).await;
                    if let Err(e) = fw.heal() {
                        self.fault_error(format!("healing the partition: {e:#}"));
                    }
                    format!("partition: {what} for {hold:?}")
                }
                "membership" => match self.membership(&mut rng).await {
                    Ok(what) => what,
                    Err(e) => {
                        self.fault_error(format!("membership: {e:#}"));
                        continue;
                    }
                },
                other => {
                    eprintln!("unknown nemesis {other:?}; skipping");
                    continue;
                }
            };
            eprintln!("[{:>6.1}s] {description}", start_ns as f64 / 1e9);
            faults.push(Fault {
                kind,
                description,
                start_ns,
                end_ns: self.recorder.now_ns(),
            });
        }
        faults
    }

    /// One change of the cluster's shape (see the module doc); returns what
    /// it did. The change is recorded by the cluster when this returns; it
    /// completes in the background while the drill goes on. A change the
    /// cluster refuses because its map moved on since it was read (the
    /// rebalancer placed a replica on the chosen node meanwhile) is chosen
    /// again from a fresh map; any other failure is the drill's.
    async fn membership(&self, rng: &mut StdRng) -> anyhow::Result<String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.membership_once(rng).await {
                Err(e) if attempt < 5 && e.downcast_ref::<MapMoved>().is_some() => {
                    eprintln!("membership change refused ({e}); choosing again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn membership_once(&self, rng: &mut StdRng) -> anyhow::Result<String> {
        let client = self
            .admin_client()
            .await
            .context("no member answered the admin client")?;
        let status = client.cluster_status().await.context("cluster status")?;
        let map = status.map.clone().context("no cluster map yet")?;
        let members = self.members();
        let spares = self
            .spares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Keep three members: the replication factor.
        let can_shrink = members.len() > 3;
        let mut actions = vec!["move-replica", "transfer-leader", "set-groups"];
        if !spares.is_empty() {
            actions.extend(["join", "join"]);
        }
        if can_shrink {
            actions.extend(["drain", "remove-killed"]);
        }
        let action = actions[rng.gen_range(0..actions.len())];
        let data: Vec<&pb::MapGroup> = map.groups.iter().filter(|g| g.id != 0).collect();
        let voters = |g: &pb::MapGroup| -> Vec<u64> {
            g.replicas
                .iter()
                .filter(|r| r.role == pb::ReplicaRole::Voter as i32)
                .map(|r| r.node_id)
                .collect()
        };
        match action {
            "join" => {
                let id = self
                    .spares
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop()
                    .context("no spare")?;
                self.cluster.lock().await.join(id, &[]);
                self.members
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                Ok(format!("node {id} joins"))
            }
            "drain" | "remove-killed" => {
                let victim = members[rng.gen_range(0..members.len())];
                let dead = action == "remove-killed";
                if dead {
                    self.cluster.lock().await.kill(victim);
                }
                self.members
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&victim);
                self.departed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(victim);
                retry_admin(|| client.drain_node(victim, dead)).await?;
                Ok(if dead {
                    format!("kill -9 node {victim}, then node remove {victim}")
                } else {
                    format!("node drain {victim}")
                })
            }
            "move-replica" => {
                // A group without a change in flight, a voter on a member,
                // to a member without a replica of it.
                let mut candidates = Vec::new();
                for g in data.iter().filter(|g| g.change.is_empty()) {
                    let holders: Vec<u64> = g.replicas.iter().map(|r| r.node_id).collect();
                    let serving: Vec<u64> = map
                        .nodes
                        .iter()
                        .filter(|n| {
                            n.state == pb::NodeState::Serving as i32
                                && !n.read_replica
                                && members.contains(&n.id)
                        })
                        .map(|n| n.id)
                        .collect();
                    for from in voters(g).into_iter().filter(|n| members.contains(n)) {
                        for to in serving.iter().filter(|n| !holders.contains(n)) {
                            candidates.push((g.id, from, *to));
                        }
                    }
                }
                if candidates.is_empty() {
                    let g = data[rng.gen_range(0..data.len())];
                    let to = voters(g)[rng.gen_range(0..voters(g).len())];
                    retry_admin(|| client.transfer_leader(g.id, to))
                        .await
                        .map_err(map_moved)?;
                    return Ok(format!(
                        "transfer group {}'s leadership to node {to} (no replica could move)",
                        g.id
                    ));
                }
                let (g, from, to) = candidates[rng.gen_range(0..candidates.len())];
                retry_admin(|| client.move_replica(g, from, to))
                    .await
                    .map_err(map_moved)?;
                Ok(format!(
                    "move group {g}'s replica from node {from} to node {to}"
                ))
            }
            "transfer-leader" => {
                let g = data[rng.gen_range(0..data.len())];
                let candidates: Vec<u64> = voters(g)
                    .into_iter()
                    .filter(|n| members.contains(n))
                    .collect();
                if candidates.is_empty() {
                    bail!("group {} has no voter on a member", g.id);
                }
                let to = candidates[rng.gen_range(0..candidates.len())];
                retry_admin(|| client.transfer_leader(g.id, to))
                    .await
                    .map_err(map_moved)?;
                Ok(format!("transfer group {}'s leadership to node {to}", g.id))
            }
            _ => {
                let current = map.target_groups;
                let choices: Vec<u32> = [2u32, 3, 4, 6]
                    .into_iter()
                    .filter(|c| *c != current)
                    .collect();
                let n = choices[rng.gen_range(0..choices.len())];
                retry_admin(|| client.set_groups(n))
                    .await
                    .map_err(map_moved)?;
                Ok(format!("set-groups {current} -> {n}"))
            }
        }
    }
}

/// A membership change refused because the map changed since it was read
/// (a side-effect-free change, safe to choose again).
#[derive(Debug)]
struct MapMoved(String);

impl std::fmt::Display for MapMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MapMoved {}

/// Whether a refusal says the request no longer fits the map:
/// `FAILED_PRECONDITION`, or `NOT_FOUND` (the group or node was removed
/// since the map was read — a shrink deletes groups).
fn refused_by_map(e: &palisade_client::Error) -> bool {
    matches!(
        e.code(),
        tonic::Code::FailedPrecondition | tonic::Code::NotFound
    )
}

/// Marks a refusal by the map (see [`refused_by_map`]) as [`MapMoved`].
fn map_moved(e: palisade_client::Error) -> anyhow::Error {
    if refused_by_map(&e) {
        anyhow::Error::new(MapMoved(e.to_string()))
    } else {
        anyhow::Error::new(e)
    }
}

/// Runs an admin call, retrying for a while (a leader election, a node
/// that is still joining); the error of the last attempt otherwise. A
/// refusal by the map (see [`refused_by_map`]) is not retried: the same
/// request would be refused again.
async fn retry_admin<T, F, Fut>(mut call: F) -> Result<T, palisade_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, palisade_client::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if refused_by_map(&e) => return Err(e),
            Err(e) if Instant::now() < deadline => {
                eprintln!("admin call failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads every key once more after recovery, as a fresh process each.
async fn final_reads(drill: &Drill, keys: &[String]) -> bool {
    let Ok(client) = Client::connect(drill.endpoints()).await else {
        return false;
    };
    let mut all_ok = true;
    for key in keys {
        let process = drill.next_process.fetch_add(1, Ordering::Relaxed);
        drill
            .recorder
            .record(process, Kind::Invoke, F::Read, key, Value::Null);
        match client.get(key.clone()).await {
            Ok(r) => {
                let v = r.kv.map_or(Value::Null, |kv| decode_value(&kv.value));
                drill.recorder.record(process, Kind::Ok, F::Read, key, v);
            }
            Err(_) => {
                drill
                    .recorder
                    .record(process, Kind::Fail, F::Read, key, Value::Null);
                all_ok = false;
            }
        }
    }
    all_ok
}

async fn run(args: DrillArgs) -> anyhow::Result<u8> {
    if !["register", "lock"].contains(&args.workload.as_str()) {
        bail!("unknown workload {:?}: use register or lock", args.workload);
    }
    if ![3, 5].contains(&args.nodes) {
        bail!("--nodes must be 3 or 5");
    }
    for k in &args.nemesis {
        if !["kill", "pause", "partition", "membership", "none"].contains(&k.as_str()) {
            bail!("unknown nemesis {k:?}: use kill, pause, partition, membership or none");
        }
    }
    let membership = args.nemesis.iter().any(|k| k == "membership");
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    ensure_palisade_bin()?;
    let firewall = if args.nemesis.iter().any(|k| k == "partition") {
        Some(Arc::new(
            Firewall::new().context("the partition nemesis needs root and iptables")?,
        ))
    } else {
        None
    };
    eprintln!(
        "jepsen-lite: {} nodes, {:?}, nemesis {:?}, concurrency {}, seed {seed}{}",
        args.nodes,
        args.time,
        args.nemesis,
        args.concurrency,
        match (args.positive_control, args.workload.as_str()) {
            (false, _) => "",
            (true, "lock") => " (POSITIVE CONTROL: unfenced writes)",
            (true, _) => " (POSITIVE CONTROL: unsafe local reads)",
        }
    );
    let mut opts = ClusterOptions::new(args.nodes);
    opts.groups = args.groups;
    opts.learners = args.learners;
    // The lock workload's positive control drops the fence instead.
    if args.positive_control && args.workload != "lock" {
        opts.extra_args.push("--unsafe-local-reads".into());
    }
    let cluster = TestCluster::start(opts).await;
    // Spare nodes take the ids after the voters and learners.
    let first_spare = args.nodes + args.learners + 1;
    let spares: Vec<u64> = if membership {
        (first_spare..first_spare + args.spare_nodes)
            .rev()
            .collect()
    } else {
        Vec::new()
    };
    let last = first_spare + args.spare_nodes;
    let addrs: BTreeMap<u64, String> = (1..last).map(|id| (id, cluster.addr(id))).collect();
    let ips: BTreeMap<u64, String> = (1..last).map(|id| (id, cluster.ip_of(id))).collect();
    let mut members: std::collections::BTreeSet<u64> = (1..=args.nodes).collect();
    members.extend(cluster.learner_ids());
    let log_dir = cluster.dir().to_path_buf();
    let drill = Arc::new(Drill {
        args: args.clone(),
        cluster: tokio::sync::Mutex::new(cluster),
        addrs,
        ips,
        members: Mutex::new(members),
        spares: Mutex::new(spares),
        departed: Mutex::new(Vec::new()),
        fault_errors: Mutex::new(Vec::new()),
        ok_ops: AtomicU64::new(0),
        worker_ok: Mutex::new(BTreeMap::new()),
        recorder: Recorder {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        },
        next_process: AtomicU64::new(0),
        ops_started: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    let values = Arc::new(AtomicU64::new(1));
    let lock_stats = Arc::new(Mutex::new(crate::lockwork::LockStats::default()));
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            if args.workload == "lock" {
                let drill = drill.clone();
                let stats = lock_stats.clone();
                let unfenced = drill.args.positive_control;
                tokio::spawn(async move {
                    let ok =
                        crate::lockwork::worker(drill.endpoints(), &drill.stop, &stats, unfenced)
                            .await;
                    drill.ok_ops.fetch_add(ok, Ordering::Relaxed);
                    drill
                        .worker_ok
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(w, ok);
                })
            } else {
                tokio::spawn(drill.clone().worker(
                    w,
                    seed.wrapping_add(w as u64 * 7919),
                    values.clone(),
                ))
            }
        })
        .collect();
    let nemesis = tokio::spawn(drill.clone().nemesis(seed, firewall.clone()));
    tokio::time::sleep(args.time).await;
    drill.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let faults = nemesis.await.unwrap_or_default();

    // Heal everything and wait for recovery.
    if let Some(fw) = &firewall {
        fw.heal()?;
    }
    let recovered = {
        let mut c = drill.cluster.lock().await;
        c.heal_processes();
        let members = drill.members();
        match c
            .try_wait_for_leaders(&members, Duration::from_secs(60))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                eprintln!(
                    "cluster did not recover: {e} (logs in {})",
                    log_dir.display()
                );
                false
            }
        }
    };
    // With the membership nemesis: every recorded change finishes, drained
    // and removed nodes end up removed, and they can then be stopped.
    let converged = if membership && recovered {
        let c = drill.cluster.lock().await;
        let departed: Vec<u64> = drill
            .departed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut settled = false;
        while Instant::now() < deadline {
            if let Some(map) = c.status().await.and_then(|s| s.map) {
                let quiet = map.moving.is_none() && map.groups.iter().all(|g| g.change.is_empty());
                let gone = departed.iter().all(|d| {
                    map.nodes
                        .iter()
                        .any(|n| n.id == *d && n.state == pb::NodeState::Removed as i32)
                });
                if quiet && gone {
                    settled = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !settled {
            eprintln!(
                "membership changes did not finish within 180 s (logs in {})",
                log_dir.display()
            );
        }
        drop(c);
        let mut c = drill.cluster.lock().await;
        for d in departed {
            c.retire(d);
        }
        settled
    } else {
        true
    };
    // Honesty gates: what the drill claims, it did.
    let mut gate_failures: Vec<String> = drill
        .fault_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let wanted_faults = args.nemesis.iter().any(|k| k != "none");
    if wanted_faults && faults.is_empty() {
        gate_failures.push("no fault was applied".into());
    }
    let ok_ops = drill.ok_ops.load(Ordering::Relaxed);
    if ok_ops < args.min_ok() {
        gate_failures.push(format!(
            "only {ok_ops} operations were acknowledged (--min-ok {})",
            args.min_ok()
        ));
    }
    let worker_ok = drill
        .worker_ok
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for w in 0..args.concurrency {
        if worker_ok.get(&w).copied().unwrap_or(0) == 0 {
            gate_failures.push(format!("worker {w} never got an operation through"));
        }
    }
    if !converged {
        gate_failures.push("membership changes did not finish".into());
    }
    for g in &gate_failures {
        eprintln!("GATE: {g}");
    }
    if args.workload == "lock" {
        let stats = std::mem::take(&mut *lock_stats.lock().unwrap_or_else(|p| p.into_inner()));
        let verdict = if recovered {
            crate::lockwork::check(&drill.endpoints(), &stats).await
        } else {
            crate::lockwork::LockVerdict {
                ok: false,
                problems: vec!["the cluster did not recover".into()],
                summary: json!({}),
            }
        };
        let ok = verdict.ok && gate_failures.is_empty();
        let results = json!({
            "workload": "lock",
            "verdict": if !verdict.ok { "violation" } else if ok { "fenced" } else { "gate-failed" },
            "problems": verdict.problems,
            "gate_failures": gate_failures,
            "converged": converged,
            "lock": verdict.summary,
            "recovered": recovered,
            "seed": seed,
            "nodes": args.nodes,
            "duration_s": args.time.as_secs_f64(),
            "nemesis": args.nemesis,
            "concurrency": args.concurrency,
            "faults": faults.iter().map(|f| json!({
                "kind": f.kind, "description": f.description,
                "start_s": f.start_ns as f64 / 1e9, "end_s": f.end_ns as f64 / 1e9,
            })).collect::<Vec<_>>(),
            "replay": format!(
                "jepsen-lite run --workload lock --nodes {} --time {}s --nemesis {} --concurrency {} --seed {seed}",
                args.nodes, args.time.as_secs_f64(), args.nemesis.join(","), args.concurrency
            ),
        });
        std::fs::write(
            args.out.join("results.json"),
            serde_json::to_string_pretty(&results)?,
        )?;
        println!(
            "{}: {} faults, recovered: {recovered}; {}; results in {}",
            if !verdict.ok {
                "VIOLATION"
            } else if ok {
                "fenced"
            } else {
                "GATE FAILED"
            },
            faults.len(),
            verdict.summary,
            args.out.display()
        );
        for p in verdict.problems.iter().chain(&gate_failures) {
            println!("  {p}");
        }
        return Ok(if ok {
            crate::EXIT_OK
        } else {
            crate::EXIT_VIOLATION
        });
    }

    let keys: Vec<String> = {
        let events = drill
            .recorder
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<String> = events
            .iter()
            .filter_map(|e| e.key.as_str().map(String::from))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    };
    let final_ok = recovered && final_reads(&drill, &keys).await;

    // Write and check the history.
    let events = drill
        .recorder
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let text = crate::history::to_jsonl(&events);
    std::fs::write(args.out.join("history.jsonl"), &text)?;
    let history = crate::history::parse(&text)
        .map_err(|e| anyhow::anyhow!("recorded an invalid history: {e}"))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let check_start = Instant::now();
    let report = checker::check(&history, checker::Budget::default(), threads);
    let check_time = check_start.elapsed();
    std::fs::write(
        args.out.join("report.html"),
        crate::report::html(&report, &format!("jepsen-lite drill, seed {seed}")),
    )?;
    let linearizability = if report.first_violation().is_some() {
        "not-linearizable"
    } else if report.unknown().next().is_some() {
        "unknown"
    } else {
        "linearizable"
    };
    // SESSION reads are judged by the session guarantees they promise.
    let sessions = crate::session::check_sessions(&history);
    let verdict = if args.read_consistency == ReadLevel::Session {
        if sessions.holds() {
            "session-consistent"
        } else {
            "session-violation"
        }
    } else {
        linearizability
    };

    let results = json!({
        "verdict": verdict,
        "linearizability": linearizability,
        "read_consistency": args.read_consistency.name(),
        "learners": args.learners,
        "sessions": {
            "reads_checked": sessions.reads_checked,
            "violations": sessions.violations.len(),
            "first": sessions.violations.iter().take(5).map(|v| json!({
                "process": v.process, "key": v.key, "line": v.line, "message": v.message,
            })).collect::<Vec<_>>(),
        },
        "recovered": recovered,
        "converged": converged,
        "gate_failures": gate_failures,
        "final_reads_ok": final_ok,
        "seed": seed,
        "nodes": args.nodes,
        "duration_s": args.time.as_secs_f64(),
        "nemesis": args.nemesis,
        "concurrency": args.concurrency,
        "positive_control": args.positive_control,
        "keys": keys.len(),
        "ops": op_counts(&history),
        "availability": availability(&history, &faults),
        "faults": faults.iter().map(|f| json!({
            "kind": f.kind, "description": f.description,
            "start_s": f.start_ns as f64 / 1e9, "end_s": f.end_ns as f64 / 1e9,
        })).collect::<Vec<_>>(),
        "check_seconds": check_time.as_secs_f64(),
        "violation": report.first_violation().map(crate::describe_violation),
        "replay": format!(
            "jepsen-lite run --nodes {} --time {}s --nemesis {} --concurrency {} --read-consistency {} --learners {} --seed {seed}{}",
            args.nodes, args.time.as_secs_f64(), args.nemesis.join(","), args.concurrency,
            args.read_consistency.name(), args.learners,
            if args.positive_control { " --positive-control" } else { "" }
        ),
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;

    println!(
        "{verdict}: {} ops on {} keys, {} faults, recovered: {recovered}; checked in {:.2} s; results in {}",
        history.ops.len(),
        keys.len(),
        faults.len(),
        check_time.as_secs_f64(),
        args.out.display()
    );
    if args.read_consistency == ReadLevel::Session {
        println!(
            "sessions: {} reads checked, {} violations (linearizability, not promised: {linearizability})",
            sessions.reads_checked,
            sessions.violations.len()
        );
        for v in sessions.violations.iter().take(3) {
            println!("  line {}: {}", v.line, v.message);
        }
    } else if let Some(v) = report.first_violation() {
        println!("{}", crate::describe_violation(v));
    }
    for g in &gate_failures {
        println!("GATE FAILED: {g}");
    }
    Ok(
        if verdict == "not-linearizable"
            || verdict == "session-violation"
            || !recovered
            || !final_ok
            || !gate_failures.is_empty()
        {
            crate::EXIT_VIOLATION
        } else if verdict == "unknown" {
            crate::EXIT_UNKNOWN
        } else {
            crate::EXIT_OK
        },
    )
}

/// Finds the `palisade` binary, or builds it when running from a source
/// tree, and points `PALISADE_BIN` at it for the cluster harness.
fn ensure_palisade_bin() -> anyhow::Result<()> {
    if let Some(bin) = palisade_tests::find_palisade_bin() {
        // SAFETY: set before any other thread reads the environment.
        unsafe { std::env::set_var("PALISADE_BIN", &bin) };
        return Ok(());
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !workspace.join("Cargo.toml").is_file() {
        bail!("the palisade binary was not found next to jepsen-lite; set PALISADE_BIN");
    }
    eprintln!("building palisade (cargo build --release -p palisade)…");
    let status = std::process::Command::new("cargo")
        .args(["build", "--release", "-p", "palisade"])
        .current_dir(&workspace)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo build -p palisade failed");
    }
    let bin = workspace.join("target/release/palisade");
    // SAFETY: as above.
    unsafe { std::env::set_var("PALISADE_BIN", &bin) };
    Ok(())
}

fn op_counts(history: &crate::history::History) -> Value {
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for op in &history.ops {
        let f = format!("{:?}", op.f).to_lowercase();
        let o = format!("{:?}", op.outcome).to_lowercase();
        *counts.entry(f).or_default().entry(o).or_default() += 1;
    }
    json!(counts)
}

/// Share of operations that succeeded, while healthy and during each kind
/// of fault (by invoke time).
fn availability(history: &crate::history::History, faults: &[Fault]) -> Value {
    let mut phases: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for op in &history.ops {
        let t = op.invoke_time_ns.unwrap_or(0);
        let phase = faults
            .iter()
            .find(|f| f.start_ns <= t && t < f.end_ns)
            .map_or("healthy".to_string(), |f| f.kind.clone());
        let e = phases.entry(phase).or_default();
        e.1 += 1;
        if op.outcome == crate::history::Outcome::Ok {
            e.0 += 1;
        }
    }
    json!(phases
        .into_iter()
        .map(|(k, (ok, total))| (k, json!({"ok": ok, "total": total, "ratio": if total > 0 { ok as f64 / total as f64 } else { 0.0 }})))
        .collect::<BTreeMap<_, _>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked_from(links: &[(u64, u64)], a: u64) -> Vec<u64> {
        let mut v: Vec<u64> = links
            .iter()
            .filter(|(x, _)| *x == a)
            .map(|(_, y)| *y)
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn partition_plans_cut_the_intended_links() {
        let mut rng = StdRng::seed_from_u64(1);
        let (_, iso) = partition_plan("isolate", &[1, 2, 3], 2, &mut rng);
        assert_eq!(blocked_from(&iso, 2), vec![1, 3]);
        assert_eq!(blocked_from(&iso, 1), vec![2]);
        assert_eq!(iso.len(), 4);

        // Ring of 5: each node still hears its two neighbours (a majority
        // with itself) and nobody else.
        let (_, ring) = partition_plan("ring", &[1, 2, 3, 4, 5], 1, &mut rng);
        assert_eq!(blocked_from(&ring, 1), vec![3, 4]);
        assert_eq!(blocked_from(&ring, 3), vec![1, 5]);
        assert_eq!(ring.len(), 10);

        // Bridge: {1,2} and {4,5} are cut from each other; 3 reaches all.
        let (_, bridge) = partition_plan("bridge", &[1, 2, 3, 4, 5], 1, &mut rng);
        assert_eq!(blocked_from(&bridge, 3), Vec::<u64>::new());
        assert_eq!(blocked_from(&bridge, 1), vec![4, 5]);
        assert_eq!(bridge.len(), 8);

        // Halves of 5: a minority of 2 against a majority of 3.
        let (_, halves) = partition_plan("halves", &[1, 2, 3, 4, 5], 1, &mut rng);
        assert_eq!(halves.len(), 2 * 2 * 3);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
