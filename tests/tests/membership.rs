//! A living cluster, against real node processes over gRPC: nodes join
//! under load and the cluster rebalances, nodes drain and are removed, a
//! killed node is replaced from the survivors, and the hash group count
//! changes online — with no acknowledged write lost or applied twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_client::{Client, Error, proto as pb};
use palisade_tests::{ClusterOptions, TestCluster};

const LONG: Duration = Duration::from_secs(180);

/// What a load generator saw.
#[derive(Default, Debug)]
struct Load {
    /// Unique keys whose put was acknowledged, with their value.
    acked: BTreeMap<String, String>,
    /// Per overwritten key: puts acknowledged, puts with unknown outcome.
    overwrites: BTreeMap<String, (u64, u64)>,
    unknown: usize,
    failed: usize,
}

/// Puts unique keys `{prefix}-{n}` and overwrites a few counters until
/// `stop`, from `workers` concurrent clients.
async fn load(client: Client, prefix: &str, workers: usize, stop: Arc<AtomicBool>) -> Load {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut load = Load::default();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (key, unique) = if n.is_multiple_of(4) {
                        (format!("{prefix}-counter-{}", (n / 4) % 5), false)
                    } else {
                        (format!("{prefix}-{w}-{n}"), true)
                    };
                    let value = format!("{w}-{n}");
                    let outcome = client.put(key.clone(), value.clone()).await;
                    let (acked, unknown) = match outcome {
                        Ok(_) => (1, 0),
                        Err(Error::UnknownOutcome(_)) => {
                            load.unknown += 1;
                            (0, 1)
                        }
                        Err(_) => {
                            load.failed += 1;
                            (0, 0)
                        }
                    };
                    if unique {
                        if acked == 1 {
                            load.acked.insert(key, value);
                        }
                    } else {
                        let e = load.overwrites.entry(key).or_default();
                        e.0 += acked;
                        e.1 += unknown;
                    }
                }
                load
            })
        })
        .collect();
    let mut total = Load::default();
    for t in tasks {
        let l = t.await.expect("load task");
        total.acked.extend(l.acked);
        for (k, (a, u)) in l.overwrites {
            let e = total.overwrites.entry(k).or_default();
            e.0 += a;
            e.1 += u;
        }
        total.unknown += l.unknown;
        total.failed += l.failed;
    }
    total
}

/// Every acknowledged key reads back, and every overwritten key has
/// exactly one version per applied put: at least the acknowledged ones (none
/// lost), at most those plus the unknown ones (none applied twice).
async fn check_load(client: &Client, load: &Load) {
    assert!(
        load.acked.len() >= 100,
        "the load acknowledged only {} writes: it did not really run",
        load.acked.len()
    );
    for (k, v) in &load.acked {
        let got = client
            .get(k.clone())
            .await
            .unwrap_or_else(|e| panic!("get {k}: {e}"));
        let got = got
            .kv
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        assert_eq!(
            got.as_deref(),
            Some(v.as_str()),
            "acknowledged write of {k} lost"
        );
    }
    for (k, (acked, unknown)) in &load.overwrites {
        let kv = client.get(k.clone()).await.expect("get counter").kv;
        let version = kv.map_or(0, |kv| kv.version);
        assert!(
            version >= *acked && version <= acked + unknown,
            "{k}: {version} versions for {acked} acknowledged puts and {unknown} unknown ones"
        );
    }
}

fn serving(map: &pb::ClusterMap) -> BTreeSet<u64> {
    map.nodes
        .iter()
        .filter(|n| n.state == pb::NodeState::Serving as i32)
        .map(|n| n.id)
        .collect()
}

/// Data voters per serving node.
fn voter_counts(map: &pb::ClusterMap) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = serving(map).into_iter().map(|n| (n, 0)).collect();
    for g in map.groups.iter().filter(|g| g.id != 0) {
        for r in &g.replicas {
            if r.role == pb::ReplicaRole::Voter as i32 {
                *counts.entry(r.node_id).or_default() += 1;
            }
        }
    }
    counts
}

/// Replica counts within one, leaders within the fair share + 1, nothing
/// in flight.
fn balanced(status: &pb::ClusterStatusResponse, map: &pb::ClusterMap) -> bool {
    let nodes = serving(map);
    let quiet = map.moving.is_none()
        && map.groups.iter().all(|g| g.change.is_empty())
        && map.nodes.iter().all(|n| {
            n.state == pb::NodeState::Serving as i32 || n.state == pb::NodeState::Removed as i32
        });
    let counts = voter_counts(map);
    let (min, max) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    let data: Vec<&pb::GroupStatus> = status.groups.iter().filter(|g| g.group_id != 0).collect();
    let fair = data.len().div_ceil(nodes.len().max(1));
    let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
    for g in &data {
        *leads.entry(g.leader_id).or_default() += 1;
    }
    let led_ok =
        data.iter().all(|g| nodes.contains(&g.leader_id)) && leads.values().all(|n| *n <= fair + 1);
    quiet && max - min <= 1 && led_ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_grows_to_five_under_load_and_shrinks_back_by_draining_two() {
    let mut cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let client = cluster.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(load(client.clone(), "grow", 8, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Grow: two nodes join; the cluster moves replicas and leaders to them.
    let t0 = Instant::now();
    cluster.join(4, &[]);
    cluster.join(5, &[]);
    let status = cluster
        .wait_map("five serving nodes, balanced", LONG, |s, m| {
            serving(m).len() == 5 && balanced(s, m)
        })
        .await;
    let map = status.map.clone().unwrap();
    println!(
        "grew 3 -> 5 nodes and rebalanced in {:?}: data voters per node {:?}, meta voters {}",
        t0.elapsed(),
        voter_counts(&map),
        map.groups[0]
            .replicas
            .iter()
            .filter(|r| r.role == pb::ReplicaRole::Voter as i32)
            .count()
    );
    for n in [4, 5] {
        assert!(voter_counts(&map)[&n] >= 2, "node {n} got no replicas");
    }

    // Leader transfer on request.
    let g = map.groups.iter().find(|g| g.id != 0).unwrap();
    let to = g
        .replicas
        .iter()
        .map(|r| r.node_id)
        .find(|n| {
            status
                .groups
                .iter()
                .all(|s| s.group_id != g.id || s.leader_id != *n)
        })
        .unwrap();
    let r = client
        .transfer_leader(g.id, to)
        .await
        .expect("transfer leader");
    assert_eq!(r.leader_id, to);
    let leader = cluster
        .wait_map("the transferred leader in charge", LONG, |s, _| {
            s.groups
                .iter()
                .any(|x| x.group_id == g.id && x.leader_id == to)
        })
        .await;
    assert!(
        leader
            .groups
            .iter()
            .any(|x| x.group_id == g.id && x.leader_id == to)
    );

    // Shrink: drain a bootstrap node and a joined one (after a node the
    // cluster does not know, which changes nothing).
    let unknown = client.drain_node(99, false).await;
    assert!(
        matches!(&unknown, Err(e) if e.code() == tonic::Code::NotFound),
        "{unknown:?}"
    );
    let t1 = Instant::now();
    client.drain_node(1, false).await.expect("drain 1");
    client.drain_node(4, false).await.expect("drain 4");
    let status = cluster
        .wait_map("nodes 1 and 4 removed, groups on 2, 3, 5", LONG, |s, m| {
            let removed = m
                .nodes
                .iter()
                .filter(|n| [1, 4].contains(&n.id))
                .all(|n| n.state == pb::NodeState::Removed as i32);
            let placed = m.groups.iter().all(|g| {
                g.replicas.iter().all(|r| [2, 3, 5].contains(&r.node_id)) && g.replicas.len() == 3
            });
            removed && placed && balanced(s, m)
        })
        .await;
    println!("drained two nodes in {:?}", t1.elapsed());
    stop.store(true, Ordering::Relaxed);
    let load = loader.await.unwrap();
    println!(
        "load: {} acknowledged, {} unknown, {} failed",
        load.acked.len(),
        load.unknown,
        load.failed
    );
    // A removed node serves nothing: it refuses, retryably, so clients go
    // elsewhere.
    let mut kv = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(1)))
        .await
        .expect("connect to the removed node");
    let refused = kv
        .put(pb::PutRequest {
            key: b"after-removal".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("a removed node must not take writes");
    assert_eq!(
        refused.code(),
        palisade_client::Code::Unavailable,
        "{refused:?}"
    );
    assert!(refused.message().contains("removed"), "{refused:?}");
    for n in [1, 4] {
        cluster.kill(n);
    }
    let live = Client::connect(vec![cluster.addr(2), cluster.addr(3), cluster.addr(5)])
        .await
        .unwrap();
    check_load(&live, &load).await;
    assert!(
        status
            .map
            .unwrap()
            .groups
            .iter()
            .all(|g| g.change.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_is_removed_and_its_groups_are_rereplicated_from_the_survivors() {
    let keys: usize = std::env::var("PALISADE_REREPLICATE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut cluster = TestCluster::start(ClusterOptions::new(4)).await;
    let client = cluster.client().await;
    let value = "v".repeat(100);
    let t = Instant::now();
    let chunks: Vec<Vec<usize>> = (0..keys)
        .collect::<Vec<_>>()
        .chunks(keys.div_ceil(32).max(1))
        .map(|c| c.to_vec())
        .collect();
    let writers: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let client = client.clone();
            let value = value.clone();
            tokio::spawn(async move {
                for i in chunk {
                    client
                        .put(format!("rr-{i:06}"), value.clone())
                        .await
                        .unwrap_or_else(|e| panic!("put rr-{i}: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    println!("loaded {keys} keys in {:?}", t.elapsed());
    let status = cluster.status().await.unwrap();
    let map = status.map.unwrap();
    let victim = *voter_counts(&map)
        .iter()
        .max_by_key(|(n, c)| (**c, **n))
        .unwrap()
        .0;
    cluster.kill(victim);
    let t0 = Instant::now();
    let live: Vec<String> = cluster.running().iter().map(|n| cluster.addr(*n)).collect();
    let client = Client::connect(live).await.unwrap();
    let r = client.drain_node(victim, true).await.expect("node remove");
    assert_eq!(r.state, pb::NodeState::Draining as i32);
    cluster
        .wait_map(
            "every group back to 3 caught-up voters without the dead node",
            LONG,
            |s, m| {
                let gone = m
                    .nodes
                    .iter()
                    .any(|n| n.id == victim && n.state == pb::NodeState::Removed as i32);
                let placed = m.groups.iter().filter(|g| g.id != 0).all(|g| {
                    let voters: Vec<u64> = g
                        .replicas
                        .iter()
                        .filter(|r| r.role == pb::ReplicaRole::Voter as i32)
                        .map(|r| r.node_id)
                        .collect();
                    voters.len() == 3 && !voters.contains(&victim)
                });
                let caught_up = s.groups.iter().all(|g| {
                    let Some(leader) = g.replicas.iter().find(|r| r.node_id == g.leader_id) else {
                        return false;
                    };
                    g.replicas
                        .iter()
                        .filter(|r| r.node_id != victim)
                        .all(|r| r.applied_index >= leader.commit_index)
                        && g.replicas.iter().filter(|r| r.node_id != victim).count() >= 3
                });
                gone && placed && caught_up
            },
        )
        .await;
    println!(
        "node {victim} removed: {keys} keys re-replicated to 3 voters per group in {:?}",
        t0.elapsed()
    );
    for i in (0..keys).step_by((keys / 500).max(1)) {
        let got = client.get(format!("rr-{i:06}")).await.expect("get");
        assert_eq!(got.kv.map(|kv| kv.value), Some(value.clone().into_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hash_groups_go_from_4_to_8_to_2_under_load_without_losing_or_repeating_a_write() {
    let cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let client = cluster.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(load(client.clone(), "regroup", 8, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for target in [8u32, 2] {
        let t = Instant::now();
        client.set_groups(target).await.expect("set groups");
        let status = cluster
            .wait_map(&format!("{target} groups"), LONG, |_, m| {
                let data: Vec<&pb::MapGroup> = m.groups.iter().filter(|g| g.id != 0).collect();
                let even = data.iter().all(|g| {
                    let want = 4096 / target;
                    g.slots == want || g.slots == want + 1
                });
                data.len() == target as usize && even && m.moving.is_none()
            })
            .await;
        println!(
            "4096 slots regrouped into {target} groups in {:?} (map epoch {})",
            t.elapsed(),
            status.map.unwrap().epoch
        );
    }
    stop.store(true, Ordering::Relaxed);
    let load = loader.await.unwrap();
    println!(
        "load: {} acknowledged, {} unknown, {} failed",
        load.acked.len(),
        load.unknown,
        load.failed
    );
    check_load(&client, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_longer_than_down_after_is_replaced_without_an_operator() {
    let mut opts = ClusterOptions::new(4);
    opts.extra_args = vec!["--down-after".into(), "3s".into()];
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    for i in 0..200 {
        client.put(format!("down-{i}"), "v").await.unwrap();
    }
    let map = cluster.status().await.unwrap().map.unwrap();
    let victim = *voter_counts(&map)
        .iter()
        .max_by_key(|(n, c)| (**c, **n))
        .unwrap()
        .0;
    let t0 = Instant::now();
    cluster.kill(victim);
    cluster
        .wait_map(
            "the dead node drained and removed on its own",
            LONG,
            |_, m| {
                let gone = m
                    .nodes
                    .iter()
                    .any(|n| n.id == victim && n.state == pb::NodeState::Removed as i32);
                let healthy = m.groups.iter().filter(|g| g.id != 0).all(|g| {
                    g.replicas.len() == 3 && g.replicas.iter().all(|r| r.node_id != victim)
                });
                gone && healthy
            },
        )
        .await;
    println!(
        "node {victim} down: replaced without an operator in {:?}",
        t0.elapsed()
    );
    let live: Vec<String> = cluster.running().iter().map(|n| cluster.addr(*n)).collect();
    let client = Client::connect(live).await.unwrap();
    for i in 0..200 {
        let got = client.get(format!("down-{i}")).await.unwrap();
        assert_eq!(got.kv.map(|kv| kv.value), Some(b"v".to_vec()), "down-{i}");
    }
}
