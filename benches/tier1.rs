//! Tier-1 duplicate lookup against its peers, plus honest bytes per entry.
//!
//! For 10k and 1M resident random 16-byte TxIDs, times `contains` of a
//! resident key (the duplicate path) on:
//!
//! - `txgate_tier1`: [`txgate::tier1::Tier1`], capacity = resident count;
//! - `hashbrown_ahash`: a raw `hashbrown::HashSet<[u8; 16], ahash::RandomState>`,
//!   the floor (no TTL, no bound);
//! - `quick_cache_unsync`: `quick_cache::unsync::Cache<[u8; 16], ()>::get`, sized
//!   so every key stays resident (checked before timing);
//! - `lru`: `lru::LruCache<[u8; 16], ()>::get`, which promotes the entry (that is
//!   its real cost on a hit).
//!
//! Every structure sees the same pre-shuffled sequence of resident keys, one
//! lookup per criterion iteration (`Throughput::Elements(1)`), with a cursor
//! that carries on across samples so the 1M run keeps touching the whole set.
//!
//! Memory: a counting global allocator tracks live bytes (as requested, and as
//! glibc's usable size plus its 8-byte chunk header); bytes per entry is the
//! growth while building a structure divided by its entries.
//!
//! After criterion finishes, the medians it wrote in this run
//! (`<criterion>/<group>/<id>/new/estimates.json`) are summarised per size,
//! with the ratios tier1/hashbrown (target <= 1.5), quick_cache/tier1 and
//! lru/tier1, and written to `<criterion>/tier1-summary.json`.
//!
//! `cargo bench --bench tier1`; options after `--` go to criterion (a filter,
//! `--list`, `--noplot`, `--measurement-time 10`, ...).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{OnceCell, RefCell};
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use criterion::{Bencher, Criterion, Throughput};
use txgate::tier1::Tier1;

// ---------------------------------------------------------------------------
// Counting allocator.

/// Live bytes as requested by `Layout::size()`.
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Live bytes as glibc holds them: `malloc_usable_size` plus the chunk header.
static LIVE_CHUNK_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Live allocations.
static LIVE_ALLOCS: AtomicUsize = AtomicUsize::new(0);

/// glibc's per-chunk header (the size word) on 64-bit targets.
const CHUNK_HEADER: usize = 8;

struct Counting;

fn chunk_bytes(ptr: *mut u8) -> usize {
    // SAFETY: `ptr` is a live allocation returned by the system allocator
    // (glibc malloc on Linux), which `malloc_usable_size` accepts.
    unsafe { libc::malloc_usable_size(ptr.cast()) + CHUNK_HEADER }
}

fn track_alloc(ptr: *mut u8, size: usize) {
    if !ptr.is_null() {
        LIVE_BYTES.fetch_add(size, Relaxed);
        LIVE_CHUNK_BYTES.fetch_add(chunk_bytes(ptr), Relaxed);
        LIVE_ALLOCS.fetch_add(1, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        track_alloc(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        track_alloc(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        LIVE_CHUNK_BYTES.fetch_sub(chunk_bytes(ptr), Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_chunk = chunk_bytes(ptr);
        // SAFETY: forwarded with the caller's guarantees.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_add(new_size, Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
            LIVE_CHUNK_BYTES.fetch_add(chunk_bytes(new), Relaxed);
            LIVE_CHUNK_BYTES.fetch_sub(old_chunk, Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy)]
struct Snapshot {
    bytes: usize,
    chunk_bytes: usize,
    allocs: usize,
}

fn snapshot() -> Snapshot {
    Snapshot {
        bytes: LIVE_BYTES.load(Relaxed),
        chunk_bytes: LIVE_CHUNK_BYTES.load(Relaxed),
        allocs: LIVE_ALLOCS.load(Relaxed),
    }
}

/// Memory one structure holds, measured while building it.
struct MemRow {
    name: &'static str,
    entries: usize,
    bytes: usize,
    chunk_bytes: usize,
    allocs: usize,
    /// What the structure says it holds, where it says.
    reported: Option<usize>,
}

/// Builds with `f`, recording the live-heap growth it leaves behind.
fn measured<T>(
    name: &'static str,
    entries: usize,
    rows: &mut Vec<MemRow>,
    f: impl FnOnce() -> T,
) -> T {
    let before = snapshot();
    let value = f();
    let after = snapshot();
    rows.push(MemRow {
        name,
        entries,
        bytes: after.bytes.saturating_sub(before.bytes),
        chunk_bytes: after.chunk_bytes.saturating_sub(before.chunk_bytes),
        allocs: after.allocs.saturating_sub(before.allocs),
        reported: None,
    });
    value
}

// ---------------------------------------------------------------------------
// Fixture: the same resident keys in all four structures.

const KEY_LEN: usize = 16;
type Key = [u8; KEY_LEN];
const TTL: Duration = Duration::from_secs(3600);

const IDS: [&str; 4] = [
    "txgate_tier1",
    "hashbrown_ahash",
    "quick_cache_unsync",
    "lru",
];
const SIZES: [(&str, usize); 2] = [("10k", 10_000), ("1m", 1_000_000)];

struct Fixture {
    /// Every resident key once, shuffled: the lookup sequence.
    order: Vec<Key>,
    now_ms: u32,
    tier1: Tier1,
    hashbrown: hashbrown::HashSet<Key, ahash::RandomState>,
    quick: quick_cache::unsync::Cache<Key, ()>,
    lru: RefCell<lru::LruCache<Key, ()>>,
    mem: Vec<MemRow>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Fixture {
    fn build(n: usize) -> Self {
        let mut rng = 0x7478_6761_7465_u64 ^ n as u64;
        let keys: Vec<Key> = (0..n)
            .map(|_| {
                let mut k = [0u8; KEY_LEN];
                k[..8].copy_from_slice(&splitmix64(&mut rng).to_le_bytes());
                k[8..].copy_from_slice(&splitmix64(&mut rng).to_le_bytes());
                k
            })
            .collect();
        let mut order = keys.clone();
        for i in (1..order.len()).rev() {
            let j = (splitmix64(&mut rng) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let now_ms = txgate::clock::coarse_ms() as u32;
        let mut mem = Vec::new();

        let tier1 = measured("txgate_tier1", n, &mut mem, || {
            let mut t = Tier1::new(n, KEY_LEN, TTL).expect("tier-1 parameters");
            for k in &keys {
                assert!(t.insert(k, now_ms), "random TxIDs collided");
            }
            t
        });
        mem.last_mut().expect("row").reported = Some(tier1.heap_bytes());

        let hashbrown = measured("hashbrown_ahash", n, &mut mem, || {
            let mut s = hashbrown::HashSet::with_capacity_and_hasher(n, ahash::RandomState::new());
            s.extend(keys.iter().copied());
            s
        });

        let quick = measured("quick_cache_unsync", n, &mut mem, || {
            let mut c = quick_cache::unsync::Cache::new(n);
            for k in &keys {
                c.insert(*k, ());
            }
            c
        });
        mem.last_mut().expect("row").reported = Some(quick.memory_used().total());

        let lru = measured("lru", n, &mut mem, || {
            let mut c = lru::LruCache::new(NonZeroUsize::new(n).expect("n > 0"));
            for k in &keys {
                c.put(*k, ());
            }
            c
        });

        // Every key resident everywhere, checked without promoting anything.
        assert_eq!(tier1.len(), n, "tier-1 lost entries");
        assert_eq!(hashbrown.len(), n, "random TxIDs collided");
        assert_eq!(quick.len(), n, "quick_cache evicted: size it larger");
        assert_eq!(lru.len(), n, "lru evicted");
        for k in &order {
            assert!(tier1.contains(k, now_ms), "tier-1 misses a resident key");
            assert!(hashbrown.contains(k));
            assert!(
                quick.peek(k).is_some(),
                "quick_cache misses a key: size it larger"
            );
            assert!(lru.peek(k).is_some());
        }
        drop(keys);

        Self {
            order,
            now_ms,
            tier1,
            hashbrown,
            quick,
            lru: RefCell::new(lru),
            mem,
        }
    }
}

/// One lookup per iteration, walking `order` from `cursor` (kept across
/// samples, so successive samples do not replay the same warm prefix).
fn lookups(b: &mut Bencher, order: &[Key], cursor: &mut usize, mut hit: impl FnMut(&Key) -> bool) {
    let n = order.len();
    b.iter(|| {
        let k = &order[*cursor];
        *cursor += 1;
        if *cursor == n {
            *cursor = 0;
        }
        hit(black_box(k))
    });
}

/// The `tier1_hit/<label>` group; returns the memory rows if it built its
/// fixture (not when filtered out or listing).
fn bench_hit(c: &mut Criterion, label: &str, n: usize) -> Option<Vec<MemRow>> {
    let fixture: OnceCell<Fixture> = OnceCell::new();
    let fx = || fixture.get_or_init(|| Fixture::build(n));
    let mut group = c.benchmark_group(format!("tier1_hit/{label}"));
    group.throughput(Throughput::Elements(1));

    let mut cursor = 0;
    group.bench_function(IDS[0], |b| {
        let f = fx();
        let now = f.now_ms;
        lookups(b, &f.order, &mut cursor, |k| f.tier1.contains(k, now));
    });
    let mut cursor = 0;
    group.bench_function(IDS[1], |b| {
        let f = fx();
        lookups(b, &f.order, &mut cursor, |k| f.hashbrown.contains(k));
    });
    let mut cursor = 0;
    group.bench_function(IDS[2], |b| {
        let f = fx();
        lookups(b, &f.order, &mut cursor, |k| f.quick.get(k).is_some());
    });
    let mut cursor = 0;
    group.bench_function(IDS[3], |b| {
        let f = fx();
        let mut lru = f.lru.borrow_mut();
        lookups(b, &f.order, &mut cursor, |k| lru.get(k).is_some());
    });
    group.finish();

    fixture.into_inner().map(|f| f.mem)
}

// ---------------------------------------------------------------------------
// Reports.

fn print_memory(rows: &[MemRow]) {
    println!();
    println!(
        "bytes per entry at {} entries (live-heap growth while building / entries)",
        rows[0].entries
    );
    println!(
        "{:<20} {:>14} {:>12} {:>16} {:>12} {:>14}",
        "structure", "live bytes", "B/entry", "B/entry (glibc)", "allocs/entry", "self-reported"
    );
    for r in rows {
        let per = |x: usize| x as f64 / r.entries as f64;
        let reported = r
            .reported
            .map_or("-".to_string(), |x| format!("{:.1} B/entry", per(x)));
        println!(
            "{:<20} {:>14} {:>12.1} {:>16.1} {:>12.2} {:>14}",
            r.name,
            r.bytes,
            per(r.bytes),
            per(r.chunk_bytes),
            per(r.allocs),
            reported
        );
    }
    println!("(B/entry (glibc): malloc_usable_size + 8-byte chunk header per allocation)");
}

fn memory_json(rows: &[MemRow]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                let per = |x: usize| x as f64 / r.entries as f64;
                serde_json::json!({
                    "structure": r.name,
                    "entries": r.entries,
                    "live_bytes": r.bytes,
                    "bytes_per_entry": per(r.bytes),
                    "glibc_bytes_per_entry": per(r.chunk_bytes),
                    "allocs_per_entry": per(r.allocs),
                    "self_reported_bytes": r.reported,
                })
            })
            .collect(),
    )
}

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

/// The median (ns per lookup) criterion wrote for `group/id` during this
/// run, or why there is none.
fn median_ns(dir: &std::path::Path, started: SystemTime) -> Result<f64, String> {
    let path = dir.join("new").join("estimates.json");
    let meta = std::fs::metadata(&path).map_err(|_| format!("missing {}", path.display()))?;
    // A file left by an earlier run (this one filtered it out, or only
    // listed or tested) must not pass for a fresh measurement.
    let fresh = meta
        .modified()
        .map(|m| m + Duration::from_secs(1) >= started)
        .unwrap_or(false);
    if !fresh {
        return Err(format!("not measured in this run ({})", path.display()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    v["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("{}: no median.point_estimate", path.display()))
}

fn summarize(started: SystemTime, memory: &[MemRow]) {
    let root = criterion_dir();
    let mut sizes = Vec::new();
    for (label, n) in SIZES {
        let group = format!("tier1_hit/{label}");
        let group_dir = root.join(group.replace('/', "_"));
        let medians: Vec<(&str, Result<f64, String>)> = IDS
            .iter()
            .map(|id| (*id, median_ns(&group_dir.join(id), started)))
            .collect();
        if medians.iter().all(|(_, m)| m.is_err()) {
            println!("\n{group}: no estimates from this run (filtered out, listed, or test mode)");
            continue;
        }
        println!("\n{group}: {n} resident 16-byte TxIDs, random resident-key lookups");
        println!("{:<20} {:>14}", "structure", "median ns/op");
        for (id, m) in &medians {
            match m {
                Ok(ns) => println!("{id:<20} {ns:>14.2}"),
                Err(why) => println!("{id:<20} {:>14}  {why}", "-"),
            }
        }
        let get = |id: &str| {
            medians
                .iter()
                .find(|(i, _)| *i == id)
                .and_then(|(_, m)| m.as_ref().ok().copied())
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let tier1 = get(IDS[0]);
        let tier1_vs_hb = ratio(tier1, get(IDS[1]));
        let quick_vs_tier1 = ratio(get(IDS[2]), tier1);
        let lru_vs_tier1 = ratio(get(IDS[3]), tier1);
        let show = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.2}x"));
        let verdict = match tier1_vs_hb {
            Some(r) if r <= 1.5 => "meets target <= 1.5",
            Some(_) => "MISSES target <= 1.5",
            None => "n/a",
        };
        println!(
            "tier1 / hashbrown    {:>14}  ({verdict})",
            show(tier1_vs_hb)
        );
        println!(
            "quick_cache / tier1  {:>14}  (tier-1 is this many times faster)",
            show(quick_vs_tier1)
        );
        println!(
            "lru / tier1          {:>14}  (tier-1 is this many times faster)",
            show(lru_vs_tier1)
        );
        let median_json: serde_json::Map<String, serde_json::Value> = medians
            .iter()
            .map(|(id, m)| {
                let v = match m {
                    Ok(ns) => serde_json::json!(ns),
                    Err(_) => serde_json::Value::Null,
                };
                (id.to_string(), v)
            })
            .collect();
        sizes.push(serde_json::json!({
            "group": group,
            "entries": n,
            "median_ns": median_json,
            "ratios": {
                "tier1_over_hashbrown": tier1_vs_hb,
                "quick_cache_over_tier1": quick_vs_tier1,
                "lru_over_tier1": lru_vs_tier1,
            },
            "target_tier1_over_hashbrown_max": 1.5,
            "meets_target": tier1_vs_hb.map(|r| r <= 1.5),
        }));
    }

    if sizes.is_empty() {
        println!(
            "\nno tier-1 estimates from this run; {} not written",
            root.join("tier1-summary.json").display()
        );
        return;
    }
    let summary = serde_json::json!({
        "bench": "tier1",
        "unit": "ns per lookup (criterion median point estimate)",
        "sizes": sizes,
        "bytes_per_entry": memory_json(memory),
    });
    let path = root.join("tier1-summary.json");
    let written = std::fs::create_dir_all(&root).and_then(|()| {
        let text = serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?;
        std::fs::write(&path, text + "\n")
    });
    match written {
        Ok(()) => println!("\nsummary written to {}", path.display()),
        Err(e) => println!("\ncould not write {}: {e}", path.display()),
    }
}

fn main() {
    let started = SystemTime::now();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();

    let mut memory = Vec::new();
    for (label, n) in SIZES {
        if let Some(rows) = bench_hit(&mut c, label, n)
            && n == 1_000_000
        {
            memory = rows;
        }
    }
    Criterion::default().configure_from_args().final_summary();

    if memory.is_empty() {
        println!("\nbytes per entry: not measured (the 1m group did not run)");
    } else {
        print_memory(&memory);
    }
    summarize(started, &memory);
}
