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
//!
//! **Layout**: entries (key and value in one buffer, inline when short) sit in
//! the hash table itself, the fields every op reads laid out first. The expiry/eviction order refers to them by bucket
//! number, never by a second copy of the key: an entry whose deadline is no
//! earlier than the last one's (one TTL on a monotonic clock: every dedup
//! claim) appends a ticket (seq, bucket) to a FIFO, one without a TTL to
//! another FIFO, and only the rest go to an ordered tree. Reaching the oldest
//! entry is then a direct load, not a probe. A ticket whose bucket has since
//! been emptied or reused (seq differs) is stale and skipped when met, so a
//! removal does not search the FIFOs. When the table rehashes (grows, or
//! clears tombstones) and entries move, the order structures are rebuilt from
//! it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hashbrown::HashTable;

use crate::hugepages::Prefaulted;

/// The partition's table: allocated once, for twice its bound (see
/// [`table_capacity_for`]), every page faulted in at start-up ([`Prefaulted`]).
type Table = HashTable<Entry, Prefaulted>;

use super::CacheError;
use crate::clock;

/// Expired entries dropped per sweep, per shard.
pub const SWEEP_BUDGET: usize = 1024;
const NO_DEADLINE: u64 = u64::MAX;
/// Most keys a partition's table and FIFO are sized for up front: a larger
/// share starts at this size and grows as it fills (each doubling a stall of
/// seconds at that size).
const PRESIZE_KEYS_MAX: usize = 16 << 20;
/// How many novel inserts ahead a full partition prefetches its eviction
/// victim: far enough for the miss to land, near enough to stay cached.
const EVICT_LOOKAHEAD: usize = 8;

/// Stale tickets a FIFO may hold beyond one per live entry before it is
/// compacted: compaction is O(len) and then waits for at least as many
/// pushes, so it is O(1) per insert amortized and a FIFO stays within twice
/// the live entries plus this.
const STALE_TICKETS_SLACK: usize = 1024;
/// Key plus value bytes stored inline: any key and value of up to 38 bytes
/// each (`txgate:` ‖ a 16-byte TxID, a claimant id) fit. With the lengths and
/// tag a [`KeyVal`] takes 80 bytes and an [`Entry`] 96.
const KV_INLINE_MAX: usize = 77;

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

    /// What the partitions of a `max_keys` bound over `shards` shards take
    /// at start-up (each table is sized, and its pages touched, then), to
    /// refuse a bound the machine cannot hold before allocating it. Growth
    /// past [`PRESIZE_KEYS_MAX`] keys a shard comes later and is not in it.
    pub fn start_bytes(max_keys: usize, shards: usize) -> u128 {
        (0..shards.max(1))
            .map(|i| {
                let presize = share_of(max_keys, i, shards).min(PRESIZE_KEYS_MAX);
                let cap = table_capacity_for(presize);
                // hashbrown: a power of two of buckets at load ≤ 7/8 (4 or 8
                // below 8), each an entry and a control byte, plus one group
                // of control bytes mirrored.
                let buckets = match cap {
                    0 => 0,
                    1..=3 => 4,
                    4..=7 => 8,
                    _ => (cap as u128 * 8 / 7).next_power_of_two(),
                };
                buckets * (std::mem::size_of::<Entry>() as u128 + 1)
                    + 16
                    + presize as u128 * std::mem::size_of::<Ticket>() as u128
            })
            .sum()
    }

    /// Eviction and expiry counts so far.
    pub fn counters(&self) -> &MemoryCounters {
        &self.counters
    }

    /// Shard `shard` of `shards`'s partition, bounded to its share of the keys.
    pub fn shard(&self, shard: usize, shards: usize) -> MemoryShard {
        debug_assert!(shard < shards);
        MemoryShard {
            part: RefCell::new(Partition::new(share_of(self.max_keys, shard, shards))),
            closed: Cell::new(false),
            counters: self.counters.clone(),
        }
    }
}

/// Shard `shard`'s part of a bound of `max_keys` over `shards`: the shares sum
/// to the bound exactly (the first `max_keys % shards` shards take one more),
/// except that every shard holds at least one key (0 would mean unbounded).
fn share_of(max_keys: usize, shard: usize, shards: usize) -> usize {
    if max_keys == 0 {
        return 0;
    }
    let shards = shards.max(1);
    let extra = usize::from(shard < max_keys % shards);
    (max_keys / shards + extra).max(1)
}

/// A key and its value in one buffer, inline when short (dedup keys and claim
/// values are), so a lookup touches the table and not a second allocation.
enum KeyVal {
    Inline {
        key_len: u8,
        val_len: u8,
        buf: [u8; KV_INLINE_MAX],
    },
    /// `buf` is the key then the value.
    Heap { key_len: usize, buf: Box<[u8]> },
}

impl KeyVal {
    fn new(key: &[u8], val: &[u8]) -> Self {
        let len = key.len() + val.len();
        if len <= KV_INLINE_MAX {
            let mut buf = [0u8; KV_INLINE_MAX];
            buf[..key.len()].copy_from_slice(key);
            buf[key.len()..len].copy_from_slice(val);
            Self::Inline {
                key_len: key.len() as u8,
                val_len: val.len() as u8,
                buf,
            }
        } else {
            let mut buf = Vec::with_capacity(len);
            buf.extend_from_slice(key);
            buf.extend_from_slice(val);
            Self::Heap {
                key_len: key.len(),
                buf: buf.into_boxed_slice(),
            }
        }
    }

    fn key(&self) -> &[u8] {
        match self {
            Self::Inline { key_len, buf, .. } => &buf[..*key_len as usize],
            Self::Heap { key_len, buf } => &buf[..*key_len],
        }
    }

    fn val(&self) -> &[u8] {
        match self {
            Self::Inline {
                key_len,
                val_len,
                buf,
            } => &buf[*key_len as usize..][..*val_len as usize],
            Self::Heap { key_len, buf } => &buf[*key_len..],
        }
    }
}

// What ops read (seq and deadline, then the tag, lengths and key) comes first
// and together, so that it mostly shares one cache line.
#[repr(C)]
struct Entry {
    /// Insertion seq, unique in the partition: names this entry (and not a
    /// later one in the same bucket) in the order structures.
    seq: u64,
    /// Deadline in ms on the monotonic clock, or NO_DEADLINE.
    deadline_ms: u64,
    kv: KeyVal,
}

/// A FIFO's reference to an entry.
#[derive(Clone, Copy)]
struct Ticket {
    seq: u64,
    bucket: usize,
}

/// Where the entry first in eviction order is referenced.
#[derive(Clone, Copy)]
enum Queue {
    Timed,
    Early,
    Forever,
}

/// The entry first in eviction order.
struct First {
    deadline_ms: u64,
    bucket: usize,
    queue: Queue,
}

struct Partition {
    table: Table,
    hasher: ahash::RandomState,
    /// Tickets of entries with a deadline no earlier than the previous
    /// ticket's, so in (deadline, seq) order; stale ones included.
    timed: VecDeque<Ticket>,
    /// Deadline of the last ticket pushed to `timed`.
    timed_last_ms: u64,
    /// Entries with a deadline earlier than `timed_last_ms` when inserted (a
    /// TTL shorter than an earlier entry's): (deadline, seq) -> bucket.
    /// Removed from eagerly.
    early: BTreeMap<(u64, u64), usize>,
    /// Tickets of entries without a deadline, oldest first; stale ones
    /// included.
    forever: VecDeque<Ticket>,
    seq: u64,
    max_keys: usize,
    /// This partition's share of [`MemoryCounters::evictions`]: each is a
    /// claim forgotten before its TTL, so the gate exports it per shard.
    evictions: u64,
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
    // Round sub-millisecond remainders up, and add the millisecond `now_ms`
    // was truncated by: an entry never expires early (up to 1 ms late).
    let ttl_ms = ttl.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128 / 2) as u64;
    now_ms.saturating_add(ttl_ms).saturating_add(1)
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
        let created =
            self.part
                .borrow_mut()
                .set_nx(key, val, deadline(now, ttl), now, &self.counters);
        Ok(created)
    }

    /// Writes `key = val`, replacing any value and TTL.
    pub fn set(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<(), CacheError> {
        self.check_open()?;
        let now = clock::precise_ms();
        self.part
            .borrow_mut()
            .set(key, val, deadline(now, ttl), now, &self.counters);
        Ok(())
    }

    /// The value under `key`, `None` when absent or expired.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        self.check_open()?;
        let now = clock::precise_ms();
        Ok(self.part.borrow_mut().get(key, now, &self.counters))
    }

    /// Removes `key` if present.
    pub fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        self.check_open()?;
        let mut p = self.part.borrow_mut();
        let hash = p.hasher.hash_one(key);
        p.remove(hash, key);
        Ok(())
    }

    /// Drops up to `budget` expired entries, soonest deadline first.
    pub fn sweep(&self, budget: usize) {
        let now = clock::precise_ms();
        self.part.borrow_mut().sweep(budget, now, &self.counters);
    }

    /// Keys held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.part.borrow().table.len()
    }

    /// Whether the partition holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries this partition dropped because it was full.
    pub fn evictions(&self) -> u64 {
        self.part.borrow().evictions
    }

    /// Drops everything (but its eviction count); later ops fail with
    /// `Closed`.
    pub fn close(&self) {
        self.closed.set(true);
        let mut p = self.part.borrow_mut();
        let evictions = p.evictions;
        *p = Partition::new(0);
        p.evictions = evictions;
    }
}

/// The table capacity to ask for so `keys` live entries never make it grow.
///
/// A full partition removes and inserts on every novel key, and some removals
/// leave tombstones that use up the table's room for inserts. When the room
/// runs out the table rehashes: in place while its entries fill at most half
/// its capacity, otherwise into a table twice the size — a new allocation,
/// every page faulted in, every entry moved and reindexed, on one claim
/// (≈ 0.5 s at 500 k keys), with both tables held meanwhile. Asking for twice
/// the keys keeps every rehash in place.
fn table_capacity_for(keys: usize) -> usize {
    if keys == 0 {
        0
    } else {
        keys.saturating_add(1).saturating_mul(2)
    }
}

impl Partition {
    fn new(max_keys: usize) -> Self {
        // Sized once for the bound: growing a large table rehashes every
        // entry at once, a stall of milliseconds to a second on the claim
        // path.
        let presize = max_keys.min(PRESIZE_KEYS_MAX);
        Self {
            table: HashTable::with_capacity_in(table_capacity_for(presize), Prefaulted),
            hasher: ahash::RandomState::new(),
            timed: VecDeque::with_capacity(presize),
            timed_last_ms: 0,
            early: BTreeMap::new(),
            forever: VecDeque::new(),
            seq: 0,
            max_keys,
            evictions: 0,
        }
    }

    fn set_nx(
        &mut self,
        key: &[u8],
        val: &[u8],
        deadline_ms: u64,
        now_ms: u64,
        counters: &MemoryCounters,
    ) -> bool {
        let hash = self.hasher.hash_one(key);
        // At the bound a novel key evicts. Finding the victim before the
        // lookup lets their cache misses overlap; a refused call finds it for
        // nothing (the same one each time, so from cache).
        let mut victim = if self.is_full() { self.first() } else { None };
        if let Ok(found) = self.table.find_entry(hash, |e| e.kv.key() == key) {
            if found.get().deadline_ms > now_ms {
                return false;
            }
            let (e, _) = found.remove();
            self.untrack(&e);
            counters.expirations.fetch_add(1, Ordering::Relaxed);
            // No longer full (and the victim may be the entry just removed).
            victim = None;
        }
        if let Some(victim) = victim {
            self.evict(&victim, now_ms, counters);
        }
        self.insert_new(hash, key, val, deadline_ms);
        self.prefetch_oldest_ahead();
        self.reclaim(now_ms, counters);
        true
    }

    /// Unbounded (`max_keys` 0), nothing evicts, and the periodic sweep
    /// drops at most [`SWEEP_BUDGET`] a tick: each insert also drops up to
    /// two expired entries, so expiry keeps up with any insert rate. Bounded,
    /// eviction (soonest to expire first) does it already.
    #[inline]
    fn reclaim(&mut self, now_ms: u64, counters: &MemoryCounters) {
        if self.max_keys == 0 {
            self.sweep(2, now_ms, counters);
        }
    }

    /// A full partition evicts its oldest entry on every novel insert: a
    /// random bucket, so a DRAM miss. Tickets name the next ones now: start
    /// loading the entry [`EVICT_LOOKAHEAD`] inserts ahead.
    #[inline]
    fn prefetch_oldest_ahead(&self) {
        if self.is_full()
            && let Some(t) = self.timed.get(EVICT_LOOKAHEAD)
            && let Some(e) = self.table.get_bucket(t.bucket)
        {
            crate::tier1::prefetch_line(e);
        }
    }

    fn set(
        &mut self,
        key: &[u8],
        val: &[u8],
        deadline_ms: u64,
        now_ms: u64,
        counters: &MemoryCounters,
    ) {
        let hash = self.hasher.hash_one(key);
        self.remove(hash, key);
        if self.is_full()
            && let Some(victim) = self.first()
        {
            self.evict(&victim, now_ms, counters);
        }
        self.insert_new(hash, key, val, deadline_ms);
        self.reclaim(now_ms, counters);
    }

    fn get(&mut self, key: &[u8], now_ms: u64, counters: &MemoryCounters) -> Option<Vec<u8>> {
        let hash = self.hasher.hash_one(key);
        let found = self.table.find_entry(hash, |e| e.kv.key() == key).ok()?;
        if found.get().deadline_ms > now_ms {
            return Some(found.get().kv.val().to_vec());
        }
        let (e, _) = found.remove();
        self.untrack(&e);
        counters.expirations.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn sweep(&mut self, budget: usize, now_ms: u64, counters: &MemoryCounters) {
        for _ in 0..budget {
            // Entries without a deadline come last and never expire.
            let Some(first) = self.first() else {
                break;
            };
            if first.deadline_ms > now_ms {
                break;
            }
            self.drop_first(&first);
            counters.expirations.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove(&mut self, hash: u64, key: &[u8]) {
        if let Ok(found) = self.table.find_entry(hash, |e| e.kv.key() == key) {
            let (e, _) = found.remove();
            self.untrack(&e);
        }
    }

    /// Forgets a removed entry's place in the order. Its ticket in a FIFO, if
    /// it has one, is left to go stale.
    fn untrack(&mut self, e: &Entry) {
        if !self.early.is_empty() && e.deadline_ms != NO_DEADLINE {
            self.early.remove(&(e.deadline_ms, e.seq));
        }
    }

    fn is_full(&self) -> bool {
        self.max_keys > 0 && self.table.len() >= self.max_keys
    }

    /// Makes room in a full partition: drops `victim`, what
    /// [`Partition::first`] returned with nothing removed since, counted as
    /// expired if its deadline has passed.
    fn evict(&mut self, victim: &First, now_ms: u64, counters: &MemoryCounters) {
        self.drop_first(victim);
        let counter = if victim.deadline_ms <= now_ms {
            &counters.expirations
        } else {
            self.evictions += 1;
            &counters.evictions
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Inserts a key known to be absent into a partition with room for it.
    fn insert_new(&mut self, hash: u64, key: &[u8], val: &[u8], deadline_ms: u64) {
        debug_assert!(self.table.find(hash, |e| e.kv.key() == key).is_none());
        debug_assert!(!self.is_full());
        self.seq += 1;
        let seq = self.seq;
        let entry = Entry {
            kv: KeyVal::new(key, val),
            deadline_ms,
            seq,
        };
        // The table calls the hasher only to move entries.
        let moved = Cell::new(false);
        let hasher = &self.hasher;
        let bucket = self
            .table
            .insert_unique(hash, entry, |e| {
                moved.set(true);
                hasher.hash_one(e.kv.key())
            })
            .bucket_index();
        let ticket = Ticket { seq, bucket };
        if deadline_ms == NO_DEADLINE {
            push_ticket(&mut self.forever, ticket, &self.table);
        } else {
            if self.timed.is_empty() {
                self.timed_last_ms = 0;
            }
            if deadline_ms >= self.timed_last_ms {
                push_ticket(&mut self.timed, ticket, &self.table);
                self.timed_last_ms = deadline_ms;
            } else {
                self.early.insert((deadline_ms, seq), bucket);
            }
        }
        if moved.get() {
            self.reindex();
        }
        debug_assert!(self.table.len() <= self.timed.len() + self.early.len() + self.forever.len());
    }

    /// Rebuilds the order structures from the table after entries moved.
    /// Tickets were pushed in seq order and `timed` also in deadline order, so
    /// ordering the live entries by seq restores both FIFOs.
    #[cold]
    fn reindex(&mut self) {
        let mut live: Vec<(u64, u64, usize)> = self
            .table
            .iter_buckets()
            .filter_map(|b| self.table.get_bucket(b).map(|e| (e.seq, e.deadline_ms, b)))
            .collect();
        live.sort_unstable_by_key(|&(seq, _, _)| seq);
        self.timed.clear();
        self.forever.clear();
        for (seq, deadline_ms, bucket) in live {
            let ticket = Ticket { seq, bucket };
            if deadline_ms == NO_DEADLINE {
                self.forever.push_back(ticket);
            } else if let Some(b) = self.early.get_mut(&(deadline_ms, seq)) {
                *b = bucket;
            } else {
                self.timed.push_back(ticket);
            }
        }
    }

    /// The live entry first in eviction order: soonest deadline, then oldest.
    /// Drops the stale tickets in front of it.
    fn first(&mut self) -> Option<First> {
        let timed = live_front(&mut self.timed, &self.table);
        let early = self.early.first_key_value();
        match (timed, early) {
            (Some((t, t_deadline_ms)), Some((&(deadline_ms, seq), &bucket))) => {
                Some(if (t_deadline_ms, t.seq) < (deadline_ms, seq) {
                    First {
                        deadline_ms: t_deadline_ms,
                        bucket: t.bucket,
                        queue: Queue::Timed,
                    }
                } else {
                    First {
                        deadline_ms,
                        bucket,
                        queue: Queue::Early,
                    }
                })
            }
            (Some((t, deadline_ms)), None) => Some(First {
                deadline_ms,
                bucket: t.bucket,
                queue: Queue::Timed,
            }),
            (None, Some((&(deadline_ms, _), &bucket))) => Some(First {
                deadline_ms,
                bucket,
                queue: Queue::Early,
            }),
            (None, None) => live_front(&mut self.forever, &self.table).map(|(t, deadline_ms)| {
                debug_assert_eq!(deadline_ms, NO_DEADLINE);
                First {
                    deadline_ms,
                    bucket: t.bucket,
                    queue: Queue::Forever,
                }
            }),
        }
    }

    /// Removes the entry [`Partition::first`] just returned.
    fn drop_first(&mut self, first: &First) {
        match first.queue {
            Queue::Timed => {
                self.timed.pop_front();
            }
            Queue::Early => {
                self.early.pop_first();
            }
            Queue::Forever => {
                self.forever.pop_front();
            }
        }
        let found = self.table.get_bucket_entry(first.bucket);
        debug_assert!(found.is_ok(), "first() returns a live entry");
        if let Ok(found) = found {
            found.remove();
        }
    }
}

/// `t`'s entry's deadline if it is still in the table (not removed or
/// replaced since).
fn live_deadline(table: &Table, t: &Ticket) -> Option<u64> {
    table
        .get_bucket(t.bucket)
        .filter(|e| e.seq == t.seq)
        .map(|e| e.deadline_ms)
}

/// The first live ticket of `queue` and its entry's deadline, after popping
/// the stale ones before it.
fn live_front(queue: &mut VecDeque<Ticket>, table: &Table) -> Option<(Ticket, u64)> {
    while let Some(&t) = queue.front() {
        if let Some(deadline_ms) = live_deadline(table, &t) {
            return Some((t, deadline_ms));
        }
        queue.pop_front();
    }
    None
}

/// Appends `ticket`, first dropping the stale tickets if they have piled up
/// (removals without a matching eviction or sweep).
fn push_ticket(queue: &mut VecDeque<Ticket>, ticket: Ticket, table: &Table) {
    if queue.len() >= 2 * table.len() + STALE_TICKETS_SLACK {
        queue.retain(|t| live_deadline(table, t).is_some());
    }
    queue.push_back(ticket);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
        assert_eq!(s.evictions(), 1, "the shard's own count");
        assert_eq!(s.len(), 3);
        s.close();
        assert_eq!(s.evictions(), 1, "kept past close");
    }

    #[test]
    fn max_keys_is_split_over_shards() {
        let b = MemoryBackend::new(10);
        let s = b.shard(1, 4);
        for i in 0..10u8 {
            s.set(&[i], b"v", Duration::ZERO).unwrap();
        }
        assert_eq!(s.len(), 3);
        // The shares sum to the bound, not above it.
        for (max, shards) in [(10, 4), (1_000_000, 3), (7, 7), (5, 1)] {
            let sum: usize = (0..shards).map(|i| share_of(max, i, shards)).sum();
            assert_eq!(sum, max, "{max} over {shards}");
        }
        // Below one key a shard, each still holds one (0 would be unbounded).
        assert_eq!(share_of(1, 7, 8), 1);
        assert_eq!(share_of(0, 1, 2), 0);
    }

    /// A full partition churns: every novel key evicts one. Its table must
    /// never grow past its start-up size (a doubling stalls one claim for up
    /// to a second and holds both tables meanwhile).
    #[test]
    fn a_full_partition_never_regrows_its_table_under_churn() {
        let c = MemoryCounters::default();
        let max_keys = 50_000;
        let mut p = Partition::new(max_keys);
        let buckets = p.table.capacity();
        for i in 0..400_000u64 {
            let key = [b"txgate:".as_slice(), &i.to_le_bytes(), &[0u8; 8]].concat();
            assert!(p.set_nx(&key, b"host-1:0:42", i + 60_000, i / 1000, &c));
            assert!(
                p.table.capacity() <= buckets,
                "insert {i}: the table grew from {buckets} to {} at its bound of {max_keys}",
                p.table.capacity()
            );
        }
        assert_eq!(p.table.len(), max_keys);
    }

    /// The start-up estimate the CLI checks against the memory limits is
    /// what the partitions really allocate.
    #[test]
    fn start_bytes_is_what_the_partitions_allocate() {
        for (max_keys, shards) in [(1, 1), (5, 1), (1000, 2), (100_000, 3), (1 << 20, 2)] {
            let real: u128 = (0..shards)
                .map(|i| {
                    let p = Partition::new(share_of(max_keys, i, shards));
                    (p.table.allocation_size() + p.timed.capacity() * std::mem::size_of::<Ticket>())
                        as u128
                })
                .sum();
            let estimate = MemoryBackend::start_bytes(max_keys, shards);
            assert!(
                estimate >= real && estimate <= real + 64 * shards as u128,
                "{max_keys} keys over {shards}: estimated {estimate}, allocated {real}"
            );
        }
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

    // The tests below drive a partition on a clock of their own (ms).

    fn counts(c: &MemoryCounters) -> (u64, u64) {
        (
            c.evictions.load(Ordering::Relaxed),
            c.expirations.load(Ordering::Relaxed),
        )
    }

    /// Fills a partition bounded to `keys.len()` with `keys` (TTL in ms, 0 =
    /// none) at time 0, then inserts as many new keys (no TTL, so behind
    /// all of them) and returns the keys in the order they were evicted.
    fn eviction_order(keys: &[(&'static str, u64)]) -> Vec<&'static str> {
        let c = MemoryCounters::default();
        let mut p = Partition::new(keys.len());
        let dl = |ttl_ms: u64| if ttl_ms == 0 { NO_DEADLINE } else { ttl_ms };
        for &(k, ttl_ms) in keys {
            assert!(p.set_nx(k.as_bytes(), b"v", dl(ttl_ms), 0, &c));
        }
        let mut evicted = Vec::new();
        for i in 0..keys.len() {
            let new = format!("new{i}");
            assert!(p.set_nx(new.as_bytes(), b"v", NO_DEADLINE, 0, &c));
            let gone: Vec<_> = keys
                .iter()
                .map(|&(k, _)| k)
                .filter(|k| !evicted.contains(k) && p.get(k.as_bytes(), 0, &c).is_none())
                .collect();
            assert_eq!(gone.len(), 1, "one eviction per insert");
            evicted.push(gone[0]);
        }
        assert_eq!(counts(&c), (keys.len() as u64, 0));
        evicted
    }

    #[test]
    fn eviction_follows_deadlines_across_out_of_order_ttls_then_oldest_untimed() {
        let order = eviction_order(&[
            ("a100", 100),
            ("b50", 50),
            ("none1", 0),
            ("c200", 200),
            ("d50", 50),
            ("e100", 100),
            ("none2", 0),
            ("f10", 10),
            ("g300", 300),
        ]);
        assert_eq!(
            order,
            [
                "f10", "b50", "d50", "a100", "e100", "c200", "g300", "none1", "none2"
            ]
        );
    }

    #[test]
    fn overwritten_entry_is_ordered_by_its_new_ttl() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(3);
        p.set(b"k", b"old", 10, 0, &c);
        p.set(b"x", b"v", 50, 0, &c);
        p.set(b"k", b"new", 100, 0, &c);
        // Past k's old deadline: the sweep must not take the new k.
        p.sweep(SWEEP_BUDGET, 20, &c);
        assert_eq!(p.get(b"k", 20, &c), Some(b"new".to_vec()));
        assert_eq!(p.table.len(), 2);
        p.set(b"y", b"v", 200, 20, &c);
        // Full: x (deadline 50) goes before k (100).
        p.set(b"z", b"v", 200, 20, &c);
        assert_eq!(p.get(b"x", 20, &c), None);
        assert_eq!(p.get(b"k", 20, &c), Some(b"new".to_vec()));
        p.set(b"w", b"v", 200, 20, &c);
        assert_eq!(p.get(b"k", 20, &c), None);
        assert_eq!(counts(&c), (2, 0));
        // Overwriting with no TTL moves the key behind every timed one.
        p.set(b"y", b"v", NO_DEADLINE, 20, &c);
        p.set(b"u", b"v", 300, 20, &c);
        p.set(b"t", b"v", 300, 20, &c);
        assert_eq!(p.get(b"y", 20, &c), Some(b"v".to_vec()));
        assert_eq!(counts(&c), (4, 0));
    }

    #[test]
    fn deleted_then_reinserted_key_is_ordered_by_its_new_insert() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(3);
        for k in [b"a", b"b", b"c"] {
            assert!(p.set_nx(k, b"v", 100, 0, &c));
        }
        let hash = p.hasher.hash_one(b"a".as_slice());
        p.remove(hash, b"a");
        assert_eq!(p.get(b"a", 0, &c), None);
        assert!(p.set_nx(b"a", b"v2", 100, 0, &c));
        // b is now the oldest; a's first ticket is stale and skipped.
        assert!(p.set_nx(b"d", b"v", 100, 0, &c));
        assert_eq!(p.get(b"b", 0, &c), None);
        assert_eq!(p.get(b"a", 0, &c), Some(b"v2".to_vec()));
        assert!(p.set_nx(b"e", b"v", 100, 0, &c));
        assert!(p.set_nx(b"f", b"v", 100, 0, &c));
        assert_eq!(p.get(b"c", 0, &c), None);
        assert_eq!(p.get(b"a", 0, &c), None);
        assert_eq!(counts(&c), (3, 0));
    }

    #[test]
    fn expired_entry_reads_absent_is_reclaimable_and_counts_as_expired() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(0);
        assert!(p.set_nx(b"k", b"v", 10, 0, &c));
        assert!(!p.set_nx(b"k", b"w", 20, 9, &c));
        // `get` does not extend the TTL.
        assert_eq!(p.get(b"k", 9, &c), Some(b"v".to_vec()));
        assert!(p.set_nx(b"k", b"w", 20, 10, &c));
        assert_eq!(counts(&c), (0, 1));
        assert_eq!(p.get(b"k", 19, &c), Some(b"w".to_vec()));
        assert_eq!(p.get(b"k", 20, &c), None);
        assert_eq!(counts(&c), (0, 2));
        assert_eq!(p.table.len(), 0);
        // No TTL: never expires.
        assert!(p.set_nx(b"n", b"v", NO_DEADLINE, 0, &c));
        assert_eq!(p.get(b"n", u64::MAX - 1, &c), Some(b"v".to_vec()));
    }

    #[test]
    fn full_partition_dropping_an_expired_entry_counts_an_expiration() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(2);
        assert!(p.set_nx(b"a", b"v", 10, 0, &c));
        assert!(p.set_nx(b"b", b"v", 100, 0, &c));
        assert!(p.set_nx(b"c", b"v", 100, 10, &c));
        assert!(p.set_nx(b"d", b"v", 100, 10, &c));
        assert_eq!(counts(&c), (1, 1));
    }

    #[test]
    fn sweep_drops_soonest_expired_first_within_budget_and_skips_removed() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(0);
        p.set(b"t30", b"v", 30, 0, &c);
        p.set(b"t10", b"v", 10, 0, &c);
        p.set(b"t20", b"v", 20, 0, &c);
        p.set(b"t40", b"v", 40, 0, &c);
        p.set(b"t15", b"v", 15, 0, &c);
        p.set(b"none", b"v", NO_DEADLINE, 0, &c);
        p.set(b"t35", b"v", 35, 0, &c);
        let hash = p.hasher.hash_one(b"t20".as_slice());
        p.remove(hash, b"t20");
        p.sweep(2, 100, &c);
        let left = |p: &Partition| {
            let mut keys: Vec<_> = p
                .table
                .iter()
                .map(|e| String::from_utf8(e.kv.key().to_vec()).unwrap())
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(left(&p), ["none", "t30", "t35", "t40"]);
        // Only what has expired by now goes.
        p.sweep(SWEEP_BUDGET, 35, &c);
        assert_eq!(left(&p), ["none", "t40"]);
        assert_eq!(counts(&c), (0, 4));
        p.sweep(SWEEP_BUDGET, u64::MAX - 1, &c);
        assert_eq!(left(&p), ["none"]);
        assert_eq!(counts(&c), (0, 5));
    }

    #[test]
    fn stale_tickets_are_compacted_under_churn() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(0);
        for i in 0..100_000u32 {
            let k = (i % 7).to_le_bytes();
            let dl = if i % 2 == 0 { NO_DEADLINE } else { 1000 };
            p.set(&k, b"v", dl, 0, &c);
            if i % 3 == 0 {
                let hash = p.hasher.hash_one(k.as_slice());
                p.remove(hash, &k);
            }
        }
        let bound = 2 * p.table.len() + STALE_TICKETS_SLACK + 1;
        assert!(p.timed.len() <= bound && p.forever.len() <= bound);
        assert_eq!(counts(&c), (0, 0));
    }

    #[test]
    fn long_keys_and_values_round_trip() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(0);
        let long = [7u8; 300];
        for (k, v) in [
            (&long[..40], &long[..30]),
            (&long[..], &b"v"[..]),
            (&b"k"[..], &long[..]),
            (&long[..KV_INLINE_MAX - 1], &b"v"[..]),
            (&b"e"[..], &b""[..]),
        ] {
            assert!(p.set_nx(k, v, NO_DEADLINE, 0, &c));
            assert_eq!(p.get(k, 0, &c).as_deref(), Some(v));
        }
        assert_eq!(p.table.len(), 5);
    }

    /// (deadline, seq)
    type OrderKey = (u64, u64);

    /// The partition as it was before the FIFOs: a map of owned keys and one
    /// ordered map of (deadline, seq), the reference it must agree with.
    #[derive(Default)]
    struct Model {
        map: HashMap<Vec<u8>, (Vec<u8>, OrderKey)>,
        order: BTreeMap<OrderKey, Vec<u8>>,
        seq: u64,
        max_keys: usize,
        evictions: u64,
        expirations: u64,
    }

    impl Model {
        fn remove(&mut self, key: &[u8]) {
            if let Some((_, ok)) = self.map.remove(key) {
                self.order.remove(&ok);
            }
        }

        fn insert_new(&mut self, key: &[u8], val: &[u8], dl: u64, now: u64) {
            if self.max_keys > 0
                && self.map.len() >= self.max_keys
                && let Some(((vdl, _), victim)) = self.order.pop_first()
            {
                self.map.remove(&victim);
                if vdl <= now {
                    self.expirations += 1;
                } else {
                    self.evictions += 1;
                }
            }
            self.seq += 1;
            self.order.insert((dl, self.seq), key.to_vec());
            self.map
                .insert(key.to_vec(), (val.to_vec(), (dl, self.seq)));
            // Unbounded, each insert also drops up to two expired entries.
            if self.max_keys == 0 {
                self.sweep(2, now);
            }
        }

        fn set_nx(&mut self, key: &[u8], val: &[u8], dl: u64, now: u64) -> bool {
            if let Some((_, (edl, _))) = self.map.get(key) {
                if *edl > now {
                    return false;
                }
                self.remove(key);
                self.expirations += 1;
            }
            self.insert_new(key, val, dl, now);
            true
        }

        fn get(&mut self, key: &[u8], now: u64) -> Option<Vec<u8>> {
            let (v, (dl, _)) = self.map.get(key)?;
            if *dl > now {
                return Some(v.clone());
            }
            self.remove(key);
            self.expirations += 1;
            None
        }

        fn sweep(&mut self, budget: usize, now: u64) {
            for _ in 0..budget {
                let Some((&(dl, _), _)) = self.order.first_key_value() else {
                    break;
                };
                if dl > now {
                    break;
                }
                let (_, key) = self.order.pop_first().unwrap();
                self.map.remove(&key);
                self.expirations += 1;
            }
        }
    }

    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn unbounded_inserts_reclaim_expired_entries_without_a_sweep() {
        let c = MemoryCounters::default();
        let mut p = Partition::new(0);
        // One novel key a millisecond, each living 10 ms, and no sweep.
        for now in 0..50_000u64 {
            p.set_nx(format!("k{now}").as_bytes(), b"v", now + 10, now, &c);
        }
        assert!(p.table.len() <= 12, "{} entries live", p.table.len());
    }

    #[test]
    fn deadlines_never_come_early() {
        // `now_ms` is truncated: a set at 5.9 ms with a 10 ms TTL must live
        // past 15.9 ms, so its deadline is 16, not 15.
        assert_eq!(deadline(5, Duration::from_millis(10)), 16);
        assert_eq!(deadline(5, Duration::from_micros(500)), 7);
        assert_eq!(deadline(5, Duration::ZERO), NO_DEADLINE);
    }

    #[test]
    fn agrees_with_a_single_ordered_map_under_random_ops() {
        // Small key spaces churn the order structures; large ones make the
        // table grow or clear tombstones (entries move) with tickets out.
        for (seed, max_keys, keys) in [
            (1u64, 8usize, 24u64),
            (2, 1, 24),
            (3, 0, 24),
            (4, 32, 24),
            (5, 3, 24),
            (6, 0, 3000),
            (7, 700, 3000),
            (8, 200, 400),
        ] {
            let mut rng = seed;
            let c = MemoryCounters::default();
            let mut p = Partition::new(max_keys);
            let mut m = Model {
                max_keys,
                ..Model::default()
            };
            let mut now = 1u64;
            for step in 0..20_000 {
                let r = splitmix64(&mut rng);
                now += r % 3;
                let key_id = (r >> 8) % keys;
                // A few keys too long to sit inline.
                let key = if key_id < 3 {
                    vec![key_id as u8; 70]
                } else {
                    format!("key{key_id}").into_bytes()
                };
                let val = format!("v{step}").into_bytes();
                // Mostly one TTL (the FIFO case), some shorter and longer
                // ones, some none.
                let dl = match (r >> 16) % 10 {
                    0 => NO_DEADLINE,
                    1 => now + 1,
                    2 => now + 5,
                    3 => now + 80,
                    _ => now + 20,
                };
                match (r >> 24) % 16 {
                    0..=6 => assert_eq!(
                        p.set_nx(&key, &val, dl, now, &c),
                        m.set_nx(&key, &val, dl, now),
                        "set_nx at step {step}"
                    ),
                    7..=8 => {
                        p.set(&key, &val, dl, now, &c);
                        m.remove(&key);
                        m.insert_new(&key, &val, dl, now);
                    }
                    9..=11 => {
                        assert_eq!(p.get(&key, now, &c), m.get(&key, now), "get at step {step}")
                    }
                    12..=13 => {
                        let hash = p.hasher.hash_one(key.as_slice());
                        p.remove(hash, &key);
                        m.remove(&key);
                    }
                    _ => {
                        let budget = (r >> 32) as usize % 4;
                        p.sweep(budget, now, &c);
                        m.sweep(budget, now);
                    }
                }
                assert_eq!(p.table.len(), m.map.len(), "len at step {step}");
                assert_eq!(counts(&c), (m.evictions, m.expirations), "at step {step}");
            }
            for (k, (v, (dl, _))) in &m.map {
                let e = p
                    .table
                    .find(p.hasher.hash_one(k.as_slice()), |e| e.kv.key() == k)
                    .expect("same keys");
                assert_eq!((e.kv.val(), e.deadline_ms), (v.as_slice(), *dl));
            }
        }
    }

    #[test]
    fn short_keys_and_values_stay_inline_in_a_compact_entry() {
        let (key, val) = ([1u8; 38], [2u8; 38]);
        let kv = KeyVal::new(&key, &val);
        assert!(matches!(kv, KeyVal::Inline { .. }));
        assert_eq!((kv.key(), kv.val()), (&key[..], &val[..]));
        // The tag and lengths share the buffer's last word.
        assert_eq!(size_of::<KeyVal>(), (KV_INLINE_MAX + 3).next_multiple_of(8));
        assert_eq!(size_of::<Entry>(), size_of::<KeyVal>() + 16);
    }
}
