//! `palisade bench` against a real 3-node cluster: every workload runs,
//! closed and open loop, and reports sane numbers (no timing assertions:
//! speed is measured, not tested).

use palisade_tests::{ClusterOptions, TestCluster, palisade_bin};

fn bench(cluster: &TestCluster, args: &[&str]) -> serde_json::Value {
    let out_path = cluster
        .dir()
        .join(format!("bench-{}.json", args.join("-").replace('/', "_")));
    let out = std::process::Command::new(palisade_bin())
        .arg("bench")
        .args(["--endpoints", &cluster.endpoints().join(",")])
        .args(["--duration", "2s", "--warmup", "500ms", "--keys", "500"])
        .args(args)
        .arg("--json")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("throughput") && text.contains("p99.9"),
        "{text}"
    );
    serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_workload_and_reports_server_counters() {
    let cluster = TestCluster::start(ClusterOptions::new(3)).await;
    let put = bench(
        &cluster,
        &["--workload", "put", "--clients", "8", "--connections", "2"],
    );
    assert!(put["ops"].as_u64().unwrap() > 0, "{put}");
    assert_eq!(put["errors"], 0, "{put}");
    assert!(put["latency"]["p50_us"].as_u64().unwrap() > 0);
    assert!(put["latency"]["p99_us"].as_u64() >= put["latency"]["p50_us"].as_u64());
    let fsyncs = put["fsyncs_per_write"].as_f64().unwrap();
    assert!(fsyncs > 0.0 && fsyncs < 20.0, "{put}");
    let nodes = put["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes
            .iter()
            .all(|n| n["rss_bytes"].as_u64().unwrap() > 0 && n["disk_bytes"].as_u64().unwrap() > 0)
    );
    for w in ["get", "ycsb-a", "ycsb-b", "ycsb-c", "ycsb-f"] {
        let r = bench(
            &cluster,
            &["--workload", w, "--clients", "4", "--key-dist", "zipfian"],
        );
        assert!(r["ops"].as_u64().unwrap() > 0, "{w}: {r}");
        assert_eq!(r["errors"], 0, "{w}: {r}");
        assert!(r["preload_s"].as_f64().is_some(), "{w} preloads: {r}");
    }
    let stale = bench(
        &cluster,
        &[
            "--workload",
            "get",
            "--consistency",
            "stale",
            "--preload",
            "false",
        ],
    );
    assert!(stale["ops"].as_u64().unwrap() > 0);
    // Open loop: ~200 ops/s scheduled for 2 s.
    let open = bench(
        &cluster,
        &["--workload", "ycsb-b", "--rate", "200", "--clients", "16"],
    );
    let ops = open["ops"].as_u64().unwrap();
    assert!((200..=600).contains(&ops), "{open}");
    assert!(open["mode"].as_str().unwrap().starts_with("open loop"));
    assert!(!open["per_second"].as_array().unwrap().is_empty());
}
