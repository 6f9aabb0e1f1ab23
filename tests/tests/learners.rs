//! Read replicas (learners) on a real cluster of 3 voters + 1 learner, over
//! gRPC: the learner serves SESSION, BOUNDED_STALENESS, STALE and versioned
//! reads itself; LINEARIZABLE and LEASE reads sent to it are answered by the
//! leader; a held-back learner keeps read-your-writes (it waits or forwards,
//! never answers older than the session); `ack = ALL` writes are applied on
//! the learner before they are acknowledged, and say so when they cannot be.

use std::time::Duration;

use palisade_client::proto as pb;
use palisade_client::{Error, ReadOptions};
use palisade_tests::{ClusterOptions, TestCluster, palisade_bin};
use pb::ReadConsistency as Level;

const LEARNER: u64 = 4;

fn get(key: &str, level: Level, session: Option<pb::SessionToken>) -> pb::GetRequest {
    pb::GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: level as i32,
        max_staleness_ms: if level == Level::BoundedStaleness {
            1000
        } else {
            0
        },
        session,
        ..Default::default()
    }
}

fn value(resp: &pb::GetResponse) -> Option<String> {
    resp.kv
        .as_ref()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

async fn start() -> TestCluster {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 2;
    opts.learners = 1;
    TestCluster::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_serves_local_reads_and_never_votes() {
    let cluster = start().await;
    let status = cluster.status().await.unwrap();
    assert!(
        status.nodes.iter().any(|n| n.id == LEARNER && n.reachable),
        "the learner is listed: {:?}",
        status.nodes
    );
    for g in &status.groups {
        let learner = g.replicas.iter().find(|r| r.node_id == LEARNER).unwrap();
        assert_eq!(learner.role, pb::RaftRole::Learner as i32);
        assert!(!learner.voters.contains(&LEARNER), "{g:?}");
        assert!(learner.learners.contains(&LEARNER), "{g:?}");
        assert_ne!(g.leader_id, LEARNER);
    }

    let client = cluster.client().await;
    let put = client.put("color", "blue").await.unwrap();
    let token = put.session.clone();
    let mut kv = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(LEARNER)))
        .await
        .unwrap();
    // Served by the learner itself.
    for level in [Level::Session, Level::BoundedStaleness, Level::Stale] {
        let mut answered = None;
        // STALE may run ahead of replication; the other two wait.
        for _ in 0..50 {
            let r = kv
                .get(get("color", level, token.clone()))
                .await
                .unwrap()
                .into_inner();
            if value(&r).is_some() {
                answered = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = answered.unwrap_or_else(|| panic!("{level:?} never saw the write"));
        let h = r.header.unwrap();
        assert_eq!(h.node_id, LEARNER, "{level:?} served by the learner");
        assert_eq!(h.consistency, level as i32);
        assert_eq!(value(&r).as_deref(), Some("blue"));
    }
    let rev = put.header.unwrap().revision;
    let mut versioned = get("color", Level::Linearizable, None);
    versioned.at_revision = rev;
    let r = kv.get(versioned).await.unwrap().into_inner();
    assert_eq!(r.header.unwrap().node_id, LEARNER, "at_revision is local");
    assert_eq!(value(&r).as_deref(), Some("blue"));
    // LINEARIZABLE and LEASE need the leader: answered correctly, by it.
    for level in [Level::Linearizable, Level::Lease] {
        let r = kv
            .get(get("color", level, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(value(&r).as_deref(), Some("blue"));
        assert_ne!(r.header.unwrap().node_id, LEARNER, "{level:?}");
    }

    // Bad options are rejected and change nothing.
    let err = kv
        .put(pb::PutRequest {
            key: b"color".to_vec(),
            value: b"green".to_vec(),
            ack: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("ack"), "{err:?}");
    let err = kv
        .scan(pb::ScanRequest {
            at_revision: rev,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("group_id"), "{err:?}");
    let r = client.get("color").await.unwrap();
    assert_eq!(value(&r).as_deref(), Some("blue"));
    let err = client
        .add_learner(1, &cluster.addr(1), &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = client.add_learner(9, "nowhere", &[]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // Learners never vote: with two of three voters down, nothing commits
    // and no leader is elected, although three of four nodes are up.
    let mut cluster = cluster;
    let leader = status.groups[1].leader_id;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    cluster.kill(others[0]);
    cluster.kill(leader);
    let mut put_kv =
        pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(others[1])))
            .await
            .unwrap();
    let mut req = tonic::Request::new(pb::PutRequest {
        key: b"color".to_vec(),
        value: b"red".to_vec(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(4));
    assert!(
        put_kv.put(req).await.is_err(),
        "a minority of voters committed"
    );
    let st = pb::admin_client::AdminClient::connect(format!("http://{}", cluster.addr(LEARNER)))
        .await
        .unwrap()
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    for g in &st.groups {
        for r in &g.replicas {
            if r.node_id == LEARNER {
                assert_eq!(r.role, pb::RaftRole::Learner as i32, "{g:?}");
            }
        }
        assert!(g.leader_id != LEARNER, "{g:?}");
    }
    // STALE reads keep working on the learner during the outage.
    let r = kv
        .get(get("color", Level::Stale, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(value(&r).as_deref(), Some("blue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_learner_keeps_read_your_writes_and_ack_all_waits_for_it() {
    let mut cluster = start().await;
    let client = cluster.client().await;
    let mut learner = pb::kv_client::KvClient::connect(format!("http://{}", cluster.addr(LEARNER)))
        .await
        .unwrap();

    // ack = ALL: acknowledged only once the learner applied it, so a STALE
    // read there sees it at once.
    for i in 0..10 {
        let v = format!("all-{i}");
        let r = client
            .put_request(pb::PutRequest {
                key: b"acked".to_vec(),
                value: v.clone().into_bytes(),
                ack: pb::WriteAck::All as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        let rev = r.header.unwrap().revision;
        let got = learner
            .get(get("acked", Level::Stale, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(value(&got).as_deref(), Some(v.as_str()));
        assert!(got.header.unwrap().revision >= rev);
    }

    // Hold the learner back (SIGSTOP), write, let it go, and read with the
    // session at once, many times: it must wait for the apply (or forward),
    // never answer with the value before the session's own write.
    for round in 0..15 {
        cluster.pause(LEARNER);
        let v = format!("new-{round}");
        let put = client.put("ryw", v.clone()).await.unwrap();
        cluster.resume(LEARNER);
        let r = learner
            .get(get("ryw", Level::Session, put.session.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(value(&r).as_deref(), Some(v.as_str()), "round {round}");
        assert!(r.header.unwrap().revision >= put.header.unwrap().revision);
    }

    // With the learner stopped, an ack = ALL write is committed but says it
    // is not everywhere; MAJORITY writes are unaffected.
    cluster.pause(LEARNER);
    let err = client
        .put_request(pb::PutRequest {
            key: b"acked".to_vec(),
            value: b"while-paused".to_vec(),
            ack: pb::WriteAck::All as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    match &err {
        Error::NotEverywhere { lagging, .. } => assert_eq!(lagging, &vec![LEARNER]),
        other => panic!("expected NotEverywhere, got {other}"),
    }
    let r = client.get("acked").await.unwrap();
    assert_eq!(value(&r).as_deref(), Some("while-paused"), "it did commit");
    for i in 0..20 {
        client.put("acked", format!("majority-{i}")).await.unwrap();
    }
    // cluster status shows the held-back learner and its lag (from the
    // leader's replication progress: the learner cannot answer itself).
    let status = cluster.status().await.unwrap();
    assert!(
        status.nodes.iter().any(|n| n.id == LEARNER && !n.reachable),
        "{:?}",
        status.nodes
    );
    let g = status
        .groups
        .iter()
        .find(|g| g.group_id == client.group_for_key(b"acked").unwrap())
        .unwrap();
    let held = g.replicas.iter().find(|r| r.node_id == LEARNER).unwrap();
    assert_eq!(held.role, pb::RaftRole::Unreachable as i32);
    assert!(held.lag >= 20, "lag of the held-back learner: {g:?}");
    cluster.resume(LEARNER);
    cluster
        .wait_caught_up(LEARNER, Duration::from_secs(30))
        .await;
    let status = cluster.status().await.unwrap();
    for g in &status.groups {
        let l = g.replicas.iter().find(|r| r.node_id == LEARNER).unwrap();
        assert!(l.lag <= 2, "caught-up learner lag {}: {g:?}", l.lag);
    }

    // The CLI: put --ack all and get --consistency session against the
    // learner alone.
    let out = std::process::Command::new(palisade_bin())
        .args(["put", "cli", "x", "--ack", "all"])
        .args(["--endpoints", &cluster.endpoints().join(",")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let session = printed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("session="))
        .unwrap()
        .to_string();
    let out = std::process::Command::new(palisade_bin())
        .args([
            "get",
            "cli",
            "--consistency",
            "session",
            "--session",
            &session,
        ])
        .args(["--json", "--endpoints", &cluster.addr(LEARNER)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["kv"]["value"], "x");
    assert_eq!(json["header"]["node_id"], LEARNER);
    let client = palisade_client::Client::connect(vec![cluster.addr(LEARNER)])
        .await
        .unwrap();
    let r = client.get_with("cli", ReadOptions::stale()).await.unwrap();
    assert_eq!(r.header.unwrap().node_id, LEARNER);
}
