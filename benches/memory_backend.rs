//! The memory backend's partition ops at the default key bound.
//!
//! One partition (`MemoryBackend::new(1_000_000).shard(0, 1)`), keys shaped as
//! the dedup path builds them (`txgate:` ‖ 16-byte TxID, 23 bytes), values
//! shaped as its claimant ids (`instance:0:000000012345`, 23 bytes). One op
//! per criterion iteration (`Throughput::Elements(1)`); keys are precomputed,
//! so the timed loop allocates only what the op itself does.
//!
//! - `memory_get/hit`: `get` of a resident key (1M resident, shuffled order).
//! - `memory_set_nx/existing`: `set_nx` of a resident key (returns false),
//!   same shuffled order over the same 1M resident keys.
//! - `memory_set_nx/novel`: `set_nx` of a key never seen (TTL 60 s) into a
//!   partition pre-filled to its 1M bound, so every insert also evicts the
//!   oldest entry: the steady state of a long run. The keys walk a list of 4M
//!   distinct keys; a key is evicted 1M inserts after it went in and comes
//!   round again only 4M inserts later, so every key stays novel.
//!
//! Cursors carry on across samples (warm-up included), so successive samples
//! do not replay the same warm prefix. After each bench the results are
//! checked (every get hit, every existing `set_nx` refused, every novel one
//! created and evicting exactly one entry) and any mismatch is reported.
//! At the end the medians criterion wrote in this run are printed, one line
//! per bench.
//!
//! `cargo bench --bench memory_backend`; options after `--` go to criterion (a
//! filter, `--list`, `--noplot`, `--measurement-time 10`, ...).

use std::cell::OnceCell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use txgate::cache::memory::{MemoryBackend, MemoryShard};

/// The partition's key bound (the default `memory_max_keys`).
const MAX_KEYS: usize = 1_000_000;
/// Distinct keys the novel bench walks through.
const NOVEL_KEYS: usize = 4 * MAX_KEYS;
const PREFIX: &[u8] = b"txgate:";
const TXID_LEN: usize = 16;
const KEY_LEN: usize = PREFIX.len() + TXID_LEN;
/// A claimant id as the dedup path writes it.
const VALUE: &[u8] = b"instance:0:000000012345";
/// The dedup TTL.
const TTL: Duration = Duration::from_secs(60);
/// TTL of the resident fixture's keys: long enough that none expires however
/// long criterion is told to measure (the TTL does not change an op's cost).
const RESIDENT_TTL: Duration = Duration::from_secs(24 * 3600);

type Key = [u8; KEY_LEN];

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` distinct keys. The TxID's first half mixes the index through
/// splitmix64's finaliser (a bijection, so distinct indices give distinct
/// keys); the second half is random.
fn keys(n: usize, seed: u64) -> Vec<Key> {
    let mut rng = seed;
    (0..n)
        .map(|i| {
            let mut k = [0u8; KEY_LEN];
            k[..PREFIX.len()].copy_from_slice(PREFIX);
            let mut idx = (i as u64).wrapping_sub(0x9E37_79B9_7F4A_7C15);
            let unique = splitmix64(&mut idx);
            k[PREFIX.len()..PREFIX.len() + 8].copy_from_slice(&unique.to_le_bytes());
            k[PREFIX.len() + 8..].copy_from_slice(&splitmix64(&mut rng).to_le_bytes());
            k
        })
        .collect()
}

fn shuffle(v: &mut [Key], seed: u64) {
    let mut rng = seed;
    for i in (1..v.len()).rev() {
        let j = (splitmix64(&mut rng) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// A partition bounded to `MAX_KEYS` holding `keys`.
fn filled(keys: &[Key], ttl: Duration) -> (MemoryBackend, MemoryShard) {
    let backend = MemoryBackend::new(MAX_KEYS);
    let shard = backend.shard(0, 1);
    for k in keys {
        assert!(shard.set_nx(k, VALUE, ttl).expect("open partition"));
    }
    assert_eq!(shard.len(), keys.len());
    (backend, shard)
}

/// 1M resident keys and the shuffled order they are read in.
struct Resident {
    backend: MemoryBackend,
    shard: MemoryShard,
    order: Vec<Key>,
}

impl Resident {
    fn build() -> Self {
        let t = Instant::now();
        let mut order = keys(MAX_KEYS, 0x5EED_0001);
        let (backend, shard) = filled(&order, RESIDENT_TTL);
        shuffle(&mut order, 0x5EED_0002);
        println!(
            "resident fixture: {} keys in {:.1} s",
            shard.len(),
            t.elapsed().as_secs_f64()
        );
        Self {
            backend,
            shard,
            order,
        }
    }
}

/// A partition full at its bound, and the novel keys to insert, the first
/// `MAX_KEYS` of which are the ones already in.
struct Novel {
    backend: MemoryBackend,
    shard: MemoryShard,
    keys: Vec<Key>,
}

impl Novel {
    fn build() -> Self {
        let t = Instant::now();
        let keys = keys(NOVEL_KEYS, 0x5EED_0003);
        let (backend, shard) = filled(&keys[..MAX_KEYS], TTL);
        println!(
            "novel fixture: {} keys resident, {} in the list, in {:.1} s",
            shard.len(),
            keys.len(),
            t.elapsed().as_secs_f64()
        );
        Self {
            backend,
            shard,
            keys,
        }
    }
}

/// Evictions plus expirations so far (a full partition's insert drops one
/// entry, counted as either depending on whether its TTL had passed).
fn dropped(b: &MemoryBackend) -> u64 {
    b.counters().evictions.load(Relaxed) + b.counters().expirations.load(Relaxed)
}

fn report(bench: &str, ops: u64, bad: u64, what: &str) {
    if bad == 0 {
        println!("{bench}: check ok ({ops} ops, {what})");
    } else {
        println!("{bench}: CHECK FAILED: {bad} of {ops} ops were not {what}");
    }
}

fn bench_resident(c: &mut Criterion, fixture: &OnceCell<Resident>) {
    let fx = || fixture.get_or_init(Resident::build);

    let mut group = c.benchmark_group("memory_get");
    group.throughput(Throughput::Elements(1));
    let (mut cursor, mut ops, mut bad) = (0, 0u64, 0u64);
    group.bench_function("hit", |b| {
        let f = fx();
        let n = f.order.len();
        b.iter(|| {
            let k = &f.order[cursor];
            cursor += 1;
            if cursor == n {
                cursor = 0;
            }
            let r = f.shard.get(black_box(k));
            ops += 1;
            bad += u64::from(!matches!(r, Ok(Some(_))));
            r
        });
    });
    group.finish();
    if ops > 0 {
        report("memory_get/hit", ops, bad, "hits");
    }

    let mut group = c.benchmark_group("memory_set_nx");
    group.throughput(Throughput::Elements(1));
    let (mut cursor, mut ops, mut bad) = (0, 0u64, 0u64);
    group.bench_function("existing", |b| {
        let f = fx();
        let n = f.order.len();
        b.iter(|| {
            let k = &f.order[cursor];
            cursor += 1;
            if cursor == n {
                cursor = 0;
            }
            let r = f.shard.set_nx(black_box(k), black_box(VALUE), TTL);
            ops += 1;
            bad += u64::from(r != Ok(false));
            r
        });
    });
    group.finish();
    if ops > 0 {
        let f = fx();
        let churn = dropped(&f.backend);
        report("memory_set_nx/existing", ops, bad, "refused (false)");
        if churn != 0 || f.shard.len() != MAX_KEYS {
            println!(
                "memory_set_nx/existing: CHECK FAILED: {churn} entries dropped, {} resident",
                f.shard.len()
            );
        }
    }
}

fn bench_novel(c: &mut Criterion, fixture: &OnceCell<Novel>) {
    let fx = || fixture.get_or_init(Novel::build);

    let mut group = c.benchmark_group("memory_set_nx");
    group.throughput(Throughput::Elements(1));
    // The first MAX_KEYS keys are resident; start after them.
    let (mut cursor, mut ops, mut bad) = (MAX_KEYS, 0u64, 0u64);
    let mut dropped_before = None;
    group.bench_function("novel", |b| {
        let f = fx();
        dropped_before.get_or_insert_with(|| dropped(&f.backend));
        let n = f.keys.len();
        b.iter(|| {
            let k = &f.keys[cursor];
            cursor += 1;
            if cursor == n {
                cursor = 0;
            }
            let r = f.shard.set_nx(black_box(k), black_box(VALUE), TTL);
            ops += 1;
            bad += u64::from(r != Ok(true));
            r
        });
    });
    group.finish();
    if let (Some(before), Some(f)) = (dropped_before, fixture.get()) {
        report("memory_set_nx/novel", ops, bad, "created (true)");
        let churn = dropped(&f.backend) - before;
        if churn != ops || f.shard.len() != MAX_KEYS {
            println!(
                "memory_set_nx/novel: CHECK FAILED: {ops} inserts dropped {churn} entries, {} resident",
                f.shard.len()
            );
        } else {
            println!("memory_set_nx/novel: every insert evicted one entry ({churn} in all)");
        }
    }
}

// ---------------------------------------------------------------------------
// Summary.

const BENCHES: [(&str, &str); 3] = [
    ("memory_set_nx", "novel"),
    ("memory_set_nx", "existing"),
    ("memory_get", "hit"),
];

/// Where criterion writes, resolved as criterion resolves it.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("criterion")
}

/// The median (ns per op) criterion wrote for the bench in `dir` during this
/// run, or why there is none.
fn median_ns(dir: &Path, started: SystemTime) -> Result<f64, String> {
    let path = dir.join("new").join("estimates.json");
    let meta = std::fs::metadata(&path).map_err(|_| format!("missing {}", path.display()))?;
    // A file left by an earlier run must not pass for a fresh measurement.
    let fresh = meta
        .modified()
        .map(|m| m + Duration::from_secs(1) >= started)
        .unwrap_or(false);
    if !fresh {
        return Err("not measured in this run".to_string());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    v["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("{}: no median.point_estimate", path.display()))
}

fn summarize(started: SystemTime) {
    let root = criterion_dir();
    println!("\nmedians (1M-key partition, {KEY_LEN}-byte keys):");
    for (group, id) in BENCHES {
        let dir = root.join(group).join(id);
        match median_ns(&dir, started) {
            Ok(ns) => println!("  {group}/{id}: {ns:.1} ns/op ({:.2} Mops/s)", 1e3 / ns),
            Err(e) => println!("  {group}/{id}: {e}"),
        }
    }
}

fn main() {
    let started = SystemTime::now();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();

    // Fixtures are built on first use, so filtered-out benches cost nothing,
    // and dropped as soon as their benches are done.
    {
        let novel = OnceCell::new();
        bench_novel(&mut c, &novel);
    }
    {
        let resident = OnceCell::new();
        bench_resident(&mut c, &resident);
    }
    Criterion::default().configure_from_args().final_summary();
    summarize(started);
}
