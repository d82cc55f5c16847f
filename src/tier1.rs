//! Tier-1: a shard's bounded, TTL'd set of recently seen TxIDs.
//!
//! Every claim looks here first, so a duplicate costs one hash and (usually)
//! one cache line. Dedup entries share one TTL, so expiry order is insertion
//! order: the set is a FIFO ring of slots plus an open-addressed table that
//! stores the keys inline.
//!
//! - **Table**: linear probing, load at most 3/4, size `ceil(capacity * 4/3)`
//!   (any size: the home bucket is `(hash32 * buckets) >> 32`, no power-of-two
//!   rounding). A bucket is `key ‖ born_ms (u32) ‖ ring slot (u32)`; deletion
//!   shifts later entries back, so there are no tombstones.
//! - **Tags**: one byte per bucket (0 = empty, else 7 bits of the hash), read
//!   8 at a time as a `u64` and matched with SWAR bit tricks, so a lookup
//!   usually touches one tag word and compares one key: few, predictable
//!   branches. The hash is a keyed folded multiply (two 64×64→128 multiplies
//!   for a 16-byte TxID), seeded at random per set.
//! - **Ring**: `ring[slot]` is the bucket of the slot's entry, in insertion
//!   order. When full, the oldest entry is evicted (FIFO, counted); expired
//!   entries are removed from the head on every insert and by [`Tier1::sweep`].
//! - **Truth**: full keys are compared, so a TxID is reported seen only if that
//!   exact TxID was inserted and has not expired. The set may forget (eviction),
//!   it never lies.
//!
//! Memory: `(key_len + 9) * 4/3 + 4` bytes per entry of capacity: 37.3 bytes
//! for 16-byte TxIDs, allocated once at start-up (`tier1_bytes_per_entry` test and
//! the `tier1` bench measure it).

use std::time::Duration;

const EMPTY: u32 = u32::MAX;
/// Tags read per probe step.
const GROUP: usize = 8;
const LO_BYTES: u64 = 0x0101_0101_0101_0101;
const HI_BITS: u64 = 0x8080_8080_8080_8080;
/// Longest TTL: ages are wrapping u32 milliseconds.
pub const TTL_MS_MAX: u64 = (1 << 31) - 1;
/// Most entries one set can hold (ring slots are u32, one value is reserved).
pub const CAPACITY_MAX: usize = (u32::MAX - 1) as usize / 4 * 3;
/// Expired entries removed from the head per insert: more than the one an
/// insert adds, so expiry keeps up without a background task.
const SWEEP_PER_INSERT: usize = 2;

/// How many inserts ahead the oldest entries' buckets are prefetched: far
/// enough for a DRAM miss to land, near enough to stay in cache.
const HEAD_LOOKAHEAD: usize = 8;

/// A cache hint for `buf[at]`; nothing out of bounds.
#[inline(always)]
fn prefetch(buf: &[u8], at: usize) {
    if let Some(b) = buf.get(at) {
        prefetch_line(b);
    }
}

/// Starts loading the cache line holding `*p` into all cache levels; a
/// no-op off x86-64. A hint: never faults, changes nothing.
#[inline(always)]
pub(crate) fn prefetch_line<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and has no effect on memory; the
    // pointer comes from a reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (p as *const T).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Table buckets for `capacity` entries: load at most 3/4.
fn buckets_for(capacity: usize) -> usize {
    (capacity + capacity.div_ceil(3)).max(2 * GROUP)
}

/// Why a tier-1 set could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Tier1Error {
    #[error("tier-1 capacity {0} is out of range: 1..={CAPACITY_MAX}")]
    Capacity(usize),
    #[error("tier-1 key length {0} is out of range: 1..=256 bytes")]
    KeyLen(usize),
    #[error("tier-1 TTL {0:?} is too long: at most {TTL_MS_MAX} ms")]
    Ttl(Duration),
}

/// A bounded, TTL'd set of fixed-length keys (TxIDs). `!Sync` by design: one
/// per shard.
pub struct Tier1 {
    key_len: usize,
    stride: usize,
    buckets: usize,
    /// Tag groups a probe may visit: the bound on every probe loop.
    groups_max: usize,
    table: Box<[u8]>,
    /// `buckets + GROUP` tags; the last GROUP mirror the first so a group
    /// read never wraps.
    tags: Box<[u8]>,
    ring: Box<[u32]>,
    head: usize,
    len: usize,
    ttl_ms: u32,
    hasher: FoldHash,
    evictions: u64,
    expirations: u64,
}

impl Tier1 {
    /// A set of at most `capacity` keys of exactly `key_len` bytes, each
    /// forgotten `ttl` after insertion (zero: kept until evicted).
    pub fn new(capacity: usize, key_len: usize, ttl: Duration) -> Result<Self, Tier1Error> {
        if capacity == 0 || capacity > CAPACITY_MAX {
            return Err(Tier1Error::Capacity(capacity));
        }
        if key_len == 0 || key_len > 256 {
            return Err(Tier1Error::KeyLen(key_len));
        }
        // Whole ms, rounded up: a sub-ms TTL must not become 0 ("never").
        let ttl_ms = ttl.as_nanos().div_ceil(1_000_000);
        if ttl_ms > TTL_MS_MAX as u128 {
            return Err(Tier1Error::Ttl(ttl));
        }
        let buckets = buckets_for(capacity);
        let stride = key_len + 8;
        Ok(Self {
            key_len,
            stride,
            buckets,
            groups_max: buckets.div_ceil(GROUP) + 1,
            table: prefaulted(buckets * stride),
            tags: prefaulted(buckets + GROUP),
            ring: vec![EMPTY; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            ttl_ms: ttl_ms as u32,
            hasher: FoldHash::random(),
            evictions: 0,
            expirations: 0,
        })
    }

    /// Whether `key` was inserted and has not expired (`now_ms` from
    /// [`crate::clock::coarse_ms`], truncated). The hot path of every claim.
    #[inline]
    pub fn contains(&self, key: &[u8], now_ms: u32) -> bool {
        // 16-byte TxIDs get code compiled for their size: constant stride,
        // one u128 compare, no length checks.
        if key.len() == 16 && self.key_len == 16 {
            self.contains_sized::<16>(key, now_ms)
        } else {
            self.contains_sized::<0>(key, now_ms)
        }
    }

    /// Starts loading the lines a coming lookup of `key` reads first (its
    /// home tag group and bucket), so the lookups of a received batch
    /// overlap their cache misses instead of taking them one by one. A hint
    /// only.
    #[inline]
    pub fn prefetch_lookup(&self, key: &[u8]) {
        let pos = self.home(self.hasher.hash(key));
        prefetch(&self.tags, pos);
        prefetch(&self.table, pos * self.stride);
    }

    /// Starts loading the table line a coming [`Tier1::insert`] of `key`
    /// will write, so a novel claim overlaps that DRAM miss with its
    /// backend call instead of stalling on it afterwards. A hint only.
    #[inline]
    pub fn prefetch_insert(&self, key: &[u8]) {
        prefetch(&self.table, self.home(self.hasher.hash(key)) * self.stride);
    }

    /// Inserts `key`; returns false when it was already present and fresh.
    /// Evicts the oldest entry when full.
    pub fn insert(&mut self, key: &[u8], now_ms: u32) -> bool {
        assert_eq!(key.len(), self.key_len, "tier-1 key length");
        self.sweep(now_ms, SWEEP_PER_INSERT);
        if let Some(pos) = self.find(key) {
            if self.fresh(pos, now_ms) {
                return false;
            }
            // Expired but not yet swept: retire it and append a fresh one.
            self.ring[self.slot_at(pos) as usize] = EMPTY;
            self.remove_at(pos);
            self.expirations += 1;
        }
        if self.len == self.ring.len() && self.pop_head() {
            self.evictions += 1;
        }
        let mut slot = self.head + self.len;
        if slot >= self.ring.len() {
            slot -= self.ring.len();
        }
        let h = self.hasher.hash(key);
        let pos = self.first_empty(self.home(h));
        self.set_tag(pos, tag_of(h));
        let e = pos * self.stride;
        self.table[e..e + self.key_len].copy_from_slice(key);
        self.write_u32(e + self.key_len, now_ms);
        self.write_u32(e + self.key_len + 4, slot as u32);
        self.ring[slot] = pos as u32;
        self.len += 1;
        self.prefetch_head_ahead();
        true
    }

    /// Every insert reads the oldest entry (expiry check, eviction when
    /// full): a random bucket, so a DRAM miss. Entries leave in ring order,
    /// so the one a later insert will read is known now: start loading it.
    #[inline]
    fn prefetch_head_ahead(&self) {
        if self.len <= HEAD_LOOKAHEAD {
            return;
        }
        let mut slot = self.head + HEAD_LOOKAHEAD;
        if slot >= self.ring.len() {
            slot -= self.ring.len();
        }
        let pos = self.ring[slot];
        if pos != EMPTY {
            prefetch(&self.table, pos as usize * self.stride);
            prefetch(&self.tags, pos as usize);
        }
    }

    /// Removes up to `budget` expired entries from the oldest end; returns
    /// how many it removed. Call it from a periodic task so entries leave
    /// even when no inserts arrive.
    pub fn sweep(&mut self, now_ms: u32, budget: usize) -> usize {
        if self.ttl_ms == 0 {
            return 0;
        }
        let mut removed = 0;
        while self.len > 0 && removed < budget {
            let pos = self.ring[self.head];
            if pos != EMPTY && self.fresh(pos as usize, now_ms) {
                break;
            }
            if self.pop_head() {
                self.expirations += 1;
            }
            removed += 1;
        }
        removed
    }

    /// Entries held (some may be expired and not yet swept).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bound given at construction.
    pub fn capacity(&self) -> usize {
        self.ring.len()
    }

    /// Entries dropped because the set was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Entries dropped because their TTL had passed.
    pub fn expirations(&self) -> u64 {
        self.expirations
    }

    /// Heap bytes held: the table, the tags and the ring, allocated once.
    pub fn heap_bytes(&self) -> usize {
        self.table.len() + self.tags.len() + self.ring.len() * 4
    }

    /// What [`Tier1::heap_bytes`] will be for `capacity` keys of `key_len`
    /// bytes, before allocating it (to refuse a size the machine cannot hold).
    pub fn bytes_for(capacity: usize, key_len: usize) -> u128 {
        let buckets = buckets_for(capacity) as u128;
        buckets * (key_len as u128 + 8) + buckets + GROUP as u128 + capacity as u128 * 4
    }

    #[inline]
    fn home(&self, h: u64) -> usize {
        ((h as u32 as u64 * self.buckets as u64) >> 32) as usize
    }

    #[inline]
    fn group_at(&self, pos: usize) -> u64 {
        let group: &[u8; GROUP] = self.tags[pos..]
            .first_chunk()
            .expect("GROUP mirror tags follow the last bucket");
        u64::from_le_bytes(*group)
    }

    #[inline]
    fn wrap(&self, pos: usize) -> usize {
        if pos >= self.buckets {
            pos - self.buckets
        } else {
            pos
        }
    }

    fn set_tag(&mut self, pos: usize, tag: u8) {
        self.tags[pos] = tag;
        if pos < GROUP {
            self.tags[self.buckets + pos] = tag;
        }
    }

    fn first_empty(&self, mut pos: usize) -> usize {
        for _ in 0..self.groups_max {
            let empty = match_byte(self.group_at(pos), 0);
            if empty != 0 {
                return self.wrap(pos + (empty.trailing_zeros() / 8) as usize);
            }
            pos = self.wrap(pos + GROUP);
        }
        unreachable!("load < 1 leaves an empty bucket")
    }

    #[inline]
    fn next(&self, pos: usize) -> usize {
        if pos + 1 == self.buckets { 0 } else { pos + 1 }
    }

    #[inline]
    fn find(&self, key: &[u8]) -> Option<usize> {
        self.find_sized::<0>(key)
    }

    #[inline(always)]
    fn contains_sized<const K: usize>(&self, key: &[u8], now_ms: u32) -> bool {
        let Some(pos) = self.find_sized::<K>(key) else {
            return false;
        };
        if self.ttl_ms == 0 {
            return true;
        }
        let (key_len, stride) = if K == 0 {
            (self.key_len, self.stride)
        } else {
            (K, K + 8)
        };
        let at = pos * stride + key_len;
        let born = u32::from_le_bytes(
            *self.table[at..]
                .first_chunk()
                .expect("bucket holds born_ms"),
        );
        now_ms.wrapping_sub(born) < self.ttl_ms
    }

    /// Probes for `key`; `K` is the key length when known at compile time,
    /// 0 for "read it from `self`".
    #[inline(always)]
    fn find_sized<const K: usize>(&self, key: &[u8]) -> Option<usize> {
        let key_len = if K == 0 { self.key_len } else { K };
        let stride = if K == 0 { self.stride } else { K + 8 };
        debug_assert_eq!(key.len(), self.key_len, "tier-1 key length");
        let h = if K == 16 {
            self.hasher.hash16(key.first_chunk().expect("K-byte key"))
        } else {
            self.hasher.hash(key)
        };
        let tag = tag_of(h);
        let mut pos = self.home(h);
        // A key sits before the first empty bucket of its probe run, so the
        // scan ends at the first group holding an empty tag; load < 1
        // guarantees one well before the bound.
        for _ in 0..self.groups_max {
            let group = self.group_at(pos);
            let mut hits = match_byte(group, tag);
            while hits != 0 {
                let at = self.wrap(pos + (hits.trailing_zeros() / 8) as usize);
                let e = at * stride;
                let same = if K == 16 {
                    let stored: &[u8; 16] = self.table[e..].first_chunk().expect("bucket");
                    let probe: &[u8; 16] = key.first_chunk().expect("K-byte key");
                    u128::from_ne_bytes(*stored) == u128::from_ne_bytes(*probe)
                } else {
                    keys_eq(&self.table[e..e + key_len], key)
                };
                if same {
                    return Some(at);
                }
                hits &= hits - 1;
            }
            if match_byte(group, 0) != 0 {
                return None;
            }
            pos = self.wrap(pos + GROUP);
        }
        None
    }

    #[inline]
    fn fresh(&self, pos: usize, now_ms: u32) -> bool {
        self.ttl_ms == 0 || now_ms.wrapping_sub(self.born_at(pos)) < self.ttl_ms
    }

    #[inline]
    fn read_u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.table[at..at + 4].try_into().unwrap())
    }

    #[inline]
    fn write_u32(&mut self, at: usize, v: u32) {
        self.table[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[inline]
    fn born_at(&self, pos: usize) -> u32 {
        self.read_u32(pos * self.stride + self.key_len)
    }

    #[inline]
    fn slot_at(&self, pos: usize) -> u32 {
        self.read_u32(pos * self.stride + self.key_len + 4)
    }

    /// Drops the oldest ring slot; true if it still held a table entry.
    fn pop_head(&mut self) -> bool {
        debug_assert!(self.len > 0);
        let pos = self.ring[self.head];
        self.ring[self.head] = EMPTY;
        self.head = self.next_slot(self.head);
        self.len -= 1;
        if pos == EMPTY {
            return false;
        }
        self.remove_at(pos as usize);
        true
    }

    fn next_slot(&self, slot: usize) -> usize {
        if slot + 1 == self.ring.len() {
            0
        } else {
            slot + 1
        }
    }

    /// Empties bucket `pos`, shifting later entries of its cluster back so
    /// every entry stays reachable from its home bucket.
    fn remove_at(&mut self, pos: usize) {
        let n = self.buckets;
        let mut hole = pos;
        let mut j = pos;
        for _ in 0..n {
            j = self.next(j);
            let tag = self.tags[j];
            if tag == 0 {
                break;
            }
            let e = j * self.stride;
            let home = self.home(self.hasher.hash(&self.table[e..e + self.key_len]));
            // The entry may fill the hole iff the hole lies on its probe path
            // (home ..= j), i.e. is no further from home than j is. Both
            // distances wrap at most once: a compare, not a division.
            let wrap = |d: usize| if d >= n { d - n } else { d };
            let d_hole = wrap(hole + n - home);
            let d_j = wrap(j + n - home);
            if d_hole < d_j {
                let slot = self.slot_at(j);
                self.table
                    .copy_within(e..e + self.stride, hole * self.stride);
                self.set_tag(hole, tag);
                self.ring[slot as usize] = hole as u32;
                hole = j;
            }
        }
        self.set_tag(hole, 0);
    }
}

/// A zeroed buffer with every page already mapped: a fresh allocation is
/// mapped lazily, and first touches would otherwise land as page faults on
/// the claim path (tens of MB per shard at the default capacity).
fn prefaulted(len: usize) -> Box<[u8]> {
    let mut b = vec![0u8; len].into_boxed_slice();
    // SAFETY: `b` is ours, `len` bytes, and already zero.
    unsafe { crate::hugepages::fault_in(b.as_mut_ptr(), b.len()) };
    b
}

/// The tag stored for hash `h`: its top 7 bits, high bit set (0 = empty).
#[inline]
fn tag_of(h: u64) -> u8 {
    0x80 | (h >> 57) as u8
}

/// High bit set in each byte of `group` equal to `b` (exact for the lowest
/// match; a byte above a match may show up falsely, which callers tolerate:
/// keys are compared, and a false "empty" only ever follows a real one).
#[inline]
fn match_byte(group: u64, b: u8) -> u64 {
    let x = group ^ (LO_BYTES * b as u64);
    x.wrapping_sub(LO_BYTES) & !x & HI_BITS
}

/// A keyed folded-multiply hash (the construction of foldhash and wyhash):
/// per 16 bytes, one 64×64→128 multiply of key words mixed with secrets,
/// folded to 64 bits. Random seeds per set keep crafted TxIDs from piling
/// into one probe run.
struct FoldHash {
    seeds: [u64; 3],
}

impl FoldHash {
    fn random() -> Self {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        Self {
            seeds: [s.hash_one(1u8), s.hash_one(2u8), s.hash_one(3u8) | 1],
        }
    }

    /// [`FoldHash::hash`] of a 16-byte key, the common TxID size.
    #[inline(always)]
    fn hash16(&self, key: &[u8; 16]) -> u64 {
        let [s0, s1, s2] = self.seeds;
        let (a, b) = key.split_at(8);
        let a = u64::from_le_bytes(a.try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        fold_mul(fold_mul(a ^ s1, b ^ s0 ^ 16), s2)
    }

    #[inline(always)]
    fn hash(&self, key: &[u8]) -> u64 {
        if let Ok(k) = <&[u8; 16]>::try_from(key) {
            return self.hash16(k);
        }
        let [s0, s1, s2] = self.seeds;
        let mut acc = s0 ^ key.len() as u64;
        let mut chunks = key.chunks_exact(16);
        for c in &mut chunks {
            let (a, b) = c.split_at(8);
            acc = fold_mul(
                u64::from_le_bytes(a.try_into().unwrap()) ^ s1,
                u64::from_le_bytes(b.try_into().unwrap()) ^ acc,
            );
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut pad = [0u8; 16];
            pad[..rest.len()].copy_from_slice(rest);
            let (a, b) = pad.split_at(8);
            acc = fold_mul(
                u64::from_le_bytes(a.try_into().unwrap()) ^ s1,
                u64::from_le_bytes(b.try_into().unwrap()) ^ acc,
            );
        }
        fold_mul(acc, s2)
    }
}

#[inline(always)]
fn fold_mul(x: u64, y: u64) -> u64 {
    let p = x as u128 * y as u128;
    (p as u64) ^ ((p >> 64) as u64)
}

#[inline(always)]
fn keys_eq(a: &[u8], b: &[u8]) -> bool {
    match b.len() {
        16 => {
            let (Ok(x), Ok(y)) = (<[u8; 16]>::try_from(a), <[u8; 16]>::try_from(b)) else {
                return false;
            };
            u128::from_ne_bytes(x) == u128::from_ne_bytes(y)
        }
        8 => {
            let (Ok(x), Ok(y)) = (<[u8; 8]>::try_from(a), <[u8; 8]>::try_from(b)) else {
                return false;
            };
            u64::from_ne_bytes(x) == u64::from_ne_bytes(y)
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn key(i: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        k[8..].copy_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn rejects_bad_construction() {
        assert_eq!(
            Tier1::new(0, 16, Duration::ZERO).err(),
            Some(Tier1Error::Capacity(0))
        );
        assert_eq!(
            Tier1::new(4, 0, Duration::ZERO).err(),
            Some(Tier1Error::KeyLen(0))
        );
        assert!(matches!(
            Tier1::new(4, 16, Duration::from_secs(30 * 86_400)),
            Err(Tier1Error::Ttl(_))
        ));
    }

    #[test]
    fn inserted_keys_are_seen_and_others_are_not() {
        let mut t = Tier1::new(1000, 16, Duration::ZERO).unwrap();
        for i in 0..1000 {
            assert!(!t.contains(&key(i), 0));
            assert!(t.insert(&key(i), 0));
            assert!(!t.insert(&key(i), 0), "second insert of {i}");
        }
        for i in 0..1000 {
            assert!(t.contains(&key(i), 0));
            assert!(!t.contains(&key(i + 1000), 0));
        }
        assert_eq!(t.len(), 1000);
        assert_eq!(t.evictions(), 0);
    }

    #[test]
    fn full_set_evicts_oldest_first_and_counts_it() {
        let mut t = Tier1::new(100, 16, Duration::ZERO).unwrap();
        for i in 0..150 {
            t.insert(&key(i), 0);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.evictions(), 50);
        assert!((0..50).all(|i| !t.contains(&key(i), 0)));
        assert!((50..150).all(|i| t.contains(&key(i), 0)));
    }

    #[test]
    fn entries_expire_after_ttl_and_are_swept() {
        let mut t = Tier1::new(100, 16, Duration::from_millis(100)).unwrap();
        t.insert(&key(1), 1000);
        t.insert(&key(2), 1050);
        assert!(t.contains(&key(1), 1099));
        assert!(!t.contains(&key(1), 1100), "expired at exactly ttl");
        assert!(t.contains(&key(2), 1100));
        assert_eq!(t.sweep(1100, 10), 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.sweep(2000, 10), 1);
        assert!(t.is_empty());
        assert_eq!(t.expirations(), 2);
        // Reinserting an expired key that was not swept yet works.
        t.insert(&key(3), 3000);
        assert!(t.insert(&key(3), 3200));
        assert!(t.contains(&key(3), 3250));
    }

    #[test]
    fn bytes_for_predicts_heap_bytes() {
        for (cap, len) in [(1, 16), (100, 16), (1000, 8), (4096, 32), (100_000, 16)] {
            let t = Tier1::new(cap, len, Duration::from_secs(1)).unwrap();
            assert_eq!(
                Tier1::bytes_for(cap, len),
                t.heap_bytes() as u128,
                "{cap} x {len}"
            );
        }
    }

    #[test]
    fn a_sub_millisecond_ttl_still_expires() {
        // Truncated to whole ms it would be 0: "never expires".
        let mut t = Tier1::new(10, 16, Duration::from_micros(500)).unwrap();
        t.insert(&key(1), 1000);
        assert!(t.contains(&key(1), 1000));
        assert!(!t.contains(&key(1), 1001));
    }

    #[test]
    fn ages_survive_clock_wraparound() {
        let mut t = Tier1::new(10, 16, Duration::from_millis(100)).unwrap();
        t.insert(&key(1), u32::MAX - 10);
        assert!(t.contains(&key(1), 20));
        assert!(!t.contains(&key(1), 90));
    }

    /// One million distinct TxIDs through a full, small tier-1: not one is
    /// reported seen before it was inserted.
    #[test]
    fn a_full_tier1_never_reports_a_novel_txid_as_seen() {
        let mut t = Tier1::new(10_000, 16, Duration::from_secs(60)).unwrap();
        let mut lies = 0;
        for i in 0..1_000_000u64 {
            let now = (i / 1000) as u32;
            if t.contains(&key(i), now) {
                lies += 1;
            }
            t.insert(&key(i), now);
        }
        assert_eq!(lies, 0);
        assert_eq!(t.evictions(), 990_000);
    }

    /// Random inserts, lookups and clock steps against a model of the ring
    /// (a deque of entries, retired ones kept as dead slots until popped).
    #[test]
    fn matches_a_fifo_ttl_model_under_random_operations() {
        struct Slot {
            key: Vec<u8>,
            born: u32,
            dead: bool,
        }
        for (cap, key_len) in [(7usize, 16usize), (64, 16), (300, 5), (1000, 8)] {
            let ttl = 50u32;
            let fresh = |s: &Slot, now: u32| !s.dead && now.wrapping_sub(s.born) < ttl;
            let mut t = Tier1::new(cap, key_len, Duration::from_millis(ttl as u64)).unwrap();
            let mut ring: VecDeque<Slot> = VecDeque::new();
            let mut s = 1u64;
            let mut now = 0u32;
            for _ in 0..200_000 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 33) as usize;
                let k: Vec<u8> = key((r % (cap * 3)) as u64)
                    .iter()
                    .copied()
                    .cycle()
                    .take(key_len)
                    .collect();
                match r % 10 {
                    0 => now = now.wrapping_add((r % 7) as u32),
                    1..=4 => {
                        for _ in 0..SWEEP_PER_INSERT {
                            match ring.front() {
                                Some(f) if !fresh(f, now) => ring.pop_front(),
                                _ => break,
                            };
                        }
                        let live = ring.iter_mut().find(|x| !x.dead && x.key == k);
                        let want = match live {
                            Some(x) if now.wrapping_sub(x.born) < ttl => false,
                            Some(x) => {
                                x.dead = true;
                                true
                            }
                            None => true,
                        };
                        assert_eq!(t.insert(&k, now), want);
                        if want {
                            if ring.len() == cap {
                                ring.pop_front();
                            }
                            ring.push_back(Slot {
                                key: k.clone(),
                                born: now,
                                dead: false,
                            });
                        }
                    }
                    _ => {
                        let want = ring.iter().any(|x| x.key == k && fresh(x, now));
                        assert_eq!(t.contains(&k, now), want);
                    }
                }
                assert_eq!(t.len(), ring.len());
            }
        }
    }

    #[test]
    fn tier1_bytes_per_entry() {
        let t = Tier1::new(1_000_000, 16, Duration::from_secs(60)).unwrap();
        let per_entry = t.heap_bytes() as f64 / 1_000_000.0;
        assert!(per_entry <= 48.0, "{per_entry} bytes per entry");
        assert!((37.0..38.0).contains(&per_entry), "{per_entry}");
    }
}
