//! Upgrades keep data: a cluster's data directories written by the version
//! before the cluster map (`tests/fixtures/v0-3node.tar.gz`, made by
//! `scripts/make-upgrade-fixture.sh` from commit 0241544: every node a voter
//! of every group, slots dealt `1 + slot % 4`, lease ids embedding their
//! group) open under this version. The map is derived from that layout, so
//! every key is where it was; and the cluster then changes shape like any
//! other (its groups adopt their slots, and slots move).

use std::path::PathBuf;
use std::time::Duration;

use palisade_tests::{ClusterOptions, TestCluster};

fn fixture() -> (tempfile::TempDir, serde_json::Value) {
    let tarball = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/v0-3node.tar.gz");
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-xzf")
        .arg(&tarball)
        .status()
        .expect("tar");
    assert!(status.success(), "unpacking {}", tarball.display());
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    (dir, expected)
}

async fn check_every_key(client: &palisade_client::Client, expected: &serde_json::Value) {
    let keys = expected["keys"].as_object().unwrap();
    assert!(keys.len() > 250, "the fixture holds {} keys", keys.len());
    for (k, v) in keys {
        let got = client
            .get(k.clone())
            .await
            .unwrap_or_else(|e| panic!("get {k}: {e}"));
        let got = got
            .kv
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        assert_eq!(got.as_deref(), v.as_str(), "{k}");
    }
    for k in expected["deleted"].as_array().unwrap() {
        let k = k.as_str().unwrap();
        assert!(client.get(k).await.unwrap().kv.is_none(), "{k} was deleted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_written_before_the_cluster_map_opens_with_every_key_and_then_regroups() {
    let (seed, expected) = fixture();
    let mut opts = ClusterOptions::new(3);
    // The data directories remember these peer addresses.
    opts.address = Some(("127.77.77".into(), 27001));
    opts.seed_data = Some(seed.path().to_path_buf());
    let cluster = TestCluster::start(opts).await;
    let client = cluster.client().await;
    check_every_key(&client, &expected).await;

    // The derived map: the old static layout, nothing moved.
    let status = cluster
        .wait_map(
            "the groups adopted their slots",
            Duration::from_secs(60),
            |s, _| {
                s.groups.iter().filter(|g| g.group_id != 0).all(|g| {
                    g.replicas
                        .iter()
                        .all(|r| !r.serves_all && r.owned_slots == 1024)
                })
            },
        )
        .await;
    let map = status.map.clone().unwrap();
    assert_eq!(map.groups.len(), 5, "meta + 4 data groups");
    for g in &map.groups {
        let voters: Vec<u64> = g.replicas.iter().map(|r| r.node_id).collect();
        assert_eq!(voters, vec![1, 2, 3], "group {}", g.id);
        if g.id != 0 {
            assert_eq!(g.slots, 1024);
        }
    }
    assert_eq!(map.route[0].group_id, 1, "slot 0 stays with group 1");

    // The lease granted by the old version, with its key, still works.
    let lease = expected["lease"].as_u64().unwrap();
    let ttl = client.lease_time_to_live(lease).await.expect("old lease");
    assert_eq!(ttl.keys, vec![b"{up}attached".to_vec()]);
    assert!(ttl.remaining_ms > 0);
    client
        .lease_keep_alive(lease)
        .await
        .expect("keep the old lease alive");

    // And the old cluster changes shape like a new one.
    client.put("after-upgrade", "new").await.unwrap();
    client.set_groups(8).await.expect("set groups");
    cluster
        .wait_map("8 groups", Duration::from_secs(120), |_, m| {
            m.groups.len() == 9
                && m.moving.is_none()
                && m.groups.iter().all(|g| g.id == 0 || g.slots == 512)
        })
        .await;
    check_every_key(&client, &expected).await;
    let got = client.get("after-upgrade").await.unwrap().kv.unwrap();
    assert_eq!(got.value, b"new");
    // A lease of the old version stays in its group, and so does the slot
    // of its key (other slots moved in its place): the key still ends with
    // the lease.
    let ttl = client
        .lease_time_to_live(lease)
        .await
        .expect("old lease after the regroup");
    assert_eq!(ttl.granted_ttl_ms, 86_400_000);
    assert_eq!(ttl.keys, vec![b"{up}attached".to_vec()]);
    client
        .lease_revoke(lease)
        .await
        .expect("revoke the old lease");
    assert!(
        client.get("{up}attached").await.unwrap().kv.is_none(),
        "the key ended with its lease"
    );
}
