//! Deterministic simulation of palisade clusters.
//!
//! The hosts run the *real* node (`palisade_server::Node`: the same gRPC
//! services, Raft glue and sled storage as production) over turmoil's
//! simulated network. Only the edges are swapped, through the seams the node
//! exposes for this:
//! - outgoing connections: [`SimConnector`] (a tonic channel whose
//!   connector opens a `turmoil::net::TcpStream`);
//! - incoming connections: [`incoming`] (a `turmoil::net::TcpListener`);
//! - durability: `FlushMode::Inline` — each durable write flushes sled
//!   synchronously on the simulation thread, since a completion arriving from
//!   sled's or a flusher's OS thread would happen at a time turmoil does not
//!   control;
//! - randomness: openraft's election timeouts come from
//!   `palisade_group::runtime::seed_thread_rng`.
//!
//! Storage: each host's sled database lives in a directory that outlives the
//! host, so `crash` + `bounce` restarts a node on its own data.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_group::Connector;
use palisade_proto::v1::kv_client::KvClient;
use palisade_server::{Node, NodeConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

/// Port every simulated node listens on.
pub const PORT: u16 = 7000;

/// Host name of node `id`.
pub fn host(id: u64) -> String {
    format!("n{id}")
}

/// `host:port` of node `id`.
pub fn addr(id: u64) -> String {
    format!("{}:{PORT}", host(id))
}

/// A turmoil TCP stream that tonic's server accepts.
pub struct SimIo(pub turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connections accepted on a simulated listener.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl futures::Stream<Item = io::Result<SimIo>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| SimIo(s));
        Some((next, l))
    })
}

/// Opens channels over turmoil's network.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimConnector;

/// A lazily connected channel to `addr` (`host:port`) over the simulation.
pub fn sim_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        })))
}

impl Connector for SimConnector {
    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        sim_channel(addr)
    }
}

/// A Kv client stub for node `id`, usable inside the simulation.
pub fn kv_client(id: u64) -> KvClient<Channel> {
    KvClient::new(sim_channel(&addr(id)).expect("static address"))
}

/// A simulation with LAN-like links (1–10 ms per message), seeded.
pub fn builder(seed: u64, duration: Duration) -> turmoil::Builder {
    let mut b = turmoil::Builder::new();
    b.simulation_duration(duration)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(10))
        // Only links given a fail rate (the `Lossy` fault) ever fail; this
        // is how fast such a link comes back each time.
        .repair_rate(0.3)
        .rng_seed(seed);
    b
}

/// Retries `f` while it fails with `UNAVAILABLE` (elections, forwarding),
/// up to `tries` times, 100 ms apart in simulated time.
pub async fn retry_unavailable<T, F, Fut>(tries: usize, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..tries {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if s.code() == tonic::Code::Unavailable => last = Some(s),
            Err(s) => return Err(s),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| tonic::Status::unavailable("no attempt made")))
}

/// The config of node `id` in an `n`-node simulated cluster.
pub fn node_config(id: u64, n: u64, data_dir: PathBuf, groups: u64) -> NodeConfig {
    let peers = (1..=n).map(|i| (i, addr(i))).collect();
    let listen: SocketAddr = ([0, 0, 0, 0], PORT).into();
    let mut config = NodeConfig::new(id, listen, peers, data_dir);
    config.data_groups = groups;
    config.flush_mode = palisade_storage::FlushMode::Inline;
    config.cache_bytes = 4 * 1024 * 1024;
    config.on_fatal = record_fatal_stop();
    // Free space is the host's, not the simulation's: no alarm.
    config.disk_reserve_bytes = 0;
    config
}

/// Runs node `id` until the host is crashed or the simulation ends.
pub async fn run_node(config: NodeConfig) -> Result<(), Box<dyn std::error::Error>> {
    let node = Node::open_with(config, Arc::new(SimConnector)).await?;
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    node.serve_with_incoming(incoming(listener), std::future::pending())
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Scenario: clients, faults, invariants, history.
// ---------------------------------------------------------------------------

pub mod membership;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use jepsen_lite::history::{Event, F, Kind};
use palisade_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Shape of one simulated run.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u64,
    pub clients: usize,
    /// How long clients run (simulated time).
    pub workload: Duration,
    /// Inject faults (partitions, crashes, latency) during the workload.
    pub faults: bool,
    /// Change the cluster's shape during the workload (joins, drains,
    /// removals, replica moves, leader transfers, group counts).
    pub membership: bool,
    /// Nodes that may join (with `membership`).
    pub spares: u64,
}

impl SimOptions {
    pub fn new(seed: u64, nodes: u64) -> Self {
        Self {
            seed,
            nodes,
            groups: 2,
            clients: 4,
            workload: Duration::from_secs(20),
            faults: true,
            membership: false,
            spares: 2,
        }
    }

    /// A run with membership changes too.
    pub fn with_membership(seed: u64, nodes: u64) -> Self {
        Self {
            membership: true,
            ..Self::new(seed, nodes)
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct SimOutcome {
    /// Every client operation, in the jepsen-lite format.
    pub history: Vec<Event>,
    /// Faults applied and invariant observations, one line each.
    pub trace: Vec<String>,
    /// Problems found: checker verdict, invariant violations, lost writes.
    pub problems: Vec<String>,
}

impl SimOutcome {
    /// A hash of the history and trace, for comparing replays.
    pub fn fingerprint(&self) -> u64 {
        let mut text = jepsen_lite::history::to_jsonl(&self.history);
        for line in &self.trace {
            text.push_str(line);
            text.push('\n');
        }
        fnv1a(text.as_bytes())
    }
}

/// FNV-1a over the bytes (stable across runs and platforms).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The command that replays a seed.
pub fn replay_command(opts: &SimOptions) -> String {
    format!(
        "PALISADE_SIM_SEED={} PALISADE_SIM_NODES={}{} cargo test -p palisade-sim --test simulation replay_one_seed -- --nocapture",
        opts.seed,
        opts.nodes,
        if opts.membership {
            " PALISADE_SIM_MEMBERSHIP=1"
        } else {
            ""
        }
    )
}

/// Records events in execution order (the simulation is single-threaded,
/// so the order is deterministic), stamped with simulated time.
#[derive(Clone, Default)]
struct Recorder {
    events: Rc<RefCell<Vec<Event>>>,
}

impl Recorder {
    fn record(&self, process: u64, kind: Kind, f: F, key: &str, value: Value) {
        let mut events = self.events.borrow_mut();
        let index = events.len() as u64;
        events.push(Event {
            index,
            process,
            kind,
            f,
            key: Value::String(key.to_string()),
            value,
            time_ns: None,
            revision: None,
        });
    }
}

/// Shared between clients: the next process id, key rotation, values.
#[derive(Default)]
struct Counters {
    next_process: u64,
    ops: u64,
    next_value: u64,
}

const KEY_ROTATION: u64 = 120;

async fn client_loop(
    rec: Recorder,
    counters: Rc<RefCell<Counters>>,
    nodes: u64,
    seed: u64,
    run_for: Duration,
) -> turmoil::Result {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = tokio::time::Instant::now();
    let timeout = Duration::from_millis(800);
    let new_process = |c: &Rc<RefCell<Counters>>| {
        let mut c = c.borrow_mut();
        c.next_process += 1;
        c.next_process
    };
    let mut process = new_process(&counters);
    let mut last_seen = Value::Null;
    let stubs: Vec<_> = (1..=nodes).map(kv_client).collect();
    while start.elapsed() < run_for {
        let (key, value_id) = {
            let mut c = counters.borrow_mut();
            c.ops += 1;
            c.next_value += 1;
            (format!("r{}", c.ops / KEY_ROTATION), c.next_value)
        };
        let mut kv = stubs[rng.gen_range(0..stubs.len())].clone();
        let (f, invoke) = match rng.gen_range(0..10) {
            0..=4 => (F::Read, Value::Null),
            5..=7 => (F::Write, json!(value_id)),
            _ => (F::Cas, json!([last_seen.clone(), value_id])),
        };
        rec.record(process, Kind::Invoke, f, &key, invoke.clone());
        let (kind, value) =
            jepsen_lite::drill::run_register_op(&mut kv, f, &key, &invoke, timeout).await;
        if f == F::Read && kind == Kind::Ok {
            last_seen = value.clone();
        }
        rec.record(process, kind, f, &key, value);
        if kind == Kind::Info {
            process = new_process(&counters);
        }
        if kind != Kind::Ok {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(10..60))).await;
        }
    }
    Ok(())
}

/// After healing: read every key once, linearizably, retrying through
/// elections.
async fn final_reads(
    rec: Recorder,
    counters: Rc<RefCell<Counters>>,
    keys: u64,
    via: u64,
) -> turmoil::Result {
    let kv = kv_client(via);
    let mut failed = Vec::new();
    for k in 0..=keys {
        let key = format!("r{k}");
        let process = {
            let mut c = counters.borrow_mut();
            c.next_process += 1;
            c.next_process
        };
        rec.record(process, Kind::Invoke, F::Read, &key, Value::Null);
        let got = retry_unavailable(100, || {
            let mut kv = kv.clone();
            let key = key.clone().into_bytes();
            async move {
                // A request the cluster never answers is a failure to
                // report, not a reason to wait forever.
                let call = kv.get(pb::GetRequest {
                    key,
                    ..Default::default()
                });
                let r = match tokio::time::timeout(FINAL_READ_TIMEOUT, call).await {
                    Ok(r) => r,
                    Err(_) => Err(tonic::Status::unavailable(format!(
                        "no answer within {FINAL_READ_TIMEOUT:?}"
                    ))),
                };
                if let Err(e) = &r
                    && std::env::var_os("PALISADE_SIM_LOG").is_some()
                {
                    eprintln!("final read failed: {:?} {}", e.code(), e.message());
                }
                r
            }
        })
        .await;
        match got {
            Ok(r) => {
                let v = r.into_inner().kv.map_or(Value::Null, |kv| {
                    jepsen_lite::drill::decode_value(&kv.value)
                });
                rec.record(process, Kind::Ok, F::Read, &key, v);
            }
            Err(e) => {
                rec.record(process, Kind::Fail, F::Read, &key, Value::Null);
                failed.push(format!("{key}: {:?} {}", e.code(), e.message()));
            }
        }
    }
    FINAL_READ_FAILURES.with(|f| f.borrow_mut().extend(failed));
    Ok(())
}

/// How long one attempt of a final read may take.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A fault from the schedule.
#[derive(Debug, Clone)]
enum Fault {
    Isolate(u64),
    OneWay(u64, u64),
    Halves(Vec<u64>, Vec<u64>),
    Crash(u64),
    SlowLink(u64, u64),
    /// The link drops into random short partitions: bursts of message loss.
    Lossy(u64, u64),
    /// The node is cut off and reconnected every 100–400 ms.
    Flap(u64),
    /// Isolate a node that currently leads some group.
    IsolateLeader(u64),
    /// A follower starts elections in every group at once: a leader change
    /// driven by no clock.
    Elect(u64),
}

impl Fault {
    fn pick(rng: &mut StdRng, members: &[u64], leaders: &[u64]) -> Fault {
        let n = members.len();
        let i = rng.gen_range(0..n);
        let (a, b) = (members[i], members[(i + 1) % n]);
        match rng.gen_range(0..9) {
            7 if !leaders.is_empty() => {
                Fault::IsolateLeader(leaders[rng.gen_range(0..leaders.len())])
            }
            8 => Fault::Elect(a),
            0 => Fault::Isolate(a),
            5 => Fault::Lossy(a, b),
            6 => Fault::Flap(a),
            1 => Fault::OneWay(a, b),
            2 => {
                let mut all: Vec<u64> = members.to_vec();
                for i in (1..all.len()).rev() {
                    all.swap(i, rng.gen_range(0..=i));
                }
                let minority = all.split_off(n / 2 + 1);
                Fault::Halves(minority, all)
            }
            3 => Fault::Crash(a),
            _ => Fault::SlowLink(a, b),
        }
    }

    /// Applies the fault; `hosts` is every node host of the simulation.
    fn apply(&self, sim: &mut turmoil::Sim<'_>, hosts: &[u64]) {
        match self {
            Fault::Isolate(a) => {
                for b in hosts.iter().filter(|b| *b != a) {
                    sim.partition(host(*a), host(*b));
                }
            }
            Fault::OneWay(a, b) => sim.partition_oneway(host(*a), host(*b)),
            Fault::Halves(x, y) => {
                for a in x {
                    for b in y {
                        sim.partition(host(*a), host(*b));
                    }
                }
            }
            Fault::Crash(a) => sim.crash(host(*a)),
            Fault::SlowLink(a, b) => {
                sim.set_link_latency(host(*a), host(*b), Duration::from_millis(300))
            }
            Fault::Lossy(a, b) => sim.set_link_fail_rate(host(*a), host(*b), 0.05),
            Fault::Flap(a) | Fault::IsolateLeader(a) => Fault::Isolate(*a).apply(sim, hosts),
            Fault::Elect(a) => ELECT.with(|e| e.borrow_mut().push(*a)),
        }
    }

    /// Heals the fault; a crashed node comes back unless it is `gone`
    /// (removed from the cluster meanwhile).
    fn heal(&self, sim: &mut turmoil::Sim<'_>, hosts: &[u64], gone: &BTreeSet<u64>) {
        match self {
            Fault::Isolate(a) => {
                for b in hosts.iter().filter(|b| *b != a) {
                    sim.repair(host(*a), host(*b));
                }
            }
            Fault::OneWay(a, b) => sim.repair_oneway(host(*a), host(*b)),
            Fault::Halves(x, y) => {
                for a in x {
                    for b in y {
                        sim.repair(host(*a), host(*b));
                    }
                }
            }
            Fault::Crash(a) if gone.contains(a) => {}
            Fault::Crash(a) => sim.bounce(host(*a)),
            Fault::SlowLink(a, b) => {
                sim.set_link_latency(host(*a), host(*b), Duration::from_millis(5))
            }
            Fault::Lossy(a, b) => {
                sim.set_link_fail_rate(host(*a), host(*b), 0.0);
                sim.repair(host(*a), host(*b));
            }
            Fault::Flap(a) | Fault::IsolateLeader(a) => Fault::Isolate(*a).heal(sim, hosts, gone),
            Fault::Elect(_) => {}
        }
    }
}

/// The config of a node that joins the `n`-node cluster later.
pub fn join_config(id: u64, n: u64, data_dir: PathBuf) -> NodeConfig {
    let listen: SocketAddr = ([0, 0, 0, 0], PORT).into();
    let mut config = NodeConfig::new(id, listen, BTreeMap::new(), data_dir);
    config.join = (1..=n).map(addr).collect();
    config.advertise = addr(id);
    config.flush_mode = palisade_storage::FlushMode::Inline;
    config.cache_bytes = 4 * 1024 * 1024;
    config.on_fatal = record_fatal_stop();
    // Free space is the host's, not the simulation's: no alarm.
    config.disk_reserve_bytes = 0;
    config
}

/// Shortens the coordinator's timings for simulated runs (seconds of
/// simulated time are precious) and the down-detection to fit them.
fn sim_timings(config: &mut NodeConfig) {
    config.coordinator.interval = Duration::from_millis(300);
    config.coordinator.down_after = Duration::from_secs(8);
    config.coordinator.catchup_timeout = Duration::from_secs(20);
    config.coordinator.transfer_cooldown = Duration::from_secs(3);
    config.coordinator.max_move_slots = 1024;
}

/// Polls the map through the `members` (the newest answer wins) until
/// nothing is in flight (or `limit` passes), then reads every key once more
/// through the first member that map has serving: a drained node keeps
/// running, but its copy of the map stops where it was removed and it
/// serves nothing.
async fn settle_then_read(
    rec: Recorder,
    counters: Rc<RefCell<Counters>>,
    keys: u64,
    members: Vec<u64>,
    limit: Duration,
) -> turmoil::Result {
    let mut via = members.first().copied().unwrap_or(1);
    let start = tokio::time::Instant::now();
    while !limit.is_zero() {
        let mut newest: Option<pb::ClusterMap> = None;
        for &m in &members {
            let Ok(channel) = sim_channel(&addr(m)) else {
                continue;
            };
            let mut admin = palisade_proto::v1::admin_client::AdminClient::new(channel);
            let req = pb::GetClusterMapRequest { min_epoch: 0 };
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(1), admin.get_cluster_map(req)).await
                && let Some(map) = r.into_inner().map
                && newest.as_ref().is_none_or(|n| map.epoch > n.epoch)
            {
                newest = Some(map);
            }
        }
        if let Some(map) = &newest {
            let serving = |id: &u64| {
                map.nodes
                    .iter()
                    .any(|n| n.id == *id && n.state == pb::NodeState::Serving as i32)
            };
            if let Some(m) = members.iter().find(|m| serving(m)) {
                via = *m;
            }
            if map.moving.is_none() && map.groups.iter().all(|g| g.change.is_empty()) {
                break;
            }
        }
        if start.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    final_reads(rec, counters, keys, via).await
}

/// Runs one seeded simulation and checks it.
pub fn run(opts: &SimOptions) -> SimOutcome {
    palisade_group::runtime::seed_thread_rng(opts.seed);
    let tracker = Rc::new(RefCell::new(membership::OwnershipTracker::default()));
    palisade_group::observe::set_observer(membership::OwnershipTracker::observer(&tracker));
    let spares = if opts.membership { opts.spares } else { 0 };
    let dirs: Vec<tempfile::TempDir> = (0..opts.nodes + spares)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let total = opts.workload + Duration::from_secs(60);
    let mut sim = builder(opts.seed, total).build();
    for id in 1..=opts.nodes {
        let dir = dirs[id as usize - 1].path().to_path_buf();
        let (n, groups) = (opts.nodes, opts.groups);
        let membership = opts.membership;
        sim.host(host(id), move || {
            let mut config = node_config(id, n, dir.clone(), groups);
            if membership {
                sim_timings(&mut config);
            }
            async move { run_registered_node(config).await }
        });
    }
    REGISTRY.with(|r| r.borrow_mut().clear());
    ELECT.with(|e| e.borrow_mut().clear());
    EXITED.with(|e| e.borrow_mut().clear());
    FINAL_READ_FAILURES.with(|f| f.borrow_mut().clear());
    FATAL_STOPS.with(|f| f.borrow_mut().clear());
    let mut invariants = Invariants::default();
    let mut next_observation = Duration::ZERO;
    let rec = Recorder::default();
    let counters = Rc::new(RefCell::new(Counters::default()));
    // Clients start after a short settling time so the first elections are
    // part of every history but not all of it.
    for c in 0..opts.clients {
        let (rec, counters, n) = (rec.clone(), counters.clone(), opts.nodes);
        let seed = opts.seed.wrapping_mul(31).wrapping_add(c as u64);
        let run_for = opts.workload;
        sim.client(format!("c{c}"), async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            client_loop(rec, counters, n, seed, run_for).await
        });
    }

    let mut trace = Vec::new();
    let mut problems = Vec::new();
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0xfa17);
    let mut active: Option<(Fault, Duration)> = None;
    // For a flapping fault: whether the node is cut off now, and when to toggle.
    let mut flap: Option<(bool, Duration)> = None;
    let mut next_fault = Duration::from_secs(4);
    let workload_end = Duration::from_secs(2) + opts.workload;
    // Membership: every node host so far, the members (faults hit these),
    // the nodes gone for good, the spares left.
    let mut hosts: Vec<u64> = (1..=opts.nodes).collect();
    let mut members: Vec<u64> = hosts.clone();
    let mut gone: BTreeSet<u64> = BTreeSet::new();
    let mut spare_ids: Vec<u64> = (opts.nodes + 1..=opts.nodes + spares).rev().collect();
    let mut mrng = StdRng::seed_from_u64(opts.seed ^ 0x3e3b);
    let mut next_change = Duration::from_secs(5);
    let changes: Rc<RefCell<Vec<Result<String, String>>>> = Rc::default();
    let mut change_count = 0u64;
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                problems.push(format!("simulation error: {e}"));
                break;
            }
        }
        let now = sim.elapsed();
        if now >= next_observation {
            invariants.observe(now, &mut trace, &mut problems);
            next_observation = now + Duration::from_millis(20);
        }
        if let (Some((Fault::Flap(a), _)), Some((cut, at))) = (&active, flap)
            && now >= at
        {
            if cut {
                Fault::Isolate(*a).heal(&mut sim, &hosts, &gone);
            } else {
                Fault::Isolate(*a).apply(&mut sim, &hosts);
            }
            flap = Some((!cut, now + Duration::from_millis(rng.gen_range(100..400))));
        }
        if let Some((fault, until)) = &active
            && now >= *until
        {
            fault.heal(&mut sim, &hosts, &gone);
            trace.push(format!("{:>8} heal {fault:?}", now.as_millis()));
            active = None;
            flap = None;
            next_fault = now + Duration::from_millis(rng.gen_range(1000..3000));
        }
        if opts.faults && active.is_none() && now >= next_fault && now < workload_end {
            let leaders: Vec<u64> = invariants
                .leaders
                .values()
                .map(|(node, _)| *node)
                .filter(|n| members.contains(n))
                .collect();
            let fault = Fault::pick(&mut rng, &members, &leaders);
            fault.apply(&mut sim, &hosts);
            trace.push(format!("{:>8} apply {fault:?}", now.as_millis()));
            if matches!(fault, Fault::Flap(_)) {
                flap = Some((true, now + Duration::from_millis(rng.gen_range(100..400))));
            }
            active = Some((
                fault,
                now + Duration::from_millis(rng.gen_range(1500..5000)),
            ));
        }
        if opts.membership && now >= next_change && now < workload_end {
            next_change = now + Duration::from_millis(mrng.gen_range(2500..5000));
            let crashed = match &active {
                Some((Fault::Crash(c), _)) => Some(*c),
                _ => None,
            };
            let shrinkable: Vec<u64> = members
                .iter()
                .copied()
                .filter(|m| Some(*m) != crashed)
                .collect();
            let mut options = vec![
                membership::Change::MoveReplica,
                membership::Change::TransferLeader,
                membership::Change::SetGroups,
            ];
            if let Some(id) = spare_ids.last() {
                options.push(membership::Change::Join(*id));
            }
            if members.len() > 3 && !shrinkable.is_empty() {
                let victim = shrinkable[mrng.gen_range(0..shrinkable.len())];
                options.push(membership::Change::Drain(victim));
                // Killing a node for good is a failure the cluster survives
                // only with every group at full strength: a second loss
                // before the first is repaired takes a majority of some
                // group with it, which no system with three replicas
                // survives.
                if crashed.is_none() && fully_replicated(&members) {
                    options.push(membership::Change::Remove(victim));
                }
            }
            let change = options[mrng.gen_range(0..options.len())].clone();
            match &change {
                membership::Change::Join(id) => {
                    let id = *id;
                    spare_ids.pop();
                    let dir = dirs[id as usize - 1].path().to_path_buf();
                    let n = opts.nodes;
                    sim.host(host(id), move || {
                        let mut config = join_config(id, n, dir.clone());
                        sim_timings(&mut config);
                        async move { run_registered_node(config).await }
                    });
                    hosts.push(id);
                    members.push(id);
                }
                membership::Change::Drain(id) => {
                    members.retain(|m| m != id);
                }
                membership::Change::Remove(id) => {
                    sim.crash(host(*id));
                    members.retain(|m| m != id);
                    gone.insert(*id);
                }
                _ => {}
            }
            trace.push(format!("{:>8} membership {change:?}", now.as_millis()));
            change_count += 1;
            let via = members.clone();
            let done = changes.clone();
            let seed = opts.seed.wrapping_mul(7).wrapping_add(change_count);
            sim.client(format!("admin{change_count}"), async move {
                let r = membership::carry_out(change, via, seed).await;
                done.borrow_mut().push(r);
                Ok(())
            });
        }
    }
    if let Some((fault, _)) = active.take() {
        fault.heal(&mut sim, &hosts, &gone);
        trace.push(format!("{:>8} heal {fault:?}", sim.elapsed().as_millis()));
    }

    // Everything healed: (let membership changes finish, then) read every
    // key once more.
    let keys = counters.borrow().ops / KEY_ROTATION;
    let mut final_members = members.clone();
    final_members.sort_unstable();
    let settle = if opts.membership {
        Duration::from_secs(40)
    } else {
        Duration::ZERO
    };
    sim.client(
        "final",
        settle_then_read(rec.clone(), counters.clone(), keys, final_members, settle),
    );
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                problems.push(format!("simulation error during final reads: {e}"));
                break;
            }
        }
        let now = sim.elapsed();
        if now >= next_observation {
            invariants.observe(now, &mut trace, &mut problems);
            next_observation = now + Duration::from_millis(20);
        }
    }
    if opts.membership {
        describe_cluster(&mut trace);
    }
    for stop in FATAL_STOPS.with(|f| std::mem::take(&mut *f.borrow_mut())) {
        problems.push(format!("a group stopped on its own: {stop}"));
    }
    let unread = FINAL_READ_FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()));
    if !unread.is_empty() {
        problems.push(format!(
            "{} keys could not be read after every fault healed (first: {})",
            unread.len(),
            unread[0]
        ));
    }
    for n in EXITED.with(|e| std::mem::take(&mut *e.borrow_mut())) {
        trace.push(format!("node {n} exited: the cluster had removed it"));
    }
    REGISTRY.with(|r| r.borrow_mut().clear());
    palisade_group::observe::clear_observer();
    palisade_group::runtime::unseed_thread_rng();

    let t = tracker.borrow();
    problems.extend(t.problems.iter().cloned());
    if opts.membership {
        let results = changes.borrow();
        for r in results.iter() {
            match r {
                Ok(done) => trace.push(format!("membership done: {done}")),
                Err(e) => problems.push(format!("membership change not applied: {e}")),
            }
        }
        if change_count == 0 || results.iter().all(|r| r.is_err()) {
            problems.push("no membership change was applied".into());
        }
        if t.ownership_changes == 0 {
            problems.push("no group ever recorded slot ownership".into());
        }
        let unowned = t.unowned();
        if !unowned.is_empty() {
            problems.push(format!(
                "{} slots have no owner at the end (first: {:?})",
                unowned.len(),
                &unowned[..unowned.len().min(5)]
            ));
        }
        trace.push(format!(
            "ownership: {} changes, {} writes checked against ownership",
            t.ownership_changes, t.writes_checked
        ));
    }
    drop(t);

    let history = rec.events.borrow().clone();
    check_history(&history, &mut problems);
    SimOutcome {
        history,
        trace,
        problems,
    }
}

fn check_history(history: &[Event], problems: &mut Vec<String>) {
    let text = jepsen_lite::history::to_jsonl(history);
    match jepsen_lite::history::parse(&text) {
        Err(e) => problems.push(format!("invalid history: {e}")),
        Ok(h) => {
            let report =
                jepsen_lite::checker::check(&h, jepsen_lite::checker::Budget::default(), 1);
            if let Some(v) = report.first_violation() {
                problems.push(format!(
                    "not linearizable: {}",
                    jepsen_lite::describe_violation(v)
                ));
            }
            for k in report.unknown() {
                problems.push(format!("checker budget exceeded on key {}", k.key));
            }
            let finals = h.ops.iter().filter(|o| o.f == F::Read).count();
            if finals == 0 {
                problems.push("the history has no reads".into());
            }
        }
    }
}

thread_local! {
    /// Nodes started in this simulation: (node id, incarnation, handle).
    /// The simulation runs on one thread, so a thread-local is shared by the
    /// hosts and the driver loop.
    static REGISTRY: RefCell<Vec<(u64, u64, std::sync::Weak<Node>)>> = const { RefCell::new(Vec::new()) };
    /// Nodes asked to start an election now (a leader change that waits for
    /// no timeout); drained by each node's control task.
    static ELECT: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Nodes that exited because the cluster had removed them.
    static EXITED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Keys the final reads could not read after everything healed.
    static FINAL_READ_FAILURES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// Groups whose Raft stopped on its own (see `NodeConfig::on_fatal`):
    /// a real node would exit; here it is a problem of the run.
    static FATAL_STOPS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The simulation's fatal hook: records the stop (all hosts share this
/// process, so it must not exit).
fn record_fatal_stop() -> palisade_server::config::FatalHook {
    palisade_server::config::FatalHook(Arc::new(|what: &str| {
        FATAL_STOPS.with(|f| f.borrow_mut().push(what.to_string()));
    }))
}

/// Like [`run_node`], but registers the node for invariant observation.
pub async fn run_registered_node(config: NodeConfig) -> Result<(), Box<dyn std::error::Error>> {
    let id = config.id;
    let node = match Node::open_with(config, Arc::new(SimConnector)).await {
        Ok(node) => node,
        // The cluster removed this node (it was down past `down_after`)
        // before it could come back: it exits, as a real one does.
        Err(palisade_server::ServerError::NodeRemoved(n)) => {
            EXITED.with(|e| e.borrow_mut().push(n));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let incarnation = r.len() as u64;
        r.push((id, incarnation, Arc::downgrade(&node)));
    });
    let control = node.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let asked = ELECT.with(|e| {
                let mut e = e.borrow_mut();
                let before = e.len();
                e.retain(|n| *n != id);
                e.len() != before
            });
            if asked {
                for (_, group) in control.groups() {
                    let _ = group.raft().trigger().elect().await;
                }
            }
        }
    });
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    node.serve_with_incoming(incoming(listener), std::future::pending())
        .await?;
    Ok(())
}

/// The end state, for the trace: each live node's map (nodes, groups with
/// changes in flight, the move in flight) and its replicas' Raft view.
/// Whether, by the newest map a live node has, every group has all its
/// voters on `members` (nodes up), none is changing, and no node drains.
fn fully_replicated(members: &[u64]) -> bool {
    let newest = REGISTRY.with(|r| {
        r.borrow()
            .iter()
            .filter(|(id, _, _)| members.contains(id))
            .filter_map(|(_, _, w)| w.upgrade().map(|n| n.map()))
            .max_by_key(|m| m.epoch)
    });
    let Some(map) = newest else { return false };
    let draining = map
        .nodes
        .values()
        .any(|n| n.state == palisade_shard::NodeState::Draining);
    !draining
        && map.groups.iter().all(|(g, info)| {
            let voters = info.voter_nodes();
            info.change.is_none()
                && voters.iter().all(|n| members.contains(n))
                && (*g == palisade_shard::META_GROUP || voters.len() as u32 >= map.replication)
        })
}

fn describe_cluster(trace: &mut Vec<String>) {
    let live: Vec<(u64, Arc<Node>)> = REGISTRY.with(|r| {
        r.borrow()
            .iter()
            .filter_map(|(id, _, w)| w.upgrade().map(|n| (*id, n)))
            .collect()
    });
    for (id, node) in live {
        let map = node.map();
        let nodes: Vec<String> = map
            .nodes
            .iter()
            .map(|(n, i)| format!("{n}:{}", i.state.name()))
            .collect();
        let groups: Vec<String> = map
            .groups
            .iter()
            .map(|(g, i)| {
                let change = i
                    .change
                    .map(|c| format!(" change {c:?}"))
                    .unwrap_or_default();
                format!(
                    "g{g}e{} {:?}{change}",
                    i.epoch,
                    i.replicas.values().map(|r| r.node).collect::<Vec<_>>()
                )
            })
            .collect();
        trace.push(format!(
            "end node {id}: map epoch {} nodes [{}] groups [{}] moving {:?}",
            map.epoch,
            nodes.join(" "),
            groups.join("; "),
            map.moving.as_ref().map(|m| (m.id, m.from, m.to, m.phase))
        ));
        for (g, group) in node.groups() {
            let m = group.raft().metrics().borrow().clone();
            trace.push(format!(
                "end node {id} group {g}: replica {} {:?} term {} leader {:?} applied {:?} membership {:?}",
                group.replica_id(),
                m.state,
                m.current_term,
                m.current_leader,
                m.last_applied.map(|l| l.index),
                m.membership_config.membership().get_joint_config()
            ));
        }
    }
}

/// Safety invariants checked on live nodes during a run.
#[derive(Default)]
struct Invariants {
    /// (node, incarnation, group, replica) → last applied index seen. A
    /// replica removed and added back is a new replica (a new id) that
    /// starts from nothing.
    applied: BTreeMap<(u64, u64, u64, u64), u64>,
    /// (group, index) → leader id of the applied (so committed) entry.
    committed: BTreeMap<(u64, u64), String>,
    /// group → (leader, term) last reported, for the trace.
    leaders: BTreeMap<u64, (u64, u64)>,
}

impl Invariants {
    fn observe(&mut self, now: Duration, trace: &mut Vec<String>, problems: &mut Vec<String>) {
        let live: Vec<(u64, u64, Arc<Node>)> = REGISTRY.with(|r| {
            r.borrow()
                .iter()
                .filter_map(|(id, inc, w)| w.upgrade().map(|n| (*id, *inc, n)))
                .collect()
        });
        for (id, inc, node) in live {
            for (gid, group) in node.groups() {
                let gid = &gid;
                // Never hold the metrics borrow across an await (none here).
                let m = group.raft().metrics().borrow().clone();
                if let Some(applied) = m.last_applied {
                    let key = (id, inc, *gid, group.replica_id());
                    let prev = self.applied.insert(key, applied.index).unwrap_or(0);
                    if applied.index < prev {
                        problems.push(format!(
                            "node {id} group {gid}: applied index went back from {prev} to {}",
                            applied.index
                        ));
                    }
                    let leader = applied.leader_id.to_string();
                    match self.committed.get(&(*gid, applied.index)) {
                        Some(l) if *l != leader => problems.push(format!(
                            "group {gid}: committed entry {} changed: leader {l} elsewhere, {leader} on node {id}",
                            applied.index
                        )),
                        Some(_) => {}
                        None => {
                            self.committed.insert((*gid, applied.index), leader);
                        }
                    }
                }
                if m.state == openraft::ServerState::Leader {
                    let now_leading = (id, m.current_term);
                    if self.leaders.get(gid) != Some(&now_leading) {
                        self.leaders.insert(*gid, now_leading);
                        trace.push(format!(
                            "{:>8} leader group={gid} node={id} term={}",
                            now.as_millis(),
                            m.current_term
                        ));
                    }
                }
            }
        }
    }
}
