//! Faults against real `redis-server` processes and a fault proxy: kill -9
//! under load, SIGSTOP, replies split into 1-byte segments, delayed
//! replies, and a reset mid-reply. The rules under test: nothing waits past
//! the op timeout (plus scheduling slack), the connection never desyncs
//! (distinct keys read back their own values), and it comes back by itself.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::redis::{RedisServer, require_redis};
use txgate::cache::{self, BackendKind, Config};
use txgate::engine::{Engine, Op, Reply};

/// Scheduling slack on a shared 2-core box; the bound is about "never
/// stalls", not speed.
const SLACK: Duration = Duration::from_millis(1500);

fn engine_at(addr: &str, op_timeout: Duration) -> Engine {
    let cfg = Config {
        backend: BackendKind::Redis,
        redis_addr: Some(addr.to_owned()),
        op_timeout,
        dial_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    support::engine(1, cache::open(&cfg).expect("redis opens"))
}

#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicU64,
    err: AtomicU64,
    slowest_us: AtomicU64,
}

/// `tasks` loops of set_nx on shard 0 until `load.stop`; bounded by a
/// 30 s guard.
fn start_load(e: &Engine, tasks: usize, load: Arc<Load>) {
    let l = load.clone();
    futures_lite::future::block_on(e.run_on(0, move |s| async move {
        for t in 0..tasks {
            let (s, l) = (s.clone(), l.clone());
            glommio::spawn_local(async move {
                let guard = Instant::now() + Duration::from_secs(30);
                let mut i = 0u64;
                while !l.stop.load(Ordering::Relaxed) && Instant::now() < guard {
                    i += 1;
                    let key = format!("load:{t}:{i}").into_bytes();
                    let t0 = Instant::now();
                    let r = s
                        .op(
                            &key,
                            Op::SetNx {
                                key: key.clone(),
                                val: b"v".to_vec(),
                                ttl: Duration::from_secs(30),
                            },
                        )
                        .await;
                    let us = t0.elapsed().as_micros() as u64;
                    l.slowest_us.fetch_max(us, Ordering::Relaxed);
                    let counter = if r.is_ok() { &l.ok } else { &l.err };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if r.is_err() {
                        // Failing fast while down: don't spin the shard.
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
            .detach();
        }
    }))
    .expect("shard answers");
}

/// Distinct values for distinct keys read back exactly: no reply went to
/// the wrong request.
fn assert_no_desync(e: &Engine, tag: &str) {
    for i in 0..200 {
        let key = format!("desync:{tag}:{i}").into_bytes();
        let val = format!("value-{tag}-{i}").into_bytes();
        let set = Op::Set {
            key: key.clone(),
            val: val.clone(),
            ttl: Duration::from_secs(60),
        };
        assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
    }
    for i in 0..200 {
        let key = format!("desync:{tag}:{i}").into_bytes();
        let want = format!("value-{tag}-{i}").into_bytes();
        assert_eq!(
            e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
            Reply::Get(Some(want))
        );
    }
}

#[test]
fn kill9_under_load_fails_in_flight_ops_fast_and_reconnects_after_restart() {
    require_redis();
    let server = RedisServer::start();
    let op_timeout = Duration::from_millis(200);
    let e = engine_at(&server.addr(), op_timeout);
    let load = Arc::new(Load::default());
    start_load(&e, 16, load.clone());
    support::wait_for("load to run", Duration::from_secs(5), || {
        load.ok.load(Ordering::Relaxed) > 1000
    });
    server.kill9();
    support::wait_for("ops to fail", Duration::from_secs(5), || {
        load.err.load(Ordering::Relaxed) > 100
    });
    server.restart();
    let ok_at_restart = load.ok.load(Ordering::Relaxed);
    support::wait_for(
        "ops to succeed again after the restart",
        Duration::from_secs(10),
        || load.ok.load(Ordering::Relaxed) > ok_at_restart + 1000,
    );
    load.stop.store(true, Ordering::Relaxed);
    let slowest = Duration::from_micros(load.slowest_us.load(Ordering::Relaxed));
    assert!(slowest <= op_timeout + SLACK, "an op took {slowest:?}");
    assert_no_desync(&e, "kill9");
}

#[test]
fn sigstop_for_2s_every_op_returns_within_the_op_timeout_and_replies_match_after() {
    require_redis();
    let server = RedisServer::start();
    let op_timeout = Duration::from_millis(100);
    let e = engine_at(&server.addr(), op_timeout);
    let load = Arc::new(Load::default());
    start_load(&e, 16, load.clone());
    support::wait_for("load to run", Duration::from_secs(5), || {
        load.ok.load(Ordering::Relaxed) > 1000
    });
    server.pause();
    std::thread::sleep(Duration::from_secs(2));
    let errors_while_paused = load.err.load(Ordering::Relaxed);
    server.resume();
    assert!(
        errors_while_paused > 0,
        "ops failed (timed out) while the server was stopped"
    );
    let ok_at_resume = load.ok.load(Ordering::Relaxed);
    support::wait_for(
        "ops to succeed after SIGCONT",
        Duration::from_secs(10),
        || load.ok.load(Ordering::Relaxed) > ok_at_resume + 1000,
    );
    load.stop.store(true, Ordering::Relaxed);
    let slowest = Duration::from_micros(load.slowest_us.load(Ordering::Relaxed));
    assert!(slowest <= op_timeout + SLACK, "an op took {slowest:?}");
    assert_no_desync(&e, "sigstop");
}

fn proxied() -> (RedisServer, FaultProxy) {
    require_redis();
    let server = RedisServer::start();
    let upstream: SocketAddr = server.addr().parse().unwrap();
    let proxy = FaultProxy::start(upstream);
    (server, proxy)
}

#[test]
fn replies_split_into_one_byte_segments_parse_correctly() {
    let (_server, proxy) = proxied();
    let e = engine_at(&proxy.addr().to_string(), Duration::from_secs(5));
    proxy.set_split_replies(true);
    let big: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let key = b"split:big".to_vec();
    let set = Op::Set {
        key: key.clone(),
        val: big.clone(),
        ttl: Duration::from_secs(60),
    };
    assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
    assert_eq!(
        e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
        Reply::Get(Some(big))
    );
    for i in 0..20 {
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
fn delayed_replies_time_out_and_late_replies_are_dropped_not_delivered() {
    let (_server, proxy) = proxied();
    let op_timeout = Duration::from_millis(100);
    let e = engine_at(&proxy.addr().to_string(), op_timeout);
    proxy.set_delay(Duration::from_millis(400));
    let mut timed_out = 0;
    for i in 0..10 {
        let key = format!("late:{i}").into_bytes();
        let t0 = Instant::now();
        let r = e.op_blocking(
            &key,
            Op::Set {
                key: key.clone(),
                val: b"late".to_vec(),
                ttl: Duration::ZERO,
            },
        );
        assert!(
            t0.elapsed() <= op_timeout + SLACK,
            "waited {:?}",
            t0.elapsed()
        );
        timed_out += r.is_err() as usize;
    }
    assert_eq!(timed_out, 10);
    proxy.set_delay(Duration::ZERO);
    // Late replies drain; then every reply matches its own request.
    std::thread::sleep(Duration::from_millis(1000));
    assert_no_desync(&e, "delay");
}

#[test]
fn a_reset_mid_reply_fails_the_op_and_the_connection_comes_back() {
    let (_server, proxy) = proxied();
    let e = engine_at(&proxy.addr().to_string(), Duration::from_secs(2));
    let key = b"reset:big".to_vec();
    let big = vec![b'x'; 64 << 10];
    let set = Op::Set {
        key: key.clone(),
        val: big.clone(),
        ttl: Duration::from_secs(60),
    };
    assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
    proxy.reset_after_bytes(1000);
    assert!(
        e.op_blocking(&key, Op::Get { key: key.clone() }).is_err(),
        "cut reply is an error"
    );
    support::wait_for(
        "reconnect",
        Duration::from_secs(10),
        || matches!(e.op_blocking(&key, Op::Get { key: key.clone() }), Ok(Reply::Get(Some(v))) if v == big),
    );
    assert!(proxy.connections() >= 2, "it reconnected");
    assert_no_desync(&e, "reset");
}

#[test]
fn a_blackholed_connection_is_replaced_not_left_to_overflow() {
    let (_server, proxy) = proxied();
    let e = engine_at(&proxy.addr().to_string(), Duration::from_millis(50));
    assert_no_desync(&e, "before");
    let base = proxy.connections();
    proxy.set_blackhole(true);
    // Replies stop (no RST, no EOF): ops time out, then the connection is
    // declared dead and redialed.
    let key = b"hole".to_vec();
    let mut failed = 0;
    let end = Instant::now() + Duration::from_secs(5);
    while proxy.connections() <= base && Instant::now() < end {
        let r = e.op_blocking(&key, Op::Get { key: key.clone() });
        failed += r.is_err() as usize;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(failed > 0, "ops failed while blackholed");
    assert!(
        proxy.connections() >= 2,
        "the wedged connection was replaced"
    );
    proxy.set_blackhole(false);
    support::wait_for("ops to work again", Duration::from_secs(10), || {
        e.op_blocking(&key, Op::Get { key: key.clone() }).is_ok()
    });
    assert_no_desync(&e, "after");
}

/// One op timeout in all, even where a `SET … NX … GET` retry is allowed
/// (Redis ≥ 7.0): the retry used to get a timeout of its own, so a stalled
/// server held every novel claim for twice the op timeout.
#[test]
fn a_set_nx_on_a_stalled_server_gives_up_at_one_op_timeout() {
    require_redis();
    let server = RedisServer::start();
    let op_timeout = Duration::from_millis(300);
    let e = engine_at(&server.addr(), op_timeout);
    server.pause();
    for i in 0..3 {
        let key = format!("stalled:{i}").into_bytes();
        let t0 = Instant::now();
        let r = e.op_blocking(
            &key,
            Op::SetNx {
                key: key.clone(),
                val: b"v".to_vec(),
                ttl: Duration::from_secs(10),
            },
        );
        let took = t0.elapsed();
        assert!(r.is_err(), "{r:?}");
        // A second op timeout would make it 600 ms; the sweep's tick and a
        // loaded host stay well under 150 ms.
        assert!(took < op_timeout + Duration::from_millis(150), "{took:?}");
    }
    server.resume();
}

/// The `SET … NX … GET` retry after a connection lost with the claim in
/// flight: the first attempt reached the server (only its reply was cut),
/// so the retry reads back the claim's own value and reports a win — not a
/// fail-open forward, and never a false duplicate.
#[test]
fn a_claim_whose_reply_was_cut_is_won_by_its_retry() {
    let (server, proxy) = proxied();
    let e = engine_at(&proxy.addr().to_string(), Duration::from_secs(2));
    let key = b"cut:claim".to_vec();
    let nx = Op::SetNx {
        key: key.clone(),
        val: b"mine".to_vec(),
        ttl: Duration::from_secs(60),
    };
    // The next server→client byte resets the connection: the SET lands,
    // its reply is lost.
    proxy.reset_after_bytes(0);
    assert_eq!(e.op_blocking(&key, nx.clone()).unwrap(), Reply::SetNx(true));
    assert_eq!(proxy.resets(), 1, "the reply was cut");
    assert_eq!(server.cli(&["GET", "cut:claim"]).trim(), "mine");
    // A second claim of it is a loss.
    assert_eq!(e.op_blocking(&key, nx).unwrap(), Reply::SetNx(false));
}
