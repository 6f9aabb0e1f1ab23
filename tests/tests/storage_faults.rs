//! Storage faults against real node processes: what a damaged disk must
//! never cost (an acknowledged write) and how the cluster recovers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palisade_client::{Client, proto as pb};
use palisade_tests::{ClusterOptions, TestCluster};

const DATA_GROUP: u64 = 1;

/// The leader of `group` in `s`, and the other voters.
fn leader_and_followers(s: &pb::ClusterStatusResponse, group: u64) -> (u64, Vec<u64>) {
    let g = s
        .groups
        .iter()
        .find(|g| g.group_id == group)
        .expect("the group is in the status");
    let followers = g
        .replicas
        .iter()
        .map(|r| r.node_id)
        .filter(|n| *n != g.leader_id)
        .collect();
    (g.leader_id, followers)
}

/// The newest write-ahead log segment in node `id`'s data directory.
fn newest_segment(cluster: &TestCluster, id: u64) -> PathBuf {
    let dir = cluster
        .dir()
        .join(format!("node-{id}"))
        .join("db")
        .join("wal");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("wal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

/// Flips 4 bytes at every place `needle` occurs in `path`; returns how many.
fn flip_at(path: &Path, needle: &[u8]) -> usize {
    let mut data = std::fs::read(path).expect("read segment");
    let hits: Vec<usize> = data
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    for &at in &hits {
        for b in &mut data[at..at + 4] {
            *b ^= 0xff;
        }
    }
    std::fs::write(path, &data).expect("write segment");
    hits.len()
}

/// Issue 14's first reproduction. A follower's newest log segment gets a
/// flipped record among entries only it and the (then crashed) leader had
/// acknowledged; a lagging follower wakes up. Cutting the log at the bad
/// record and voting with what is left would elect a leader without those
/// writes. The damaged replica must instead abstain until the old leader
/// is back and has re-sent them: nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_record_in_the_newest_log_segment_costs_no_acknowledged_write() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let value = |i: u32| format!("value-{i}-{}", "x".repeat(100));
    for i in 0..1000u32 {
        client
            .put(format!("old-{i:04}"), value(i))
            .await
            .expect("put before the faults");
    }
    let status = cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(30))
        .await;
    let (leader, followers) = leader_and_followers(&status, DATA_GROUP);
    let (lagging, damaged) = (followers[0], followers[1]);
    eprintln!("ROLES leader={leader} lagging={lagging} damaged={damaged}");

    // Acknowledged by the leader and `damaged` only.
    cluster.pause(lagging);
    for i in 0..300u32 {
        client
            .put(format!("new-{i:04}"), value(i))
            .await
            .expect("put with one follower paused");
    }
    cluster.kill(damaged);
    let segment = newest_segment(&cluster, damaged);
    let flipped = flip_at(&segment, b"new-0000");
    assert!(
        flipped >= 1,
        "the first new key is in {}",
        segment.display()
    );
    cluster.kill(leader);
    cluster.resume(lagging);
    cluster.restart(damaged);

    // Without the old leader, the damaged replica must not help elect
    // anyone (its log lost entries a majority counted on), nor lead.
    let window = Instant::now() + Duration::from_secs(8);
    let mut saw_quarantine = false;
    while Instant::now() < window {
        if let Some(s) = cluster.status().await {
            for g in &s.groups {
                for r in &g.replicas {
                    if r.node_id == damaged && !r.quarantine.is_empty() {
                        saw_quarantine = true;
                    }
                }
                if g.group_id == DATA_GROUP {
                    assert!(
                        g.leader_id != damaged && g.leader_id != lagging,
                        "group {} elected node {} while the only full copy was down: {g:#?}",
                        g.group_id,
                        g.leader_id
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        saw_quarantine,
        "node {damaged}'s damaged replica never reported its quarantine"
    );

    cluster.restart(leader);
    cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await;
    let client = cluster.client().await;
    let mut missing = Vec::new();
    for (prefix, n) in [("old", 1000u32), ("new", 300)] {
        for i in 0..n {
            let key = format!("{prefix}-{i:04}");
            let got = client.get(key.clone()).await.expect("get after recovery");
            let v = got
                .kv
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            if v.as_deref() != Some(value(i).as_str()) {
                missing.push(key);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    // The damaged replica is given its entries back and votes again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cluster.status().await;
        let healed = s.as_ref().is_some_and(|s| {
            s.groups.iter().all(|g| {
                g.replicas.len() == 3
                    && g.replicas.iter().all(|r| r.quarantine.is_empty())
                    && (g.group_id != DATA_GROUP || g.replicas.iter().all(|r| r.key_count == 1300))
            })
        });
        if healed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the damaged replica did not recover: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in 1..=3 {
        let log = std::fs::read_to_string(cluster.dir().join(format!("node-{id}.log")))
            .unwrap_or_default();
        assert!(!log.contains("panicked"), "node {id} panicked");
    }
}

/// Issue 14's second reproduction. A follower's data directory disappears
/// (a replaced disk, an operator's `rm -rf`) and the node is started again
/// under its old id: it would vote and count toward quorums without the
/// votes and log it promised to keep. It must refuse to start, saying what
/// to do; the cluster stays available, and the documented way back — remove
/// the node, join a new one — heals it with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_on_an_empty_data_directory_refuses_its_old_identity() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 2;
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    for i in 0..200u32 {
        client
            .put(format!("k-{i:04}"), format!("v{i}"))
            .await
            .expect("put");
    }
    // Every node has reported in: the map records its data directory.
    cluster
        .wait_map(
            "every node's incarnation recorded",
            Duration::from_secs(60),
            |_, m| m.nodes.iter().all(|n| n.incarnation != 0),
        )
        .await;
    let wiped = 3;
    cluster.kill(wiped);
    let dir = cluster.dir().join(format!("node-{wiped}"));
    std::fs::rename(&dir, cluster.dir().join(format!("node-{wiped}.lost"))).expect("move away");
    cluster.restart(wiped);
    let exit = cluster.wait_exit(wiped, Duration::from_secs(30));
    let log = cluster.node_log(wiped);
    assert!(
        exit.is_some_and(|s| !s.success()),
        "node {wiped} started on an empty data directory under its old id ({exit:?}); log:\n{log}"
    );
    assert!(
        log.contains("lost its state") && log.contains("node remove"),
        "the refusal says what happened and what to do; log:\n{log}"
    );

    // The survivors still serve, and a replacement heals the cluster.
    let live: Vec<String> = [1, 2].iter().map(|n| cluster.addr(*n)).collect();
    let client = Client::connect(live).await.expect("connect");
    client
        .put("after", "wipe")
        .await
        .expect("put after the wipe");
    // The meta leader may have been the wiped node: an operator retries a
    // `node remove` that timed out (it is idempotent).
    palisade_tests::eventually(Duration::from_secs(60), || client.drain_node(wiped, true)).await;
    cluster
        .wait_map(
            "the wiped node removed",
            Duration::from_secs(120),
            |_, m| {
                m.nodes
                    .iter()
                    .any(|n| n.id == wiped && n.state == pb::NodeState::Removed as i32)
            },
        )
        .await;
    cluster.join(4, &[]);
    cluster
        .wait_map(
            "every group on 3 voters again, with the new node",
            Duration::from_secs(120),
            |s, m| {
                let placed = m.groups.iter().filter(|g| g.id != 0).all(|g| {
                    g.replicas
                        .iter()
                        .filter(|r| r.role == pb::ReplicaRole::Voter as i32)
                        .count()
                        == 3
                });
                let on_new = m
                    .groups
                    .iter()
                    .any(|g| g.replicas.iter().any(|r| r.node_id == 4));
                let led = s.groups.iter().all(|g| g.leader_id != 0);
                placed && on_new && led
            },
        )
        .await;
    let client = Client::connect(
        [1, 2, 4]
            .iter()
            .map(|n| cluster.addr(*n))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("connect");
    for i in 0..200u32 {
        let got = client.get(format!("k-{i:04}")).await.expect("get");
        assert_eq!(
            got.kv.map(|kv| kv.value),
            Some(format!("v{i}").into_bytes()),
            "k-{i:04}"
        );
    }
}

/// Free bytes on the filesystem holding `path` (statvfs via `df`).
fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

/// Fills node `id`'s disk until `leave` bytes are free; returns the file.
fn fill_disk(cluster: &TestCluster, id: u64, leave: u64) -> PathBuf {
    let dir = cluster.dir().join(format!("node-{id}"));
    let path = dir.join("ballast");
    let size = free_bytes(&dir).saturating_sub(leave);
    let file = std::fs::File::create(&path).expect("ballast");
    // Written, not sparse: tmpfs counts written pages.
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = size;
    use std::io::Write;
    let mut w = std::io::BufWriter::new(file);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).expect("fill");
        left -= n as u64;
    }
    w.flush().expect("flush ballast");
    path
}

/// Issue 14's third reproduction. Every node's (small) disk fills up. The
/// groups must stay alive (no zombie, no candidates spinning), writes that
/// add data get RESOURCE_EXHAUSTED with a typed `DiskFull` detail, reads
/// and deletes keep working, and once space is freed writes go through
/// again without a restart. A single full follower costs nothing: the
/// others commit, and it catches up once freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_raises_an_alarm_not_a_zombie_and_clears_by_itself() {
    const MIB: u64 = 1024 * 1024;
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    opts.tmpfs_mb = Some(160);
    opts.extra_args = vec!["--disk-reserve-mb".into(), "48".into()];
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    for i in 0..100u32 {
        client.put(format!("k-{i:03}"), "v").await.expect("put");
    }
    let status = cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(30))
        .await;
    let (_, followers) = leader_and_followers(&status, DATA_GROUP);

    // One follower past the floor: it stores no new data, the other two
    // still commit.
    let one = fill_disk(&cluster, followers[0], 16 * MIB);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..20u32 {
        client
            .put(format!("minority-{i:02}"), "v")
            .await
            .expect("a write with one full follower");
    }
    std::fs::remove_file(&one).expect("free");

    // Every disk full.
    // Below the reserve (48 MiB) but above the floor where a follower
    // refuses new data (half the reserve): writes already in flight when
    // the alarm rose still commit, and nothing queues behind them.
    let ballast: Vec<PathBuf> = (1..=3)
        .map(|id| fill_disk(&cluster, id, 34 * MIB))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        match client.put("while-full", "v").await {
            Err(e) if e.code() == tonic::Code::ResourceExhausted => break e,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "writes were not refused with RESOURCE_EXHAUSTED on full disks: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let detail = palisade_client::disk_full_detail(&refusal).expect("a typed DiskFull detail");
    assert_eq!(detail.group_id, DATA_GROUP);
    assert!(
        !detail.node_ids.is_empty() && detail.node_ids.iter().all(|n| (1..=3).contains(n)),
        "the detail names the full nodes: {detail:?}"
    );
    // Reads and deletes go on; the groups keep their leaders.
    let got = client.get("k-001").await.expect("read while full");
    assert!(got.kv.is_some());
    client.delete("k-002").await.expect("delete while full");
    let s = cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(10))
        .await;
    let term_then = s.groups.iter().map(|g| g.term).max().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(10))
        .await;
    assert!(
        s.nodes.iter().all(|n| n.disk_full),
        "every node reports the alarm: {:?}",
        s.nodes
    );
    let term_now = s.groups.iter().map(|g| g.term).max().unwrap_or(0);
    assert!(
        term_now <= term_then + 1,
        "elections spin while the disks are full: term {term_then} -> {term_now}"
    );

    // Space freed: the alarm clears by itself and writes go through.
    for b in &ballast {
        std::fs::remove_file(b).expect("free");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.put("after-full", "v").await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "writes did not resume after space was freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    assert!(client.get("k-002").await.expect("get").kv.is_none());
    for id in 1..=3 {
        assert!(
            cluster.wait_exit(id, Duration::ZERO).is_none(),
            "node {id} exited"
        );
        let log = cluster.node_log(id);
        assert!(!log.contains("panicked"), "node {id} panicked");
    }
    // The follower that was full alone caught up.
    cluster
        .wait_caught_up(followers[0], Duration::from_secs(30))
        .await;
}

/// The damaged replica is the leader itself: it restarts with a shorter log
/// while a follower still holds what it lost. It must not come back as
/// leader of its old term (openraft restarts a replica that had won its
/// vote straight into leadership), or it would hand out the lost entries'
/// log ids again to new writes; the follower with the full log leads, and
/// every replica ends with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_leader_does_not_lead_again_with_what_it_lost() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    for i in 0..200u32 {
        client.put(format!("old-{i:04}"), "v").await.expect("put");
    }
    let status = cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(30))
        .await;
    let (leader, followers) = leader_and_followers(&status, DATA_GROUP);
    let lagging = followers[0];
    eprintln!("ROLES leader={leader} lagging={lagging}");
    cluster.pause(lagging);
    for i in 0..100u32 {
        client
            .put(format!("new-{i:04}"), "v")
            .await
            .expect("put with one follower paused");
    }
    cluster.kill(leader);
    let flipped = flip_at(&newest_segment(&cluster, leader), b"new-0000");
    assert!(flipped >= 1);
    cluster.restart(leader);
    cluster.resume(lagging);
    cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await;
    // New writes after the damage, then every write is on every replica.
    let client = cluster.client().await;
    for i in 0..50u32 {
        client
            .put(format!("after-{i:04}"), "v")
            .await
            .expect("put after");
    }
    for (prefix, n) in [("old", 200u32), ("new", 100), ("after", 50)] {
        for i in 0..n {
            let key = format!("{prefix}-{i:04}");
            let got = client.get(key.clone()).await.expect("get");
            assert!(got.kv.is_some(), "{key} lost");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cluster.status().await;
        let same = s.as_ref().is_some_and(|s| {
            s.groups
                .iter()
                .filter(|g| g.group_id == DATA_GROUP)
                .all(|g| {
                    g.replicas.len() == 3
                        && g.replicas
                            .iter()
                            .all(|r| r.key_count == 350 && r.quarantine.is_empty())
                })
        });
        if same {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas did not converge on every write: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in 1..=3 {
        assert!(
            !cluster.node_log(id).contains("panicked"),
            "node {id} panicked"
        );
    }
}
