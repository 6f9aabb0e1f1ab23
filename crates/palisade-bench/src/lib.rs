//! `palisade bench`: a load generator for palisade.
//!
//! - **Closed loop** (default): `--clients N` tasks over `--connections M`
//!   client connections, each sending its next operation as soon as the
//!   previous one completes.
//! - **Open loop** (`--rate R`): operations are *scheduled* at a fixed rate
//!   and each one's latency is measured from its intended send time, so a
//!   stall shows up as latency instead of being hidden by the senders
//!   slowing down (coordinated omission).
//!
//! Operations during `--warmup` are not measured. Latencies go to
//! HdrHistograms (µs, 3 significant digits); the report has p50/p90/p99/
//! p99.9/max, throughput, a per-second throughput series, error and timeout
//! counts, and the server-side counters that explain the numbers: fsyncs per
//! write (from each node's group-commit flusher), RSS and bytes on disk per
//! node. Workloads and key distributions: see [`workload`]. The same
//! workloads run against etcd with `--backend etcd` (cargo feature `etcd`),
//! see [`backend`].

pub mod backend;
pub mod chart;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod prom;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use palisade_client::ReadOptions;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::time::Instant;

pub use backend::{Backend, BackendKind, Failure, NodeCounters, ReadLevel};
pub use workload::{KeyChooser, KeyDist, Op, Workload};

/// Read levels on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    Linearizable,
    Lease,
    Session,
    Bounded,
    Stale,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// The system to drive.
    #[arg(long, value_enum, default_value = "palisade")]
    pub backend: BackendKind,
    /// Comma-separated HOST:PORT of some nodes (etcd: client URLs).
    #[arg(
        long,
        env = "PALISADE_ENDPOINTS",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent closed-loop clients (or, in open loop, the most
    /// operations in flight).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Client connections the clients share.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Open loop: operations per second to schedule (0: closed loop).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Measured time, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long, value_enum, default_value = "uniform")]
    pub key_dist: KeyDist,
    /// Write every key once before measuring (default: when the workload
    /// reads).
    #[arg(long)]
    pub preload: Option<bool>,
    /// Read consistency of gets.
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: Level,
    /// Seed of the operation and key choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Parses `10s`, `500ms`, `1m` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
        .map_err(|_| format!("'{s}' is not a duration like 10s, 1m or 500ms"))?;
    if v.is_nan() || v <= 0.0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn read_level(level: Level) -> ReadLevel {
    let palisade = match level {
        Level::Linearizable => ReadOptions::linearizable(),
        Level::Lease => ReadOptions::lease(),
        Level::Session => ReadOptions::session(),
        Level::Bounded => ReadOptions::bounded(Duration::from_millis(500)),
        Level::Stale => ReadOptions::stale(),
    };
    ReadLevel {
        palisade,
        etcd_serializable: !matches!(level, Level::Linearizable | Level::Lease),
    }
}

/// Counts shared by the workers.
#[derive(Default)]
struct Counters {
    /// Completed operations (measured or not), for the per-second series.
    done: AtomicU64,
    /// Writes that applied (puts, successful read-modify-writes), measured.
    writes: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    /// Read-modify-writes whose compare failed (a concurrent writer won).
    cas_conflicts: AtomicU64,
}

struct Shared {
    args: BenchArgs,
    backend: Backend,
    keys: KeyChooser,
    value: Vec<u8>,
    level: ReadLevel,
    counters: Counters,
    /// Set once the warm-up is over: from then on operations are measured.
    measuring: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn new(args: &BenchArgs, backend: Backend) -> Arc<Self> {
        Arc::new(Shared {
            keys: KeyChooser::new(args.keys, args.key_dist),
            value: vec![b'v'; args.value_size],
            level: read_level(args.consistency),
            backend,
            counters: Counters::default(),
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            args: args.clone(),
        })
    }

    /// Runs one operation; returns whether it succeeded.
    async fn run_op(&self, conn: usize, op: Op, key: Vec<u8>) -> bool {
        let b = &self.backend;
        let result = match op {
            Op::Get => b.get(conn, key, self.level).await.map(|_| true),
            Op::Put => b.put(conn, key, self.value.clone()).await.map(|_| true),
            Op::ReadModifyWrite => match b.get(conn, key.clone(), self.level).await {
                Ok(old) => {
                    let mut new = self.value.clone();
                    if let Some(first) = new.first_mut() {
                        *first = old
                            .as_ref()
                            .and_then(|v| v.first())
                            .map_or(0, |b| b.wrapping_add(1));
                    }
                    b.compare_and_swap(conn, key, old, new).await
                }
                Err(e) => Err(e),
            },
        };
        let measuring = self.measuring.load(Ordering::Relaxed);
        match result {
            Ok(applied) => {
                if measuring && (op == Op::Put || (op == Op::ReadModifyWrite && applied)) {
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                }
                if measuring && op == Op::ReadModifyWrite && !applied {
                    self.counters.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(failure) => {
                if measuring {
                    let c = match failure {
                        Failure::Timeout => &self.counters.timeouts,
                        Failure::Error => &self.counters.errors,
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds")
}

/// A closed-loop client: next operation as soon as the previous completes.
async fn closed_worker(shared: Arc<Shared>, index: usize) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut rng = StdRng::seed_from_u64(shared.args.seed.wrapping_add(index as u64 * 7919));
    let conn = shared.backend.connection_for(index);
    while !shared.stop.load(Ordering::Relaxed) {
        let op = shared.args.workload.next_op(&mut rng);
        let key = workload::key(shared.keys.next(&mut rng));
        let started = Instant::now();
        let ok = shared.run_op(conn, op, key).await;
        shared.counters.done.fetch_add(1, Ordering::Relaxed);
        if ok && shared.measuring.load(Ordering::Relaxed) {
            let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
        }
    }
    hist
}

/// Open loop: schedules operations at `rate`; latency counts from the
/// intended send time.
async fn open_loop(shared: Arc<Shared>, rate: u64) -> Histogram<u64> {
    let hist = Arc::new(std::sync::Mutex::new(new_histogram()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(shared.args.clients.max(1)));
    let mut rng = StdRng::seed_from_u64(shared.args.seed);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut i: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended).await;
        // Waiting for a slot is part of the latency: measured from `intended`.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let op = shared.args.workload.next_op(&mut rng);
        let key = workload::key(shared.keys.next(&mut rng));
        let conn = shared.backend.connection_for(i as usize);
        let shared2 = shared.clone();
        let hist = hist.clone();
        tasks.spawn(async move {
            let ok = shared2.run_op(conn, op, key).await;
            shared2.counters.done.fetch_add(1, Ordering::Relaxed);
            if ok && shared2.measuring.load(Ordering::Relaxed) {
                let us = intended.elapsed().as_micros().max(1) as u64;
                let _ = hist.lock().unwrap_or_else(|p| p.into_inner()).record(us);
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
        i += 1;
    }
    while tasks.join_next().await.is_some() {}
    let merged = hist.lock().unwrap_or_else(|p| p.into_inner());
    merged.clone()
}

/// Writes every key once, with 64 concurrent writers.
async fn preload(shared: &Arc<Shared>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..64 {
        let shared = shared.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let conn = shared.backend.connection_for(w);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= shared.args.keys {
                    return Ok::<(), anyhow::Error>(());
                }
                // A failed put is retried a few times (an election may be
                // under way) before the preload gives up.
                let mut attempt = 0;
                while let Err(f) = shared
                    .backend
                    .put(conn, workload::key(i), shared.value.clone())
                    .await
                {
                    attempt += 1;
                    if attempt >= 5 {
                        bail!("preloading key {i} failed: {f:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Quantiles at which the latency CDF is recorded.
const CDF_QUANTILES: [f64; 16] = [
    0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0,
];

fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q);
    let cdf: Vec<Value> = CDF_QUANTILES.iter().map(|q| json!([q, us(*q)])).collect();
    json!({
        "count": h.len(),
        "p50_us": us(0.50), "p90_us": us(0.90), "p99_us": us(0.99),
        "p999_us": us(0.999), "max_us": h.max(), "mean_us": h.mean(),
        "cdf": cdf,
    })
}

/// Writes every key once (`--keys`, `--value-size`) through `backend`, with
/// 64 concurrent writers; returns how long it took.
pub async fn preload_keys(args: &BenchArgs, backend: Backend) -> anyhow::Result<Duration> {
    let shared = Shared::new(args, backend);
    preload(&shared).await
}

/// Client-side timeout of every request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.connections == 0 {
        bail!("--clients and --connections must be at least 1");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    Ok(())
}

/// Runs the benchmark and returns its results (also printed).
pub async fn run(args: BenchArgs) -> anyhow::Result<Value> {
    check_args(&args)?;
    let backend = Backend::connect(
        args.backend,
        &args.endpoints,
        args.connections,
        REQUEST_TIMEOUT,
    )
    .await?;
    run_with(args, backend).await
}

/// Runs the benchmark against an already connected `backend` (which must
/// have `args.connections` connections).
pub async fn run_with(args: BenchArgs, backend: Backend) -> anyhow::Result<Value> {
    check_args(&args)?;
    let shared = Shared::new(&args, backend);
    let preload_time = if args.preload.unwrap_or(args.workload.reads()) {
        eprintln!("preloading {} keys…", args.keys);
        Some(preload(&shared).await?)
    } else {
        None
    };

    let workers: Vec<tokio::task::JoinHandle<Histogram<u64>>> = if args.rate > 0 {
        vec![tokio::spawn(open_loop(shared.clone(), args.rate))]
    } else {
        (0..args.clients)
            .map(|i| tokio::spawn(closed_worker(shared.clone(), i)))
            .collect()
    };
    tokio::time::sleep(args.warmup).await;
    let before = shared.backend.counters().await;
    shared.measuring.store(true, Ordering::Relaxed);
    let measure_start = Instant::now();
    let done_at_start = shared.counters.done.load(Ordering::Relaxed);
    let mut series = Vec::new();
    let mut last = done_at_start;
    let mut tick = tokio::time::interval_at(
        measure_start + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    while measure_start.elapsed() < args.duration {
        tick.tick().await;
        let now = shared.counters.done.load(Ordering::Relaxed);
        series.push(now - last);
        last = now;
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = measure_start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let after = shared.backend.counters().await;
    let mut hist = new_histogram();
    for w in workers {
        hist.add(w.await?)?;
    }

    let ops = hist.len();
    let writes = shared.counters.writes.load(Ordering::Relaxed);
    let delta = |a: &NodeCounters, f: fn(&NodeCounters) -> u64| {
        let b = before.iter().find(|b| b.id == a.id).map_or(0, f);
        f(a).saturating_sub(b)
    };
    let fsyncs: u64 = after.iter().map(|a| delta(a, |n| n.fsyncs)).sum();
    let written: u64 = after.iter().map(|a| delta(a, |n| n.write_bytes)).sum();
    let nodes: Vec<Value> = after
        .iter()
        .map(|n| {
            json!({
                "id": n.id, "rss_bytes": n.rss_bytes, "disk_bytes": n.disk_bytes,
                "fsyncs": delta(n, |n| n.fsyncs),
                "write_bytes": delta(n, |n| n.write_bytes),
            })
        })
        .collect();
    let results = json!({
        "backend": shared.backend.name(),
        "workload": format!("{:?}", args.workload),
        "mode": if args.rate > 0 { format!("open loop at {} ops/s", args.rate) } else { "closed loop".into() },
        "clients": args.clients,
        "connections": args.connections,
        "keys": args.keys,
        "key_dist": format!("{:?}", args.key_dist),
        "value_size": args.value_size,
        "consistency": format!("{:?}", args.consistency),
        "duration_s": elapsed.as_secs_f64(),
        "preload_s": preload_time.map(|d| d.as_secs_f64()),
        "ops": ops,
        "throughput_ops_s": ops as f64 / elapsed.as_secs_f64(),
        "latency": percentiles(&hist),
        "errors": shared.counters.errors.load(Ordering::Relaxed),
        "timeouts": shared.counters.timeouts.load(Ordering::Relaxed),
        "cas_conflicts": shared.counters.cas_conflicts.load(Ordering::Relaxed),
        "per_second": series,
        "writes": writes,
        "fsyncs_per_write": if writes > 0 { Some(fsyncs as f64 / writes as f64) } else { None },
        "bytes_written_per_write": if writes > 0 && written > 0 { Some(written as f64 / writes as f64) } else { None },
        "nodes": nodes,
    });
    print_report(&results);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(results)
}

fn print_report(r: &Value) {
    let l = &r["latency"];
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0) / 1000.0;
    println!(
        "[{}] {} {}, {} clients / {} connections, {} keys ({}), {} B values, reads {}",
        r["backend"].as_str().unwrap_or(""),
        r["workload"].as_str().unwrap_or(""),
        r["mode"].as_str().unwrap_or(""),
        r["clients"],
        r["connections"],
        r["keys"],
        r["key_dist"].as_str().unwrap_or(""),
        r["value_size"],
        r["consistency"].as_str().unwrap_or("")
    );
    println!(
        "  throughput {:.0} ops/s over {:.1} s ({} ops, {} errors, {} timeouts, {} cas conflicts)",
        r["throughput_ops_s"].as_f64().unwrap_or(0.0),
        r["duration_s"].as_f64().unwrap_or(0.0),
        r["ops"],
        r["errors"],
        r["timeouts"],
        r["cas_conflicts"]
    );
    println!(
        "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        ms(&l["p50_us"]),
        ms(&l["p90_us"]),
        ms(&l["p99_us"]),
        ms(&l["p999_us"]),
        ms(&l["max_us"])
    );
    if let Some(f) = r["fsyncs_per_write"].as_f64() {
        println!("  fsyncs per write (all nodes): {f:.2}");
    }
    if let Some(b) = r["bytes_written_per_write"].as_f64() {
        println!("  bytes written to storage per write (all nodes): {b:.0}");
    }
    for n in r["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node {}: RSS {:.1} MiB, {:.1} MiB on disk, {} fsyncs, {:.1} MiB written",
            n["id"],
            n["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            n["disk_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            n["fsyncs"],
            n["write_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    }
}
