//! `palisade demo`: a whole local cluster in one command.
//!
//! Starts `--nodes` node processes (this same binary, `start`) on loopback
//! with data in a temporary directory (kept if `--data-dir` is given), waits
//! until every group has a leader, prints one client endpoint per line on
//! stdout (details go to stderr), and on Ctrl-C or SIGTERM stops the nodes
//! and removes the temporary data. Children die with the demo even if it is
//! killed (PR_SET_PDEATHSIG), so nothing is left running.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use palisade_client::Client;

#[derive(Args)]
pub struct DemoArgs {
    /// Number of nodes (1, 3, 5 or 7).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Port of node 1; node i listens on base-port + i - 1.
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Keep data here instead of in a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Data groups to create.
    #[arg(long, default_value_t = palisade_server::config::DEFAULT_DATA_GROUPS)]
    pub groups: u64,
    /// Read replicas (non-voting learners of every group) to add, with ids
    /// and ports after the voters'.
    #[arg(long, default_value_t = 0)]
    pub learners: u64,
}

pub(crate) struct Nodes {
    pub(crate) children: Vec<(u64, Child)>,
}

impl Nodes {
    /// SIGTERM everyone, give them a moment to flush, then SIGKILL.
    pub(crate) fn stop(&mut self) {
        for (_, child) in &self.children {
            // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn start_command(
    exe: &Path,
    id: u64,
    addr: &str,
    peers: &str,
    dir: &Path,
    groups: u64,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("start")
        .args(["--id", &id.to_string()])
        .args(["--listen", addr])
        .args(["--peers", peers])
        .arg("--data-dir")
        .arg(dir)
        .args(["--groups", &groups.to_string()]);
    cmd
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if ![1, 3, 5, 7].contains(&args.nodes) {
        bail!(
            "--nodes must be 1, 3, 5 or 7 (an odd count tolerates the most failures), got {}",
            args.nodes
        );
    }
    if args.learners > 4 {
        bail!("--learners must be at most 4, got {}", args.learners);
    }
    if u32::from(args.base_port) + (args.nodes + args.learners) as u32 > 65_536 {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    let exe = std::env::current_exe().context("cannot find the palisade binary")?;
    let (_temp, root) = match &args.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("palisade-demo-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(&root)?;
    let addrs: Vec<(u64, String)> = (1..=args.nodes + args.learners)
        .map(|i| {
            (
                i,
                format!("{}:{}", args.host, args.base_port as u64 + i - 1),
            )
        })
        .collect();
    let peers = addrs
        .iter()
        .take(args.nodes as usize)
        .map(|(i, a)| format!("{i}={a}"))
        .collect::<Vec<_>>()
        .join(",");

    let mut nodes = Nodes {
        children: Vec::new(),
    };
    let voter_endpoints: Vec<String> = addrs
        .iter()
        .take(args.nodes as usize)
        .map(|(_, a)| a.clone())
        .collect();
    for (id, addr) in &addrs {
        if *id == args.nodes + 1 {
            // Learners join a running cluster.
            if let Err(e) = wait_ready(&voter_endpoints, args.nodes, &mut nodes).await {
                eprintln!("cluster did not come up: {e:#}");
                return Ok(ExitCode::FAILURE);
            }
        }
        let dir = root.join(format!("node-{id}"));
        let log_path = root.join(format!("node-{id}.log"));
        let cmd = if *id > args.nodes {
            learner_command(&exe, *id, addr, &voter_endpoints.join(","), &dir)
        } else {
            start_command(&exe, *id, addr, &peers, &dir, args.groups)
        };
        let child =
            spawn_child(cmd, &log_path).with_context(|| format!("cannot start node {id}"))?;
        nodes.children.push((*id, child));
    }

    let endpoints: Vec<String> = addrs.iter().map(|(_, a)| a.clone()).collect();
    if let Err(e) = wait_ready(&endpoints, args.nodes + args.learners, &mut nodes).await {
        eprintln!("cluster did not come up: {e:#}");
        for (id, _) in &addrs {
            let log = root.join(format!("node-{id}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            eprintln!("--- last lines of {} ---", log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        return Ok(ExitCode::FAILURE);
    }

    for e in &endpoints {
        println!("{e}");
    }
    eprintln!();
    eprintln!(
        "palisade demo: {} nodes{}, {} data groups + the meta group, data in {}",
        args.nodes,
        if args.learners > 0 {
            format!(" + {} learners", args.learners)
        } else {
            String::new()
        },
        args.groups,
        root.display()
    );
    for ((id, child), (_, addr)) in nodes.children.iter().zip(&addrs) {
        eprintln!(
            "  node {id}: {addr}  pid {}  log {}{}",
            child.id(),
            root.join(format!("node-{id}.log")).display(),
            if *id > args.nodes { "  (learner)" } else { "" }
        );
    }
    eprintln!();
    eprintln!("try, in another terminal:");
    eprintln!("  palisade put greeting hello");
    eprintln!("  palisade get greeting");
    eprintln!("  palisade cluster status");
    eprintln!("  kill -9 <a pid above>   # the others elect new leaders and keep serving");
    eprintln!("restart a killed node with:");
    eprintln!(
        "  {}",
        format!(
            "{:?}",
            start_command(
                &exe,
                1,
                &addrs[0].1,
                &peers,
                &root.join("node-1"),
                args.groups
            )
        )
        .replace('"', "")
    );
    eprintln!("  (with its own --id, --listen and --data-dir)");
    let next = args.nodes + args.learners + 1;
    eprintln!("grow the cluster: start a node that joins it (the cluster moves replicas to it):");
    eprintln!(
        "  {} start --listen {}:{} --join {} --data-dir {}",
        exe.display(),
        args.host,
        args.base_port as u64 + next - 1,
        addrs[0].1,
        root.join(format!("node-{next}")).display()
    );
    eprintln!("  then `palisade node drain {next}` moves everything off it again");
    eprintln!(
        "Ctrl-C stops the cluster{}.",
        if args.data_dir.is_some() {
            ""
        } else {
            " and deletes its data"
        }
    );

    wait_for_stop().await;
    eprintln!("stopping…");
    nodes.stop();
    Ok(ExitCode::SUCCESS)
}

/// Spawns `cmd` with its output appended to `log_path`, in its own process
/// group (Ctrl-C reaches only the parent, which stops children in order),
/// and set to die with the parent.
pub(crate) fn spawn_child(mut cmd: Command, log_path: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

fn learner_command(exe: &Path, id: u64, addr: &str, join: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("start")
        .args(["--id", &id.to_string()])
        .args(["--listen", addr])
        .args(["--learner", "--join", join])
        .arg("--data-dir")
        .arg(dir);
    cmd
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits until every node answers and every group has a leader.
pub(crate) async fn wait_ready(
    endpoints: &[String],
    n: u64,
    nodes: &mut Nodes,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::from("no answer yet");
    while tokio::time::Instant::now() < deadline {
        for (id, child) in &mut nodes.children {
            if let Some(status) = child.try_wait()? {
                bail!("node {id} exited with {status}");
            }
        }
        if let Ok(client) = Client::connect(endpoints.to_vec()).await {
            match client.cluster_status().await {
                Ok(s) => {
                    let up = s.nodes.iter().filter(|n| n.reachable).count() as u64;
                    let led = s.groups.iter().filter(|g| g.leader_id != 0).count() as u64;
                    let total = u64::from(s.data_groups) + 1;
                    if up == n && led == total && s.groups.len() as u64 == total {
                        return Ok(());
                    }
                    last = format!("{up}/{n} nodes up, {led}/{total} groups with a leader");
                }
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not ready after 60 s: {last}")
}
