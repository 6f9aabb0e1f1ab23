//! `palisade bench compare`: palisade and etcd measured side by side.
//!
//! Starts a 3-node palisade cluster (and, with `--scale-groups N`, a second
//! one with N data groups) and a 3-node etcd cluster on loopback, preloads
//! the same keys into each, then runs every row of the workload matrix
//! against each system in alternation (palisade, etcd, palisade, etcd…), so
//! drift of the machine over time falls on both alike. Both systems run
//! with their defaults: acknowledged after an fsync on a majority.
//!
//! Writes, into `--out`: `results.json` (every run, with latency
//! percentiles, CDF points, per-second series and counters), `table.md` (the
//! ratio table, also printed), `throughput.svg` (put throughput against
//! clients) and `latency-*.svg` (latency CDFs).
//!
//! Process-level numbers are measured here, the same way for both systems:
//! RSS (`/proc/PID/status`), bytes written to storage (`/proc/PID/io`) and
//! bytes allocated on disk under each node's data directory. fsyncs come
//! from each system's own counters (see `palisade_bench::NodeCounters`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use palisade_bench::chart::{Axis, Series, line_chart};
use palisade_bench::{Backend, BackendKind, BenchArgs, KeyDist, Level, Workload};
use serde_json::{Value, json};

use crate::demo::{Nodes, spawn_child, start_command, wait_ready};

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Directory for results.json, table.md and the charts.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Measured time of each run.
    #[arg(long, default_value = "10s", value_parser = palisade_bench::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each run.
    #[arg(long, default_value = "2s", value_parser = palisade_bench::parse_duration)]
    pub warmup: Duration,
    /// Keys preloaded into each system (and the key space of every run).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Runs of each system per row (alternating).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Data groups of the main palisade cluster.
    #[arg(long, default_value_t = 1)]
    pub groups: u64,
    /// Also run the put rows on a palisade cluster with this many data
    /// groups (0: no).
    #[arg(long, default_value_t = 8)]
    pub scale_groups: u64,
    /// Client counts of the put rows.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    pub put_clients: Vec<usize>,
    /// Client counts of the linearizable get rows.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub get_clients: Vec<usize>,
    /// YCSB workloads to run at 64 clients with Zipfian keys.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "ycsb-a,ycsb-f"
    )]
    pub ycsb: Vec<Workload>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd: PathBuf,
    /// First loopback port to use (needs 40 free ports from here).
    #[arg(long, default_value_t = 7600)]
    pub base_port: u16,
    /// A quick pass (1 s runs, 2,000 keys, one round, a small matrix): checks
    /// that the comparison works, measures nothing worth reporting.
    #[arg(long)]
    pub smoke: bool,
}

impl CompareArgs {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.duration = Duration::from_secs(1);
            self.warmup = Duration::from_millis(300);
            self.keys = 2_000;
            self.rounds = 1;
            self.scale_groups = self.scale_groups.min(2);
            self.put_clients = vec![1, 8];
            self.get_clients = vec![8];
            self.ycsb = vec![Workload::YcsbF];
        }
    }
}

/// One row of the matrix.
#[derive(Debug, Clone)]
struct Row {
    workload: Workload,
    clients: usize,
    key_dist: KeyDist,
}

impl Row {
    fn connections(&self) -> usize {
        self.clients.clamp(1, 8)
    }

    fn label(&self) -> String {
        let w = match self.workload {
            Workload::Put => "put".to_string(),
            Workload::Get => "get (linearizable)".to_string(),
            other => format!("{other:?}").to_lowercase().replace("ycsb", "ycsb-"),
        };
        let dist = match self.key_dist {
            KeyDist::Uniform => "",
            KeyDist::Zipfian => ", zipfian",
        };
        format!("{w}{dist}")
    }
}

/// A running cluster under test.
struct Cluster {
    name: String,
    kind: BackendKind,
    endpoints: Vec<String>,
    nodes: Nodes,
    dirs: Vec<PathBuf>,
}

/// Process-level numbers of one node.
#[derive(Debug, Clone, Default)]
struct ProcStats {
    rss_bytes: u64,
    write_bytes: u64,
    disk_bytes: u64,
}

impl Cluster {
    fn proc_stats(&self) -> Vec<ProcStats> {
        self.nodes
            .children
            .iter()
            .zip(&self.dirs)
            .map(|((_, child), dir)| ProcStats {
                rss_bytes: proc_field(child.id(), "status", "VmRSS:").map_or(0, |kib| kib * 1024),
                write_bytes: proc_field(child.id(), "io", "write_bytes:").unwrap_or(0),
                disk_bytes: allocated_bytes(dir),
            })
            .collect()
    }

    fn bench_args(&self, args: &CompareArgs, row: &Row) -> BenchArgs {
        BenchArgs {
            backend: self.kind,
            endpoints: self.endpoints.clone(),
            workload: row.workload,
            clients: row.clients,
            connections: row.connections(),
            rate: 0,
            duration: args.duration,
            warmup: args.warmup,
            keys: args.keys,
            value_size: args.value_size,
            key_dist: row.key_dist,
            preload: Some(false),
            consistency: Level::Linearizable,
            seed: 1,
            json: None,
        }
    }
}

/// A numeric field of `/proc/PID/FILE` (the first number after `prefix`).
fn proc_field(pid: u32, file: &str, prefix: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(prefix))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Bytes allocated on disk by the files under `dir` (what `du` reports).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

async fn start_palisade(
    name: &str,
    exe: &Path,
    root: &Path,
    logs: &Path,
    first_port: u16,
    groups: u64,
) -> anyhow::Result<Cluster> {
    let addrs: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", first_port + i))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Nodes {
        children: Vec::new(),
    };
    let mut dirs = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let dir = root.join(format!("{name}-{id}"));
        std::fs::create_dir_all(&dir)?;
        let cmd = start_command(exe, id, addr, &peers, &dir, groups);
        let child = spawn_child(cmd, &logs.join(format!("{name}-{id}.log")))
            .with_context(|| format!("cannot start {name} node {id}"))?;
        nodes.children.push((id, child));
        dirs.push(dir);
    }
    wait_ready(&addrs, 3, &mut nodes)
        .await
        .with_context(|| format!("{name} did not come up (logs in {})", logs.display()))?;
    Ok(Cluster {
        name: name.to_string(),
        kind: BackendKind::Palisade,
        endpoints: addrs,
        nodes,
        dirs,
    })
}

async fn start_etcd(
    etcd: &Path,
    root: &Path,
    logs: &Path,
    first_port: u16,
) -> anyhow::Result<Cluster> {
    let client = |i: u16| format!("http://127.0.0.1:{}", first_port + i);
    let peer = |i: u16| format!("http://127.0.0.1:{}", first_port + 10 + i);
    let initial = (0..3)
        .map(|i| format!("e{}={}", i + 1, peer(i)))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Nodes {
        children: Vec::new(),
    };
    let mut dirs = Vec::new();
    for i in 0..3u16 {
        let name = format!("e{}", i + 1);
        let dir = root.join(format!("etcd-{}", i + 1));
        let mut cmd = Command::new(etcd);
        cmd.args(["--name", &name])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &client(i)])
            .args(["--advertise-client-urls", &client(i)])
            .args(["--listen-peer-urls", &peer(i)])
            .args(["--initial-advertise-peer-urls", &peer(i)])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "palisade-bench"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let child =
            spawn_child(cmd, &logs.join(format!("etcd-{}.log", i + 1))).with_context(|| {
                format!(
                    "cannot run {} (install it with `apt-get install etcd-server`, \
                     or pass --etcd PATH)",
                    etcd.display()
                )
            })?;
        nodes.children.push((u64::from(i) + 1, child));
        dirs.push(dir);
    }
    let endpoints: Vec<String> = (0..3).map(client).collect();
    // Connecting finds the leader, waiting for the first election.
    Backend::connect(BackendKind::Etcd, &endpoints, 1, Duration::from_secs(10))
        .await
        .with_context(|| format!("etcd did not come up (logs in {})", logs.display()))?;
    Ok(Cluster {
        name: "etcd".into(),
        kind: BackendKind::Etcd,
        endpoints,
        nodes,
        dirs,
    })
}

fn version_of(cmd: &Path) -> String {
    Command::new(cmd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_string(), |s| s.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "cpu": model, "cpus": cpus,
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "description": format!("{cpus} × {model}, {:.0} GiB RAM, Linux {kernel}; clients, 3 palisade and 3 etcd nodes on one machine over loopback, data on the same file system", mem_kib as f64 / 1048576.0),
    })
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_string())
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Mean over runs of a numeric field found at `path` in each result.
fn mean_of(runs: &[Value], path: &[&str]) -> f64 {
    let vals: Vec<f64> = runs
        .iter()
        .filter_map(|r| path.iter().try_fold(r, |v, k| v.get(*k)))
        .filter_map(Value::as_f64)
        .collect();
    mean(&vals)
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

pub async fn run(mut args: CompareArgs) -> anyhow::Result<ExitCode> {
    if !cfg!(feature = "etcd") {
        bail!(
            "this palisade was built without etcd support; run scripts/bench-compare.sh \
             (installs etcd and protoc, builds with `--features etcd`)"
        );
    }
    args.apply_smoke();
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if u32::from(args.base_port) + 40 > 65_535 {
        bail!("--base-port {} leaves no room for 40 ports", args.base_port);
    }
    let exe = std::env::current_exe().context("cannot find the palisade binary")?;
    std::fs::create_dir_all(&args.out)?;
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let temp = tempfile::Builder::new()
        .prefix("palisade-compare-")
        .tempdir()?;
    let root = temp.path();

    eprintln!("starting 3-node palisade ({} data groups)…", args.groups);
    let mut clusters = vec![
        start_palisade(
            &format!("palisade-{}g", args.groups),
            &exe,
            root,
            &logs,
            args.base_port,
            args.groups,
        )
        .await?,
    ];
    if args.scale_groups > 0 && args.scale_groups != args.groups {
        eprintln!(
            "starting 3-node palisade ({} data groups)…",
            args.scale_groups
        );
        clusters.push(
            start_palisade(
                &format!("palisade-{}g", args.scale_groups),
                &exe,
                root,
                &logs,
                args.base_port + 10,
                args.scale_groups,
            )
            .await?,
        );
    }
    eprintln!("starting 3-node etcd ({})…", version_of(&args.etcd));
    clusters.push(start_etcd(&args.etcd, root, &logs, args.base_port + 20).await?);

    // Preload the same keys everywhere, then measure memory and disk.
    let mut footprint = Vec::new();
    for c in &clusters {
        let preload_args = c.bench_args(
            &args,
            &Row {
                workload: Workload::Put,
                clients: 64,
                key_dist: KeyDist::Uniform,
            },
        );
        let backend =
            Backend::connect(c.kind, &c.endpoints, 8, palisade_bench::REQUEST_TIMEOUT).await?;
        eprintln!("preloading {} keys into {}…", args.keys, c.name);
        let took = palisade_bench::preload_keys(&preload_args, backend).await?;
        let stats = c.proc_stats();
        let rss = mean(&stats.iter().map(|s| s.rss_bytes as f64).collect::<Vec<_>>());
        let disk = mean(
            &stats
                .iter()
                .map(|s| s.disk_bytes as f64)
                .collect::<Vec<_>>(),
        );
        footprint.push(json!({
            "system": c.name, "preload_s": took.as_secs_f64(),
            "rss_bytes_per_node": rss, "disk_bytes_per_node": disk,
            "disk_bytes_per_key": disk / args.keys as f64,
            "nodes": stats.iter().map(|s| json!({"rss_bytes": s.rss_bytes, "disk_bytes": s.disk_bytes})).collect::<Vec<_>>(),
        }));
    }

    let mut rows: Vec<Row> = Vec::new();
    for &c in &args.put_clients {
        rows.push(Row {
            workload: Workload::Put,
            clients: c,
            key_dist: KeyDist::Uniform,
        });
    }
    for &c in &args.get_clients {
        rows.push(Row {
            workload: Workload::Get,
            clients: c,
            key_dist: KeyDist::Uniform,
        });
    }
    for &w in &args.ycsb {
        rows.push(Row {
            workload: w,
            clients: 64,
            key_dist: KeyDist::Zipfian,
        });
    }

    // runs[row][cluster] = results of each round.
    let mut runs: Vec<Vec<Vec<Value>>> = vec![vec![Vec::new(); clusters.len()]; rows.len()];
    for (ri, row) in rows.iter().enumerate() {
        for round in 0..args.rounds {
            for (ci, c) in clusters.iter().enumerate() {
                // The extra palisade cluster runs only the put rows.
                if ci > 0 && c.kind == BackendKind::Palisade && row.workload != Workload::Put {
                    continue;
                }
                eprintln!(
                    "== {} · {} clients · {} · round {}/{}",
                    row.label(),
                    row.clients,
                    c.name,
                    round + 1,
                    args.rounds
                );
                let bench = c.bench_args(&args, row);
                let backend = Backend::connect(
                    c.kind,
                    &c.endpoints,
                    bench.connections,
                    palisade_bench::REQUEST_TIMEOUT,
                )
                .await?;
                let before = c.proc_stats();
                let mut r = palisade_bench::run_with(bench, backend).await?;
                let after = c.proc_stats();
                let written: u64 = after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| a.write_bytes.saturating_sub(b.write_bytes))
                    .sum();
                let writes = r["writes"].as_u64().unwrap_or(0);
                r["system"] = json!(c.name);
                r["round"] = json!(round);
                r["os_bytes_written_per_write"] = if writes > 0 {
                    json!(written as f64 / writes as f64)
                } else {
                    Value::Null
                };
                r["processes"] = json!(
                    after
                        .iter()
                        .map(|s| json!({"rss_bytes": s.rss_bytes, "disk_bytes": s.disk_bytes}))
                        .collect::<Vec<_>>()
                );
                runs[ri][ci].push(r);
            }
        }
    }

    // A run that did nothing, or mostly failed, makes the table meaningless.
    for r in runs.iter().flatten().flatten() {
        let ops = r["ops"].as_u64().unwrap_or(0);
        let failed = r["errors"].as_u64().unwrap_or(0) + r["timeouts"].as_u64().unwrap_or(0);
        if ops == 0 || failed > ops / 10 {
            bail!(
                "run {} / {} / {} clients completed {ops} operations with {failed} failures; \
                 see the logs in {}",
                r["system"].as_str().unwrap_or("?"),
                r["workload"].as_str().unwrap_or("?"),
                r["clients"],
                logs.display()
            );
        }
    }

    let etcd_index = clusters.len() - 1;
    let mut table_rows = Vec::new();
    let mut md = String::new();
    md.push_str("| workload | clients | palisade groups | palisade ops/s | etcd ops/s | × | palisade p50 ms | etcd p50 ms | × | palisade p99 ms | etcd p99 ms | × | palisade fsyncs/write | etcd fsyncs/write | palisade bytes written/write | etcd bytes written/write |\n");
    md.push_str(
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (ri, row) in rows.iter().enumerate() {
        let e = &runs[ri][etcd_index];
        for (ci, c) in clusters.iter().enumerate().take(etcd_index) {
            let p = &runs[ri][ci];
            if p.is_empty() {
                continue;
            }
            let m = |runs: &[Value], path: &[&str]| mean_of(runs, path);
            let (pt, et) = (m(p, &["throughput_ops_s"]), m(e, &["throughput_ops_s"]));
            let (p50, e50) = (
                m(p, &["latency", "p50_us"]) / 1000.0,
                m(e, &["latency", "p50_us"]) / 1000.0,
            );
            let (p99, e99) = (
                m(p, &["latency", "p99_us"]) / 1000.0,
                m(e, &["latency", "p99_us"]) / 1000.0,
            );
            let (pf, ef) = (m(p, &["fsyncs_per_write"]), m(e, &["fsyncs_per_write"]));
            let (pw, ew) = (
                m(p, &["os_bytes_written_per_write"]),
                m(e, &["os_bytes_written_per_write"]),
            );
            let groups = c.name.trim_start_matches("palisade-");
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.label(),
                row.clients,
                groups,
                num(pt, 0),
                num(et, 0),
                ratio(pt, et),
                num(p50, 2),
                num(e50, 2),
                ratio(p50, e50),
                num(p99, 2),
                num(e99, 2),
                ratio(p99, e99),
                num(pf, 2),
                num(ef, 2),
                num(pw, 0),
                num(ew, 0),
            ));
            table_rows.push(json!({
                "workload": row.label(), "clients": row.clients, "palisade": c.name,
                "palisade_ops_s": pt, "etcd_ops_s": et, "throughput_ratio": pt / et,
                "palisade_p50_ms": p50, "etcd_p50_ms": e50,
                "palisade_p99_ms": p99, "etcd_p99_ms": e99,
                "palisade_fsyncs_per_write": pf, "etcd_fsyncs_per_write": ef,
                "palisade_bytes_written_per_write": pw, "etcd_bytes_written_per_write": ew,
            }));
        }
    }
    md.push_str("\nAfter preloading the keys (mean per node):\n\n| system | RSS MiB | on disk MiB | disk bytes per key | preload s |\n|---|---:|---:|---:|---:|\n");
    for f in &footprint {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            f["system"].as_str().unwrap_or(""),
            num(
                f["rss_bytes_per_node"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                1
            ),
            num(
                f["disk_bytes_per_node"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                1
            ),
            num(f["disk_bytes_per_key"].as_f64().unwrap_or(f64::NAN), 0),
            num(f["preload_s"].as_f64().unwrap_or(f64::NAN), 1),
        ));
    }
    let machine = machine();
    let header = format!(
        "{} — {} keys, {} B values, {} s runs after {} s warm-up, {} round(s) per system, alternating; {}; {}\n\n",
        today(),
        args.keys,
        args.value_size,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.rounds,
        version_of(&args.etcd),
        machine["description"].as_str().unwrap_or("")
    );
    let table = format!("{header}{md}");
    println!("\n{table}");
    std::fs::write(args.out.join("table.md"), &table)?;

    // Charts.
    let put_rows: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.workload == Workload::Put)
        .map(|(i, _)| i)
        .collect();
    let series: Vec<Series> = clusters
        .iter()
        .enumerate()
        .map(|(ci, c)| Series {
            name: c.name.clone(),
            points: put_rows
                .iter()
                .map(|&ri| {
                    (
                        rows[ri].clients as f64,
                        mean_of(&runs[ri][ci], &["throughput_ops_s"]),
                    )
                })
                .filter(|(_, y)| y.is_finite())
                .collect(),
        })
        .collect();
    let svg = line_chart(
        &format!(
            "put throughput, {} B values, {} keys",
            args.value_size, args.keys
        ),
        &Axis {
            label: "concurrent clients".into(),
            log: true,
        },
        &Axis {
            label: "acknowledged puts per second".into(),
            log: false,
        },
        &series,
    );
    std::fs::write(args.out.join("throughput.svg"), svg)?;
    let mut charts = vec!["throughput.svg".to_string()];
    for (ri, row) in rows.iter().enumerate() {
        let series: Vec<Series> = clusters
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| {
                let cdf = runs[ri][ci].first()?["latency"]["cdf"].as_array()?.clone();
                Some(Series {
                    name: c.name.clone(),
                    points: cdf
                        .iter()
                        .filter_map(|p| Some((p[1].as_f64()? / 1000.0, p[0].as_f64()? * 100.0)))
                        .collect(),
                })
            })
            .collect();
        let file = format!(
            "latency-{}-{}.svg",
            row.label()
                .replace([' ', ',', '(', ')'], "-")
                .replace("--", "-")
                .trim_end_matches('-'),
            row.clients
        );
        let svg = line_chart(
            &format!("{} latency CDF, {} clients", row.label(), row.clients),
            &Axis {
                label: "latency (ms)".into(),
                log: true,
            },
            &Axis {
                label: "percent of operations at or below".into(),
                log: false,
            },
            &series,
        );
        std::fs::write(args.out.join(&file), svg)?;
        charts.push(file);
    }

    let results = json!({
        "date": today(),
        "machine": machine,
        "etcd_version": version_of(&args.etcd),
        "palisade_version": env!("CARGO_PKG_VERSION"),
        "settings": {
            "keys": args.keys, "value_size": args.value_size,
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(),
            "rounds": args.rounds, "groups": args.groups, "scale_groups": args.scale_groups,
            "smoke": args.smoke,
        },
        "footprint": footprint,
        "table": table_rows,
        "charts": charts,
        "runs": runs.iter().flatten().flatten().collect::<Vec<_>>(),
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    eprintln!(
        "wrote {}/results.json, table.md and {} charts",
        args.out.display(),
        charts.len()
    );
    for mut c in clusters {
        c.nodes.stop();
    }
    Ok(ExitCode::SUCCESS)
}
