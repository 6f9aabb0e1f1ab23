//! Versioned (MVCC) reads over gRPC on a real 3-node cluster: `at_revision`
//! returns exactly the historical state on every replica — after restarts,
//! after a snapshot install, after a whole-cluster restart — History lists
//! the retained versions, and compaction (manual and automatic) turns reads
//! below the compaction point into OUT_OF_RANGE naming the oldest revision.

use std::collections::BTreeMap;
use std::time::Duration;

use palisade_client::proto as pb;
use palisade_client::{ReadOptions, compacted_detail};
use palisade_tests::{ClusterOptions, TestCluster, palisade_bin};
use tonic::Code;

/// What every key held after each write: revision → key → value.
#[derive(Default)]
struct Model {
    states: BTreeMap<u64, BTreeMap<String, String>>,
}

impl Model {
    fn record(&mut self, revision: u64, key: &str, value: Option<&str>) {
        let mut state = self
            .states
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default();
        match value {
            Some(v) => state.insert(key.to_string(), v.to_string()),
            None => state.remove(key),
        };
        self.states.insert(revision, state);
    }

    /// The state as of `revision`: the last write at or below it.
    fn at(&self, revision: u64) -> BTreeMap<String, String> {
        self.states
            .range(..=revision)
            .next_back()
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }
}

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

/// Writes `n` puts and deletes (a fixed pattern) and records them.
async fn write_history(client: &palisade_client::Client, model: &mut Model, from: usize, n: usize) {
    for i in from..from + n {
        let key = KEYS[i % KEYS.len()];
        if i % 7 == 3 {
            let r = client.delete(key).await.unwrap();
            model.record(r.header.unwrap().revision, key, None);
        } else {
            let value = format!("v{i}");
            let r = client.put(key, value.clone()).await.unwrap();
            model.record(r.header.unwrap().revision, key, Some(&value));
        }
    }
}

async fn kv(cluster: &TestCluster, id: u64) -> pb::kv_client::KvClient<tonic::transport::Channel> {
    pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(id)))
        .await
        .unwrap()
}

fn at(key: &str, revision: u64) -> pb::GetRequest {
    pb::GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: pb::ReadConsistency::Stale as i32,
        at_revision: revision,
        ..Default::default()
    }
}

/// Checks every key at every revision in `revisions` on node `id`, which
/// must answer itself (versioned reads are served by any replica).
async fn check_node(cluster: &TestCluster, id: u64, model: &Model, revisions: &[u64]) {
    let mut kv = kv(cluster, id).await;
    for &rev in revisions {
        let want = model.at(rev);
        for key in KEYS {
            let resp = kv.get(at(key, rev)).await.unwrap().into_inner();
            let h = resp.header.unwrap();
            assert_eq!(
                (h.node_id, h.revision),
                (id, rev),
                "served locally at {rev}"
            );
            let got = resp.kv.map(|kv| String::from_utf8(kv.value).unwrap());
            assert_eq!(
                got.as_deref(),
                want.get(key).map(String::as_str),
                "node {id}: {key} at revision {rev}"
            );
        }
        // A scan at the revision sees the same state.
        let scan = kv
            .scan(pb::ScanRequest {
                key: b"k".to_vec(),
                prefix: true,
                group_id: 1,
                at_revision: rev,
                consistency: pb::ReadConsistency::Stale as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got: BTreeMap<String, String> = scan
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8(kv.key).unwrap(),
                    String::from_utf8(kv.value).unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "node {id}: scan at {rev}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_revision_reads_exact_history_across_restarts_snapshots_and_compaction() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    opts.snapshot_every = Some(15);
    opts.keep_logs = Some(3);
    opts.extra_args = vec!["--history-retention".into(), "0".into()];
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let mut model = Model::default();
    write_history(&client, &mut model, 0, 30).await;

    // Node 3 misses the next writes; the leader snapshots and purges its log,
    // so node 3 catches up by installing a snapshot, history included.
    let victim = 3;
    cluster.kill(victim);
    let client = cluster.client().await;
    write_history(&client, &mut model, 30, 40).await;
    cluster.restart(victim);
    let status = cluster
        .wait_caught_up(victim, Duration::from_secs(60))
        .await;
    let replica = status.groups[1]
        .replicas
        .iter()
        .find(|r| r.node_id == victim)
        .unwrap();
    assert!(
        replica.snapshots_installed >= 1,
        "node {victim} should have caught up by snapshot: {replica:?}"
    );
    let revisions: Vec<u64> = model.states.keys().copied().collect();
    let last = *revisions.last().unwrap();
    for id in 1..=3 {
        check_node(&cluster, id, &model, &revisions).await;
    }

    // History lists every version of a key, tombstones included.
    let history = client.history("k3", ReadOptions::default()).await.unwrap();
    let mut expected = Vec::new();
    let mut prev: Option<String> = None;
    for (rev, state) in &model.states {
        let now = state.get("k3").cloned();
        if now != prev {
            expected.push((*rev, now.clone()));
        }
        prev = now;
    }
    let got: Vec<(u64, Option<String>)> = history
        .versions
        .iter()
        .map(|v| {
            let value =
                v.kv.as_ref()
                    .filter(|_| !v.deleted)
                    .map(|kv| String::from_utf8(kv.value.clone()).unwrap());
            (v.revision, value)
        })
        .collect();
    assert_eq!(got, expected, "History of k3");
    assert!(got.iter().any(|(_, v)| v.is_none()), "k3 has tombstones");

    // Whole-cluster restart: history is durable.
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.restart(id);
    }
    cluster
        .wait_for_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await;
    let client = cluster.client().await;
    // A write after the restart makes every replica apply the old log again.
    write_history(&client, &mut model, 70, 1).await;
    for id in 1..=3 {
        cluster.wait_caught_up(id, Duration::from_secs(30)).await;
        check_node(&cluster, id, &model, &revisions).await;
    }

    // Compaction: below the point → OUT_OF_RANGE naming the oldest revision
    // on every replica; at or above it, still exact.
    let point = revisions[revisions.len() / 2];
    assert_eq!(client.compact(1, point).await.unwrap(), point);
    let newest = *model.states.keys().next_back().unwrap();
    for id in 1..=3 {
        cluster.wait_caught_up(id, Duration::from_secs(30)).await;
        let mut kv = kv(&cluster, id).await;
        let err = kv.get(at("k1", point - 1)).await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        let detail = compacted_detail(&palisade_client::Error::Status(err.clone())).unwrap();
        assert_eq!(
            (detail.requested_revision, detail.oldest_revision),
            (point - 1, point)
        );
        assert!(
            err.message()
                .contains(&format!("oldest readable revision is {point}"))
        );
        let later: Vec<u64> = revisions.iter().copied().filter(|r| *r >= point).collect();
        check_node(&cluster, id, &model, &later).await;
    }
    // Compacting again at or below the point, or past the newest revision.
    let err = client.compact(1, point).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    let err = client.compact(1, newest + 1_000).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    let err = client.compact(7, 10).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    // A read in the future waits a bounded time, then OUT_OF_RANGE at the
    // leader (UNAVAILABLE when asked of a follower that cannot forward).
    let err = client
        .get_with("k1", ReadOptions::at_revision(newest + 1_000))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::Unavailable),
        "{err}"
    );
    assert!(last < newest + 1_000);

    // The CLI: get --at-revision, history, cluster compact.
    let endpoints = cluster.endpoints().join(",");
    let rev = revisions[revisions.len() - 2];
    let want = model.at(rev).get("k2").cloned().unwrap_or_default();
    let out = std::process::Command::new(palisade_bin())
        .args(["get", "k2", "--at-revision", &rev.to_string()])
        .args(["--endpoints", &endpoints])
        .output()
        .unwrap();
    if want.is_empty() {
        assert!(!out.status.success());
    } else {
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
    }
    let out = std::process::Command::new(palisade_bin())
        .args(["history", "k2", "--endpoints", &endpoints])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("REVISION"), "{text}");
    let out = std::process::Command::new(palisade_bin())
        .args(["cluster", "compact", "1", &(point + 1).to_string()])
        .args(["--endpoints", &endpoints])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new(palisade_bin())
        .args(["get", "k2", "--at-revision", &point.to_string()])
        .args(["--endpoints", &endpoints])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("compacted"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_compacted_automatically_past_the_retention_window() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    opts.extra_args = vec!["--history-retention".into(), "20".into()];
    let cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let first = client
        .put("hot", "0")
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    let mut revisions = vec![first];
    for i in 1..80 {
        revisions.push(
            client
                .put("hot", i.to_string())
                .await
                .unwrap()
                .header
                .unwrap()
                .revision,
        );
    }
    let last = revisions[79];
    // The leader compacts within about a second of the window filling up.
    let (status, _) = palisade_tests::eventually(Duration::from_secs(20), || async {
        let s = cluster
            .status()
            .await
            .ok_or_else(|| "no status".to_string())?;
        let ok = s.groups[1]
            .replicas
            .iter()
            .all(|r| r.compact_revision + 22 >= last && r.compact_revision > first);
        if ok {
            Ok(s)
        } else {
            Err(format!("{:?}", s.groups[1]))
        }
    })
    .await;
    let point = status.groups[1].replicas[0].compact_revision;
    let err = client
        .get_with("hot", ReadOptions::at_revision(first))
        .await
        .unwrap_err();
    let detail = compacted_detail(&err).expect("a Compacted detail");
    assert_eq!(detail.oldest_revision, point);
    // Inside the window, history is still there.
    let r = client
        .get_with("hot", ReadOptions::at_revision(revisions[74]))
        .await
        .unwrap();
    assert_eq!(r.kv.unwrap().value, b"74");
    let history = client.history("hot", ReadOptions::default()).await.unwrap();
    assert!(
        history.versions.len() <= 25 && history.versions.len() >= 5,
        "{} versions retained",
        history.versions.len()
    );
    assert!(
        status.groups[1]
            .replicas
            .iter()
            .all(|r| r.history_records <= 25),
        "{:?}",
        status.groups[1]
    );
}

/// Concurrent writers share Raft entries (proposal batching), never a
/// key's revision: 48 concurrent puts to distinct keys all land with the
/// revision their receipts name, 24 concurrent puts to one key get 24
/// distinct revisions and History lists 24 versions, and every node agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_batched_without_sharing_a_keys_revision() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..48 {
        let c = client.clone();
        tasks.spawn(async move {
            let key = format!("spread-{i}");
            let r = c.put(key.clone(), format!("v{i}")).await.unwrap();
            (key, format!("v{i}"), r.header.unwrap().revision)
        });
    }
    for i in 0..24 {
        let c = client.clone();
        tasks.spawn(async move {
            let r = c.put("hot", format!("h{i}")).await.unwrap();
            (
                "hot".to_string(),
                format!("h{i}"),
                r.header.unwrap().revision,
            )
        });
    }
    let mut writes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        writes.push(r.unwrap());
    }
    let hot: Vec<&(String, String, u64)> = writes.iter().filter(|w| w.0 == "hot").collect();
    let hot_revisions: std::collections::BTreeSet<u64> = hot.iter().map(|w| w.2).collect();
    assert_eq!(
        hot_revisions.len(),
        24,
        "writes to one key need distinct revisions"
    );
    let spread_revisions: std::collections::BTreeSet<u64> = writes
        .iter()
        .filter(|w| w.0 != "hot")
        .map(|w| w.2)
        .collect();
    eprintln!(
        "48 distinct-key puts landed at {} distinct revisions",
        spread_revisions.len()
    );

    for w in writes.iter().filter(|w| w.0 != "hot") {
        let got = client
            .get_with(w.0.clone(), ReadOptions::at_revision(w.2))
            .await
            .unwrap()
            .kv
            .unwrap();
        assert_eq!(
            (got.value, got.mod_revision),
            (w.1.clone().into_bytes(), w.2)
        );
    }
    let history = client
        .history("hot", ReadOptions::linearizable())
        .await
        .unwrap()
        .versions;
    let listed: Vec<(u64, Vec<u8>)> = history
        .iter()
        .map(|v| (v.revision, v.kv.clone().unwrap().value))
        .collect();
    let mut want: Vec<(u64, Vec<u8>)> = hot
        .iter()
        .map(|w| (w.2, w.1.clone().into_bytes()))
        .collect();
    want.sort();
    assert_eq!(listed, want, "History of the hot key");

    // Every replica applied the same batches.
    let last = writes.iter().map(|w| w.2).max().unwrap();
    for id in 1..=3 {
        let node = palisade_client::Client::connect(vec![cluster.addr(id)])
            .await
            .unwrap();
        for w in writes.iter().filter(|w| w.0 != "hot").take(8) {
            let got = node
                .get_with(w.0.clone(), ReadOptions::at_revision(last))
                .await
                .unwrap()
                .kv
                .unwrap();
            assert_eq!(got.value, w.1.clone().into_bytes(), "node {id}");
        }
    }
}
