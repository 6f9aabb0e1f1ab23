//! Test harness: real `palisade` node processes on loopback.
//!
//! [`TestCluster`] starts node processes from the built `palisade` binary,
//! kills (`SIGKILL`) and restarts them, and waits for leaders and catch-up
//! through the public `ClusterStatus` API. Each cluster binds its own
//! loopback address `127.A.B.n` (A, B derived from the test process id and
//! a counter), so tests running in parallel, in one process or many, never
//! collide on ports. Dropping the cluster kills every process and removes
//! the data; when a test panics, the tail of every node's log is printed
//! first so CI failures can be diagnosed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palisade_client::{Client, proto as pb};

/// Port every test node listens on (each node has its own IP).
const PORT: u16 = 17_001;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// Where the `palisade` binary is: `$PALISADE_BIN`, or next to the running
/// executable (a binary in `target/<profile>/`), or one directory up (a test
/// in `target/<profile>/deps/`).
pub fn find_palisade_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PALISADE_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("palisade"), dir.parent()?.join("palisade")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Path of the `palisade` binary; panics with advice when it is missing.
pub fn palisade_bin() -> PathBuf {
    find_palisade_bin().unwrap_or_else(|| {
        panic!("the palisade binary is missing: build it first (`cargo test --workspace` builds it) or set PALISADE_BIN")
    })
}

/// Knobs for a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: u64,
    pub groups: u64,
    pub snapshot_every: Option<u64>,
    pub keep_logs: Option<u64>,
    /// Extra arguments for every `palisade start`.
    pub extra_args: Vec<String>,
    /// Read replicas started after the voters, with ids `nodes+1..`.
    pub learners: u64,
    /// Voters per data group (`--replicas`; default: the server's, 3).
    pub replicas: Option<u32>,
    /// Listen on `{prefix}.{id}:{port}` instead of a per-test address (a
    /// data directory from elsewhere remembers its peers' addresses).
    pub address: Option<(String, u16)>,
    /// Start node `id` from a copy of `{dir}/n{id}` (data directories
    /// written elsewhere, e.g. by an earlier version).
    pub seed_data: Option<PathBuf>,
    /// Give each node's data directory its own tmpfs of this many MiB (a
    /// small disk that can fill up; needs root).
    pub tmpfs_mb: Option<u64>,
}

impl ClusterOptions {
    pub fn new(nodes: u64) -> Self {
        Self {
            nodes,
            groups: 4,
            snapshot_every: None,
            keep_logs: None,
            extra_args: Vec::new(),
            learners: 0,
            replicas: None,
            address: None,
            seed_data: None,
            tmpfs_mb: None,
        }
    }
}

/// A cluster of real node processes.
pub struct TestCluster {
    /// tmpfs mounts to undo when the cluster goes.
    mounts: Vec<PathBuf>,
    dir: tempfile::TempDir,
    ip_prefix: String,
    port: u16,
    opts: ClusterOptions,
    procs: BTreeMap<u64, Child>,
    /// Nodes stopped with SIGSTOP.
    paused: std::collections::BTreeSet<u64>,
    /// Nodes started later with `--join` (voting nodes).
    joiners: std::collections::BTreeSet<u64>,
    /// Nodes gone for good (removed from the cluster): never restarted.
    retired: std::collections::BTreeSet<u64>,
}

impl TestCluster {
    /// Starts every node and waits until each group has a leader.
    pub async fn start(opts: ClusterOptions) -> TestCluster {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let h = (std::process::id().wrapping_mul(31).wrapping_add(n)) % 62_500;
        let (ip_prefix, port) = opts
            .address
            .clone()
            .unwrap_or_else(|| (format!("127.{}.{}", 1 + h / 250, h % 250), PORT));
        let dir = tempfile::Builder::new()
            .prefix("palisade-test-")
            .tempdir()
            .expect("tempdir");
        if let Some(seed) = &opts.seed_data {
            for id in 1..=opts.nodes {
                let status = Command::new("cp")
                    .arg("-a")
                    .arg(seed.join(format!("n{id}")))
                    .arg(dir.path().join(format!("node-{id}")))
                    .status()
                    .expect("cp");
                assert!(status.success(), "copying the seed data of node {id}");
            }
        }
        let mut mounts = Vec::new();
        if let Some(mb) = opts.tmpfs_mb {
            for id in 1..=opts.nodes {
                let at = dir.path().join(format!("node-{id}"));
                std::fs::create_dir_all(&at).expect("node dir");
                let status = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
                    .arg(&at)
                    .status()
                    .expect("run mount");
                assert!(
                    status.success(),
                    "mounting a {mb} MiB tmpfs at {} failed (this test needs root)",
                    at.display()
                );
                mounts.push(at);
            }
        }
        let mut cluster = TestCluster {
            mounts,
            dir,
            ip_prefix,
            port,
            opts,
            procs: BTreeMap::new(),
            paused: Default::default(),
            joiners: Default::default(),
            retired: Default::default(),
        };
        for id in 1..=cluster.opts.nodes {
            cluster.spawn(id);
        }
        let all: Vec<u64> = (1..=cluster.opts.nodes).collect();
        cluster
            .wait_for_leaders(&all, Duration::from_secs(60))
            .await;
        for id in cluster.learner_ids() {
            cluster.spawn(id);
        }
        for id in cluster.learner_ids() {
            cluster.wait_learner(id, Duration::from_secs(60)).await;
        }
        cluster
    }

    /// Ids of the read replicas.
    pub fn learner_ids(&self) -> Vec<u64> {
        (self.opts.nodes + 1..=self.opts.nodes + self.opts.learners).collect()
    }

    fn all_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = (1..=self.opts.nodes + self.opts.learners).collect();
        ids.extend(self.joiners.iter().copied());
        ids
    }

    /// Starts a new node `id` that joins the running cluster with
    /// `palisade start --join` (plus `extra` arguments), like an operator
    /// adding capacity. Its id must not be one of the bootstrap nodes'.
    pub fn join(&mut self, id: u64, extra: &[&str]) {
        assert!(
            id > self.opts.nodes + self.opts.learners,
            "node {id} is a bootstrap node"
        );
        self.joiners.insert(id);
        self.spawn_with(id, extra);
    }

    /// Waits until node `id` is a learner of every group and has caught up.
    pub async fn wait_learner(&self, id: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status().await {
                let joined = s.groups.iter().all(|g| {
                    g.replicas
                        .iter()
                        .any(|r| r.node_id == id && r.role == pb::RaftRole::Learner as i32)
                });
                if joined && s.groups.len() as u64 == self.opts.groups + 1 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not join as a learner within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.wait_caught_up(id, deadline.saturating_duration_since(Instant::now()))
            .await;
    }

    pub fn addr(&self, id: u64) -> String {
        format!("{}.{id}:{}", self.ip_prefix, self.port)
    }

    /// Node `id`'s own loopback IP (its peer traffic comes from it).
    pub fn ip(&self, id: u64) -> String {
        format!("{}.{id}", self.ip_prefix)
    }

    pub fn nodes(&self) -> u64 {
        self.opts.nodes
    }

    /// Where node logs and data live.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn endpoints(&self) -> Vec<String> {
        (1..=self.opts.nodes).map(|id| self.addr(id)).collect()
    }

    fn peers(&self) -> String {
        (1..=self.opts.nodes)
            .map(|id| format!("{id}={}", self.addr(id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    /// Starts node `id` (with its existing data, if any).
    pub fn spawn(&mut self, id: u64) {
        self.spawn_with(id, &[]);
    }

    fn spawn_with(&mut self, id: u64, extra: &[&str]) {
        assert!(
            !self.procs.contains_key(&id),
            "node {id} is already running"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("log file");
        let mut cmd = Command::new(palisade_bin());
        cmd.arg("start")
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.addr(id)]);
        if self.joiners.contains(&id) {
            cmd.args(["--join", &self.endpoints().join(",")]);
        } else if id > self.opts.nodes {
            cmd.arg("--learner")
                .args(["--join", &self.endpoints().join(",")]);
        } else {
            cmd.args(["--peers", &self.peers()]);
        }
        cmd.args(extra);
        if let Some(r) = self.opts.replicas {
            cmd.args(["--replicas", &r.to_string()]);
        }
        cmd.arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{id}")))
            .args(["--groups", &self.opts.groups.to_string()]);
        if let Some(n) = self.opts.snapshot_every {
            cmd.args(["--snapshot-every", &n.to_string()]);
        }
        if let Some(n) = self.opts.keep_logs {
            cmd.args(["--keep-logs", &n.to_string()]);
        }
        cmd.args(&self.opts.extra_args);
        cmd.env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only an async-signal-safe call between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    // A node must not outlive its test, even if the test
                    // process dies without running destructors.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn palisade node");
        self.procs.insert(id, child);
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) {
        let mut child = self
            .procs
            .remove(&id)
            .unwrap_or_else(|| panic!("node {id} is not running"));
        self.paused.remove(&id);
        let _ = child.kill();
        let _ = child.wait();
    }

    fn signal(&self, id: u64, sig: i32) {
        if let Some(child) = self.procs.get(&id) {
            // SAFETY: kill(2) on a child we have not reaped.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
    }

    /// SIGSTOP node `id` (a process pause: GC, VM freeze, swap storm).
    pub fn pause(&mut self, id: u64) {
        self.signal(id, libc::SIGSTOP);
        self.paused.insert(id);
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
        self.paused.remove(&id);
    }

    /// Resumes every paused node and restarts every killed one.
    pub fn heal_processes(&mut self) {
        for id in std::mem::take(&mut self.paused) {
            self.signal(id, libc::SIGCONT);
        }
        for id in self.all_ids() {
            if !self.procs.contains_key(&id) && !self.retired.contains(&id) {
                self.spawn(id);
            }
        }
    }

    /// Stops node `id` for good (it was removed from the cluster): it is
    /// never restarted by [`Self::heal_processes`].
    pub fn retire(&mut self, id: u64) {
        if self.procs.contains_key(&id) {
            if self.paused.contains(&id) {
                self.resume(id);
            }
            self.kill(id);
        }
        self.retired.insert(id);
    }

    /// Node `id`'s own loopback address, for any id (nodes that join later
    /// included).
    pub fn ip_of(&self, id: u64) -> String {
        self.ip(id)
    }

    /// Waits up to `timeout` for node `id`'s process to exit by itself;
    /// returns its exit status (and forgets the process), or `None` if it
    /// is still running.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.procs.get_mut(&id)?;
            if let Ok(Some(status)) = child.try_wait() {
                self.procs.remove(&id);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `id`'s log so far.
    pub fn node_log(&self, id: u64) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// Restarts a killed node on its own data directory.
    pub fn restart(&mut self, id: u64) {
        self.spawn(id);
    }

    pub fn running(&self) -> Vec<u64> {
        self.procs.keys().copied().collect()
    }

    /// A client over every node's address.
    pub async fn client(&self) -> Client {
        let live: Vec<String> = self.running().iter().map(|id| self.addr(*id)).collect();
        Client::connect(live).await.expect("connect client")
    }

    /// Waits until the cluster map (as the first answering node sees it)
    /// satisfies `done`; returns the status then. Panics after `timeout`
    /// with `what` and the last map.
    pub async fn wait_map(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&pb::ClusterStatusResponse, &pb::ClusterMap) -> bool,
    ) -> pb::ClusterStatusResponse {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status().await
                && let Some(map) = s.map.clone()
            {
                if done(&s, &map) {
                    return s;
                }
                last = Some(map);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{what}: not reached within {timeout:?}; last map: {last:#?}");
    }

    /// Cluster status as seen by the first running node that answers.
    pub async fn status(&self) -> Option<pb::ClusterStatusResponse> {
        // Every running node, the newest map wins: a drained node's map
        // stops where it was removed.
        let mut best: Option<pb::ClusterStatusResponse> = None;
        for id in self.running() {
            if self.paused.contains(&id) {
                continue;
            }
            let addr = format!("http://{}", self.addr(id));
            let call = async {
                let mut admin = pb::admin_client::AdminClient::connect(addr).await.ok()?;
                let r = admin
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await
                    .ok()?;
                Some(r.into_inner())
            };
            let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(3), call).await else {
                continue;
            };
            let epoch = |s: &pb::ClusterStatusResponse| s.map.as_ref().map_or(0, |m| m.epoch);
            if best.as_ref().is_none_or(|b| epoch(&s) > epoch(b)) {
                best = Some(s);
            }
        }
        best
    }

    /// Waits until every node in `alive` answers and every group has a
    /// leader among them that all of them acknowledge.
    pub async fn wait_for_leaders(
        &self,
        alive: &[u64],
        timeout: Duration,
    ) -> pb::ClusterStatusResponse {
        match self.try_wait_for_leaders(alive, timeout).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Self::wait_for_leaders`], but reports a timeout as an error.
    pub async fn try_wait_for_leaders(
        &self,
        alive: &[u64],
        timeout: Duration,
    ) -> Result<pb::ClusterStatusResponse, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(s) = self.status().await {
                let up = s
                    .nodes
                    .iter()
                    .filter(|n| n.reachable && alive.contains(&n.id))
                    .count();
                // Every group of the map (once there is one) has a leader
                // every live replica follows.
                let expected = s
                    .map
                    .as_ref()
                    .map_or(self.opts.groups + 1, |m| m.groups.len() as u64);
                let groups_ok = s.map.is_some()
                    && s.groups.len() as u64 == expected
                    && s.groups.iter().all(|g| {
                        alive.contains(&g.leader_id)
                            && g.replicas
                                .iter()
                                .filter(|r| alive.contains(&r.node_id))
                                .all(|r| {
                                    r.term == g.term && r.role != pb::RaftRole::Candidate as i32
                                })
                    });
                if up == alive.len() && groups_ok {
                    return Ok(s);
                }
                last = format!(
                    "{up}/{} up; leaders {:?}",
                    alive.len(),
                    s.groups.iter().map(|g| g.leader_id).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "no leader for every group among {alive:?} within {timeout:?}: {last}"
        ))
    }

    /// Waits until node `id` has applied, in every group, at least what the
    /// group's leader had committed when this call started.
    pub async fn wait_caught_up(&self, id: u64, timeout: Duration) -> pb::ClusterStatusResponse {
        let deadline = Instant::now() + timeout;
        let target: BTreeMap<u64, u64> = loop {
            if let Some(s) = self.status().await {
                let t: Option<BTreeMap<u64, u64>> = s
                    .groups
                    .iter()
                    .map(|g| {
                        g.replicas
                            .iter()
                            .find(|r| r.node_id == g.leader_id)
                            .map(|r| (g.group_id, r.commit_index))
                    })
                    .collect();
                if let Some(t) = t {
                    break t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader status within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        while Instant::now() < deadline {
            if let Some(s) = self.status().await {
                let done = s.groups.iter().all(|g| {
                    g.replicas
                        .iter()
                        .any(|r| r.node_id == id && r.applied_index >= target[&g.group_id])
                });
                if done {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("node {id} did not catch up to {target:?} within {timeout:?}");
    }

    fn dump_logs(&self) {
        for id in self.all_ids() {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- node {id} log (last 40 lines) -----");
            let keep = std::env::var("PALISADE_TEST_LOG_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(40);
            for line in &lines[lines.len().saturating_sub(keep)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for (id, mut child) in std::mem::take(&mut self.procs) {
            if self.paused.contains(&id) {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for at in std::mem::take(&mut self.mounts) {
            let _ = Command::new("umount").arg(&at).status();
        }
    }
}

/// Retries `f` until it succeeds or `timeout` passes; returns the value and
/// how long it took.
pub async fn eventually<T, E: std::fmt::Debug, F, Fut>(timeout: Duration, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return (v, start.elapsed()),
            Err(e) => {
                assert!(
                    start.elapsed() < timeout,
                    "still failing after {timeout:?}: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
