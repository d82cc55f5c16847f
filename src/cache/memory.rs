//! The memory backend: per-process, zero infrastructure, partitioned by shard.
//!
//! Each shard owns one partition outright (`RefCell`, no lock); the engine runs
//! every op on a key on that key's owner shard, so one partition sees all of a
//! key's ops. `memory_max_keys` is split evenly over the partitions.
//!
//! **Expiry**: lazy (an expired entry reads as absent and is dropped on touch)
//! plus a bounded sweep ([`MemoryShard::sweep`], run by each shard every
//! 100 ms) that drops up to [`SWEEP_BUDGET`] expired entries, soonest first.
//!
//! **Eviction** (a full partition taking a new key): the entry closest to its
//! deadline goes first; entries without a TTL go last, oldest first. For dedup
//! keys, which share one TTL, that is plain FIFO. Evictions are counted.

use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::CacheError;
use crate::clock;

/// Expired entries dropped per sweep, per shard.
pub const SWEEP_BUDGET: usize = 1024;
const NO_DEADLINE: u64 = u64::MAX;
/// Most keys a partition's map is sized for up front (past it, it grows).
const PRESIZE_KEYS_MAX: usize = 16 << 20;

/// The process-wide memory backend: the key bound and the shared counters.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    max_keys: usize,
    counters: Arc<MemoryCounters>,
}

/// Counters summed over all partitions.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    /// Live entries dropped because their partition was full.
    pub evictions: AtomicU64,
    /// Entries dropped because their TTL had passed (on touch or by sweep).
    pub expirations: AtomicU64,
}

impl MemoryBackend {
    /// A backend holding at most `max_keys` keys over all shards (0 = unbounded).
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            counters: Arc::default(),
        }
    }

    /// Eviction and expiry counts so far.
    pub fn counters(&self) -> &MemoryCounters {
        &self.counters
    }

    /// Shard `shard` of `shards`'s partition, bounded to its share of the keys.
    pub fn shard(&self, shard: usize, shards: usize) -> MemoryShard {
        debug_assert!(shard < shards);
        let max_keys = if self.max_keys == 0 {
            0
        } else {
            self.max_keys.div_ceil(shards.max(1))
        };
        // Sized once for the bound: growing a large map rehashes every entry
        // at once, a multi-millisecond stall on the claim path.
        let map = hashbrown::HashMap::with_capacity_and_hasher(
            max_keys.min(PRESIZE_KEYS_MAX),
            ahash::RandomState::new(),
        );
        MemoryShard {
            part: RefCell::new(Partition {
                map,
                order: BTreeMap::new(),
                seq: 0,
                max_keys,
            }),
            closed: Cell::new(false),
            counters: self.counters.clone(),
        }
    }
}

/// Bytes stored inline when short (dedup keys and claim values are), so a
/// lookup touches the table and not a second allocation.
#[derive(Clone)]
enum Bytes {
    Inline { len: u8, buf: [u8; INLINE_MAX] },
    Heap(Box<[u8]>),
}

const INLINE_MAX: usize = 38;

impl Bytes {
    fn new(b: &[u8]) -> Self {
        if b.len() <= INLINE_MAX {
            let mut buf = [0u8; INLINE_MAX];
            buf[..b.len()].copy_from_slice(b);
            Self::Inline {
                len: b.len() as u8,
                buf,
            }
        } else {
            Self::Heap(b.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Inline { len, buf } => &buf[..*len as usize],
            Self::Heap(b) => b,
        }
    }
}

impl Borrow<[u8]> for Bytes {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

// Hash and Eq agree with `[u8]`'s, as `Borrow` lookups require.
impl Hash for Bytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Bytes {}

struct Entry {
    val: Bytes,
    /// (deadline in ms on the monotonic clock or NO_DEADLINE, insertion seq):
    /// this entry's key in `order`.
    order_key: (u64, u64),
}

struct Partition {
    map: hashbrown::HashMap<Bytes, Entry, ahash::RandomState>,
    /// Eviction and expiry order: soonest deadline first, then oldest.
    order: BTreeMap<(u64, u64), Bytes>,
    seq: u64,
    max_keys: usize,
}

/// One shard's partition.
pub struct MemoryShard {
    part: RefCell<Partition>,
    closed: Cell<bool>,
    counters: Arc<MemoryCounters>,
}

fn deadline(now_ms: u64, ttl: Duration) -> u64 {
    if ttl.is_zero() {
        return NO_DEADLINE;
    }
    // Round sub-millisecond remainders up: an entry never expires early.
    let ttl_ms = ttl.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128 / 2) as u64;
    now_ms.saturating_add(ttl_ms)
}

impl MemoryShard {
    fn check_open(&self) -> Result<(), CacheError> {
        if self.closed.get() {
            Err(CacheError::Closed)
        } else {
            Ok(())
        }
    }

    /// Creates `key = val` iff absent or expired.
    pub fn set_nx(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<bool, CacheError> {
        self.check_open()?;
        let now = clock::precise_ms();
        let mut p = self.part.borrow_mut();
        if let Some(e) = p.map.get(key) {
            if e.order_key.0 > now {
                return Ok(false);
            }
            p.remove(key);
            self.counters.expirations.fetch_add(1, Ordering::Relaxed);
        }
        p.insert_new(key, val, deadline(now, ttl), now, &self.counters);
        Ok(true)
    }

    /// Writes `key = val`, replacing any value and TTL.
    pub fn set(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<(), CacheError> {
        self.check_open()?;
        let now = clock::precise_ms();
        let mut p = self.part.borrow_mut();
        p.remove(key);
        p.insert_new(key, val, deadline(now, ttl), now, &self.counters);
        Ok(())
    }

    /// The value under `key`, `None` when absent or expired.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        self.check_open()?;
        let now = clock::precise_ms();
        let mut p = self.part.borrow_mut();
        match p.map.get(key) {
            None => Ok(None),
            Some(e) if e.order_key.0 > now => Ok(Some(e.val.as_slice().to_vec())),
            Some(_) => {
                p.remove(key);
                self.counters.expirations.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Removes `key` if present.
    pub fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        self.check_open()?;
        self.part.borrow_mut().remove(key);
        Ok(())
    }

    /// Drops up to `budget` expired entries, soonest deadline first.
    pub fn sweep(&self, budget: usize) {
        let now = clock::precise_ms();
        let mut p = self.part.borrow_mut();
        for _ in 0..budget {
            let Some((&(dl, _), _)) = p.order.first_key_value() else {
                break;
            };
            if dl > now {
                break;
            }
            let (_, key) = p.order.pop_first().expect("checked non-empty");
            p.map.remove(key.as_slice());
            self.counters.expirations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keys held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.part.borrow().map.len()
    }

    /// Whether the partition holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything; later ops fail with `Closed`.
    pub fn close(&self) {
        self.closed.set(true);
        let mut p = self.part.borrow_mut();
        p.map = hashbrown::HashMap::with_hasher(ahash::RandomState::new());
        p.order.clear();
    }
}

impl Partition {
    fn remove(&mut self, key: &[u8]) {
        if let Some(e) = self.map.remove(key) {
            self.order.remove(&e.order_key);
        }
    }

    /// Inserts a key known to be absent, evicting first when full.
    fn insert_new(
        &mut self,
        key: &[u8],
        val: &[u8],
        deadline_ms: u64,
        now_ms: u64,
        counters: &MemoryCounters,
    ) {
        debug_assert!(!self.map.contains_key(key));
        if self.max_keys > 0
            && self.map.len() >= self.max_keys
            && let Some(((dl, _), victim)) = self.order.pop_first()
        {
            self.map.remove(victim.as_slice());
            let counter = if dl <= now_ms {
                &counters.expirations
            } else {
                &counters.evictions
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.seq += 1;
        let order_key = (deadline_ms, self.seq);
        let key = Bytes::new(key);
        self.order.insert(order_key, key.clone());
        self.map.insert(
            key,
            Entry {
                val: Bytes::new(val),
                order_key,
            },
        );
        debug_assert_eq!(self.map.len(), self.order.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_partition_evicts_soonest_deadline_first_and_counts_it() {
        let b = MemoryBackend::new(3);
        let s = b.shard(0, 1);
        let long = Duration::from_secs(100);
        s.set(b"forever", b"v", Duration::ZERO).unwrap();
        s.set(b"late", b"v", long * 2).unwrap();
        s.set(b"soon", b"v", long).unwrap();
        assert!(s.set_nx(b"new", b"v", long).unwrap());
        assert_eq!(s.get(b"soon").unwrap(), None);
        assert!(s.get(b"late").unwrap().is_some());
        assert!(s.get(b"forever").unwrap().is_some());
        assert_eq!(b.counters().evictions.load(Ordering::Relaxed), 1);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn max_keys_is_split_over_shards() {
        let b = MemoryBackend::new(10);
        let s = b.shard(1, 4);
        for i in 0..10u8 {
            s.set(&[i], b"v", Duration::ZERO).unwrap();
        }
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn sweep_drops_expired_entries_within_budget() {
        let b = MemoryBackend::new(0);
        let s = b.shard(0, 1);
        for i in 0..10u8 {
            s.set(&[i], b"v", Duration::from_millis(1)).unwrap();
        }
        s.set(b"keep", b"v", Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        s.sweep(4);
        assert_eq!(s.len(), 7);
        s.sweep(100);
        assert_eq!(s.len(), 1);
        assert_eq!(b.counters().expirations.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn closed_partition_refuses_ops() {
        let s = MemoryBackend::new(0).shard(0, 1);
        s.close();
        assert_eq!(s.get(b"k"), Err(CacheError::Closed));
    }
}
