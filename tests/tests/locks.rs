//! Leases, locks and fencing tokens on a real 3-node cluster over gRPC and
//! the CLI: the classic "paused holder" scenario (its late write is refused
//! by the storage), tokens that keep increasing across leader kills and
//! whole-cluster restarts, and leases that delete their keys when they end.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_client::proto as pb;
use palisade_client::{Client, FencingToken, stale_fence_detail};
use palisade_tests::{ClusterOptions, TestCluster, palisade_bin};
use tonic::Code;

async fn value(client: &Client, key: &str) -> Option<String> {
    client
        .get(key)
        .await
        .unwrap()
        .kv
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_cannot_write_after_its_lease_expired() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 2;
    let cluster = TestCluster::start(opts).await;
    let a = cluster.client().await;
    let b = cluster.client().await;
    let lock = "{job}lock";

    // A takes the lock with a 2 s lease and then stops keeping it alive (a
    // GC pause, a frozen VM...).
    let started = Instant::now();
    let lease_a = a
        .lease_grant(Duration::from_secs(2), lock.as_bytes())
        .await
        .unwrap();
    let ta = a.lock(lock, lease_a, Duration::from_secs(5)).await.unwrap();
    a.put_fenced("{job}data", "A1", &ta).await.unwrap();
    assert_eq!(a.check_fence(&ta).await.unwrap(), (true, ta.token));

    // B waits for the lock; it gets it once the leader expires A's lease.
    let guard_b = b
        .lock_with_lease(lock, Duration::from_secs(5), Duration::from_secs(10))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "lock granted after {waited:?}, before A's lease ended"
    );
    let tb = guard_b.token().clone();
    assert!(tb.token > ta.token, "tokens increase: {ta:?} then {tb:?}");
    b.put_fenced("{job}data", "B", &tb).await.unwrap();

    // A wakes up and writes with its old token: refused by the storage.
    let err = a.put_fenced("{job}data", "A2", &ta).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let detail = stale_fence_detail(&err).expect("a StaleFence detail");
    assert_eq!(detail.current_token, tb.token);
    assert_eq!(
        value(&b, "{job}data").await.as_deref(),
        Some("B"),
        "B's data intact"
    );
    // Deletes and transactions are fenced the same way.
    let err = a
        .delete_request(pb::DeleteRequest {
            key: b"{job}data".to_vec(),
            fence: Some(ta.fence()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(a.check_fence(&ta).await.unwrap(), (false, tb.token));
    assert_eq!(b.check_fence(&tb).await.unwrap(), (true, tb.token));

    // A fenced write to a key of another group is refused up front.
    let other = (0..100)
        .map(|i| format!("other{i}"))
        .find(|k| b.group_for_key(k.as_bytes()) != b.group_for_key(lock.as_bytes()))
        .unwrap();
    let err = b.put_fenced(other, "x", &tb).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("hash tag"), "{err}");

    // A lock held for the whole wait is a definite refusal with a typed
    // detail (nothing was applied), not an unknown outcome.
    let lease_c = a
        .lease_grant(Duration::from_secs(5), lock.as_bytes())
        .await
        .unwrap();
    let waited = Instant::now();
    let err = a
        .lock(lock, lease_c, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, palisade_client::Error::LockHeld { lease, token } if lease == guard_b.lease() && token == tb.token),
        "{err:?}"
    );
    assert!(
        waited.elapsed() < Duration::from_secs(5),
        "no retries of a held lock"
    );
    // An unlock by a non-holder: NotLockHolder with the current token.
    let stale = palisade_client::FencingToken {
        lock: lock.as_bytes().to_vec(),
        token: ta.token,
        term: 0,
    };
    let err = a.unlock(&stale).await.unwrap_err();
    let palisade_client::Error::Status(status) = &err else {
        panic!("{err:?}")
    };
    match palisade_client::retry::detail(status) {
        Some(pb::error_detail::Kind::NotLockHolder(n)) => assert_eq!(n.current_token, tb.token),
        other => panic!("expected NotLockHolder, got {other:?}"),
    }
    // A lease lives with its slot: keys of another slot cannot attach to it.
    let err = b
        .put_request(pb::PutRequest {
            key: b"{elsewhere}k".to_vec(),
            value: b"v".to_vec(),
            lease: guard_b.lease(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("hash slot"), "{err}");
    a.lease_revoke(lease_c).await.unwrap();

    // Keys attached to a lease end with it; so do its locks.
    let ttl = b.lease_time_to_live(guard_b.lease()).await.unwrap();
    assert_eq!(ttl.granted_ttl_ms, 5000);
    assert!(ttl.remaining_ms > 0 && ttl.remaining_ms <= 5000);
    assert_eq!(ttl.locks, vec![lock.as_bytes().to_vec()]);
    b.put_request(pb::PutRequest {
        key: b"{job}ephemeral".to_vec(),
        value: b"here".to_vec(),
        lease: guard_b.lease(),
        ..Default::default()
    })
    .await
    .unwrap();
    let lease_b = guard_b.lease();
    guard_b.release().await.unwrap();
    assert_eq!(value(&b, "{job}ephemeral").await, None);
    assert_eq!(b.check_fence(&tb).await.unwrap(), (false, 0));
    let err = b.lease_keep_alive(lease_b).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = b
        .lease_grant(Duration::from_millis(10), b"")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lock_holder_paused_by_sigstop_is_fenced_off() {
    let opts = ClusterOptions::new(3);
    let cluster = TestCluster::start(opts).await;
    let endpoints = cluster.endpoints().join(",");
    let bin = palisade_bin();
    // Holder A: `palisade lock` keeps the lease alive while its command runs;
    // the command writes (fenced) after a while.
    let script = format!(
        "sleep 8; {} put '{{cli}}data' A --fence \"$PALISADE_FENCE\" --endpoints {endpoints}",
        bin.display()
    );
    let stderr_path = cluster.dir().join("holder.err");
    let mut holder = Command::new(&bin)
        .args([
            "lock",
            "{cli}lock",
            "--ttl-ms",
            "2000",
            "--endpoints",
            &endpoints,
        ])
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ta = FencingToken::parse(line.trim()).unwrap();
    // Stop the holder process: its keep-alives stop, its child sleeps on.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(holder.id() as i32, libc::SIGSTOP) };
    let b = cluster.client().await;
    let guard = b
        .lock_with_lease(
            "{cli}lock",
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(guard.token().token > ta.token);
    b.put_fenced("{cli}data", "B", guard.token()).await.unwrap();
    // The child's fenced write (at ~8 s: past A's 2 s lease even if a
    // leader change restarts it) is refused; then A resumes.
    std::thread::sleep(Duration::from_secs(8));
    // SAFETY: as above.
    unsafe { libc::kill(holder.id() as i32, libc::SIGCONT) };
    let status = holder.wait().unwrap();
    assert!(!status.success(), "A's late write must fail: {status:?}");
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        err.contains("fenced write refused"),
        "refused by the fence, not for another reason: {err}"
    );
    assert_eq!(value(&b, "{cli}data").await.as_deref(), Some("B"));
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_leader_kills_and_restarts() {
    let mut opts = ClusterOptions::new(3);
    opts.groups = 1;
    let mut cluster = TestCluster::start(opts).await;
    let mut last = 0;
    for round in 0..6 {
        let client = cluster.client().await;
        let guard = client
            .lock_with_lease("{t}lock", Duration::from_secs(3), Duration::from_secs(10))
            .await
            .unwrap();
        let t = guard.token().clone();
        assert!(
            t.token > last,
            "round {round}: token {} after {last}",
            t.token
        );
        last = t.token;
        client
            .put_fenced("{t}data", round.to_string(), &t)
            .await
            .unwrap();
        match round % 3 {
            // Release normally.
            0 => guard.release().await.unwrap(),
            // Kill the leader while the lock is held: the new leader keeps
            // the lock until the lease ends (a full TTL after it took over).
            1 => {
                drop(guard);
                let status = cluster.status().await.unwrap();
                let leader = status.groups[1].leader_id;
                cluster.kill(leader);
                let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
                cluster
                    .wait_for_leaders(&rest, Duration::from_secs(30))
                    .await;
                cluster.restart(leader);
                cluster
                    .wait_for_leaders(&[1, 2, 3], Duration::from_secs(30))
                    .await;
            }
            // Restart the whole cluster.
            _ => {
                drop(guard);
                for id in 1..=3 {
                    cluster.kill(id);
                }
                for id in 1..=3 {
                    cluster.restart(id);
                }
                cluster
                    .wait_for_leaders(&[1, 2, 3], Duration::from_secs(60))
                    .await;
            }
        }
    }
    let client = cluster.client().await;
    assert_eq!(value(&client, "{t}data").await.as_deref(), Some("5"));
}
