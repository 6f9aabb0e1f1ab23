//! The CLI rejects bad invocations before touching anything. (Also makes
//! `cargo test` build the `palisade` binary the cluster tests run.)

use std::process::Command;

fn palisade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = palisade().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "start", "demo", "get", "put", "del", "scan", "txn", "cluster",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn start_rejects_a_node_missing_from_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let out = palisade()
        .args([
            "start",
            "--id",
            "4",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "1=127.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("own id 4"));
}

#[test]
fn start_rejects_malformed_peers() {
    let out = palisade()
        .args([
            "start",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "1=nohost",
            "--data-dir",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST:PORT"));
}

#[test]
fn demo_rejects_even_node_counts() {
    let out = palisade().args(["demo", "--nodes", "4"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodes must be"));
}
