//! Per-request read consistency over gRPC on a real 3-node cluster:
//! receipts, session tokens (read-your-writes on every node), min_revision,
//! and a measured bound for BOUNDED_STALENESS.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use palisade_client::{ReadOptions, proto as pb};
use palisade_tests::{ClusterOptions, TestCluster};
use pb::ReadConsistency as Level;
use tonic::Code;

fn get(
    key: &str,
    level: Level,
    session: Option<pb::SessionToken>,
    max_staleness_ms: u64,
) -> pb::GetRequest {
    pb::GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: level as i32,
        max_staleness_ms,
        session,
        min_revision: 0,
        at_revision: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_level_answers_with_a_truthful_receipt() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    let put = client.put("k", "v1").await.unwrap();
    let token = put.session.clone().expect("writes return a session token");
    assert_eq!(token.revisions.len(), 1);
    assert_eq!(token.revisions[0].revision, put.header.unwrap().revision);

    for id in 1..=3 {
        let mut kv = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(id)))
            .await
            .unwrap();
        // SESSION with the write's token: read-your-writes on every node
        // (a follower waits for the apply or forwards; never older).
        let r = kv
            .get(get("k", Level::Session, Some(token.clone()), 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.kv.unwrap().value, b"v1", "node {id}");
        let h = r.header.unwrap();
        assert!(h.revision >= token.revisions[0].revision);
        assert_eq!(
            (h.consistency, h.staleness_unbounded),
            (Level::Session as i32, true)
        );

        // BOUNDED_STALENESS: the bound is measured and within the request.
        let r = kv
            .get(get("k", Level::BoundedStaleness, None, 500))
            .await
            .unwrap()
            .into_inner();
        let h = r.header.unwrap();
        assert_eq!(h.consistency, Level::BoundedStaleness as i32);
        assert!(
            (1..=500).contains(&h.staleness_bound_ms),
            "bound {} ms",
            h.staleness_bound_ms
        );
        assert_eq!(r.kv.unwrap().value, b"v1");

        // STALE: answered locally, no promise.
        let h = kv
            .get(get("k", Level::Stale, None, 0))
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap();
        assert_eq!(
            (h.consistency, h.node_id, h.staleness_unbounded),
            (Level::Stale as i32, id, true)
        );

        // LEASE: honoured by the leader (LEASE, or LINEARIZABLE if the
        // lease lapsed); never weaker.
        let h = kv
            .get(get("k", Level::Lease, None, 0))
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap();
        assert!([Level::Lease as i32, Level::Linearizable as i32].contains(&h.consistency));
        assert_eq!(h.staleness_bound_ms, 0);
    }

    // A revision nobody has applied: UNAVAILABLE after a bounded wait.
    let mut kv = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(1)))
        .await
        .unwrap();
    let mut far = get("k", Level::Stale, None, 0);
    far.min_revision = 1_000_000;
    let started = Instant::now();
    let err = kv.get(far).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    match palisade_client::retry::detail(&err) {
        Some(pb::error_detail::Kind::RevisionNotReached(r)) => {
            assert_eq!(r.required_revision, 1_000_000);
            assert!(r.current_revision >= 1);
        }
        other => panic!("expected RevisionNotReached, got {other:?}"),
    }

    // A request that names no level reads linearizably, and its receipt
    // says so (never the unset value).
    let r = kv
        .get(pb::GetRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.header.unwrap().consistency, Level::Linearizable as i32);

    // Bad options are rejected.
    let err = kv
        .get(get("k", Level::BoundedStaleness, None, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The client library threads its session through SESSION reads.
    let w = client.put("k", "v2").await.unwrap();
    let r = client.get_with("k", ReadOptions::session()).await.unwrap();
    assert_eq!(r.kv.unwrap().value, b"v2");
    assert!(r.header.unwrap().revision >= w.header.unwrap().revision);
    let t = client.session_token();
    assert!(t.revisions.iter().any(|g| g.revision >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_staleness_never_returns_data_older_than_the_bound() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let cluster = TestCluster::start(opts).await;
    let writer = cluster.client().await;
    let status = cluster.status().await.unwrap();
    let leader = status
        .groups
        .iter()
        .find(|g| g.group_id == 1)
        .unwrap()
        .leader_id;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let bound = Duration::from_millis(200);

    // The writer records when each value was acknowledged.
    let acked: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let log = acked.clone();
    let writes = tokio::spawn(async move {
        for v in 1..=300u64 {
            writer.put("counter", v.to_string()).await.unwrap();
            log.lock().unwrap().push((Instant::now(), v));
        }
    });
    let mut kv = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(follower)))
        .await
        .unwrap();
    let mut checked = 0;
    while !writes.is_finished() {
        let started = Instant::now();
        let r = kv
            .get(get(
                "counter",
                Level::BoundedStaleness,
                None,
                bound.as_millis() as u64,
            ))
            .await
            .unwrap()
            .into_inner();
        let seen: u64 =
            r.kv.map_or(0, |kv| String::from_utf8_lossy(&kv.value).parse().unwrap());
        // Every value acknowledged more than `bound` before the read began
        // must be visible.
        let must_see = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at + bound <= started)
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0);
        assert!(
            seen >= must_see,
            "read {seen}, but {must_see} was acknowledged more than {bound:?} earlier"
        );
        assert!(r.header.unwrap().staleness_bound_ms <= bound.as_millis() as u64);
        checked += 1;
    }
    writes.await.unwrap();
    assert!(
        checked > 20,
        "only {checked} bounded reads ran alongside the writes"
    );
}

/// A leader paused (SIGSTOP) past its lease must not answer LEASE (or
/// LINEARIZABLE) reads from its pre-pause state when it resumes: the reads
/// below wait in its socket while it is stopped and are the first thing it
/// handles on resume, before it hears of the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_resumed_after_a_pause_does_not_serve_stale_lease_reads() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let mut cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    client.put("x", "old").await.unwrap();
    let status = cluster.status().await.unwrap();
    let leader = status.groups[1].leader_id;
    let mut at_leader =
        pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(leader)))
            .await
            .unwrap();
    // Keep the leader busy (a fresh quorum acknowledgement every few ms)
    // and holding a lease when it stops.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let client = client.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.put(format!("load{}", i % 10), "x").await;
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let r = at_leader
            .get(get("x", Level::Lease, None, 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.kv.unwrap().value, b"old");
    }
    cluster.pause(leader);
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    cluster
        .wait_for_leaders(&rest, Duration::from_secs(30))
        .await;
    let client = palisade_client::Client::connect(rest.iter().map(|id| cluster.addr(*id)))
        .await
        .unwrap();
    client.put("x", "new").await.unwrap();
    let mut reads = Vec::new();
    for level in [Level::Lease, Level::Linearizable, Level::Lease] {
        let mut kv = at_leader.clone();
        reads.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(get("x", level, None, 0));
            req.set_timeout(Duration::from_secs(8));
            (level, kv.get(req).await)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.resume(leader);
    let _ = writer.await;
    for read in reads {
        let (level, result) = read.await.unwrap();
        if let Ok(r) = result {
            let r = r.into_inner();
            assert_eq!(
                r.kv.unwrap().value,
                b"new",
                "{level:?} read served stale data by the resumed old leader: {:?}",
                r.header
            );
        }
    }
}
