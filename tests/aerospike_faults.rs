//! Faults on the Aerospike backend, against our protocol-level test server
//! (and the TCP fault proxy): dropped connections under load, delayed
//! replies, replies in 1-byte segments, and server errors by name.

mod support;

use std::time::{Duration, Instant};

use support::aerospike::AeroServer;
use support::proxy::FaultProxy;
use txgate::cache::{self, BackendKind, Config};
use txgate::engine::{Engine, Op, Reply};

fn engine_at(seeds: Vec<String>, op_timeout: Duration) -> Engine {
    let cfg = Config {
        backend: BackendKind::Aerospike,
        aero_hosts: seeds,
        aero_namespace: Some("test".into()),
        op_timeout,
        dial_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    support::engine(1, cache::open(&cfg).expect("aerospike opens"))
}

/// Distinct values for distinct keys read back exactly: no reply went to
/// the wrong request.
fn assert_no_desync(e: &Engine, tag: &str) {
    for i in 0..100 {
        let key = format!("{tag}:{i}").into_bytes();
        let set = Op::Set {
            key: key.clone(),
            val: key.clone(),
            ttl: Duration::from_secs(60),
        };
        assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
    }
    for i in 0..100 {
        let key = format!("{tag}:{i}").into_bytes();
        assert_eq!(
            e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
            Reply::Get(Some(key))
        );
    }
}

#[test]
fn dropped_connections_fail_fast_and_the_shard_reconnects() {
    let server = AeroServer::start(3, "test");
    let e = engine_at(server.seeds(), Duration::from_millis(200));
    assert_no_desync(&e, "before");
    server.drop_connections();
    let key = b"after-drop".to_vec();
    let t0 = Instant::now();
    let _ = e.op_blocking(&key, Op::Get { key: key.clone() });
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "no stall: {:?}",
        t0.elapsed()
    );
    support::wait_for("reconnect", Duration::from_secs(10), || {
        e.op_blocking(&key, Op::Get { key: key.clone() }).is_ok()
    });
    assert_no_desync(&e, "after");
}

#[test]
fn delayed_replies_time_out_then_late_replies_are_dropped() {
    let server = AeroServer::start(1, "test");
    let op_timeout = Duration::from_millis(100);
    let e = engine_at(server.seeds(), op_timeout);
    server.set_delay(Duration::from_millis(300));
    for i in 0..5 {
        let key = format!("slow:{i}").into_bytes();
        let t0 = Instant::now();
        let r = e.op_blocking(&key, Op::Get { key: key.clone() });
        assert!(r.is_err(), "timed out");
        assert!(
            t0.elapsed() < op_timeout + Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
    }
    server.set_delay(Duration::ZERO);
    std::thread::sleep(Duration::from_millis(2000));
    assert_no_desync(&e, "delay");
    // The connection's counters (what /metrics shows) saw it all: five
    // timeouts whose replies came late and were dropped, on one connection.
    let c = futures_lite::future::block_on(e.on_every_shard(|s| async move {
        s.backend()
            .map(|b| b.connection_counters())
            .unwrap_or_default()
    }))
    .unwrap()
    .remove(0);
    assert_eq!((c.timeouts, c.late_replies), (5, 5), "{c:?}");
    assert_eq!((c.connects, c.disconnects), (1, 0), "{c:?}");
    assert_eq!(c.replies, 5 + 200, "{c:?}");
    assert!(c.calls >= c.replies && c.reads >= 1, "{c:?}");
}

#[test]
fn replies_in_one_byte_segments_parse_correctly() {
    let server = AeroServer::start(1, "test");
    let proxy = FaultProxy::start(server.node_addr(0));
    proxy.set_split_replies(true);
    let e = engine_at(vec![proxy.addr().to_string()], Duration::from_secs(5));
    for i in 0..10 {
        let key = format!("split:{i}").into_bytes();
        let nx = Op::SetNx {
            key: key.clone(),
            val: key.clone(),
            ttl: Duration::from_secs(60),
        };
        assert_eq!(e.op_blocking(&key, nx.clone()).unwrap(), Reply::SetNx(true));
        assert_eq!(e.op_blocking(&key, nx).unwrap(), Reply::SetNx(false));
        assert_eq!(
            e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
            Reply::Get(Some(key))
        );
    }
}

#[test]
fn server_errors_surface_with_their_names() {
    let server = AeroServer::start(1, "test");
    let e = engine_at(server.seeds(), Duration::from_secs(2));
    let key = b"busy".to_vec();
    server.set_key_busy(true);
    let err = e
        .op_blocking(
            &key,
            Op::SetNx {
                key: key.clone(),
                val: b"v".to_vec(),
                ttl: Duration::from_secs(5),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("KEY_BUSY"), "{err}");
    server.set_key_busy(false);
    server.set_forbidden_ttl(true);
    let err = e
        .op_blocking(
            &key,
            Op::Set {
                key: key.clone(),
                val: b"v".to_vec(),
                ttl: Duration::from_secs(5),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("FORBIDDEN"), "{err}");
    // No TTL is still allowed.
    let ok = e.op_blocking(
        &key,
        Op::Set {
            key: key.clone(),
            val: b"v".to_vec(),
            ttl: Duration::ZERO,
        },
    );
    assert_eq!(ok.unwrap(), Reply::Set);
}
