//! Self-tests of the test support: real `redis-server` processes (standalone
//! and cluster, with their faults) and the TCP fault proxy.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::redis::{
    RedisCluster, RedisServer, Resp, encode, hashtag_for_slot, key_slot, ping, send_commands,
};

const SHORT: Duration = Duration::from_millis(200);
const LONG: Duration = Duration::from_secs(2);

fn bulk(s: &str) -> Resp {
    Resp::Bulk(s.as_bytes().to_vec())
}

// ---------------------------------------------------------------------------
// Standalone
// ---------------------------------------------------------------------------

#[test]
fn standalone_start_kill9_restart_same_port() {
    let s = RedisServer::start();
    assert_eq!(s.addr(), format!("127.0.0.1:{}", s.port()));
    assert!(ping(&s.addr(), LONG));
    assert_eq!(s.cli(&["SET", "k", "v"]).trim(), "OK");
    assert_eq!(s.cmd(&["GET", "k"]), bulk("v"));

    let port = s.port();
    let pid = s.pid().expect("running");
    s.kill9();
    assert!(!s.is_running());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped"
    );
    assert!(!ping(&s.addr(), SHORT), "a killed server answers nothing");

    s.restart();
    assert_eq!(s.port(), port, "same port after restart");
    assert_ne!(s.pid(), Some(pid));
    assert!(ping(&s.addr(), LONG));
    assert_eq!(s.cmd(&["GET", "k"]), Resp::Nil, "no persistence: data gone");
}

#[test]
fn standalone_pause_resume() {
    let s = RedisServer::start();
    s.pause();
    assert!(s.is_paused() && !s.is_live());
    let t = Instant::now();
    assert!(!ping(&s.addr(), SHORT), "a paused server must not answer");
    assert!(t.elapsed() >= SHORT);
    s.resume();
    assert!(ping(&s.addr(), LONG), "answers again after resume");
    // Drop while paused must not hang.
    s.pause();
}

#[test]
fn standalone_requirepass_and_drop_cleans_up() {
    let s = RedisServer::start_with(&["--requirepass", "secret"]);
    assert_eq!(
        send_commands(&s.addr(), &[vec![b"GET", b"k"]], LONG).unwrap(),
        Resp::Error("NOAUTH Authentication required.".into())
    );
    assert_eq!(s.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(s.cli(&["GET", "k"]).trim(), "v");
    let (pid, dir) = (s.pid().unwrap(), s.dir().to_path_buf());
    assert!(dir.starts_with(std::env::temp_dir()));
    drop(s);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed on drop"
    );
    assert!(!dir.exists(), "temp dir removed on drop");
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// `slot → node port` from `CLUSTER NODES` text, parsed independently of
/// `RedisCluster::node_for_slot` (which uses `CLUSTER SLOTS`).
fn owner_port_from_cluster_nodes(text: &str, slot: u16) -> u16 {
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 {
            continue;
        }
        let port: u16 = fields[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("port in CLUSTER NODES");
        for range in &fields[8..] {
            if range.starts_with('[') {
                continue; // migration marker
            }
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
            if (a..=b).contains(&slot) {
                return port;
            }
        }
    }
    panic!("slot {slot} not in CLUSTER NODES:\n{text}");
}

#[test]
fn cluster_start_slots_migration_restart() {
    let c = RedisCluster::start();
    assert_eq!(c.nodes().len(), 3);
    assert_eq!(c.seed_addr(), c.node(0).addr());
    for n in c.nodes() {
        assert!(n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
    }

    // Slot math and ownership agree with redis itself.
    let nodes_text = c.node(1).cli(&["CLUSTER", "NODES"]);
    for key in [
        "foo",
        "bar",
        "{user1000}.following",
        "txid:0001",
        "a{}b",
        "x{y",
    ] {
        let slot: u16 = c
            .node(0)
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
        let owner = c.node_for_slot(slot);
        assert_eq!(
            c.node(owner).port(),
            owner_port_from_cluster_nodes(&nodes_text, slot),
            "{key}"
        );
    }
    let tag = hashtag_for_slot(777);
    assert_eq!(key_slot(format!("k{{{tag}}}z").as_bytes()), 777);

    // Keys in one slot: "foo" plus 150 hash-tagged ones (two MIGRATE batches).
    let slot = key_slot(b"foo");
    let tag = hashtag_for_slot(slot);
    assert_eq!(c.node(0).cli(&["-c", "SET", "foo", "bar"]).trim(), "OK");
    let keys: Vec<String> = (0..150).map(|i| format!("{{{tag}}}:{i}")).collect();
    let mut mset = vec!["-c", "MSET"];
    for k in &keys {
        mset.extend([k.as_str(), "v"]);
    }
    assert_eq!(c.node(2).cli(&mset).trim(), "OK");

    let from = c.node_for_slot(slot);
    let to = (from + 1) % 3;
    assert_eq!(c.node(from).cmd(&["GET", "foo"]), bulk("bar"));

    // Half-migrated: keys moved answer ASK on the source, are served on the
    // target after ASKING; the slot still belongs to the source.
    c.begin_migration(slot, from, to);
    let marker = format!("[{slot}->-{}]", c.node_id(to));
    assert!(c.node(from).cli(&["CLUSTER", "NODES"]).contains(&marker));
    assert_eq!(c.move_keys(slot, from, to), 151);
    assert_eq!(c.node_for_slot(slot), from);
    match c.node(from).cmd(&["GET", "foo"]) {
        Resp::Error(e) => assert!(e.starts_with(&format!("ASK {slot} ")), "{e}"),
        other => panic!("expected ASK, got {other:?}"),
    }
    let asking = send_commands(
        &c.node(to).addr(),
        &[vec![b"ASKING"], vec![b"GET", b"foo"]],
        LONG,
    )
    .unwrap();
    assert_eq!(asking, bulk("bar"));

    c.finish_migration(slot, from, to);
    assert_eq!(c.node_for_slot(slot), to);
    assert_eq!(c.node(to).cmd(&["GET", "foo"]), bulk("bar"));
    assert_eq!(
        c.node(to)
            .cmd(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]),
        Resp::Int(151)
    );
    match c.node(from).cmd(&["GET", "foo"]) {
        Resp::Error(e) => assert!(e.starts_with(&format!("MOVED {slot} ")), "{e}"),
        other => panic!("expected MOVED, got {other:?}"),
    }
    c.wait_state_ok(LONG);

    // And back in one call.
    assert_eq!(c.migrate_slot(slot, to, from), 151);
    assert_eq!(c.node_for_slot(slot), from);
    assert_eq!(c.node(2).cli(&["-c", "GET", "foo"]).trim(), "bar");

    // A killed node comes back on its port with its id and slots.
    let id = c.node_id(2).to_string();
    c.node(2).kill9();
    c.node(2).restart();
    assert_eq!(c.node(2).cmd(&["CLUSTER", "MYID"]), bulk(&id));
    c.wait_state_ok(Duration::from_secs(20));
}

// ---------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------

fn connect(p: &FaultProxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads exactly `len` bytes, counting the reads that returned data.
fn read_counting(s: &mut TcpStream, len: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut reads = 0;
    let mut buf = [0u8; 4096];
    while out.len() < len {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "EOF after {} of {len} bytes", out.len());
        out.extend_from_slice(&buf[..n]);
        reads += 1;
    }
    (out, reads)
}

#[test]
fn proxy_passes_ping() {
    let s = RedisServer::start();
    let p = FaultProxy::start(s.socket_addr());
    assert_eq!(p.upstream(), s.socket_addr());
    assert!(ping(&p.addr().to_string(), LONG));
    assert!(ping(&p.addr().to_string(), LONG));
    assert_eq!(p.connections(), 2);
}

#[test]
fn proxy_splits_replies_into_single_bytes() {
    let s = RedisServer::start();
    s.cmd(&["SET", "big", &"x".repeat(200)]).expect_ok("SET");
    s.cmd(&["SET", "small", &"y".repeat(20)]).expect_ok("SET");
    let p = FaultProxy::start(s.socket_addr());
    p.set_split_replies(true);
    let mut c = connect(&p);

    // Default gap (50 µs): intact, in many reads.
    let reply = format!("$200\r\n{}\r\n", "x".repeat(200)).into_bytes();
    c.write_all(&encode(&[b"GET", b"big"])).unwrap();
    let (got, reads) = read_counting(&mut c, reply.len());
    assert_eq!(got, reply);
    eprintln!("50 µs gap: {} bytes in {reads} reads", reply.len());
    assert!(reads >= reply.len() / 4, "{reads} reads of {}", reply.len());

    // A wider gap: (nearly) every byte on its own.
    p.set_split_gap(Duration::from_millis(1));
    let reply = format!("$20\r\n{}\r\n", "y".repeat(20)).into_bytes();
    c.write_all(&encode(&[b"GET", b"small"])).unwrap();
    let (got, reads) = read_counting(&mut c, reply.len());
    assert_eq!(got, reply);
    eprintln!("1 ms gap: {} bytes in {reads} reads", reply.len());
    assert!(reads >= reply.len() / 2, "{reads} reads of {}", reply.len());

    // Off again: one write, one read.
    p.set_split_replies(false);
    c.write_all(&encode(&[b"PING"])).unwrap();
    assert_eq!(read_counting(&mut c, 7).0, b"+PONG\r\n");
}

#[test]
fn proxy_reset_after_bytes_cuts_the_reply() {
    let s = RedisServer::start();
    s.cmd(&["SET", "big", &"x".repeat(1000)]).expect_ok("SET");
    let p = FaultProxy::start(s.socket_addr());
    p.reset_after_bytes(10);
    let mut c = connect(&p);
    c.write_all(&encode(&[b"GET", b"big"])).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break ErrorKind::UnexpectedEof,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e.kind(),
        }
    };
    eprintln!("got {} bytes, then {end:?}", got.len());
    assert!(
        matches!(end, ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof),
        "{end:?}"
    );
    assert!(got.len() <= 10, "{} bytes forwarded", got.len());
    assert!(b"$1000\r\nxxx".starts_with(&got));
    assert_eq!(p.resets(), 1);
    // One-shot: the next connection works.
    assert!(ping(&p.addr().to_string(), LONG));
}

#[test]
fn proxy_blackhole_delay_close_and_drop() {
    let s = RedisServer::start();
    let p = FaultProxy::start(s.socket_addr());
    let mut c = connect(&p);

    // Blackhole holds the reply; it arrives intact when lifted. The pump
    // checks the knob between reads (50 ms timeouts): give it a round.
    p.set_blackhole(true);
    std::thread::sleep(Duration::from_millis(150));
    c.set_read_timeout(Some(SHORT)).unwrap();
    c.write_all(&encode(&[b"PING"])).unwrap();
    let mut buf = [0u8; 64];
    let err = c.read(&mut buf).expect_err("blackholed");
    assert!(matches!(
        err.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut
    ));
    p.set_blackhole(false);
    c.set_read_timeout(Some(LONG)).unwrap();
    assert_eq!(read_counting(&mut c, 7).0, b"+PONG\r\n");

    // Delay.
    p.set_delay(Duration::from_millis(150));
    let t = Instant::now();
    c.write_all(&encode(&[b"PING"])).unwrap();
    assert_eq!(read_counting(&mut c, 7).0, b"+PONG\r\n");
    assert!(t.elapsed() >= Duration::from_millis(150));
    p.set_delay(Duration::ZERO);

    // close_all: the client sees EOF.
    assert_eq!(p.active_connections(), 1);
    p.close_all();
    assert_eq!(c.read(&mut buf).unwrap(), 0);

    // Drop with a stalled connection is prompt and closes it.
    let mut c = connect(&p);
    p.set_blackhole(true);
    c.write_all(&encode(&[b"PING"])).unwrap();
    let t = Instant::now();
    drop(p);
    // Bounded by the pumps' 50 ms read timeouts; slack for a loaded box.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        t.elapsed()
    );
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
}
