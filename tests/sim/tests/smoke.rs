//! The real node runs under turmoil: a 3-node cluster elects leaders and
//! serves writes and linearizable reads over the simulated network.

use std::time::Duration;

use palisade_proto::v1 as pb;
use palisade_sim::{builder, host, kv_client, node_config, retry_unavailable, run_node};

#[test]
fn three_simulated_nodes_serve_reads_and_writes() {
    palisade_group::runtime::seed_thread_rng(1);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut sim = builder(1, Duration::from_secs(60)).build();
    for id in 1..=3u64 {
        let dir = dirs[id as usize - 1].path().to_path_buf();
        sim.host(host(id), move || {
            let config = node_config(id, 3, dir.clone(), 2);
            async move { run_node(config).await }
        });
    }
    sim.client("client", async {
        // Wait for leaders: retry the first write until it succeeds.
        let mut kv = kv_client(1);
        let mut tries = 0;
        loop {
            let put = pb::PutRequest {
                key: b"hello".to_vec(),
                value: b"world".to_vec(),
                ..Default::default()
            };
            match kv.put(put).await {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "no leader after {tries} tries: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        for i in 0..20 {
            let put = pb::PutRequest {
                key: format!("k{i}").into_bytes(),
                value: format!("v{i}").into_bytes(),
                ..Default::default()
            };
            kv.put(put).await?;
        }
        // Every node answers every key (forwarding over the simulated net).
        for id in 1..=3 {
            let kv = kv_client(id);
            for i in 0..20 {
                let key = format!("k{i}").into_bytes();
                let got = retry_unavailable(50, || {
                    let mut kv = kv.clone();
                    let key = key.clone();
                    async move {
                        kv.get(pb::GetRequest {
                            key,
                            ..Default::default()
                        })
                        .await
                    }
                })
                .await?
                .into_inner();
                assert_eq!(
                    got.kv.map(|kv| kv.value),
                    Some(format!("v{i}").into_bytes()),
                    "node {id} key k{i}"
                );
            }
        }
        Ok(())
    });
    sim.run().expect("simulation failed");
    palisade_group::runtime::unseed_thread_rng();
}
