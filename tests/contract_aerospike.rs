//! The backend contract suite on the Aerospike backend, against our
//! protocol-level test server (no Aerospike package can be installed here):
//! one node, and three nodes with the partitions split between them.

mod support;

use std::time::Duration;

use support::aerospike::AeroServer;
use txgate::cache::aerospike::AerospikeBackend;
use txgate::cache::{self, BackendKind, Config};
use txgate::engine::Engine;

fn config(seeds: Vec<String>) -> Config {
    Config {
        backend: BackendKind::Aerospike,
        aero_hosts: seeds,
        aero_namespace: Some("test".into()),
        op_timeout: Duration::from_secs(2),
        dial_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

/// Opens an Aerospike backend: the backend for an engine, and a handle on
/// it for the tending counters.
fn open_aerospike(cfg: &Config) -> (Option<txgate::cache::Backend>, AerospikeBackend) {
    let backend = cache::open(cfg).expect("opens");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
    let handle = a.clone();
    (backend, handle)
}

fn engine_on(nodes: usize) -> (AeroServer, Engine) {
    let server = AeroServer::start(nodes, "test");
    let backend = cache::open(&config(server.seeds())).expect("aerospike opens");
    (server, support::engine(4, backend))
}

/// Writes `n` keys tagged `tag` through the engine; returns how many the
/// server had to proxy (sent to a node that does not master them).
fn set_batch(server: &AeroServer, e: &Engine, tag: &str, n: usize) -> u64 {
    use txgate::engine::{Op, Reply};
    let before = server.proxied();
    for i in 0..n {
        let key = format!("{tag}:{i}").into_bytes();
        let set = Op::Set {
            key: key.clone(),
            val: key.clone(),
            ttl: Duration::from_secs(60),
        };
        assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
    }
    server.proxied() - before
}

/// Waits (up to `within`) until a batch of `n` sets is served with none
/// proxied: every shard routes by the map the cluster has now.
fn wait_unproxied(server: &AeroServer, e: &Engine, what: &str, n: usize, within: Duration) {
    let mut round = 0;
    support::wait_for(what, within, || {
        round += 1;
        set_batch(server, e, &format!("{what}{round}"), n) == 0
    });
}

mod one_node {
    use super::*;
    fn make() -> (AeroServer, Engine) {
        engine_on(1)
    }
    contract_suite!(make);
}

mod three_nodes {
    use super::*;
    fn make() -> (AeroServer, Engine) {
        engine_on(3)
    }
    contract_suite!(make);
}

/// The same suite against a real Aerospike server, run by hand (none can be
/// installed on these machines; the README says which one was used):
/// `TXGATE_AERO_REAL=HOST:PORT[,HOST:PORT] cargo nextest run --test
/// contract_aerospike --run-ignored only real_server` (namespace `test`,
/// which must allow TTLs).
mod real_server {
    use super::*;
    fn make() -> ((), Engine) {
        let hosts = std::env::var("TXGATE_AERO_REAL").expect(
            "set TXGATE_AERO_REAL=HOST:PORT[,HOST:PORT] (a real server with namespace `test`) \
             to run the contract suite against it",
        );
        let seeds = hosts.split(',').map(str::to_owned).collect();
        let backend = cache::open(&config(seeds)).expect("the real server opens");
        ((), support::engine(4, backend))
    }
    contract_suite!(make, #[ignore = "needs a real Aerospike server: TXGATE_AERO_REAL=HOST:PORT"]);
}

#[test]
fn open_finds_every_node_from_one_seed() {
    let server = AeroServer::start(3, "test");
    let seed = server.seeds()[1].clone();
    let backend = cache::open(&config(vec![seed])).expect("opens from one seed");
    match backend {
        Some(cache::Backend::Aerospike(a)) => assert_eq!(a.node_ids().len(), 3),
        other => panic!("not aerospike: {other:?}"),
    }
}

#[test]
fn open_refuses_an_unknown_namespace_and_a_dead_seed() {
    let server = AeroServer::start(1, "test");
    let mut cfg = config(server.seeds());
    cfg.aero_namespace = Some("nope".into());
    let e = cache::open(&cfg).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    let port = support::redis::free_port();
    let e = cache::open(&config(vec![format!("127.0.0.1:{port}")])).unwrap_err();
    assert!(matches!(e, cache::CacheError::Refused { .. }), "{e:?}");
}

#[test]
fn ops_go_to_their_partition_master_and_a_stale_map_costs_a_hop_not_an_error() {
    use txgate::engine::{Op, Reply};
    let (server, e) = engine_on(3);
    let run = |tag: &str| {
        for i in 0..200 {
            let key = format!("{tag}:{i}").into_bytes();
            let set = Op::Set {
                key: key.clone(),
                val: key.clone(),
                ttl: Duration::from_secs(60),
            };
            assert_eq!(e.op_blocking(&key, set).unwrap(), Reply::Set);
            assert_eq!(
                e.op_blocking(&key, Op::Get { key: key.clone() }).unwrap(),
                Reply::Get(Some(key))
            );
        }
    };
    run("routed");
    assert!(server.requests() >= 400);
    assert_eq!(server.proxied(), 0, "every op went to its master");
    // The cluster's map moves; ours (read at open) is now stale.
    server.set_misroute(true);
    run("stale");
    assert!(
        server.proxied() > 0,
        "ops reached non-masters and were served"
    );
}

#[test]
fn a_changed_partition_map_is_tended_and_ops_follow_it() {
    let (server, e) = engine_on(3);
    let batch = |tag: &str| set_batch(&server, &e, tag, 60);
    assert_eq!(batch("fresh"), 0);
    // The cluster moves its partitions (and bumps partition-generation).
    server.set_misroute(true);
    assert!(
        batch("stale") > 0,
        "right after the move our map is stale: ops are proxied"
    );
    // Within a few tending rounds the new map reaches every shard.
    let mut round = 0;
    support::wait_for("the new map to be tended", Duration::from_secs(10), || {
        round += 1;
        batch(&format!("tended{round}")) == 0
    });
}

/// A `replicas` read that fails in the round that sees a new map is read
/// again next round: until the fix tending recorded the new generation
/// anyway, so that node's partitions stayed unclaimed (ops proxied through
/// another node) until some generation moved again.
#[test]
fn a_failed_replicas_read_is_retried_by_the_next_tending_round() {
    let (server, e) = engine_on(3);
    assert_eq!(set_batch(&server, &e, "fresh", 60), 0);
    // The next replicas reads fail (the kept connection, then a fresh one:
    // one node's read in that round), and the cluster moves its partitions.
    server.fail_replicas(2);
    server.set_misroute(true);
    support::wait_for(
        "the refused replicas read to be read again",
        Duration::from_secs(10),
        || server.replicas_reread_after_failure() == Some(true),
    );
    wait_unproxied(
        &server,
        &e,
        "the new map to be tended in full",
        60,
        Duration::from_secs(10),
    );
}

/// A node that leaves the cluster and carries on as a cluster of its own
/// (it lists no peers and claims every partition: a node removed, then
/// restarted alone) is not believed: its claims would send this instance's
/// writes to a store the other instances no longer use.
#[test]
fn a_node_that_left_and_claims_everything_alone_is_not_believed() {
    let server = AeroServer::start(3, "test");
    // Where two nodes claim a partition the one found later wins, so the
    // node that will leave must not be found first, or the others' claims
    // would override all of its own anyway: seed from node 0 alone.
    let (backend, a) = open_aerospike(&config(vec![server.seeds()[0].clone()]));
    assert_ne!(a.node_ids().first(), Some(&server.node_id(2)));
    let handle = a.clone();
    let e = support::engine(4, backend);
    assert_eq!(set_batch(&server, &e, "before", 60), 0);
    server.leave_last();
    wait_unproxied(
        &server,
        &e,
        "the map without the departed node",
        60,
        Duration::from_secs(15),
    );
    let gone = server.requests_to(2);
    assert_eq!(set_batch(&server, &e, "after", 60), 0);
    assert_eq!(
        server.requests_to(2),
        gone,
        "nothing reaches the node that left"
    );
    // Away from the cluster for some rounds: it has departed, and its slot
    // is free for a later join.
    support::wait_for(
        "the departed node to be forgotten",
        Duration::from_secs(20),
        || !handle.node_ids().contains(&server.node_id(2)),
    );
    assert_eq!(handle.node_ids().len(), 2);
    // Back at its old address (a restart that took longer than the
    // departure): known again, and dialed again — its old connections were
    // closed when it left.
    server.rejoin_last_left();
    support::wait_for(
        "the node to be known again",
        Duration::from_secs(20),
        || handle.node_ids().contains(&server.node_id(2)),
    );
    let served = server.requests_to(2);
    wait_unproxied(
        &server,
        &e,
        "the returned node to be routed to",
        60,
        Duration::from_secs(15),
    );
    assert!(server.requests_to(2) > served, "served directly again");
    assert_eq!(handle.node_slots(), 3);
}

/// A node that comes back at a new address with the same node id (a pod
/// rescheduled with a fixed node id) is followed there: until the fix,
/// tending knew the id and never looked at the new address, so the node's
/// partitions were proxied through the others for good.
#[test]
fn a_node_that_moves_to_a_new_address_is_followed_there() {
    let mut server = AeroServer::start(3, "test");
    let (backend, a) = open_aerospike(&config(server.seeds()));
    let handle = a.clone();
    let e = support::engine(2, backend);
    assert_eq!(set_batch(&server, &e, "before", 60), 0);
    // Moved again and again (pods rescheduled), it is followed each time,
    // and reuses the slot it left: the node table does not grow toward its
    // bound.
    for round in 0..4 {
        let served = server.requests_to(2);
        server.move_node(2);
        // Its old connections close within a read poll (50 ms); ops then
        // avoid them (a connected node proxies) until the new address is
        // followed.
        std::thread::sleep(Duration::from_millis(300));
        wait_unproxied(
            &server,
            &e,
            "the moved node to be followed",
            60,
            Duration::from_secs(15),
        );
        assert!(
            server.requests_to(2) > served,
            "move {round}: the node serves at its new address"
        );
    }
    assert_eq!(handle.node_slots(), 3, "{:?}", handle.node_ids());
}

/// A peer that every node lists but that never answers is tried once a
/// tending round, not once per node that lists it: each try costs a dial
/// timeout, and three nodes made three a round.
#[test]
fn an_unanswering_peer_is_tried_once_a_round() {
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let server = AeroServer::start(3, "test");
    let mut cfg = config(server.seeds());
    cfg.dial_timeout = Duration::from_millis(100);
    let (_backend, a) = open_aerospike(&cfg);
    // Accepts and never answers; counts the tries.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let tries = Arc::new(AtomicU64::new(0));
    let counted = tries.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().take(1000) {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(c);
        }
    });
    server.list_phantom(addr);
    let from = a.tend_rounds();
    support::wait_for("four tending rounds", Duration::from_secs(20), || {
        a.tend_rounds() >= from + 4
    });
    let (rounds, tried) = (a.tend_rounds() - from, tries.load(Ordering::SeqCst));
    assert!(tried >= 1, "the phantom was tried");
    assert!(tried <= rounds + 1, "{tried} tries in {rounds} rounds");
}

#[test]
fn a_node_that_joins_after_open_is_found_dialed_and_given_its_partitions() {
    // Three nodes listen; two form the cluster at open, the third joins later.
    let server = AeroServer::start_partial(3, 2, "test");
    let (backend, a) = open_aerospike(&config(vec![server.seeds()[0].clone()]));
    assert_eq!(a.node_ids().len(), 2, "two nodes at open");
    let handle = a.clone();
    let e = support::engine(2, backend);
    let batch = |tag: &str| set_batch(&server, &e, tag, 90);
    assert_eq!(batch("before"), 0);
    assert_eq!(server.requests_to(2), 0, "the outsider serves nothing yet");

    server.join_next();
    // Right after the join our map is stale (proxied), never an error; within
    // a few tending rounds the node is known, dialed, and ops reach it.
    wait_unproxied(
        &server,
        &e,
        "the joined node to be tended",
        90,
        Duration::from_secs(15),
    );
    assert_eq!(handle.node_ids().len(), 3);
    assert!(handle.node_ids().contains(&server.node_id(2)));
    assert!(
        server.requests_to(2) > 0,
        "the joined node masters partitions now"
    );
}

#[test]
fn tending_keeps_its_info_connection_between_rounds() {
    let server = AeroServer::start(1, "test");
    let (backend, a) = open_aerospike(&config(server.seeds()));
    // Let the first tending round dial its connection, then watch three more.
    std::thread::sleep(Duration::from_millis(1500));
    let before = server.connections_opened();
    let rounds_before = a.tend_rounds();
    support::wait_for("three more tending rounds", Duration::from_secs(10), || {
        a.tend_rounds() >= rounds_before + 3
    });
    assert_eq!(
        server.connections_opened(),
        before,
        "tending rounds {rounds_before}..{} opened connections",
        a.tend_rounds()
    );
    // A dropped info connection is redialed once, not abandoned.
    server.drop_connections();
    let rounds = a.tend_rounds();
    support::wait_for("two more tending rounds", Duration::from_secs(10), || {
        a.tend_rounds() >= rounds + 2
    });
    assert_eq!(server.connections_opened(), before + 1);
    drop(backend);
}

/// A real server reads `partition-generation` -1 for a second or two after
/// it starts, until its cluster forms, and answers writes UNAVAILABLE even
/// once `replicas` lists its partitions: `open` asks again within the dial
/// timeout rather than fail or take that map, and names the state when the
/// cluster is still forming at the deadline.
#[test]
fn open_waits_within_the_dial_timeout_for_a_forming_cluster() {
    use txgate::engine::{Op, Reply};
    let server = AeroServer::start(1, "test");
    server.set_forming(true);
    let seeds = server.seeds();
    let opening = std::thread::spawn(move || cache::open(&config(seeds)));
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !opening.is_finished(),
        "open returned while the cluster was forming (every write would be UNAVAILABLE)"
    );
    server.set_forming(false);
    let backend = opening
        .join()
        .unwrap()
        .expect("opens once the cluster has formed");
    let e = support::engine(1, backend);
    let set = Op::SetNx {
        key: b"formed".to_vec(),
        val: b"v".to_vec(),
        ttl: Duration::from_secs(60),
    };
    assert_eq!(e.op_blocking(b"formed", set).unwrap(), Reply::SetNx(true));

    server.set_forming(true);
    let mut c = config(server.seeds());
    c.dial_timeout = Duration::from_millis(300);
    match cache::open(&c) {
        Err(cache::CacheError::Connect { detail: m, .. }) => {
            assert!(m.contains("still forming"), "{m}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("opened a cluster that masters nothing"),
    }
}

/// A record over the server's `max-record-size` (1 MiB) is refused by
/// name, not as a bare number.
#[test]
fn a_record_over_the_size_limit_fails_with_its_name() {
    use txgate::engine::Op;
    let (_server, e) = engine_on(1);
    let set = Op::Set {
        key: b"too-big".to_vec(),
        val: vec![7u8; (1 << 20) + 1],
        ttl: Duration::from_secs(60),
    };
    let err = e.op_blocking(b"too-big", set).unwrap_err().to_string();
    assert!(err.contains("RECORD_TOO_BIG"), "{err}");
}

/// The same lone node among the seeds, found last at open (seeds are tried
/// last first): its claims are not believed at open either, where no
/// generation would move to correct the map for as long as the cluster
/// stays calm.
#[test]
fn a_lone_node_among_the_seeds_is_not_believed_at_open() {
    let server = AeroServer::start(3, "test");
    server.leave_last();
    let seeds = vec![server.seeds()[2].clone(), server.seeds()[0].clone()];
    let backend = cache::open(&config(seeds)).expect("opens");
    let e = support::engine(2, backend);
    let before = server.requests_to(2);
    set_batch(&server, &e, "lone", 60);
    assert_eq!(
        server.requests_to(2) - before,
        0,
        "ops went to the node outside the cluster"
    );
}

/// A seed that accepts connections and never answers gets its share of the
/// dial timeout, not all of it: a healthy seed after it still opens.
#[test]
fn a_silent_seed_does_not_starve_a_healthy_one() {
    let server = AeroServer::start(1, "test");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Tried first (the last seed is visited first).
    let seeds = vec![
        server.seeds()[0].clone(),
        silent.local_addr().unwrap().to_string(),
    ];
    let mut c = config(seeds);
    c.dial_timeout = Duration::from_millis(600);
    let r = cache::open(&c);
    assert!(r.is_ok(), "open failed: {:?}", r.err());
}

/// A record written under another bin (another writer, or an earlier
/// `--aero-bin`) holds no value of ours: `get` is a miss, not an empty
/// value.
#[test]
fn a_record_without_our_bin_reads_as_a_miss() {
    use txgate::engine::{Op, Reply};
    let server = AeroServer::start(1, "test");
    let mut other = config(server.seeds());
    other.aero_bin = "w".into();
    let writer = support::engine(1, cache::open(&other).expect("opens"));
    let key = b"shared-key".to_vec();
    let set = Op::Set {
        key: key.clone(),
        val: b"theirs".to_vec(),
        ttl: Duration::from_secs(60),
    };
    assert_eq!(writer.op_blocking(&key, set).unwrap(), Reply::Set);
    let mut ours = config(server.seeds());
    ours.aero_bin = "v".into();
    let reader = support::engine(1, cache::open(&ours).expect("opens"));
    assert_eq!(
        reader
            .op_blocking(&key, Op::Get { key: key.clone() })
            .unwrap(),
        Reply::Get(None)
    );
}

/// A namespace that refuses TTLs (nsup-period 0, the server's default since
/// 4.9) would answer FORBIDDEN to every claim, and every claim would fail
/// open behind a healthy `/readyz`: `open` fails closed and names the
/// setting. Once TTLs are allowed it opens, and leaves no probe record.
#[test]
fn a_namespace_that_refuses_ttls_fails_open_closed_naming_the_setting() {
    let server = AeroServer::start(1, "test");
    server.set_forbidden_ttl(true);
    let Err(err) = cache::open(&config(server.seeds())) else {
        panic!("open succeeded on a namespace that refuses TTLs");
    };
    let err = err.to_string();
    assert!(
        err.contains("FORBIDDEN") && err.contains("nsup-period"),
        "{err}"
    );
    server.set_forbidden_ttl(false);
    cache::open(&config(server.seeds())).expect("opens");
    assert_eq!(server.live_records(), 0, "the probe record is deleted");
}

/// `n` keys tagged `tag` whose partitions one of `nodes` masters in the
/// map the server reports now (keys in the default set, `txgate`).
fn keys_mastered_by(server: &AeroServer, nodes: &[usize], tag: &str, n: usize) -> Vec<Vec<u8>> {
    use txgate::cache::aerospike::codec;
    (0..)
        .map(|i| format!("{tag}:{i}").into_bytes())
        .filter(|k| {
            let p = codec::partition_id(&codec::digest(b"txgate", k));
            nodes.contains(&server.master_of(p))
        })
        .take(n)
        .collect()
}

/// Writes `keys` through the engine; returns how many the server proxied.
fn set_keys(server: &AeroServer, e: &Engine, keys: &[Vec<u8>]) -> u64 {
    use txgate::engine::{Op, Reply};
    let before = server.proxied();
    for key in keys {
        let set = Op::Set {
            key: key.clone(),
            val: key.clone(),
            ttl: Duration::from_secs(60),
        };
        assert_eq!(e.op_blocking(key, set).unwrap(), Reply::Set);
    }
    server.proxied() - before
}

/// One node answering a `replicas` value that does not parse is left out
/// of the map at open, counted, and the others' claims make the map: until
/// the fix `open` failed outright. With no usable answer at all, `open`
/// fails naming the node and the problem.
#[test]
fn open_leaves_out_a_node_whose_replicas_answer_does_not_parse() {
    let server = AeroServer::start(3, "test");
    server.set_bad_replicas(1, true);
    let backend = cache::open(&config(server.seeds())).expect("opens on the other nodes' claims");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
    assert_eq!(a.node_ids().len(), 3, "the node is still known");
    assert_eq!(a.replicas_refused(), 1);
    let e = support::engine(2, backend);
    let keys = keys_mastered_by(&server, &[0, 2], "others", 60);
    assert_eq!(set_keys(&server, &e, &keys), 0, "the others' claims apply");
    // Its own partitions are unclaimed: sent to a connected node (which
    // proxies, when it is not the master), never failed.
    let keys = keys_mastered_by(&server, &[1], "its-own", 20);
    set_keys(&server, &e, &keys);

    let lone = AeroServer::start(1, "test");
    lone.set_bad_replicas(0, true);
    let Err(err) = cache::open(&config(lone.seeds())) else {
        panic!("opened with no usable partition map")
    };
    let err = err.to_string();
    assert!(
        err.contains(&lone.seeds()[0]) && err.contains("replicas") && err.contains("not 512 bytes"),
        "{err}"
    );
}

/// While tending, one node answering a `replicas` value that does not
/// parse costs its own partitions that round, not the map: until the fix
/// the round failed as a whole and the map froze, so a partition move the
/// other nodes reported was never followed. The node is read again every
/// round, and its partitions come back once it answers well.
#[test]
fn an_unparsable_replicas_answer_while_tending_costs_its_node_not_the_map() {
    let server = AeroServer::start(3, "test");
    let (backend, a) = open_aerospike(&config(server.seeds()));
    let handle = a.clone();
    let e = support::engine(2, backend);
    assert_eq!(set_batch(&server, &e, "before", 60), 0);
    server.set_bad_replicas(2, true);
    server.set_misroute(true);
    // Every partition moved: those nodes 0 and 1 master now reach them.
    let keys = keys_mastered_by(&server, &[0, 1], "moved", 60);
    support::wait_for(
        "the other nodes' claims to be tended",
        Duration::from_secs(10),
        || set_keys(&server, &e, &keys) == 0,
    );
    assert!(handle.replicas_refused() > 0, "the bad answer is counted");
    server.set_bad_replicas(2, false);
    wait_unproxied(
        &server,
        &e,
        "the node's claims to be tended again",
        60,
        Duration::from_secs(10),
    );
}

/// Peers that never answer cost a tending round one dial timeout or so
/// together, not one each: until the fix they were tried one after
/// another, so eight of them made a round (and a partition move's pickup)
/// late by eight dial timeouts. Half do not accept (a full backlog: the dial
/// times out), half accept and never answer.
#[test]
fn unanswering_peers_cost_a_tending_round_one_timeout_together() {
    use std::net::TcpStream;
    use std::time::Instant;
    const PHANTOMS: u32 = 8;
    let dial_timeout = Duration::from_millis(400);
    let server = AeroServer::start(3, "test");
    let mut cfg = config(server.seeds());
    cfg.dial_timeout = dial_timeout;
    let (_backend, a) = open_aerospike(&cfg);
    let mut held = Vec::new();
    let mut phantoms = Vec::new();
    for i in 0..PHANTOMS {
        // Backlog 0 holds one connection: with it taken, SYNs are dropped.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        s.listen(if i % 2 == 0 { 0 } else { 128 }).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        if i % 2 == 0 {
            held.push(TcpStream::connect(addr).unwrap());
        }
        // Kept open, never accepting, for the test.
        phantoms.push((s, addr));
    }
    server.list_phantoms(&phantoms.iter().map(|(_, a)| *a).collect::<Vec<_>>());
    // A round to see the change, then three to time.
    let from = a.tend_rounds();
    support::wait_for("a tending round", Duration::from_secs(20), || {
        a.tend_rounds() > from + 1
    });
    let (from, started) = (a.tend_rounds(), Instant::now());
    support::wait_for("three tending rounds", Duration::from_secs(30), || {
        a.tend_rounds() >= from + 3
    });
    let per_round = started.elapsed() / 3;
    // One second between rounds, then about one dial timeout for all eight
    // together (asked one after another: one each, 4.2 s a round).
    assert!(
        per_round < Duration::from_secs(1) + 4 * dial_timeout,
        "{per_round:?} a round with {PHANTOMS} unanswering peers (dial timeout {dial_timeout:?})"
    );
    drop(held);
}

/// A TTL longer than an Aerospike server takes (10 years) is refused by the
/// backend naming the limit, not sent to come back as a bare PARAMETER;
/// ten years exactly is taken, and zero still means no expiry.
#[test]
fn a_ttl_over_ten_years_is_refused_naming_the_limit() {
    use txgate::engine::{Op, Reply};
    let (_server, e) = engine_on(1);
    let ten_years = Duration::from_secs(315_360_000);
    let set = |key: &[u8], ttl| Op::Set {
        key: key.to_vec(),
        val: b"v".to_vec(),
        ttl,
    };
    let err = e
        .op_blocking(
            b"too-long",
            set(b"too-long", ten_years + Duration::from_secs(1)),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10 years") && err.contains("315360000"),
        "{err}"
    );
    assert_eq!(
        e.op_blocking(b"ten-years", set(b"ten-years", ten_years))
            .unwrap(),
        Reply::Set
    );
    assert_eq!(
        e.op_blocking(b"forever", set(b"forever", Duration::ZERO))
            .unwrap(),
        Reply::Set
    );
}
