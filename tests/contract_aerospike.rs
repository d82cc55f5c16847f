//! The backend contract suite on the Aerospike backend, against our
//! protocol-level test server (no Aerospike package can be installed here):
//! one node, and three nodes with the partitions split between them.

mod support;

use std::time::Duration;

use support::aerospike::AeroServer;
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
    let backend = cache::open(&config(vec![server.seeds()[0].clone()])).expect("opens");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
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
    let backend = cache::open(&config(server.seeds())).expect("opens");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
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
    let backend = cache::open(&cfg).expect("opens");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
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
    let backend = cache::open(&config(vec![server.seeds()[0].clone()])).expect("opens");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
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
    let backend = cache::open(&config(server.seeds())).expect("opens");
    let Some(txgate::cache::Backend::Aerospike(ref a)) = backend else {
        panic!("an aerospike backend")
    };
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
        Err(cache::CacheError::Config(m)) => {
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
