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
//! At the end every fault is healed, the runner waits for the cluster to
//! recover, reads every key once more (so a lost acknowledged write shows up
//! as a violation), writes `history.jsonl`, `results.json` and `report.html`,
//! and exits non-zero if the history is not linearizable or the cluster did
//! not recover.

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
fn partition_plan(mode: &str, n: u64, target: u64, rng: &mut StdRng) -> (String, Vec<(u64, u64)>) {
    let all: Vec<u64> = (1..=n).collect();
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
            let (minority, majority) = shuffled.split_at((n / 2) as usize);
            (
                format!("halves {minority:?} | {majority:?}"),
                links_between(&[minority.to_vec(), majority.to_vec()]),
            )
        }
        "ring" => {
            // Node i hears only from i±1 (mod n): every node sees a majority
            // (itself and two neighbours of five), but no two majorities agree.
            let mut links = Vec::new();
            for a in 1..=n {
                for b in 1..=n {
                    let d = (a + n - b) % n;
                    if a != b && d != 1 && d != n - 1 {
                        links.push((a, b));
                    }
                }
            }
            ("majorities ring".into(), links)
        }
        _ => {
            // bridge: {1,2} and {4,5} can't talk; 3 talks to everyone.
            let left: Vec<u64> = all.iter().copied().take((n / 2) as usize).collect();
            let right: Vec<u64> = all.iter().copied().skip((n / 2 + 1) as usize).collect();
            (
                format!("bridge {left:?} - {} - {right:?}", n / 2 + 1),
                links_between(&[left, right]),
            )
        }
    }
}

struct Drill {
    args: DrillArgs,
    cluster: tokio::sync::Mutex<TestCluster>,
    endpoints: Vec<String>,
    ips: BTreeMap<u64, String>,
    recorder: Recorder,
    next_process: AtomicU64,
    ops_started: AtomicU64,
    stop: AtomicBool,
}

/// A raw gRPC stub per node: the workload picks the node per operation.
struct Stubs {
    channels: Vec<Channel>,
}

impl Stubs {
    fn new(endpoints: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let channels = endpoints
            .iter()
            .map(|e| {
                Ok(Endpoint::from_shared(format!("http://{e}"))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .connect_lazy())
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { channels })
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
    async fn worker(self: Arc<Self>, seed: u64, values: Arc<AtomicU64>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let timeout = Duration::from_millis(self.args.op_timeout_ms);
        let Ok(stubs) = Stubs::new(&self.endpoints, timeout) else {
            return;
        };
        let mut process = self.next_process.fetch_add(1, Ordering::Relaxed);
        let mut last_seen: Value = Value::Null;
        let mut session = ReadSession::new(
            self.args.read_consistency.proto(),
            self.args.max_staleness_ms,
        );
        while !self.stop.load(Ordering::Relaxed) {
            let key = self.key_name();
            let node = rng.gen_range(0..stubs.channels.len());
            let mut kv = KvClient::new(stubs.channels[node].clone());
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
    }

    async fn leader_of_random_group(&self, rng: &mut StdRng) -> Option<u64> {
        let client = Client::with_config({
            let mut c = palisade_client::ClientConfig::new(self.endpoints.clone());
            c.request_timeout = Duration::from_secs(2);
            c.attempt_timeout = Duration::from_millis(700);
            c
        })
        .await
        .ok()?;
        let status = client.cluster_status().await.ok()?;
        let leaders: Vec<u64> = status
            .groups
            .iter()
            .map(|g| g.leader_id)
            .filter(|l| *l != 0)
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
        let n = self.args.nodes;
        let deadline = self.recorder.start + self.args.time;
        loop {
            let quiet = Duration::from_millis(rng.gen_range(1500..3500));
            tokio::time::sleep(quiet).await;
            let hold = Duration::from_millis(rng.gen_range(3000..6000));
            if kinds.is_empty() || Instant::now() + hold + Duration::from_secs(1) > deadline {
                break;
            }
            let kind = kinds[rng.gen_range(0..kinds.len())].clone();
            let start_ns = self.recorder.now_ns();
            let description = match kind.as_str() {
                "kill" => {
                    let targets: Vec<u64> = match rng.gen_range(0..3) {
                        0 => vec![rng.gen_range(1..=n)],
                        1 => vec![self.leader_of_random_group(&mut rng).await.unwrap_or(1)],
                        _ => {
                            let mut all: Vec<u64> = (1..=n).collect();
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
                        c.restart(*t);
                    }
                    format!("kill -9 {targets:?}, restart after {hold:?}")
                }
                "pause" => {
                    let target = if rng.gen_bool(0.5) {
                        self.leader_of_random_group(&mut rng).await.unwrap_or(1)
                    } else {
                        rng.gen_range(1..=n)
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
                        self.leader_of_random_group(&mut rng).await.unwrap_or(1)
                    } else {
                        rng.gen_range(1..=n)
                    };
                    let (what, links) = partition_plan(mode, n, target, &mut rng);
                    if let Err(e) = fw.cut(&self.ips, &links) {
                        eprintln!("partition failed: {e:#}");
                    }
                    tokio::time::sleep(hold).await;
                    if let Err(e) = fw.heal() {
                        eprintln!("healing the partition failed: {e:#}");
                    }
                    format!("partition: {what} for {hold:?}")
                }
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
}

/// Reads every key once more after recovery, as a fresh process each.
async fn final_reads(drill: &Drill, keys: &[String]) -> bool {
    let Ok(client) = Client::connect(drill.endpoints.clone()).await else {
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
        if !["kill", "pause", "partition", "none"].contains(&k.as_str()) {
            bail!("unknown nemesis {k:?}: use kill, pause, partition or none");
        }
    }
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
    let mut endpoints = cluster.endpoints();
    endpoints.extend(cluster.learner_ids().iter().map(|id| cluster.addr(*id)));
    let ips: BTreeMap<u64, String> = (1..=args.nodes).map(|id| (id, cluster.ip(id))).collect();
    let log_dir = cluster.dir().to_path_buf();
    let drill = Arc::new(Drill {
        args: args.clone(),
        cluster: tokio::sync::Mutex::new(cluster),
        endpoints,
        ips,
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
                    crate::lockwork::worker(drill.endpoints.clone(), &drill.stop, &stats, unfenced)
                        .await
                })
            } else {
                tokio::spawn(
                    drill
                        .clone()
                        .worker(seed.wrapping_add(w as u64 * 7919), values.clone()),
                )
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
        let all: Vec<u64> = (1..=args.nodes).collect();
        match c.try_wait_for_leaders(&all, Duration::from_secs(60)).await {
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
    if args.workload == "lock" {
        let stats = std::mem::take(&mut *lock_stats.lock().unwrap_or_else(|p| p.into_inner()));
        let verdict = if recovered {
            crate::lockwork::check(&drill.endpoints, &stats).await
        } else {
            crate::lockwork::LockVerdict {
                ok: false,
                problems: vec!["the cluster did not recover".into()],
                summary: json!({}),
            }
        };
        let results = json!({
            "workload": "lock",
            "verdict": if verdict.ok { "fenced" } else { "violation" },
            "problems": verdict.problems,
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
            if verdict.ok { "fenced" } else { "VIOLATION" },
            faults.len(),
            verdict.summary,
            args.out.display()
        );
        for p in &verdict.problems {
            println!("  {p}");
        }
        return Ok(if verdict.ok {
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
    let report = checker::check(&history, checker::DEFAULT_BUDGET, threads);
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
    Ok(
        if verdict == "not-linearizable"
            || verdict == "session-violation"
            || !recovered
            || !final_ok
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
        let (_, iso) = partition_plan("isolate", 3, 2, &mut rng);
        assert_eq!(blocked_from(&iso, 2), vec![1, 3]);
        assert_eq!(blocked_from(&iso, 1), vec![2]);
        assert_eq!(iso.len(), 4);

        // Ring of 5: each node still hears its two neighbours (a majority
        // with itself) and nobody else.
        let (_, ring) = partition_plan("ring", 5, 1, &mut rng);
        assert_eq!(blocked_from(&ring, 1), vec![3, 4]);
        assert_eq!(blocked_from(&ring, 3), vec![1, 5]);
        assert_eq!(ring.len(), 10);

        // Bridge: {1,2} and {4,5} are cut from each other; 3 reaches all.
        let (_, bridge) = partition_plan("bridge", 5, 1, &mut rng);
        assert_eq!(blocked_from(&bridge, 3), Vec::<u64>::new());
        assert_eq!(blocked_from(&bridge, 1), vec![4, 5]);
        assert_eq!(bridge.len(), 8);

        // Halves of 5: a minority of 2 against a majority of 3.
        let (_, halves) = partition_plan("halves", 5, 1, &mut rng);
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
