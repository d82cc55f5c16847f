//! `txgate bench --backend aerospike` against our 3-node test server.

mod support;

use std::process::Command;

use support::aerospike::AeroServer;

#[test]
fn bench_against_a_three_node_cluster_by_seed_hosts() {
    let server = AeroServer::start(3, "test");
    let json = std::env::temp_dir().join(format!("txgate-aero-bench-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_txgate"))
        .args([
            "bench",
            "--backend",
            "aerospike",
            "--aero-namespace",
            "test",
            "--aero-hosts",
        ])
        .arg(server.seeds().join(","))
        .args([
            "--claims",
            "5000",
            "--shards",
            "2",
            "--inflight",
            "8",
            "--op-timeout",
            "2s",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("txgate runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("backend aerospike") && stdout.contains("fail-open 0"),
        "{stdout}"
    );
    assert!(stdout.contains("anomalies 0"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(v["backend"], "aerospike");
    assert!(v["verdicts"]["won"].as_u64().unwrap() > 0);
    assert!(server.live_records() > 0, "claims reached the server");
    assert_eq!(
        server.proxied(),
        0,
        "claims went to their partition masters"
    );
}
