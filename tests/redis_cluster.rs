//! The Redis backend against a real 3-master Redis Cluster found from one
//! seed address: the contract suite, routing, a dead master, and claims
//! racing a live slot migration.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::redis::{RedisCluster, require_redis};
use txgate::cache::{self, BackendKind, Config};
use txgate::engine::{Engine, Op, Reply};

fn config(seed: &str) -> Config {
    Config {
        backend: BackendKind::Redis,
        redis_addr: Some(seed.to_owned()),
        op_timeout: Duration::from_secs(2),
        dial_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

fn cluster_engine() -> (RedisCluster, Engine) {
    require_redis();
    let cluster = RedisCluster::start();
    let backend = cache::open(&config(&cluster.seed_addr())).expect("cluster opens");
    let engine = support::engine(4, backend);
    (cluster, engine)
}

contract_suite!(cluster_engine);

fn set(e: &Engine, key: &[u8], val: &[u8]) {
    let op = Op::Set {
        key: key.to_vec(),
        val: val.to_vec(),
        ttl: Duration::from_secs(60),
    };
    assert_eq!(e.op_blocking(key, op).unwrap(), Reply::Set);
}

#[test]
fn keys_land_on_their_slots_master() {
    let (cluster, e) = cluster_engine();
    for i in 0..200 {
        let key = format!("route:{i}");
        set(&e, key.as_bytes(), b"v");
        let node = cluster.node_for_key(key.as_bytes());
        let got = cluster.node(node).cli(&["GET", &key]);
        assert_eq!(got.trim(), "v", "{key} on node {node}");
    }
}

#[test]
fn a_dead_master_fails_only_its_own_slots() {
    let (cluster, _) = cluster_engine();
    let mut cfg = config(&cluster.seed_addr());
    cfg.op_timeout = Duration::from_millis(200);
    let e = support::engine(2, cache::open(&cfg).unwrap());
    let dead = 2;
    // Kill a master that is not the seed.
    cluster.node(dead).kill9();
    let (mut ok, mut failed) = (0, 0);
    for i in 0..300 {
        let key = format!("dead:{i}");
        let op = Op::Set {
            key: key.clone().into_bytes(),
            val: b"v".to_vec(),
            ttl: Duration::ZERO,
        };
        let on_dead = cluster.node_for_key(key.as_bytes()) == dead;
        match e.op_blocking(key.as_bytes(), op) {
            Ok(_) => {
                assert!(!on_dead, "{key} succeeded on a dead node");
                ok += 1;
            }
            Err(_) => {
                assert!(on_dead, "{key} failed but its master is alive");
                failed += 1;
            }
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
}

/// Claims (set_nx of a few keys, over and over, from every shard of two
/// engines) while their slot migrates between masters: exactly one `true`
/// per key.
#[test]
fn slot_migration_under_claims_keeps_exactly_one_winner_per_key() {
    let (cluster, a) = cluster_engine();
    let b = support::engine(2, cache::open(&config(&cluster.seed_addr())).unwrap());
    let tag = support::redis::hashtag_for_slot(1234);
    // All keys share the tag, so all live in one slot.
    let keys: Vec<Vec<u8>> = (0..60)
        .map(|i| format!("{{{tag}}}:claim:{i}").into_bytes())
        .collect();
    let slot = support::redis::key_slot(&keys[0]);
    assert_eq!(slot, 1234);
    let from = cluster.node_for_slot(slot);
    let to = (from + 1) % 3;
    // Half the keys exist before the migration starts, so some move.
    let wins: Arc<Vec<AtomicUsize>> = Arc::new(keys.iter().map(|_| AtomicUsize::new(0)).collect());
    let claim_all = |e: &Engine, keys: &[Vec<u8>]| {
        for (i, k) in keys.iter().enumerate() {
            let op = Op::SetNx {
                key: k.clone(),
                val: b"me".to_vec(),
                ttl: Duration::from_secs(60),
            };
            if let Ok(Reply::SetNx(true)) = e.op_blocking(k, op) {
                wins[i].fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    claim_all(&a, &keys[..30]);
    cluster.begin_migration(slot, from, to);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..5 {
                claim_all(&a, &keys);
            }
        });
        s.spawn(|| {
            for _ in 0..5 {
                claim_all(&b, &keys);
            }
        });
        s.spawn(|| {
            cluster.move_keys(slot, from, to);
        });
    });
    cluster.finish_migration(slot, from, to);
    for _ in 0..3 {
        claim_all(&a, &keys);
        claim_all(&b, &keys);
    }
    // The claims really raced the migration: redirects were followed.
    let mut asks_and_moves = 0;
    for e in [&a, &b] {
        let per_shard = futures_lite::future::block_on(e.on_every_shard(|s| async move {
            match s.backend().as_deref() {
                Some(txgate::cache::ShardBackend::Redis(r)) => {
                    let d = r.redirects();
                    d.ask + d.moved
                }
                _ => 0,
            }
        }))
        .unwrap();
        asks_and_moves += per_shard.iter().sum::<u64>();
    }
    assert!(
        asks_and_moves > 0,
        "no ASK or MOVED was seen: the test did not race the migration"
    );
    for (i, w) in wins.iter().enumerate() {
        assert_eq!(w.load(Ordering::SeqCst), 1, "winners of key {i}");
    }
    for k in &keys {
        let on = cluster.node(to).cmd_bytes(&[b"EXISTS", k]);
        assert_eq!(on, support::redis::Resp::Int(1), "key on the new owner");
    }
}

/// Where `CLUSTER SLOTS` is refused (deprecated; here denied by ACL), the
/// slot map comes from `CLUSTER SHARDS`.
#[test]
fn cluster_shards_is_used_when_cluster_slots_is_refused() {
    require_redis();
    let cluster = RedisCluster::start();
    // Where each key belongs, read while CLUSTER SLOTS still answers.
    let owners: Vec<usize> = (0..100)
        .map(|i| cluster.node_for_key(format!("shards:{i}").as_bytes()))
        .collect();
    for node in cluster.nodes() {
        node.cmd(&["ACL", "SETUSER", "default", "-cluster|slots"]);
        assert!(matches!(
            node.cmd(&["CLUSTER", "SLOTS"]),
            support::redis::Resp::Error(_)
        ));
    }
    let e = support::engine(
        2,
        cache::open(&config(&cluster.seed_addr())).expect("opens via SHARDS"),
    );
    for (i, &node) in owners.iter().enumerate() {
        let key = format!("shards:{i}");
        set(&e, key.as_bytes(), b"v");
        assert_eq!(
            cluster.node(node).cli(&["GET", &key]).trim(),
            "v",
            "{key} on node {node}"
        );
    }
}

#[test]
fn a_user_refused_info_still_finds_the_cluster() {
    require_redis();
    let cluster = RedisCluster::start();
    let owners: Vec<usize> = (0..30)
        .map(|i| cluster.node_for_key(format!("noinfo:{i}").as_bytes()))
        .collect();
    // Least privilege: no INFO (it is in @dangerous). Taking "standalone"
    // for granted would send two thirds of the keys to the wrong node.
    for node in cluster.nodes() {
        node.cmd(&[
            "ACL", "SETUSER", "probe", "on", ">pw", "~*", "+@all", "-info",
        ])
        .expect_ok("ACL SETUSER");
    }
    let mut cfg = config(&cluster.seed_addr());
    cfg.redis_username = Some("probe".into());
    cfg.redis_password = Some("pw".into());
    let backend = cache::open(&cfg).expect("opens");
    match &backend {
        Some(cache::Backend::Redis(r)) => assert!(r.info().cluster, "{:?}", r.info()),
        _ => panic!("not a Redis backend"),
    }
    let e = support::engine(2, backend);
    for (i, &node) in owners.iter().enumerate() {
        let key = format!("noinfo:{i}");
        set(&e, key.as_bytes(), b"v");
        assert_eq!(
            cluster.node(node).cli(&["GET", &key]).trim(),
            "v",
            "{key} on node {node}"
        );
    }
}

/// Runs `op` on `e` from a helper thread; `None` if no answer came within
/// `within` (the op hangs).
fn op_within(e: &Arc<Engine>, key: &str, within: Duration) -> Option<Result<Reply, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (e, key) = (e.clone(), key.to_owned());
    std::thread::spawn(move || {
        let op = Op::Set {
            key: key.clone().into_bytes(),
            val: b"v".to_vec(),
            ttl: Duration::ZERO,
        };
        let _ = tx.send(e.op_blocking(key.as_bytes(), op).map_err(|e| e.to_string()));
    });
    rx.recv_timeout(within).ok()
}

/// A fresh cluster and a one-shard engine on it with a 200 ms op timeout.
fn one_shard_with_short_timeouts() -> (RedisCluster, Config, Arc<Engine>) {
    require_redis();
    let cluster = RedisCluster::start();
    let mut cfg = config(&cluster.seed_addr());
    cfg.op_timeout = Duration::from_millis(200);
    let e = Arc::new(support::engine(1, cache::open(&cfg).unwrap()));
    (cluster, cfg, e)
}

/// A key whose slot node `node` masters.
fn key_on(cluster: &RedisCluster, node: usize, tag: &str) -> String {
    (0..10_000)
        .map(|i| format!("{tag}:{i}"))
        .find(|k| cluster.node_for_key(k.as_bytes()) == node)
        .expect("some key lands on every master")
}

/// A master that stops answering (SIGSTOP) while the shard re-reads its
/// slot map must not stop the shard's timeouts: the re-read asks a stopped
/// master, and until the fix the shard's sweep waited on that call, so from
/// then on no op of the shard ever timed out.
#[test]
fn a_stopped_master_does_not_stop_the_shards_timeouts() {
    let (cluster, cfg, e) = one_shard_with_short_timeouts();
    let key = key_on(&cluster, 1, "stopped");
    // Both other masters stop answering; the loss of node 0 makes the
    // shard re-read its map, from a stopped master whichever it asks.
    std::thread::sleep(Duration::from_millis(300));
    cluster.node(1).pause();
    cluster.node(2).pause();
    cluster.node(0).kill9();
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..5 {
        let got = op_within(&e, &key, cfg.op_timeout + Duration::from_secs(2));
        assert!(
            matches!(got, Some(Err(_))),
            "round {round}: an op on a stopped master must time out, got {got:?}"
        );
    }
    cluster.node(1).resume();
    cluster.node(2).resume();
}

/// A master gone for good whose slots the cluster gives to another master
/// (what a failover does): the shard must notice by itself. The dead master
/// sends no MOVED and failed redials count no new disconnects, so until the
/// fix the shard kept its first map (taken while the others still listed the
/// dead master) and failed those slots forever.
#[test]
fn slots_reassigned_from_a_dead_master_are_found_by_themselves() {
    let (cluster, _, e) = one_shard_with_short_timeouts();
    let dead = 2;
    let key = key_on(&cluster, dead, "reassigned");
    let ranges: Vec<_> = cluster
        .slot_ranges()
        .into_iter()
        .filter(|&(_, _, n)| n == dead)
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = counters(&e);
    assert!(before.connects >= 3, "{before:?}");
    cluster.node(dead).kill9();
    // The shard's first re-read, right after the loss, still names it.
    std::thread::sleep(Duration::from_millis(500));
    let got = op_within(&e, &key, Duration::from_secs(5));
    assert!(matches!(got, Some(Err(_))), "{got:?}");
    // Node 1 takes the dead master's slots over, with a newer epoch.
    for (first, last, _) in &ranges {
        let (first, last) = (first.to_string(), last.to_string());
        cluster
            .node(1)
            .cmd(&["CLUSTER", "DELSLOTSRANGE", &first, &last])
            .expect_ok("DELSLOTSRANGE");
        cluster
            .node(1)
            .cmd(&["CLUSTER", "ADDSLOTSRANGE", &first, &last])
            .expect_ok("ADDSLOTSRANGE");
    }
    cluster.node(1).cmd(&["CLUSTER", "BUMPEPOCH"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = op_within(&e, &key, Duration::from_secs(5));
        if matches!(last, Some(Ok(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        matches!(last, Some(Ok(Reply::Set))),
        "the reassigned slot never served the shard again: {last:?}"
    );
    assert_eq!(cluster.node(1).cli(&["GET", &key]).trim(), "v");
    // The dead master's connection left the shard with the new map; what
    // it counted stays in the shard's totals (counters never go down).
    let after = counters(&e);
    for (name, b, a) in [
        ("calls", before.calls, after.calls),
        ("replies", before.replies, after.replies),
        ("reads", before.reads, after.reads),
        ("connects", before.connects, after.connects),
        ("disconnects", before.disconnects, after.disconnects),
    ] {
        assert!(a >= b, "{name} went down: {before:?} -> {after:?}");
    }
    assert!(after.disconnects >= 1, "{after:?}");
}

/// Shard 0's connection counters, as `/metrics` shows them.
fn counters(e: &Engine) -> txgate::pipeline::PipelineCounters {
    futures_lite::future::block_on(e.on_every_shard(|s| async move {
        s.backend()
            .map(|b| b.connection_counters())
            .unwrap_or_default()
    }))
    .unwrap()
    .remove(0)
}

/// Nodes that announce hostnames (`cluster-preferred-endpoint-type
/// hostname`): every shard resolves them when it dials (off the shard's
/// thread) and routes as with IPs.
#[test]
fn nodes_announcing_hostnames_are_resolved_and_served() {
    require_redis();
    let cluster = RedisCluster::start_with(&[
        "--cluster-announce-hostname",
        "localhost",
        "--cluster-preferred-endpoint-type",
        "hostname",
    ]);
    let slots = cluster.node(0).cli(&["CLUSTER", "SLOTS"]);
    assert!(slots.contains("localhost"), "announced: {slots}");
    let seed = format!("localhost:{}", cluster.node(0).port());
    let e = support::engine(2, cache::open(&config(&seed)).expect("cluster opens"));
    for i in 0..60 {
        let key = format!("named:{i}");
        set(&e, key.as_bytes(), b"v");
        let node = cluster.node_for_key(key.as_bytes());
        assert_eq!(cluster.node(node).cli(&["GET", &key]).trim(), "v", "{key}");
    }
}

/// A master the map moves to an address that accepts connections and never
/// answers (its handshake hangs for the whole dial timeout): that dial
/// happens in the background, and claims for its slots fail fast in the
/// meantime. It used to happen inline, holding the claim that met it.
#[test]
fn a_master_moved_to_a_silent_address_is_dialed_without_holding_claims() {
    require_redis();
    let cluster = RedisCluster::start();
    let mut cfg = config(&cluster.seed_addr());
    cfg.op_timeout = Duration::from_millis(200);
    cfg.dial_timeout = Duration::from_secs(3);
    let e = Arc::new(support::engine(1, cache::open(&cfg).unwrap()));
    let moved = 2;
    let key = key_on(&cluster, moved, "silent");
    assert!(matches!(
        op_within(&e, &key, Duration::from_secs(5)),
        Some(Ok(_))
    ));
    // Accepts, never answers (bounded: 64 connections, held until the end).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(64).collect();
        drop(held);
    });
    // The master announces the silent port; once the cluster's view has it,
    // drop this shard's connection to the master so its map is re-read.
    cluster
        .node(moved)
        .cmd(&["CONFIG", "SET", "cluster-announce-port", &port.to_string()])
        .expect_ok("CONFIG SET");
    // Every node's view: the shard re-reads the map from any of them.
    support::wait_for(
        "the new address in every slot map",
        Duration::from_secs(15),
        || {
            (0..3).all(|i| {
                cluster
                    .node(i)
                    .cli(&["CLUSTER", "SLOTS"])
                    .contains(&port.to_string())
            })
        },
    );
    cluster
        .node(moved)
        .cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    // Ops succeed until the shard's map moves the master (it may redial the
    // old port first), then fail open; none waits out the dial timeout (an
    // inline dial held the first op after the move for all 3 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut failed = 0;
    while failed < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the shard's map never moved the master"
        );
        let t0 = std::time::Instant::now();
        let got = op_within(&e, &key, Duration::from_secs(10));
        let took = t0.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "an op took {took:?}: {got:?}"
        );
        failed += usize::from(matches!(got, Some(Err(_))));
        std::thread::sleep(Duration::from_millis(100));
    }
}
