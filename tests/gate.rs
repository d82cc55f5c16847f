//! The UDP gate on loopback with real sockets: duplicates suppressed and
//! novel TxIDs forwarded unchanged, short datagrams counted, kernel steering
//! (every datagram on the shard `route` names, 0 hops) and hand-overs
//! without it, two instances sharing a real redis-server, a fail-open boot
//! that upgrades when redis-server starts, and a multicast target (TTL 0, so
//! nothing leaves the host).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::redis::RedisServer;
use support::udp::{Sink, datagram, send_paced};
use support::{cores, txid, wait_for};
use txgate::cache::{self, BackendKind};
use txgate::gate::{Gate, GateConfig, ShardSnapshot, Steering};
use txgate::route::route;

fn config(shards: usize, sink: &Sink) -> GateConfig {
    let mut c = GateConfig::new("127.0.0.1:0".parse().unwrap(), vec![sink.addr()]);
    c.engine.cores = cores(shards);
    c.engine.txidset.tier1_capacity = 100_000;
    c.engine.txidset.instance_id = "gate-test".into();
    c.store.backend = BackendKind::Memory;
    c
}

fn redis_store(addr: &str) -> cache::Config {
    cache::Config {
        backend: BackendKind::Redis,
        redis_addr: Some(addr.to_owned()),
        op_timeout: Duration::from_millis(500),
        dial_timeout: Duration::from_millis(500),
        ..cache::Config::default()
    }
}

/// Sums once every shard has published at least `received` datagrams.
fn totals_after(gate: &Gate, received: u64) -> ShardSnapshot {
    let mut total = ShardSnapshot::default();
    wait_for("the gate's counters", Duration::from_secs(10), || {
        let snaps = gate.snapshots();
        let got: u64 = snaps.iter().map(|s| s.received).sum();
        let answered: u64 = snaps
            .iter()
            .map(|s| s.claims.claims() + s.short + s.hops_out)
            .sum();
        let hops_in: u64 = snaps.iter().map(|s| s.hops_in).sum();
        let hops_out: u64 = snaps.iter().map(|s| s.hops_out).sum();
        if got >= received && answered >= received && hops_in == hops_out {
            total = snaps.iter().fold(ShardSnapshot::default(), |mut t, s| {
                t.received += s.received;
                t.forwarded += s.forwarded;
                t.short += s.short;
                t.hops_out += s.hops_out;
                t.hops_in += s.hops_in;
                t.claims.add(&s.claims);
                t
            });
            true
        } else {
            false
        }
    });
    total
}

#[test]
fn forwards_each_txid_once_unchanged_and_drops_the_copies() {
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.txid_offset = 4;
    let gate = Gate::start(c).unwrap();
    let n = 2_000u64;
    let mut packets = Vec::new();
    for copy in 0..3u8 {
        for i in 0..n {
            // Copies differ after the TxID: the first one seen is forwarded.
            packets.push(datagram(&txid(i), 4, &[b'c', copy, (i % 251) as u8]));
        }
    }
    send_paced(gate.local_addr(), &packets, 200);
    let got = sink.wait_for(
        n as usize,
        Duration::from_secs(20),
        Duration::from_millis(300),
    );
    assert_eq!(got.len(), n as usize, "exactly one copy per TxID");
    let mut seen = std::collections::HashSet::new();
    for p in &got {
        assert_eq!(p.len(), 4 + 16 + 3);
        assert!(p[..4].iter().all(|&b| b == 0xEE), "forwarded unchanged");
        assert!(seen.insert(p[4..20].to_vec()), "TxID forwarded twice");
        assert_eq!(p[20], b'c');
        let i = u64::from_be_bytes(p[12..20].try_into().unwrap());
        assert_eq!(p[22], (i % 251) as u8, "payload of its own TxID");
    }
    let t = totals_after(&gate, 3 * n);
    assert_eq!(t.received, 3 * n);
    assert_eq!(t.forwarded, n);
    assert_eq!(t.claims.won, n);
    assert_eq!(t.claims.seen + t.claims.pending + t.claims.lost, 2 * n);
    let summary = gate.shutdown();
    assert_eq!(summary.total.forwarded, n);
    assert_eq!(summary.abandoned, 0);
}

#[test]
fn short_datagrams_are_counted_and_dropped() {
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.txid_offset = 8;
    let gate = Gate::start(c).unwrap();
    let mut packets: Vec<Vec<u8>> = (0..23usize).map(|len| vec![7u8; len]).collect();
    packets.push(datagram(&txid(1), 8, b""));
    send_paced(gate.local_addr(), &packets, 50);
    let got = sink.wait_for(1, Duration::from_secs(10), Duration::from_millis(200));
    assert_eq!(got.len(), 1, "only the datagram holding a whole TxID");
    assert_eq!(got[0].len(), 24);
    let t = totals_after(&gate, 24);
    assert_eq!(t.short, 23);
    assert_eq!(t.forwarded, 1);
    let text = gate.render_metrics();
    let short: u64 = text
        .lines()
        .filter(|l| l.starts_with("txgate_gate_short_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(short, 23, "{text}");
}

#[test]
fn kernel_steering_puts_every_datagram_on_its_owner_shard() {
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.steering = Steering::Cbpf;
    let gate = Gate::start(c).unwrap();
    assert!(gate.steering_active());
    let n = 3_000u64;
    let mut want: HashMap<u32, u64> = HashMap::new();
    for i in 0..n {
        *want.entry(route(&txid(i), 2)).or_default() += 1;
    }
    send_novel_and_settle(&gate, &sink, n, 200);
    let snaps = gate.snapshots();
    for (shard, s) in snaps.iter().enumerate() {
        assert_eq!(s.hops_out, 0, "shard {shard} handed packets over");
        assert_eq!(
            s.received,
            want[&(shard as u32)],
            "shard {shard} received what route() names"
        );
    }
}

#[test]
fn without_steering_shards_hand_packets_to_their_owner() {
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.steering = Steering::Off;
    let gate = Gate::start(c).unwrap();
    assert!(!gate.steering_active());
    let n = 3_000u64;
    let packets: Vec<Vec<u8>> = (0..2 * n)
        .map(|i| datagram(&txid(i % n), 0, b"y"))
        .collect();
    // Several sources, so the kernel's own hash spreads them over both shards.
    std::thread::scope(|s| {
        for part in packets.chunks(packets.len() / 4) {
            let to = gate.local_addr();
            s.spawn(move || send_paced(to, part, 100));
        }
    });
    let got = sink.wait_for(
        n as usize,
        Duration::from_secs(20),
        Duration::from_millis(300),
    );
    assert_eq!(got.len(), n as usize);
    let t = totals_after(&gate, 2 * n);
    assert!(t.hops_out > 0, "no hand-overs: {t:?}");
    assert_eq!(t.hops_out, t.hops_in);
    assert_eq!(t.forwarded, n);
    assert_eq!(
        t.claims.claims(),
        2 * n,
        "every datagram claimed on one shard"
    );
}

#[test]
fn two_instances_sharing_redis_forward_each_txid_once() {
    let redis = RedisServer::start();
    let sink = Sink::start();
    let mut gates = Vec::new();
    for name in ["a", "b"] {
        let mut c = config(1, &sink);
        c.store = redis_store(&redis.addr());
        c.engine.txidset.instance_id = format!("gate-{name}");
        gates.push(Gate::start(c).unwrap());
    }
    let n = 1_000u64;
    let packets: Vec<Vec<u8>> = (0..n).map(|i| datagram(&txid(i), 0, b"r")).collect();
    std::thread::scope(|s| {
        for g in &gates {
            let (to, p) = (g.local_addr(), &packets);
            s.spawn(move || send_paced(to, p, 100));
        }
    });
    let got = sink.wait_for(
        n as usize,
        Duration::from_secs(20),
        Duration::from_millis(500),
    );
    assert_eq!(got.len(), n as usize, "each TxID once over both instances");
    let a = totals_after(&gates[0], n);
    let b = totals_after(&gates[1], n);
    assert_eq!(a.forwarded + b.forwarded, n);
    assert_eq!(a.claims.fail_open + b.claims.fail_open, 0);
    assert_eq!(
        a.claims.lost + b.claims.lost,
        n,
        "the other instance lost each race"
    );
    // The store connections' own counters reach /metrics.
    for g in &gates {
        let text = g.render_metrics();
        let calls = metric_sum(&text, "txgate_backend_calls_total");
        assert_eq!(calls, n, "every TxID claimed in redis by each instance");
        assert!(
            metric_sum(&text, "txgate_backend_requests_total") >= calls,
            "{text}"
        );
        assert!(
            metric_sum(&text, "txgate_backend_replies_total") >= calls,
            "{text}"
        );
        let reads = metric_sum(&text, "txgate_backend_reads_total");
        let writes = metric_sum(&text, "txgate_backend_writes_total");
        assert!((1..=calls + 16).contains(&reads), "{text}");
        assert!((1..=calls + 16).contains(&writes), "{text}");
        assert_eq!(
            metric_sum(&text, "txgate_backend_connects_total"),
            1,
            "{text}"
        );
        assert_eq!(
            metric_sum(&text, "txgate_backend_disconnects_total"),
            0,
            "{text}"
        );
        assert_eq!(
            metric_sum(&text, "txgate_backend_late_replies_total"),
            0,
            "{text}"
        );
        // Redis evicts out of our sight: no figure rather than a false 0.
        assert!(!text.contains("txgate_store_evictions_total"), "{text}");
    }
}

/// A full tier-1 or memory store drops TxIDs before their TTL, cutting
/// their dedup window short: each shard's evictions reach /metrics.
#[test]
fn evictions_from_a_full_tier1_and_memory_store_reach_the_metrics() {
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.engine.txidset.tier1_capacity = 100;
    c.store.memory_max_keys = 300;
    let gate = Gate::start(c).unwrap();
    let n = 1_000u64;
    // Published with the claims that made them.
    send_novel_and_settle(&gate, &sink, n, 100);
    let text = gate.render_metrics();
    // Each shard got well over its 100 tier-1 entries and 150 store keys.
    assert_eq!(
        metric_sum(&text, "txgate_tier1_evictions_total"),
        n - 2 * 100,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "txgate_store_evictions_total"),
        n - 300,
        "{text}"
    );
    for family in [
        "# TYPE txgate_tier1_evictions_total counter",
        "# TYPE txgate_store_evictions_total counter",
        "txgate_tier1_evictions_total{shard=\"1\"}",
        "txgate_store_evictions_total{shard=\"1\"}",
    ] {
        assert!(text.contains(family), "metrics lack {family}:\n{text}");
    }
    gate.shutdown();
}

/// The sum over shards of a counter in Prometheus text.
/// Sends TxIDs 0..n once each (`burst` a millisecond), waits for the sink
/// to get them all and the gate to publish them.
fn send_novel_and_settle(gate: &Gate, sink: &Sink, n: u64, burst: usize) {
    let packets: Vec<Vec<u8>> = (0..n).map(|i| datagram(&txid(i), 0, b"n")).collect();
    send_paced(gate.local_addr(), &packets, burst);
    sink.wait_for(
        n as usize,
        Duration::from_secs(20),
        Duration::from_millis(100),
    );
    totals_after(gate, n);
}

fn metric_sum(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn fail_open_boot_serves_tier1_then_switches_to_redis_when_it_starts() {
    let redis = RedisServer::start();
    let addr = redis.addr();
    redis.kill9();
    let sink = Sink::start();

    let mut c = config(2, &sink);
    c.store = redis_store(&addr);
    // Without the flag: a specific error, nothing served.
    let err = Gate::start(c.clone()).err().expect("fails closed");
    let msg = err.to_string();
    assert!(
        msg.contains("redis store is unreachable") && msg.contains("--fail-open-boot"),
        "{msg}"
    );

    c.fail_open_boot = true;
    c.backend_retry = Duration::from_millis(100);
    let gate = Gate::start(c).unwrap();
    assert!(!gate.store_connected());
    let (ready, why) = gate.readiness();
    assert!(!ready && why.starts_with("degraded"), "{why}");
    assert!(why.contains("refused"), "the last error is named: {why}");
    let first: Vec<Vec<u8>> = (0..200u64)
        .flat_map(|i| [datagram(&txid(i), 0, b"1"), datagram(&txid(i), 0, b"2")])
        .collect();
    send_paced(gate.local_addr(), &first, 100);
    sink.wait_for(200, Duration::from_secs(10), Duration::from_millis(200));
    assert_eq!(
        sink.count(),
        200,
        "tier-1 alone dedups within this instance"
    );

    redis.restart();
    wait_for(
        "the gate to connect to redis",
        Duration::from_secs(10),
        || gate.store_connected(),
    );
    let (ready, why) = gate.readiness();
    assert!(ready, "{why}");
    let second: Vec<Vec<u8>> = (1_000..1_200u64)
        .map(|i| datagram(&txid(i), 0, b"3"))
        .collect();
    send_paced(gate.local_addr(), &second, 100);
    sink.wait_for(400, Duration::from_secs(10), Duration::from_millis(200));
    let t = totals_after(&gate, 600);
    assert_eq!(t.claims.backend_calls, 200, "new TxIDs claimed in redis");
    assert_eq!(t.claims.fail_open, 0);
    let keys = redis.cmd(&["DBSIZE"]);
    assert!(matches!(keys, support::redis::Resp::Int(200)), "{keys:?}");

    // The connections are live gauges: a store lost after the start shows
    // (txgate_store_connected only says the store was opened).
    let up = |g: &Gate| metric_sum(&g.render_metrics(), "txgate_store_connections_up");
    wait_for(
        "both shards' connections up",
        Duration::from_secs(5),
        || up(&gate) == 2,
    );
    redis.kill9();
    wait_for(
        "the lost connections to show",
        Duration::from_secs(10),
        || up(&gate) == 0,
    );
    let text = gate.render_metrics();
    assert_eq!(metric_sum(&text, "txgate_store_connections"), 2, "{text}");
    assert!(text.contains("txgate_store_connected 1"), "{text}");
}

/// Names of this process's threads that are shard executors.
fn shard_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("txgate-shard"))
        .collect()
}

#[test]
fn a_stop_during_a_store_retry_still_stops_the_shards() {
    // A "store" that hangs up on the first connection (start-up fails
    // fast, and the gate boots degraded), then accepts and never answers:
    // each retry sits in its dial for the whole dial timeout, holding the
    // engine.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (i, c) in silent.incoming().take(64).enumerate() {
            if i > 0 {
                held.push(c);
            }
        }
    });
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.store = redis_store(&addr);
    c.store.dial_timeout = Duration::from_secs(10);
    c.fail_open_boot = true;
    c.backend_retry = Duration::from_millis(50);
    let gate = Gate::start(c).unwrap();
    assert!(!shard_threads().is_empty());
    // Let a retry begin its dial.
    std::thread::sleep(Duration::from_millis(300));
    let (ready, why) = gate.readiness();
    assert!(!ready && why.starts_with("degraded"), "{why}");
    gate.stop();
    // Stopped is what it says then, degraded or not before.
    assert_eq!(gate.readiness(), (false, "stopped".to_string()));
    drop(gate);
    // Well before the retry's dial ends (which used to be what let the
    // engine go, its last holder).
    wait_for("the shard threads to end", Duration::from_secs(3), || {
        shard_threads().is_empty()
    });
}

#[test]
fn readiness_names_a_shard_that_cannot_reach_the_store() {
    let redis = RedisServer::start();
    let sink = Sink::start();
    let mut c = config(2, &sink);
    c.store = redis_store(&redis.addr());
    c.store.redis_client_name = "ready-test".into();
    let gate = Gate::start(c).unwrap();
    let (ready, why) = gate.readiness();
    assert!(ready, "{why}");
    // Shard 1 loses its connection and cannot get another (the server is
    // full); shard 0's stays up.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    let id = clients
        .lines()
        .find(|l| l.contains("name=ready-test-s1 "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("shard 1's connection: {clients}"))
        .to_owned();
    support::redis::send_commands(
        &redis.addr(),
        &[
            vec![&b"CLIENT"[..], b"KILL", b"ID", id.as_bytes()],
            vec![&b"CONFIG"[..], b"SET", b"maxclients", b"1"],
        ],
        Duration::from_secs(2),
    )
    .unwrap();
    wait_for(
        "shard 1 to be named unready",
        Duration::from_secs(10),
        || {
            let (ready, why) = gate.readiness();
            !ready && why.contains("from shard 1 of 2")
        },
    );
}

#[test]
fn forwards_to_a_multicast_group_with_ttl_0_so_nothing_leaves_the_host() {
    // TTL 0 keeps multicast on this host (looped back to local members), so
    // the test sends nothing beyond the machine.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let group = std::net::Ipv4Addr::new(239, 255, (port >> 8) as u8, port as u8);
    let member = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    member.set_reuse_address(true).unwrap();
    member
        .bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())
        .unwrap();
    member
        .join_multicast_v4(&group, &std::net::Ipv4Addr::UNSPECIFIED)
        .unwrap();
    let member: std::net::UdpSocket = member.into();
    member
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let sink = Sink::start();
    let mut c = config(1, &sink);
    c.forward = vec![std::net::SocketAddr::from((group, port))];
    c.multicast.ttl = 0;
    c.multicast.loopback = true;
    let gate = Gate::start(c).unwrap();
    let packets: Vec<Vec<u8>> = (0..50u64)
        .flat_map(|i| [datagram(&txid(i), 0, b"m"), datagram(&txid(i), 0, b"m")])
        .collect();
    send_paced(gate.local_addr(), &packets, 20);
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 50 && std::time::Instant::now() < deadline {
        if let Ok(n) = member.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(n) = member.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    assert_eq!(got.len(), 50, "one copy per TxID to the group");
    let t = totals_after(&gate, 100);
    assert_eq!(t.forwarded, 50);
}

/// A shard whose socket is all it waits on sleeps in its socket read while
/// traffic flows, and must still turn its reactor: under a stream that never pauses
/// for a millisecond, its published counters (a reactor timer) keep moving,
/// and it stops on request.
#[test]
fn a_shard_under_a_stream_without_pauses_keeps_publishing_and_stops() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let sink = Sink::start();
    let gate = Gate::start(config(1, &sink)).unwrap();
    let to = gate.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = stream(
        to,
        stop.clone(),
        Duration::from_secs(5),
        Some(Duration::from_micros(50)),
    );
    // The shard publishes every 100 ms, so ten values take about a second of
    // the 5 s stream; a reactor that turned only when the stream happened to
    // pause for a millisecond showed them after 7 s.
    let values = published_values(&gate, 10, Duration::from_secs(10));
    assert!(
        !sender.is_finished(),
        "the stream was still flowing while the counters moved"
    );
    let first = *values.last().unwrap();
    let summary = gate.shutdown();
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    assert!(summary.total.received >= first);
    assert!(summary.total.received <= sent);
    assert_eq!(summary.total.forwarded, 1000.min(summary.total.received));
}

/// Sends datagrams to `to` (1 000 TxIDs round robin) until `stop`, `limit`
/// or 20 M datagrams, `pause` apart; returns how many went out. Unpaced it
/// floods: a full socket buffer drops on the floor, the sender never blocks.
fn stream(
    to: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    limit: Duration,
    pause: Option<Duration>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let until = std::time::Instant::now() + limit;
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < until
            && sent < 20_000_000
        {
            let r = tx.send_to(&datagram(&txid(sent % 1000), 0, b"s"), to);
            sent += 1;
            if let Some(p) = pause {
                r.unwrap();
                std::thread::sleep(p);
            }
        }
        sent
    })
}

/// Waits (up to `within`) until the gate has published `n` successive
/// increases of its received counter; returns the values seen.
fn published_values(gate: &Gate, n: usize, within: Duration) -> Vec<u64> {
    let published = || gate.snapshots().iter().map(|s| s.received).sum::<u64>();
    let mut values = vec![published()];
    wait_for(&format!("{n} published values mid-stream"), within, || {
        let v = published();
        if v > *values.last().unwrap() {
            values.push(v);
        }
        std::thread::sleep(Duration::from_millis(10));
        values.len() > n
    });
    values
}

/// Under a flood (a sender that never pauses, so every read finds a full
/// batch), the shard's reactor still turns: its published counters move
/// while the flood lasts. A step-aside that did not really yield (a timer
/// already due when first polled) froze them until the flood ended.
#[test]
fn a_flooded_shard_keeps_publishing() {
    let sink = Sink::start();
    let gate = Gate::start(config(1, &sink)).unwrap();
    publishing_under_a_flood(&gate, |_| {});
    gate.shutdown();
}

/// Floods `gate` (a sender that never pauses, up to 8 s), waits for five
/// rising published values while the flood is still on, runs `mid` on the
/// gate then, and stops the sender.
fn publishing_under_a_flood(gate: &Gate, mid: impl FnOnce(&Gate)) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let stop = Arc::new(AtomicBool::new(false));
    let sender = stream(
        gate.local_addr(),
        stop.clone(),
        Duration::from_secs(8),
        None,
    );
    published_values(gate, 5, Duration::from_secs(8));
    mid(gate);
    assert!(
        !sender.is_finished(),
        "the flood was still on while the counters moved"
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
}

/// The same with claims waiting on a network store: a read that comes back
/// short sends the shard to wait for the next datagram, and under steady
/// traffic that wait completes at once (one is already queued), so it never
/// lets the runtime turn. The turn must come anyway: the store's requests
/// are written, its replies read and the counters published by other tasks
/// of the shard. (Before the fix the shard could keep its core for as long
/// as datagrams kept arriving just fast enough; this stream does not hit
/// that window reliably — it passed on the old code too — so it guards the
/// path end to end rather than pinning the fix.)
#[test]
fn a_streamed_shard_with_claims_on_the_store_keeps_turning() {
    let redis = RedisServer::start();
    let sink = Sink::start();
    let mut c = config(1, &sink);
    c.store = redis_store(&redis.addr());
    let gate = Gate::start(c).unwrap();
    publishing_under_a_flood(&gate, |gate| {
        let decided: u64 = gate
            .snapshots()
            .iter()
            .map(|s| s.claims.won + s.claims.lost)
            .sum();
        assert!(decided > 0, "claims completed through the store mid-stream");
    });
    gate.shutdown();
}
