//! `txgate bench --backend redis` against a real standalone server and a
//! real 3-master cluster: same output, every claim answered by the store.

mod support;

use std::process::Command;

use support::redis::{RedisCluster, RedisServer, require_redis};

fn bench(addr: &str) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!(
        "txgate-bench-{}-{}.json",
        std::process::id(),
        support::redis::free_port()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_txgate"))
        .args([
            "bench",
            "--backend",
            "redis",
            "--redis-addr",
            addr,
            "--claims",
            "20000",
            "--shards",
            "2",
            "--inflight",
            "16",
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
    assert!(stdout.contains("backend redis"), "{stdout}");
    assert!(stdout.contains("fail-open 0"), "{stdout}");
    assert!(stdout.contains("anomalies 0"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    v
}

fn check(v: &serde_json::Value) {
    assert_eq!(v["backend"], "redis");
    let claims: u64 = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["duplicate"]["count"].as_u64().unwrap() + s["novel"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(claims, 20_000);
    let won = v["verdicts"]["won"].as_u64().unwrap();
    assert!(
        won > 0 && v["verdicts"]["backend_errors"] == 0,
        "{}",
        v["verdicts"]
    );
}

#[test]
fn bench_against_a_standalone_server() {
    require_redis();
    let server = RedisServer::start();
    check(&bench(&server.addr()));
    let keys: u64 = server.cli(&["DBSIZE"]).trim().parse().unwrap();
    assert!(keys > 0, "claims reached the server");
}

#[test]
fn bench_against_a_cluster_by_one_seed_address() {
    require_redis();
    let cluster = RedisCluster::start();
    check(&bench(&cluster.seed_addr()));
    for i in 0..3 {
        let keys: u64 = cluster.node(i).cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 0, "node {i} holds claims");
    }
}

/// Runs a one-shard `txgate bench` against `server` for `duration`, doing
/// `fault` to the server `fault_after` into the run; the run's stderr and
/// its JSON.
fn bench_through_a_fault(
    server: &RedisServer,
    args: &[&str],
    fault_after: std::time::Duration,
    fault: impl FnOnce(&RedisServer),
) -> (String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!(
        "txgate-bench-fault-{}-{}.json",
        std::process::id(),
        support::redis::free_port()
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_txgate"))
        .args([
            "bench",
            "--backend",
            "redis",
            "--redis-addr",
            &server.addr(),
        ])
        .args(["--shards", "1", "--duplicate-ratio", "0"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("txgate runs");
    std::thread::sleep(fault_after);
    fault(server);
    let out = child.wait_with_output().expect("txgate ends");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert!(
        v["verdicts"]["fail_open"].as_u64().unwrap() > 0,
        "{}",
        v["verdicts"]
    );
    (err, v)
}

/// A store that stops answering mid-run makes claims fail open: the run says
/// so (stderr and JSON) instead of passing them off as fast claims.
#[test]
fn a_run_whose_claims_fail_open_warns_about_it() {
    require_redis();
    let server = RedisServer::start();
    let args = [
        "--duration",
        "2s",
        "--inflight",
        "4",
        "--op-timeout",
        "20ms",
    ];
    let (err, v) = bench_through_a_fault(
        &server,
        &args,
        std::time::Duration::from_millis(700),
        RedisServer::pause,
    );
    server.resume();
    assert!(
        err.contains("WARNING") && err.contains("failed open"),
        "{err}"
    );
    let w = v["warnings"].as_array().expect("warnings array");
    assert!(
        w.iter()
            .any(|l| l.as_str().unwrap().contains("failed open")),
        "{w:?}"
    );
}

/// A store that refuses every call (killed mid-run) fails claims at once, so
/// the benchmark's tasks never wait; its executor must still turn often
/// enough for the op-timeout sweep: no claim may take much past the op
/// timeout (with glommio's 100 ms preempt timer one took 1.56 s).
#[test]
fn no_claim_outlasts_its_op_timeout_when_the_store_dies_mid_run() {
    require_redis();
    let server = RedisServer::start();
    let args = [
        "--duration",
        "3s",
        "--inflight",
        "16",
        "--op-timeout",
        "50ms",
    ];
    let (_, v) = bench_through_a_fault(
        &server,
        &args,
        std::time::Duration::from_millis(800),
        RedisServer::kill9,
    );
    let max_ns = v["total"]["novel"]["max_ns"].as_u64().unwrap();
    assert!(
        max_ns < 1_000_000_000,
        "a claim took {max_ns} ns against a 50 ms op timeout"
    );
}
