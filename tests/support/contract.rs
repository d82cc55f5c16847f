//! The backend contract suite, written once. Each backend's test file calls
//! `contract_suite!(name, || -> Engine)` to get one test per rule.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use txgate::engine::{Engine, Op, Reply};

fn set_nx(e: &Engine, key: &[u8], val: &[u8], ttl: Duration) -> bool {
    match e.op_blocking(
        key,
        Op::SetNx {
            key: key.to_vec(),
            val: val.to_vec(),
            ttl,
        },
    ) {
        Ok(Reply::SetNx(won)) => won,
        other => panic!("set_nx: {other:?}"),
    }
}

fn set(e: &Engine, key: &[u8], val: &[u8], ttl: Duration) {
    match e.op_blocking(
        key,
        Op::Set {
            key: key.to_vec(),
            val: val.to_vec(),
            ttl,
        },
    ) {
        Ok(Reply::Set) => {}
        other => panic!("set: {other:?}"),
    }
}

fn get(e: &Engine, key: &[u8]) -> Option<Vec<u8>> {
    match e.op_blocking(key, Op::Get { key: key.to_vec() }) {
        Ok(Reply::Get(v)) => v,
        other => panic!("get: {other:?}"),
    }
}

fn del(e: &Engine, key: &[u8]) {
    match e.op_blocking(key, Op::Del { key: key.to_vec() }) {
        Ok(Reply::Del) => {}
        other => panic!("del: {other:?}"),
    }
}

/// A key no earlier run can have left behind in a shared store.
pub fn fresh_key(tag: &str) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("contract:{tag}:{}:{nanos}", std::process::id()).into_bytes()
}

/// Many concurrent `set_nx` on one key, from tasks on every shard and from
/// plain threads at once: exactly one wins.
pub fn create_only_race_has_exactly_one_winner(e: &Engine) {
    const PER_SHARD: usize = 25;
    const THREADS: usize = 4;
    const PER_THREAD: usize = 25;
    for round in 0..5 {
        let key = fresh_key(&format!("race{round}"));
        let e = Arc::new(e);
        let wins = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (e, key, wins) = (e.clone(), key.clone(), &wins);
                scope.spawn(move || {
                    let val = format!("thread-{t}");
                    for _ in 0..PER_THREAD {
                        if set_nx(&e, &key, val.as_bytes(), Duration::from_secs(30)) {
                            wins.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            let key2 = key.clone();
            let from_shards = futures_lite::future::block_on(e.on_every_shard(move |s| {
                let key = key2.clone();
                async move {
                    let tasks: Vec<_> = (0..PER_SHARD)
                        .map(|i| {
                            let (s, key) = (s.clone(), key.clone());
                            glommio::spawn_local(async move {
                                let val = format!("shard-{}-{i}", s.index()).into_bytes();
                                let op = Op::SetNx {
                                    key: key.clone(),
                                    val,
                                    ttl: Duration::from_secs(30),
                                };
                                matches!(s.op(&key, op).await, Ok(Reply::SetNx(true)))
                            })
                        })
                        .collect();
                    let mut won = 0;
                    for t in tasks {
                        won += t.await as usize;
                    }
                    won
                }
            }))
            .expect("every shard answers");
            wins.fetch_add(from_shards.iter().sum::<usize>(), Ordering::Relaxed);
        });
        assert_eq!(wins.load(Ordering::Relaxed), 1, "round {round}: winners");
    }
}

/// An entry with a TTL reads back before it and is gone after it; the key
/// can then be created again. "After it" allows a store that counts TTLs in
/// whole seconds: Aerospike rounds 300 ms up to 1 s and expires a record when
/// the clock's whole second passes its void time, so it may live up to 2 s.
pub fn ttl_expiry(e: &Engine) {
    let key = fresh_key("ttl");
    assert!(set_nx(e, &key, b"v", Duration::from_millis(300)));
    assert!(!set_nx(e, &key, b"w", Duration::from_millis(300)));
    assert_eq!(get(e, &key).as_deref(), Some(&b"v"[..]));
    let limit = std::time::Instant::now() + Duration::from_millis(2_600);
    while get(e, &key).is_some() {
        assert!(
            std::time::Instant::now() < limit,
            "expired entry still readable 2.6 s after a 300 ms TTL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        set_nx(e, &key, b"x", Duration::from_secs(10)),
        "expired key not re-creatable"
    );
}

pub fn ttl_zero_never_expires(e: &Engine) {
    let key = fresh_key("ttl0");
    assert!(set_nx(e, &key, b"v", Duration::ZERO));
    let key2 = fresh_key("ttl0set");
    set(e, &key2, b"w", Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(get(e, &key).as_deref(), Some(&b"v"[..]));
    assert_eq!(get(e, &key2).as_deref(), Some(&b"w"[..]));
    del(e, &key);
    del(e, &key2);
}

/// A miss is `None`, not an error.
pub fn get_miss_is_none(e: &Engine) {
    assert_eq!(get(e, &fresh_key("miss")), None);
}

/// Deleting an absent key is fine; deleting a present one removes it.
pub fn del_absent_is_fine(e: &Engine) {
    let key = fresh_key("del");
    del(e, &key);
    set(e, &key, b"v", Duration::from_secs(30));
    del(e, &key);
    assert_eq!(get(e, &key), None);
    assert!(set_nx(e, &key, b"again", Duration::from_secs(30)));
    del(e, &key);
}

/// `set` overwrites; `set_nx` on a live key changes nothing.
pub fn overwrite(e: &Engine) {
    let key = fresh_key("over");
    set(e, &key, b"one", Duration::from_secs(30));
    set(e, &key, b"two", Duration::from_secs(30));
    assert_eq!(get(e, &key).as_deref(), Some(&b"two"[..]));
    assert!(!set_nx(e, &key, b"three", Duration::from_secs(30)));
    assert_eq!(get(e, &key).as_deref(), Some(&b"two"[..]));
    del(e, &key);
}

/// Keys and values are opaque bytes: every byte value, CR LF and NUL
/// included; empty values; a 1 000 000-byte value (Aerospike caps a whole
/// record at 1 MiB, its `max-record-size` default and ceiling).
pub fn binary_keys_and_values(e: &Engine) {
    let mut key = fresh_key("bin");
    key.extend((0..=255u8).rev());
    key.extend(b"\r\n\0$*");
    let all: Vec<u8> = (0..=255u8).chain(*b"\r\n\0").collect();
    set(e, &key, &all, Duration::from_secs(30));
    assert_eq!(get(e, &key), Some(all));

    let empty = fresh_key("empty-val");
    set(e, &empty, b"", Duration::from_secs(30));
    assert_eq!(get(e, &empty), Some(Vec::new()));
    assert!(!set_nx(e, &empty, b"x", Duration::from_secs(30)));

    let big_key = fresh_key("big");
    let big: Vec<u8> = (0..1_000_000)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    assert!(set_nx(e, &big_key, &big, Duration::from_secs(30)));
    let back = get(e, &big_key).expect("a 1 MB value reads back");
    assert_eq!(back.len(), big.len());
    assert!(back == big, "the 1 MB value differs");

    // Distinct binary keys stay distinct.
    let keys: HashSet<Vec<u8>> = (0..=255u8)
        .map(|b| {
            let mut k = fresh_key("distinct");
            k.push(b);
            k
        })
        .collect();
    for k in &keys {
        set(e, k, k, Duration::from_secs(30));
    }
    for k in &keys {
        assert_eq!(get(e, k).as_ref(), Some(k));
        del(e, k);
    }
    for k in [key, empty, big_key] {
        del(e, &k);
    }
}

/// One `#[test]` per contract rule for a backend; `$make` builds a fresh
/// engine over it, returned with whatever must outlive it (a server). Extra
/// attributes (e.g. `#[ignore = "why"]`) go on every test.
#[macro_export]
macro_rules! contract_suite {
    ($make:expr $(, #[$attr:meta])*) => {
        #[test]
        $(#[$attr])*
        fn contract_create_only_race_has_exactly_one_winner() {
            let (_keep, e) = $make();
            support::contract::create_only_race_has_exactly_one_winner(&e);
        }
        #[test]
        $(#[$attr])*
        fn contract_ttl_expiry() {
            let (_keep, e) = $make();
            support::contract::ttl_expiry(&e);
        }
        #[test]
        $(#[$attr])*
        fn contract_ttl_zero_never_expires() {
            let (_keep, e) = $make();
            support::contract::ttl_zero_never_expires(&e);
        }
        #[test]
        $(#[$attr])*
        fn contract_get_miss_is_none() {
            let (_keep, e) = $make();
            support::contract::get_miss_is_none(&e);
        }
        #[test]
        $(#[$attr])*
        fn contract_del_absent_is_fine() {
            let (_keep, e) = $make();
            support::contract::del_absent_is_fine(&e);
        }
        #[test]
        $(#[$attr])*
        fn contract_overwrite() {
            let (_keep, e) = $make();
            support::contract::overwrite(&e);
        }
        #[test]
        $(#[$attr])*
        fn contract_binary_keys_and_values() {
            let (_keep, e) = $make();
            support::contract::binary_keys_and_values(&e);
        }
    };
}
