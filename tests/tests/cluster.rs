//! Multi-process cluster tests: real `palisade` nodes on loopback, driven
//! over gRPC through the client library and raw stubs.

use std::collections::BTreeMap;
use std::time::Duration;

use palisade_client::{Client, Error, proto as pb};
use palisade_tests::{ClusterOptions, TestCluster, eventually};
use tonic::Code;

const LONG: Duration = Duration::from_secs(60);

async fn must_put(client: &Client, key: &str, value: &str) -> pb::PutResponse {
    client
        .put(key, value)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

async fn must_get(client: &Client, key: &str) -> Option<String> {
    client
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .kv
        .map(|kv| String::from_utf8(kv.value).expect("utf8 value"))
}

/// Writes `n` keys `{prefix}-{i}` = `v{i}`; returns them.
async fn write_keys(client: &Client, prefix: &str, n: usize) -> BTreeMap<String, String> {
    let mut written = BTreeMap::new();
    for i in 0..n {
        let (k, v) = (format!("{prefix}-{i:04}"), format!("v{i}"));
        must_put(client, &k, &v).await;
        written.insert(k, v);
    }
    written
}

async fn assert_all_readable(client: &Client, keys: &BTreeMap<String, String>) {
    for (k, v) in keys {
        assert_eq!(
            must_get(client, k).await.as_deref(),
            Some(v.as_str()),
            "acknowledged write to {k} lost"
        );
    }
}

/// The node that leads the most groups (ties: lowest id).
fn busiest_leader(status: &pb::ClusterStatusResponse) -> u64 {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for g in &status.groups {
        *count.entry(g.leader_id).or_default() += 1;
    }
    count
        .into_iter()
        .max_by_key(|(id, c)| (*c, std::cmp::Reverse(*id)))
        .map(|(id, _)| id)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_serve_put_get_scan_txn_over_grpc() {
    let cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let client = cluster.client().await;

    // Put / get with revision metadata and a consistency receipt.
    let put = must_put(&client, "alpha", "1").await;
    let h = put.header.unwrap();
    assert!(h.revision > 0 && h.group_id >= 1 && h.node_id >= 1);
    let got = client.get("alpha").await.unwrap();
    let kv = got.kv.unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"1"[..], 1));
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (h.revision, h.revision)
    );
    assert_eq!(got.header.unwrap().group_id, h.group_id);
    let put2 = client
        .put_request(pb::PutRequest {
            key: b"alpha".to_vec(),
            value: b"2".to_vec(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(put2.prev_kv.unwrap().value, b"1");
    let kv = client.get("alpha").await.unwrap().kv.unwrap();
    assert_eq!((kv.version, kv.create_revision), (2, h.revision));
    assert!(kv.mod_revision > h.revision);

    // Every node answers every key (forwarding to each group's leader).
    for id in 1..=3 {
        let mut raw = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(id)))
            .await
            .unwrap();
        let r = raw
            .get(pb::GetRequest {
                key: b"alpha".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.kv.unwrap().value, b"2", "node {id}");
    }

    // Scan across groups: ordered, limited, prefix and range.
    for i in 0..30 {
        must_put(&client, &format!("scan/{i:02}"), &i.to_string()).await;
    }
    must_put(&client, "scan0", "outside the prefix").await;
    let all = client.scan_prefix("scan/", 0).await.unwrap();
    let keys: Vec<String> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    let want: Vec<String> = (0..30).map(|i| format!("scan/{i:02}")).collect();
    assert_eq!(keys, want);
    assert!(!all.more);
    assert!(
        all.group_headers.len() >= 2,
        "a hash-sharded scan consults every group"
    );
    let page = client.scan_prefix("scan/", 7).await.unwrap();
    assert_eq!(page.kvs.len(), 7);
    assert!(page.more);
    assert_eq!(page.kvs[6].key, b"scan/06");
    let range = client
        .scan(pb::ScanRequest {
            key: b"scan/10".to_vec(),
            range_end: b"scan/15".to_vec(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(range.kvs.len(), 5);
    assert!(range.kvs.iter().all(|kv| kv.value.is_empty()), "keys_only");

    // Txn: compare-and-swap both ways, and a multi-op transaction.
    let (ok, _) = client
        .compare_and_swap("alpha", Some(b"2".to_vec()), "3")
        .await
        .unwrap();
    assert!(ok);
    let (ok, resp) = client
        .compare_and_swap("alpha", Some(b"2".to_vec()), "4")
        .await
        .unwrap();
    assert!(!ok);
    match &resp.responses[0].response {
        Some(pb::response_op::Response::Get(g)) => assert_eq!(g.kv.as_ref().unwrap().value, b"3"),
        other => panic!("expected the failure branch's get, got {other:?}"),
    }
    let (ok, _) = client.compare_and_swap("fresh", None, "new").await.unwrap();
    assert!(ok);
    let (ok, _) = client
        .compare_and_swap("fresh", None, "again")
        .await
        .unwrap();
    assert!(!ok, "create-if-absent must fail on an existing key");
    assert_eq!(must_get(&client, "fresh").await.as_deref(), Some("new"));

    // Delete.
    let del = client.delete("fresh").await.unwrap();
    assert_eq!(del.deleted, 1);
    assert_eq!(must_get(&client, "fresh").await, None);
    assert_eq!(client.delete("fresh").await.unwrap().deleted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_precise_statuses_and_writes_nothing() {
    let cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let client = cluster.client().await;
    let mut raw = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(1)))
        .await
        .unwrap();

    let expect_invalid = |r: Result<_, Error>, needle: &str| match r {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        Err(e) => panic!("expected INVALID_ARGUMENT containing {needle:?}, got {e}"),
        Ok(_) => panic!("expected INVALID_ARGUMENT containing {needle:?}, got success"),
    };
    expect_invalid(client.put("", "v").await.map(|_| ()), "empty");
    expect_invalid(
        client.put("k".repeat(4097), "v").await.map(|_| ()),
        "max_key_bytes",
    );
    expect_invalid(
        client
            .put("big", vec![0u8; 1024 * 1024 + 1])
            .await
            .map(|_| ()),
        "max_value_bytes",
    );
    expect_invalid(client.get("").await.map(|_| ()), "empty");
    expect_invalid(
        client
            .scan(pb::ScanRequest {
                key: b"b".to_vec(),
                range_end: b"a".to_vec(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "range_end",
    );
    // Two keys in different groups cannot share a transaction.
    let shard_a = client.group_for_key(b"a").unwrap();
    let other = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| client.group_for_key(k.as_bytes()) != Some(shard_a))
        .unwrap();
    let put = |k: &str| pb::RequestOp {
        request: Some(pb::request_op::Request::Put(pb::PutRequest {
            key: k.as_bytes().to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        })),
    };
    expect_invalid(
        client
            .txn(pb::TxnRequest {
                success: vec![put("a"), put(&other)],
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "one group",
    );
    // Unknown group → NOT_FOUND.
    let status = raw
        .scan(pb::ScanRequest {
            group_id: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // A bad request id → INVALID_ARGUMENT.
    let status = raw
        .put(pb::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            prev_kv: false,
            request_id: Some(pb::RequestId {
                client_id: 0,
                seq: 1,
                first_incomplete_seq: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing of the above was written.
    for key in ["big", "a", other.as_str(), "k"] {
        assert_eq!(
            must_get(&client, key).await,
            None,
            "{key} was written by a rejected request"
        );
    }
    let everything = client.scan_prefix("", 0).await.unwrap();
    assert!(
        everything.kvs.is_empty(),
        "rejected requests wrote {:?}",
        everything.kvs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_write_with_the_same_request_id_applies_once() {
    let cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let mut raw = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(2)))
        .await
        .unwrap();
    let id = pb::RequestId {
        client_id: 42,
        seq: 7,
        first_incomplete_seq: 7,
    };
    let put = |value: &str| pb::PutRequest {
        key: b"once".to_vec(),
        value: value.as_bytes().to_vec(),
        prev_kv: false,
        request_id: Some(id),
        ..Default::default()
    };
    let first = raw.put(put("a")).await.unwrap().into_inner();
    // The "retry" (same id) must not apply again, even with other content.
    let retry = raw.put(put("b")).await.unwrap().into_inner();
    assert_eq!(
        first.header.unwrap().revision,
        retry.header.unwrap().revision
    );
    let client = cluster.client().await;
    let kv = client.get("once").await.unwrap().kv.unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"a"[..], 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_elects_new_leaders_and_keeps_acknowledged_writes() {
    let mut cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let client = cluster.client().await;
    let mut written = write_keys(&client, "before", 200).await;

    let status = cluster.status().await.unwrap();
    let victim = busiest_leader(&status);
    let led: Vec<u64> = status
        .groups
        .iter()
        .filter(|g| g.leader_id == victim)
        .map(|g| g.group_id)
        .collect();
    cluster.kill(victim);
    let alive: Vec<u64> = cluster.running();

    // Time from the kill to the first acknowledged write in a group the
    // victim led (the client retries through the election).
    let client = cluster.client().await;
    let probe_key = (0..1000)
        .map(|i| format!("probe-{i}"))
        .find(|k| led.contains(&client.group_for_key(k.as_bytes()).unwrap()))
        .expect("a key in a group the victim led");
    let (_, took) = eventually(LONG, || client.put(probe_key.clone(), "after")).await;
    eprintln!("leader kill → first successful write: {took:?} (node {victim} led groups {led:?})");
    written.insert(probe_key, "after".into());

    let status = cluster.wait_for_leaders(&alive, LONG).await;
    assert!(
        status
            .groups
            .iter()
            .all(|g| g.leader_id != victim && g.leader_id != 0)
    );
    assert_all_readable(&client, &written).await;
    written.extend(write_keys(&client, "during", 100).await);

    // The killed node restarts from its own data and catches up.
    cluster.restart(victim);
    let status = cluster.wait_caught_up(victim, LONG).await;
    for g in &status.groups {
        let mine = g.replicas.iter().find(|r| r.node_id == victim).unwrap();
        let leader = g
            .replicas
            .iter()
            .find(|r| r.node_id == g.leader_id)
            .unwrap();
        assert_eq!(
            mine.key_count, leader.key_count,
            "group {} key count on the restarted node",
            g.group_id
        );
    }
    assert_all_readable(&client, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_all_data() {
    let mut cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let client = cluster.client().await;
    let written = write_keys(&client, "durable", 150).await;
    client.delete("durable-0000").await.unwrap();
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.restart(id);
    }
    cluster.wait_for_leaders(&[1, 2, 3], LONG).await;
    let client = cluster.client().await;
    let mut expected = written;
    expected.remove("durable-0000");
    assert_all_readable(&client, &expected).await;
    assert_eq!(
        must_get(&client, "durable-0000").await,
        None,
        "a delete was undone by the restart"
    );
    let kv = client.get("durable-0001").await.unwrap().kv.unwrap();
    assert_eq!(kv.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_survive_two_kills() {
    // Five copies of every group survive any two failures.
    let mut opts = ClusterOptions::new(5);
    opts.replicas = Some(5);
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let mut written = write_keys(&client, "five", 100).await;
    let victim = busiest_leader(&cluster.status().await.unwrap());
    let second = if victim == 1 { 2 } else { 1 };
    cluster.kill(victim);
    cluster.kill(second);
    let alive = cluster.running();
    cluster.wait_for_leaders(&alive, LONG).await;
    let client = cluster.client().await;
    written.extend(write_keys(&client, "after-two-kills", 50).await);
    assert_all_readable(&client, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_a_purged_log_catches_up_by_snapshot() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    opts.snapshot_every = Some(50);
    opts.keep_logs = Some(5);
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let mut written = write_keys(&client, "early", 20).await;

    // Take down a follower of the data group, then write far past it.
    let status = cluster.status().await.unwrap();
    let data_leader = status
        .groups
        .iter()
        .find(|g| g.group_id == 1)
        .unwrap()
        .leader_id;
    let lagger = (1..=3).find(|id| *id != data_leader).unwrap();
    cluster.kill(lagger);
    written.extend(write_keys(&client, "late", 300).await);

    // The leader must have purged past everything the lagger has.
    let status = cluster.status().await.unwrap();
    let g1 = status.groups.iter().find(|g| g.group_id == 1).unwrap();
    let leader = g1
        .replicas
        .iter()
        .find(|r| r.node_id == g1.leader_id)
        .unwrap();
    assert!(
        leader.purged_index > 30,
        "leader did not purge its log: {leader:?}"
    );

    cluster.restart(lagger);
    let status = cluster.wait_caught_up(lagger, LONG).await;
    let g1 = status.groups.iter().find(|g| g.group_id == 1).unwrap();
    let mine = g1.replicas.iter().find(|r| r.node_id == lagger).unwrap();
    assert!(
        mine.snapshots_installed >= 1,
        "caught up without a snapshot: {mine:?}"
    );
    assert_eq!(
        mine.key_count,
        written.len() as u64,
        "the snapshot lost keys"
    );
    assert_all_readable(&client, &written).await;
}
