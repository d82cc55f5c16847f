//! Self-test of the protocol-level Aerospike test server
//! (`tests/support/aerospike.rs`), driven with our own codec over plain
//! `std::net::TcpStream`s.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::aerospike::AeroServer;
use txgate::cache::aerospike::codec::{
    self, BinName, InfoPairs, Op, PARTITIONS, Reply, Request, ResultCode, Ttl,
};

const NS: &str = "test";
const SET: &[u8] = b"set";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads more bytes; false on EOF or a reset.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                false
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    fn reply(&mut self) -> Reply {
        loop {
            if let Some((reply, used)) = codec::parse_reply(&self.buf).expect("a valid reply") {
                self.buf.drain(..used);
                return reply;
            }
            assert!(self.fill(), "EOF before a reply");
        }
    }

    fn info(&mut self, commands: &[&str]) -> InfoPairs {
        let mut out = Vec::new();
        codec::encode_info(commands, &mut out);
        self.send(&out);
        loop {
            if let Some((pairs, used)) = codec::parse_info_reply(&self.buf).expect("info reply") {
                self.buf.drain(..used);
                return pairs;
            }
            assert!(self.fill(), "EOF before an info reply");
        }
    }

    fn info1(&mut self, command: &str) -> String {
        let pairs = self.info(&[command]);
        assert_eq!(pairs.len(), 1, "{pairs:?}");
        assert_eq!(pairs[0].0, command);
        pairs[0].1.clone()
    }

    fn call(&mut self, op: Op<'_>, key: &[u8]) -> Reply {
        self.send(&encode(op, key));
        self.reply()
    }
}

fn bin() -> BinName {
    BinName::new(b"v").unwrap()
}

fn encode(op: Op<'_>, key: &[u8]) -> Vec<u8> {
    encode_ns(NS, op, key)
}

fn encode_ns(ns: &str, op: Op<'_>, key: &[u8]) -> Vec<u8> {
    let digest = codec::digest(SET, key);
    let mut out = Vec::new();
    codec::encode_request(
        &Request {
            namespace: ns.as_bytes(),
            set: SET,
            digest: &digest,
            timeout_ms: 1000,
            op,
        },
        &mut out,
    )
    .expect("encodes");
    out
}

fn setnx<'a>(ttl: Ttl, value: &'a [u8]) -> Op<'a> {
    Op::SetNx {
        ttl,
        bin: bin(),
        value,
    }
}

fn set<'a>(ttl: Ttl, value: &'a [u8]) -> Op<'a> {
    Op::Set {
        ttl,
        bin: bin(),
        value,
    }
}

fn get() -> Op<'static> {
    Op::Get { bin: bin() }
}

/// A key whose partition is mastered by `node` of `nodes` (p % nodes).
fn key_on(node: usize, nodes: usize, salt: &str) -> Vec<u8> {
    (0u32..)
        .map(|i| format!("{salt}-{i}").into_bytes())
        .find(|k| usize::from(codec::partition_id(&codec::digest(SET, k))) % nodes == node)
        .unwrap()
}

#[test]
fn create_only_read_delete_semantics() {
    let server = AeroServer::start(1, NS);
    let mut c = Conn::open(server.node_addr(0));
    let ok = ResultCode::OK;
    assert_eq!(c.call(setnx(Ttl::Never, b"one"), b"k").result, ok);
    assert_eq!(
        c.call(setnx(Ttl::Never, b"two"), b"k").result,
        ResultCode::RECORD_EXISTS
    );
    let hit = c.call(get(), b"k");
    assert_eq!(hit.result, ok);
    assert_eq!(hit.bin(b"v").unwrap().value, b"one");
    assert_eq!(hit.bin(b"v").unwrap().particle_type, codec::PARTICLE_BLOB);
    assert_eq!(hit.expiration, 0, "never expires");
    assert_eq!(c.call(get(), b"absent").result, ResultCode::NOT_FOUND);
    // Set replaces; generation moves.
    let replaced = c.call(set(Ttl::Never, b"three"), b"k");
    assert_eq!((replaced.result, replaced.generation), (ok, 2));
    assert_eq!(c.call(get(), b"k").bin(b"v").unwrap().value, b"three");
    assert_eq!(c.call(Op::Del, b"k").result, ok);
    assert_eq!(c.call(Op::Del, b"k").result, ResultCode::NOT_FOUND);
    assert_eq!(c.call(get(), b"k").result, ResultCode::NOT_FOUND);
    assert_eq!(c.call(setnx(Ttl::Seconds(60), b"again"), b"k").result, ok);
    let with_ttl = c.call(get(), b"k");
    assert_ne!(with_ttl.expiration, 0, "a 60 s record has an expiry");
    // Another namespace: NAMESPACE_NOT_FOUND.
    c.send(&encode_ns("other", get(), b"k"));
    assert_eq!(c.reply().result, ResultCode(20));
    // A write without ops: PARAMETER (hand-built: the codec cannot send one).
    let mut no_ops = encode(setnx(Ttl::Never, b"x"), b"z");
    let op_len = 8 + 1 + 1;
    no_ops.truncate(no_ops.len() - op_len);
    no_ops[7] -= op_len as u8;
    no_ops[29] = 0;
    c.send(&no_ops);
    assert_eq!(c.reply().result, ResultCode::PARAMETER);
    assert_eq!(server.requests(), 13);
    assert_eq!(server.proxied(), 0);
}

#[test]
fn ttl_expires_and_reads_never_extend_it() {
    let server = AeroServer::start(1, NS);
    let mut c = Conn::open(server.node_addr(0));
    assert_eq!(
        c.call(setnx(Ttl::Seconds(1), b"v"), b"t").result,
        ResultCode::OK
    );
    // As on a real server, a 1 s TTL lives between 1 and 2 s: the void time
    // is the current whole second plus 1, expired once the clock passes it.
    thread::sleep(Duration::from_millis(600));
    assert_eq!(c.call(get(), b"t").result, ResultCode::OK);
    thread::sleep(Duration::from_millis(1_500));
    assert_eq!(c.call(get(), b"t").result, ResultCode::NOT_FOUND);
    // Expired counts as absent for create-only.
    assert_eq!(
        c.call(setnx(Ttl::Seconds(1), b"w"), b"t").result,
        ResultCode::OK
    );
    assert_eq!(server.live_records(), 1);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = AeroServer::start(1, NS);
    let mut c = Conn::open(server.node_addr(0));
    c.call(set(Ttl::Never, b"p"), b"present");
    let mut batch = Vec::new();
    for (op, key) in [
        (setnx(Ttl::Seconds(30), b"1"), &b"new"[..]),
        (setnx(Ttl::Seconds(30), b"2"), b"new"),
        (get(), b"present"),
        (get(), b"absent"),
        (Op::Del, b"new"),
        (Op::Del, b"new"),
        (set(Ttl::Never, b"3"), b"new"),
    ] {
        batch.extend_from_slice(&encode(op, key));
    }
    c.send(&batch);
    let codes: Vec<u8> = (0..7).map(|_| c.reply().result.0).collect();
    assert_eq!(codes, [0, 5, 0, 2, 0, 2, 0]);
}

#[test]
fn info_commands_of_a_single_node() {
    let server = AeroServer::start(1, NS);
    let mut c = Conn::open(server.node_addr(0));
    let pairs = c.info(&[
        "node",
        "build",
        "status",
        "cluster-name",
        "partitions",
        "namespaces",
        "partition-generation",
        "peers-generation",
        "bogus",
    ]);
    let got: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("node", "BB9000000000001"),
            ("build", "8.1.0.0"),
            ("status", "ok"),
            ("cluster-name", "txgate-test"),
            ("partitions", "4096"),
            ("namespaces", "test"),
            ("partition-generation", "1"),
            ("peers-generation", "1"),
            ("bogus", "ERROR:4:not supported"),
        ]
    );
    assert!(c.info1("features").contains("peers"));
    let masters = codec::parse_replicas_masters(&c.info1("replicas"), NS)
        .unwrap()
        .unwrap();
    assert!(masters.iter().all(|&m| m));
    let peers = codec::parse_peers_clear_std(&c.info1("peers-clear-std")).unwrap();
    assert!(peers.nodes.is_empty());
    assert_eq!(server.requests(), 0, "info is not counted");
}

#[test]
fn three_nodes_split_the_partitions_and_list_their_peers() {
    let server = AeroServer::start(3, NS);
    assert_eq!(server.seeds().len(), 3);
    for i in 0..3 {
        let mut c = Conn::open(server.node_addr(i));
        assert_eq!(c.info1("node"), server.node_id(i));
        let masters = codec::parse_replicas_masters(&c.info1("replicas"), NS)
            .unwrap()
            .unwrap();
        let owned: Vec<usize> = (0..PARTITIONS).filter(|&p| masters[p]).collect();
        let want: Vec<usize> = (0..PARTITIONS).filter(|&p| p % 3 == i).collect();
        assert_eq!(owned, want, "node {i}");
        let peers = codec::parse_peers_clear_std(&c.info1("peers-clear-std")).unwrap();
        let mut got: Vec<(String, String, u16)> = peers
            .nodes
            .iter()
            .map(|p| (p.id.clone(), p.addrs[0].0.clone(), p.addrs[0].1))
            .collect();
        got.sort();
        let want: Vec<(String, String, u16)> = (0..3)
            .filter(|&j| j != i)
            .map(|j| {
                (
                    server.node_id(j),
                    "127.0.0.1".to_owned(),
                    server.node_addr(j).port(),
                )
            })
            .collect();
        assert_eq!(got, want, "node {i}");
    }
    // Routed right: no proxying; routed wrong: served, counted.
    let key = key_on(1, 3, "route");
    let mut on1 = Conn::open(server.node_addr(1));
    assert_eq!(
        on1.call(setnx(Ttl::Never, b"x"), &key).result,
        ResultCode::OK
    );
    assert_eq!(server.proxied(), 0);
    let mut on0 = Conn::open(server.node_addr(0));
    assert_eq!(
        on0.call(setnx(Ttl::Never, b"y"), &key).result,
        ResultCode::RECORD_EXISTS,
        "one store behind every node"
    );
    assert_eq!(server.proxied(), 1);
    // Misroute: the map shifts by one node and the generation moves.
    server.set_misroute(true);
    assert_eq!(on0.info1("partition-generation"), "2");
    let masters = codec::parse_replicas_masters(&on0.info1("replicas"), NS)
        .unwrap()
        .unwrap();
    assert!((0..PARTITIONS).all(|p| masters[p] == (p % 3 == 1)));
    assert_eq!(on0.call(get(), &key).result, ResultCode::OK);
    assert_eq!(server.proxied(), 1, "node 0 masters it now");
    assert_eq!(on1.call(get(), &key).result, ResultCode::OK);
    assert_eq!(server.proxied(), 2);
}

#[test]
fn fault_knobs() {
    let server = AeroServer::start(1, NS);
    let mut c = Conn::open(server.node_addr(0));
    // Delay before each reply.
    server.set_delay(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(c.call(get(), b"d").result, ResultCode::NOT_FOUND);
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.set_delay(Duration::ZERO);
    // Key busy: every write answers 14; reads still work.
    server.set_key_busy(true);
    assert_eq!(
        c.call(setnx(Ttl::Never, b"b"), b"busy").result,
        ResultCode::KEY_BUSY
    );
    assert_eq!(c.call(Op::Del, b"busy").result, ResultCode::KEY_BUSY);
    assert_eq!(c.call(get(), b"busy").result, ResultCode::NOT_FOUND);
    server.set_key_busy(false);
    // Forbidden TTL: a TTL answers 22, no expiry is accepted.
    server.set_forbidden_ttl(true);
    assert_eq!(
        c.call(setnx(Ttl::Seconds(5), b"f"), b"ttl").result,
        ResultCode::FORBIDDEN
    );
    assert_eq!(
        c.call(setnx(Ttl::Never, b"f"), b"ttl").result,
        ResultCode::OK
    );
    server.set_forbidden_ttl(false);
    // Drop connections: EOF on the old one, a new one works.
    assert_eq!(server.connections(), 1);
    server.drop_connections();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "connection not closed");
        if !c.fill() {
            break;
        }
    }
    let mut fresh = Conn::open(server.node_addr(0));
    assert_eq!(fresh.info1("status"), "ok");
    assert_eq!(fresh.call(get(), b"ttl").result, ResultCode::OK);
}

/// The tending knobs: one node's `replicas` stops parsing (the others'
/// still parse, and the generation moves at each change), and phantom peers
/// are listed by every node under their own ids.
#[test]
fn bad_replicas_and_phantom_peers() {
    let server = AeroServer::start(3, NS);
    let mut on1 = Conn::open(server.node_addr(1));
    let mut on2 = Conn::open(server.node_addr(2));
    let generation = on1.info1("partition-generation");
    server.set_bad_replicas(1, true);
    assert_ne!(on1.info1("partition-generation"), generation);
    assert!(matches!(
        codec::parse_replicas_masters(&on1.info1("replicas"), NS),
        Err(codec::CodecError::Replicas { .. })
    ));
    let masters = codec::parse_replicas_masters(&on2.info1("replicas"), NS)
        .unwrap()
        .unwrap();
    assert!((0..PARTITIONS).all(|p| masters[p] == (server.master_of(p as u16) == 2)));
    server.set_bad_replicas(1, false);
    assert!(
        codec::parse_replicas_masters(&on1.info1("replicas"), NS)
            .unwrap()
            .is_some()
    );
    let phantoms: Vec<SocketAddr> = (0..3)
        .map(|i| format!("127.0.0.1:{}", 4000 + i).parse().unwrap())
        .collect();
    server.list_phantoms(&phantoms);
    let peers = codec::parse_peers_clear_std(&on2.info1("peers-clear-std")).unwrap();
    for (i, a) in phantoms.iter().enumerate() {
        let id = AeroServer::phantom_id(i);
        assert!(
            peers
                .nodes
                .iter()
                .any(|p| p.id == id && p.addrs == [("127.0.0.1".to_owned(), a.port())]),
            "{id} at {a}: {peers:?}"
        );
    }
    assert_eq!(AeroServer::phantom_id(0), support::aerospike::PHANTOM_ID);
}

#[test]
fn garbage_closes_the_connection_and_drop_ends_everything() {
    let server = AeroServer::start(3, NS);
    let mut c = Conn::open(server.node_addr(2));
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(!c.fill(), "garbage closes the connection");
    let _idle = Conn::open(server.node_addr(0));
    let started = Instant::now();
    drop(server);
    assert!(started.elapsed() < Duration::from_secs(2));
}
