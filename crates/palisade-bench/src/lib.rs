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
//! node. Workloads and key distributions: see [`workload`].

pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use palisade_client::{Client, ClientConfig, ReadOptions, proto as pb};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::time::Instant;

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
    /// Comma-separated HOST:PORT of some nodes.
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
        .map_err(|_| format!("'{s}' is not a duration like 10s, 1m or 500ms"))?;
    if v.is_nan() || v <= 0.0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn read_options(level: Level) -> ReadOptions {
    match level {
        Level::Linearizable => ReadOptions::linearizable(),
        Level::Lease => ReadOptions::lease(),
        Level::Session => ReadOptions::session(),
        Level::Bounded => ReadOptions::bounded(Duration::from_millis(500)),
        Level::Stale => ReadOptions::stale(),
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
    clients: Vec<Client>,
    keys: KeyChooser,
    value: Vec<u8>,
    opts: ReadOptions,
    counters: Counters,
    /// Set once the warm-up is over: from then on operations are measured.
    measuring: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    /// Runs one operation; returns whether it succeeded.
    async fn run_op(&self, client: &Client, op: Op, key: Vec<u8>) -> bool {
        let result = match op {
            Op::Get => client.get_with(key, self.opts).await.map(|_| true),
            Op::Put => client.put(key, self.value.clone()).await.map(|_| true),
            Op::ReadModifyWrite => match client.get_with(key.clone(), self.opts).await {
                Ok(r) => {
                    let old = r.kv.map(|kv| kv.value);
                    let mut new = self.value.clone();
                    if let Some(first) = new.first_mut() {
                        *first = old
                            .as_ref()
                            .and_then(|v| v.first())
                            .map_or(0, |b| b.wrapping_add(1));
                    }
                    client
                        .compare_and_swap(key, old, new)
                        .await
                        .map(|(swapped, _)| swapped)
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
            Err(e) => {
                if measuring {
                    let c = if e.code() == tonic_code_deadline() {
                        &self.counters.timeouts
                    } else {
                        &self.counters.errors
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
        }
    }
}

fn tonic_code_deadline() -> palisade_client::Code {
    palisade_client::Code::DeadlineExceeded
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds")
}

/// A closed-loop client: next operation as soon as the previous completes.
async fn closed_worker(shared: Arc<Shared>, index: usize) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut rng = StdRng::seed_from_u64(shared.args.seed.wrapping_add(index as u64 * 7919));
    let client = shared.clients[index % shared.clients.len()].clone();
    while !shared.stop.load(Ordering::Relaxed) {
        let op = shared.args.workload.next_op(&mut rng);
        let key = workload::key(shared.keys.next(&mut rng));
        let started = Instant::now();
        let ok = shared.run_op(&client, op, key).await;
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
        let client = shared.clients[(i as usize) % shared.clients.len()].clone();
        let shared2 = shared.clone();
        let hist = hist.clone();
        tasks.spawn(async move {
            let ok = shared2.run_op(&client, op, key).await;
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

/// Per-node server counters from ClusterStatus.
async fn server_counters(client: &Client) -> Vec<pb::NodeInfo> {
    client
        .cluster_status()
        .await
        .map(|s| s.nodes)
        .unwrap_or_default()
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
            let client = shared.clients[w % shared.clients.len()].clone();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= shared.args.keys {
                    return Ok::<(), anyhow::Error>(());
                }
                client
                    .put(workload::key(i), shared.value.clone())
                    .await
                    .with_context(|| format!("preloading key {i}"))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q);
    json!({
        "count": h.len(),
        "p50_us": us(0.50), "p90_us": us(0.90), "p99_us": us(0.99),
        "p999_us": us(0.999), "max_us": h.max(), "mean_us": h.mean(),
    })
}

/// Runs the benchmark and returns its results (also printed).
pub async fn run(args: BenchArgs) -> anyhow::Result<Value> {
    if args.clients == 0 || args.connections == 0 {
        bail!("--clients and --connections must be at least 1");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let mut c = ClientConfig::new(args.endpoints.iter().cloned());
        c.request_timeout = Duration::from_secs(10);
        clients.push(
            Client::with_config(c)
                .await
                .with_context(|| format!("cannot reach {}", args.endpoints.join(",")))?,
        );
    }
    let shared = Arc::new(Shared {
        keys: KeyChooser::new(args.keys, args.key_dist),
        value: vec![b'v'; args.value_size],
        opts: read_options(args.consistency),
        clients,
        counters: Counters::default(),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        args: args.clone(),
    });
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
    let before = server_counters(&shared.clients[0]).await;
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
    let after = server_counters(&shared.clients[0]).await;
    let mut hist = new_histogram();
    for w in workers {
        hist.add(w.await?)?;
    }

    let ops = hist.len();
    let writes = shared.counters.writes.load(Ordering::Relaxed);
    let flushes: u64 = after
        .iter()
        .map(|a| {
            let b = before
                .iter()
                .find(|b| b.id == a.id)
                .map_or(0, |b| b.flushes);
            a.flushes.saturating_sub(b)
        })
        .sum();
    let nodes: Vec<Value> = after
        .iter()
        .map(|n| {
            json!({
                "id": n.id, "rss_bytes": n.rss_bytes, "disk_bytes": n.disk_bytes,
                "flushes": n.flushes.saturating_sub(before.iter().find(|b| b.id == n.id).map_or(0, |b| b.flushes)),
            })
        })
        .collect();
    let results = json!({
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
        "fsyncs_per_write": if writes > 0 { Some(flushes as f64 / writes as f64) } else { None },
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
        "{} {}, {} clients / {} connections, {} keys ({}), {} B values, reads {}",
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
    for n in r["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node {}: RSS {:.1} MiB, {:.1} MiB on disk, {} fsyncs",
            n["id"],
            n["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            n["disk_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            n["flushes"]
        );
    }
}
