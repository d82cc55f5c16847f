//! Shared test support: engine builders and the backend contract suite.
#![allow(dead_code)]

pub mod aerospike;
pub mod contract;
pub mod proxy;
pub mod redis;
pub mod udp;

use std::time::Duration;

use txgate::cache::Backend;
use txgate::engine::{Engine, EngineConfig, affinity_cores};
use txgate::txidset::TxIdSetConfig;

/// `shards` shards spread over this machine's cores (repeating cores when
/// there are fewer), so multi-shard logic is exercised on a 2-core box.
pub fn cores(shards: usize) -> Vec<usize> {
    let mine = affinity_cores().expect("affinity mask");
    (0..shards).map(|i| mine[i % mine.len()]).collect()
}

/// An engine of `shards` shards over `backend` with small, test-sized bounds.
pub fn engine(shards: usize, backend: Option<Backend>) -> Engine {
    engine_with(shards, backend, |_| {})
}

/// Like [`engine`], with a hook to adjust the config.
pub fn engine_with(
    shards: usize,
    backend: Option<Backend>,
    adjust: impl FnOnce(&mut EngineConfig),
) -> Engine {
    let mut config = EngineConfig {
        cores: cores(shards),
        backend,
        txidset: TxIdSetConfig {
            tier1_capacity: 100_000,
            ttl: Duration::from_secs(60),
            instance_id: "test".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    adjust(&mut config);
    Engine::start(config).expect("engine starts")
}

/// A 16-byte TxID from a number; distinct numbers give distinct TxIDs.
pub fn txid(i: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    id[8..].copy_from_slice(&i.to_be_bytes());
    id
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after
/// `limit`. Every wait in the tests is bounded this way.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}
