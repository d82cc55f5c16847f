//! The Redis backend against a real standalone `redis-server`: the contract
//! suite, fail-closed open with specific errors, AUTH/ACL/SELECT, and claims.

mod support;

use std::time::Duration;

use support::redis::{RedisServer, require_redis};
use txgate::cache::{self, BackendKind, CacheError, Config};
use txgate::engine::{Engine, Op, Reply};
use txgate::txidset::{Forward, Suppress, Verdict};

fn config(addr: &str) -> Config {
    Config {
        backend: BackendKind::Redis,
        redis_addr: Some(addr.to_owned()),
        // The contract is about semantics; a loaded 2-core CI box must not
        // turn a 1 MiB write into a timeout.
        op_timeout: Duration::from_secs(2),
        dial_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

fn redis_engine() -> (RedisServer, Engine) {
    require_redis();
    let server = RedisServer::start();
    let backend = cache::open(&config(&server.addr())).expect("redis opens");
    let engine = support::engine(4, backend);
    (server, engine)
}

contract_suite!(redis_engine);

#[test]
fn open_refused_names_the_address() {
    let port = support::redis::free_port();
    let addr = format!("127.0.0.1:{port}");
    match cache::open(&config(&addr)) {
        Err(CacheError::Refused { addr: a }) => assert_eq!(a, addr),
        other => panic!("want Refused, got {other:?}"),
    }
}

#[test]
fn open_against_a_silent_server_times_out_within_the_dial_timeout() {
    // Accepts, never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut cfg = config(&addr);
    cfg.dial_timeout = Duration::from_millis(300);
    let t0 = std::time::Instant::now();
    let r = cache::open(&cfg);
    assert!(matches!(r, Err(CacheError::DialTimeout { .. })), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "bounded, not a hang");
    drop(l);
}

#[test]
fn open_against_an_http_server_says_it_is_not_redis() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut c, _)) = l.accept() {
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let r = cache::open(&config(&addr));
    match &r {
        Err(CacheError::NotRedis { got, .. }) => assert!(got.starts_with("HTTP/1.1"), "{got}"),
        other => panic!("want NotRedis, got {other:?}"),
    }
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("not a Redis-protocol server")
    );
    server.join().unwrap();
}

/// A server still loading its data answers LOADING: an outage that passes
/// (so `--fail-open-boot` rides it out), not a refusal of our settings. A
/// database the server does not have is a refusal: waiting will not fix it.
#[test]
fn loading_is_an_outage_and_a_missing_database_a_refusal() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 1024];
            // Every command gets the same answer until the client leaves.
            for _ in 0..16 {
                match c.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let _ = c.write_all(b"-LOADING Redis is loading the dataset in memory\r\n");
                    }
                    _ => break,
                }
            }
        }
    });
    let e = cache::open(&config(&addr)).expect_err("a loading server fails open()");
    assert!(!e.is_refusal(), "{e}");
    assert!(e.to_string().contains("LOADING"), "{e}");
    server.join().unwrap();

    require_redis();
    let redis = RedisServer::start();
    let mut cfg = config(&redis.addr());
    cfg.redis_db = 99;
    let e = cache::open(&cfg).expect_err("no database 99");
    assert!(e.is_refusal(), "{e}");
    assert!(e.to_string().contains("SELECT"), "{e}");
}

#[test]
fn open_with_a_wrong_password_is_an_auth_error_and_the_right_one_works() {
    require_redis();
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let mut cfg = config(&server.addr());
    let none = cache::open(&cfg);
    assert!(matches!(none, Err(CacheError::Auth { .. })), "{none:?}");
    // SELECT goes first and gets NOAUTH: still an auth failure.
    cfg.redis_db = 1;
    let none = cache::open(&cfg);
    assert!(matches!(none, Err(CacheError::Auth { .. })), "{none:?}");
    cfg.redis_db = 0;
    cfg.redis_password = Some("wrong".into());
    let wrong = cache::open(&cfg);
    assert!(matches!(wrong, Err(CacheError::Auth { .. })), "{wrong:?}");
    cfg.redis_password = Some("s3cret".into());
    let backend = cache::open(&cfg).expect("right password");
    // Printable without the password: configs and backends show up in
    // debug logs and test failures.
    for printed in [format!("{cfg:?}"), format!("{backend:?}")] {
        assert!(!printed.contains("s3cret"), "{printed}");
    }
    let engine = support::engine(1, backend);
    let key = b"auth:k".to_vec();
    let op = Op::SetNx {
        key: key.clone(),
        val: b"v".to_vec(),
        ttl: Duration::from_secs(10),
    };
    assert_eq!(engine.op_blocking(&key, op).unwrap(), Reply::SetNx(true));
}

#[test]
fn acl_user_and_password_authenticate_every_connection() {
    require_redis();
    let server = RedisServer::start();
    server.cmd(&["ACL", "SETUSER", "gate", "on", ">pw", "~*", "+@all"]);
    let mut cfg = config(&server.addr());
    cfg.redis_username = Some("gate".into());
    cfg.redis_password = Some("nope".into());
    assert!(matches!(cache::open(&cfg), Err(CacheError::Auth { .. })));
    cfg.redis_password = Some("pw".into());
    let engine = support::engine(2, cache::open(&cfg).expect("ACL user"));
    let names = server.cli(&["CLIENT", "LIST"]);
    assert!(names.contains("user=gate"), "{names}");
    // Named for the instance and the shard.
    let me = format!("name=txgate-{}", txgate::txidset::default_instance_id());
    assert!(names.contains(&format!("{me}-s0 ")), "{names}");
    assert!(names.contains(&format!("{me}-s1 ")), "{names}");
    drop(engine);
}

#[test]
fn select_puts_keys_in_the_chosen_database() {
    require_redis();
    let server = RedisServer::start();
    let mut cfg = config(&server.addr());
    cfg.redis_db = 3;
    let engine = support::engine(1, cache::open(&cfg).unwrap());
    let key = b"db:k".to_vec();
    let op = Op::Set {
        key: key.clone(),
        val: b"in-3".to_vec(),
        ttl: Duration::ZERO,
    };
    engine.op_blocking(&key, op).unwrap();
    assert_eq!(server.cli(&["-n", "3", "GET", "db:k"]).trim(), "in-3");
    assert_eq!(server.cli(&["-n", "0", "EXISTS", "db:k"]).trim(), "0");
}

#[test]
fn claims_across_two_instances_forward_each_txid_once() {
    let (server, a) = redis_engine();
    let b = support::engine(2, cache::open(&config(&server.addr())).unwrap());
    let mut forwards = 0;
    for i in 0..500u64 {
        let id = support::txid(i + 1_000_000);
        for e in [&a, &b, &a] {
            match e.claim_blocking(&id).unwrap() {
                Verdict::Forward(Forward::Won) => forwards += 1,
                Verdict::Forward(Forward::FailOpen) => panic!("healthy backend failed open"),
                Verdict::Suppress(Suppress::Seen | Suppress::Lost | Suppress::Pending) => {}
            }
        }
    }
    assert_eq!(forwards, 500);
    // Claims carry the dedup TTL (60 s in the test engines).
    let key = [&b"txgate:"[..], &support::txid(1_000_000)].concat();
    let pttl = server.cmd_bytes(&[b"PTTL", &key]);
    assert!(
        matches!(pttl, support::redis::Resp::Int(ms) if (1..=60_000).contains(&ms)),
        "PTTL {pttl:?}"
    );
}

/// Opens `server` as ACL user `probe` with `rules` added to `+@all`.
fn open_as_limited_user(
    server: &RedisServer,
    rules: &[&str],
) -> Result<Option<cache::Backend>, CacheError> {
    let mut acl = vec![
        "ACL", "SETUSER", "probe", "reset", "on", ">pw", "~*", "+@all",
    ];
    acl.extend_from_slice(rules);
    server.cmd(&acl).expect_ok("ACL SETUSER");
    let mut cfg = config(&server.addr());
    cfg.redis_username = Some("probe".into());
    cfg.redis_password = Some("pw".into());
    cache::open(&cfg)
}

fn redis_info(backend: &Option<cache::Backend>) -> txgate::cache::redis::ServerInfo {
    match backend {
        Some(cache::Backend::Redis(r)) => r.info().clone(),
        _ => panic!("not a Redis backend"),
    }
}

#[test]
fn a_user_refused_info_still_learns_version_and_mode() {
    require_redis();
    let server = RedisServer::start();
    let info_text = server.cli(&["INFO", "server"]);
    let real = info_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))
        .expect("redis_version")
        .to_owned();
    // Without INFO: HELLO names the version, so SET NX GET stays on.
    let info = redis_info(&open_as_limited_user(&server, &["-info"]).expect("opens via HELLO"));
    let (a, b, c) = info.version;
    assert_eq!(format!("{a}.{b}.{c}"), real);
    assert_eq!(info.nx_get, info.version >= (7, 0, 0));
    assert!(!info.cluster);
    // Without INFO and HELLO (renamed away: an ACL cannot refuse HELLO):
    // CLUSTER SLOTS says "cluster support disabled"; the version is
    // unknown, so no NX GET retry.
    let renamed = RedisServer::start_with(&[
        "--rename-command",
        "INFO",
        "",
        "--rename-command",
        "HELLO",
        "",
    ]);
    let info = redis_info(&open_as_limited_user(&renamed, &[]).expect("opens via CLUSTER SLOTS"));
    assert_eq!(info.version, (0, 0, 0));
    assert!(!info.nx_get);
    assert!(!info.cluster);
    // Nothing tells: open fails, naming what to grant.
    match open_as_limited_user(&renamed, &["-cluster"]) {
        Err(CacheError::Connect { detail, .. }) => {
            assert!(
                detail.contains("+info, +hello or +cluster|slots"),
                "{detail}"
            )
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened without knowing whether it is a cluster"),
    }
}

#[test]
fn a_server_named_by_host_is_found_again_after_a_restart() {
    require_redis();
    let server = RedisServer::start();
    // Every dial looks the name up again (a managed endpoint fails over by
    // moving its name); here it keeps resolving to the same server.
    let named = format!("localhost:{}", server.port());
    let engine = support::engine(1, cache::open(&config(&named)).expect("opens by name"));
    let set = |k: &str| {
        let key = k.as_bytes().to_vec();
        let op = Op::SetNx {
            key: key.clone(),
            val: b"v".to_vec(),
            ttl: Duration::from_secs(10),
        };
        engine.op_blocking(&key, op)
    };
    assert_eq!(set("named:1").unwrap(), Reply::SetNx(true));
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while set("named:2").is_err() {
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.cli(&["GET", "named:2"]).trim(), "v");
}
