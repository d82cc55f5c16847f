//! Two-tier dedup: "forward or suppress" for one TxID, on its owner shard.
//!
//! 1. Tier-1 hit → suppress (seen): nanoseconds, no I/O.
//! 2. Already being claimed on this shard → suppress (pending): single-flight,
//!    at most one `set_nx` per TxID per process in flight.
//! 3. Otherwise `set_nx(prefix ‖ txid, claimant, ttl)` on the shard's own
//!    backend: created → forward (won); exists → suppress (lost); any error or
//!    timeout → forward (fail-open), counted. The outcome enters tier-1 either
//!    way, so later copies stop at step 1.
//!
//! The stored value names the claimant, `instance:shard:counter`, unique per
//! claim: a backend that can echo the value back can tell its own earlier
//! write from a rival's.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use crate::cache::ShardBackend;
use crate::clock;
use crate::metrics::LatencyHistogram;
use crate::tier1::{Tier1, Tier1Error};

/// Longest key prefix; keys are built on the stack.
pub const KEY_PREFIX_MAX: usize = 64;
pub use crate::identity::{INSTANCE_ID_MAX, default_instance_id};
const KEY_MAX: usize = KEY_PREFIX_MAX + crate::route::TXID_LEN_MAX;
const VALUE_MAX: usize = INSTANCE_ID_MAX + 2 * 21;

/// How one shard's TxID set is built.
#[derive(Debug, Clone)]
pub struct TxIdSetConfig {
    /// Length of every TxID, bytes (1..=64).
    pub txid_len: usize,
    /// Tier-1 bound, entries per shard.
    pub tier1_capacity: usize,
    /// How long a TxID stays claimed, in tier-1 and in the backend.
    pub ttl: Duration,
    /// Namespaces the backend keys (`prefix ‖ txid`).
    pub key_prefix: Vec<u8>,
    /// Names this process in stored values (≤ 40 bytes).
    pub instance_id: String,
    /// Bound on TxIDs being claimed at once per shard; past it a novel TxID
    /// fails open at once rather than queueing.
    pub pending_max: usize,
}

impl Default for TxIdSetConfig {
    fn default() -> Self {
        Self {
            txid_len: 16,
            tier1_capacity: 1 << 20,
            ttl: Duration::from_secs(60),
            key_prefix: b"txgate:".to_vec(),
            instance_id: default_instance_id(),
            pending_max: 4096,
        }
    }
}

/// Where a set's claim sequence starts: random high 32 bits, so values stay
/// unique per claim across restarts that reuse the instance id and shard (a
/// container's pid and hostname often repeat), which the `SET NX GET` retry
/// relies on: a value from the previous run read back must not look like ours.
fn first_claim_seq() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let high = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (high >> 32) << 32
}

/// Why a TxID set could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxIdSetError {
    #[error(transparent)]
    Tier1(#[from] Tier1Error),
    #[error("TxID length {0} is out of range: 1..={max} bytes", max = crate::route::TXID_LEN_MAX)]
    TxIdLen(usize),
    #[error("key prefix is {0} bytes: at most {KEY_PREFIX_MAX}")]
    KeyPrefix(usize),
    #[error("instance id '{0}' is too long: at most {INSTANCE_ID_MAX} bytes")]
    InstanceId(String),
    #[error("pending bound must be at least 1")]
    PendingMax,
}

/// Why a claim forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// This instance created the claim (or, with no backend, saw it first).
    Won,
    /// The backend failed or timed out, or too many claims were pending:
    /// forward rather than risk losing the packet.
    FailOpen,
}

/// Why a claim suppresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppress {
    /// Tier-1 had it.
    Seen,
    /// Another claimant created it first.
    Lost,
    /// A claim of the same TxID is in flight on this shard.
    Pending,
}

/// The answer for one copy of a TxID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward(Forward),
    Suppress(Suppress),
}

impl Verdict {
    /// Whether the packet goes out.
    pub fn is_forward(self) -> bool {
        matches!(self, Self::Forward(_))
    }
}

/// Claim outcomes, summed; `Copy` so shards can hand out snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimCounters {
    pub won: u64,
    pub fail_open: u64,
    pub seen: u64,
    pub lost: u64,
    pub pending: u64,
    /// Backend errors, timeouts included.
    pub backend_errors: u64,
    pub backend_timeouts: u64,
    /// Novel claims that failed open because `pending_max` claims were in flight.
    pub pending_full: u64,
    /// `set_nx` calls issued.
    pub backend_calls: u64,
}

impl ClaimCounters {
    /// Every claim answered.
    pub fn claims(&self) -> u64 {
        self.won + self.fail_open + self.seen + self.lost + self.pending
    }

    /// Adds `other` into `self` (for totals over shards).
    pub fn add(&mut self, o: &ClaimCounters) {
        self.won += o.won;
        self.fail_open += o.fail_open;
        self.seen += o.seen;
        self.lost += o.lost;
        self.pending += o.pending;
        self.backend_errors += o.backend_errors;
        self.backend_timeouts += o.backend_timeouts;
        self.pending_full += o.pending_full;
        self.backend_calls += o.backend_calls;
    }
}

/// One shard's TxID set. `!Send`: it lives on its shard.
pub struct TxIdSet {
    shard: usize,
    txid_len: usize,
    ttl: Duration,
    key_prefix: Vec<u8>,
    instance_id: String,
    tier1: RefCell<Tier1>,
    pending: Rc<RefCell<Pending>>,
    backend: RefCell<Option<Rc<ShardBackend>>>,
    backend_latency: RefCell<LatencyHistogram>,
    claim_seq: Cell<u64>,
    counters: Cell<ClaimCounters>,
}

impl TxIdSet {
    /// Builds shard `shard`'s set; `backend` is `None` for tier-1 only.
    pub fn new(
        config: &TxIdSetConfig,
        shard: usize,
        backend: Option<Rc<ShardBackend>>,
    ) -> Result<Self, TxIdSetError> {
        if config.txid_len == 0 || config.txid_len > crate::route::TXID_LEN_MAX {
            return Err(TxIdSetError::TxIdLen(config.txid_len));
        }
        if config.key_prefix.len() > KEY_PREFIX_MAX {
            return Err(TxIdSetError::KeyPrefix(config.key_prefix.len()));
        }
        if config.instance_id.len() > INSTANCE_ID_MAX {
            return Err(TxIdSetError::InstanceId(config.instance_id.clone()));
        }
        if config.pending_max == 0 {
            return Err(TxIdSetError::PendingMax);
        }
        Ok(Self {
            shard,
            txid_len: config.txid_len,
            ttl: config.ttl,
            key_prefix: config.key_prefix.clone(),
            instance_id: config.instance_id.clone(),
            tier1: RefCell::new(Tier1::new(
                config.tier1_capacity,
                config.txid_len,
                config.ttl,
            )?),
            pending: Rc::new(RefCell::new(Pending::new(
                config.pending_max,
                config.txid_len,
            ))),
            backend_latency: RefCell::new(LatencyHistogram::default()),
            backend: RefCell::new(backend),
            claim_seq: Cell::new(first_claim_seq()),
            counters: Cell::new(ClaimCounters::default()),
        })
    }

    /// The TxID length every claim must have.
    pub fn txid_len(&self) -> usize {
        self.txid_len
    }

    /// Swaps the backend (fail-open boot upgrading to a real store, or
    /// dropping to tier-1 only). Claims in flight finish on the old one.
    pub fn set_backend(&self, backend: Option<Rc<ShardBackend>>) {
        *self.backend.borrow_mut() = backend;
    }

    /// Counters so far.
    pub fn counters(&self) -> ClaimCounters {
        self.counters.get()
    }

    /// Entries in tier-1.
    pub fn tier1_len(&self) -> usize {
        self.tier1.borrow().len()
    }

    /// Tier-1 entries dropped because it was full, before their TTL.
    pub fn tier1_evictions(&self) -> u64 {
        self.tier1.borrow().evictions()
    }

    /// Drops up to `budget` expired tier-1 entries; for the shard's periodic task.
    pub fn sweep(&self, budget: usize) -> usize {
        self.tier1
            .borrow_mut()
            .sweep(clock::coarse_ms() as u32, budget)
    }

    fn count(&self, f: impl FnOnce(&mut ClaimCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    /// Forward or suppress one copy of `txid`. Must run on the TxID's owner
    /// shard so all copies meet here. Panics if `txid` is not `txid_len` bytes
    /// (callers check lengths at the edge: the gate counts short packets).
    pub async fn claim(&self, txid: &[u8]) -> Verdict {
        match self.begin(txid) {
            Claim::Done(v) => v,
            Claim::Novel(c) => match self.finish_now(c) {
                Ok(v) => v,
                Err(c) => self.finish(c).await,
            },
        }
    }

    /// Starts loading what a coming [`TxIdSet::begin`] of `txid` reads
    /// first; call it for a whole batch before claiming it. A hint only.
    #[inline]
    pub fn prefetch(&self, txid: &[u8]) {
        if txid.len() == self.txid_len {
            self.tier1.borrow().prefetch_lookup(txid);
        }
    }

    /// The synchronous part of [`TxIdSet::claim`]: answers from tier-1, the
    /// single-flight table or the pending bound, or reserves a novel claim
    /// for [`TxIdSet::finish`]. Lets a caller answer most packets without
    /// building a future, and own what a novel claim needs (no borrow of the
    /// packet survives this call).
    pub fn begin(&self, txid: &[u8]) -> Claim {
        assert_eq!(txid.len(), self.txid_len, "TxID length");
        if self
            .tier1
            .borrow()
            .contains(txid, clock::coarse_ms() as u32)
        {
            self.count(|c| c.seen += 1);
            return Claim::Done(Verdict::Suppress(Suppress::Seen));
        }
        // Novel here: tier-1 will take it whatever the backend says.
        self.tier1.borrow().prefetch_insert(txid);
        let Some(backend) = self.backend.borrow().clone() else {
            // A claim begun on a backend since dropped may still be in
            // flight: single-flight holds across the change.
            if self.pending.borrow().contains(txid) {
                self.count(|c| c.pending += 1);
                return Claim::Done(Verdict::Suppress(Suppress::Pending));
            }
            self.tier1
                .borrow_mut()
                .insert(txid, clock::coarse_ms() as u32);
            self.count(|c| c.won += 1);
            return Claim::Done(Verdict::Forward(Forward::Won));
        };
        let slot = match self.pending.borrow_mut().insert(txid) {
            PendingInsert::Inserted(slot) => slot,
            PendingInsert::Present => {
                self.count(|c| c.pending += 1);
                return Claim::Done(Verdict::Suppress(Suppress::Pending));
            }
            PendingInsert::Full => {
                self.remember(txid);
                self.count(|c| {
                    c.fail_open += 1;
                    c.pending_full += 1;
                });
                return Claim::Done(Verdict::Forward(Forward::FailOpen));
            }
        };
        let seq = self.claim_seq.get().wrapping_add(1);
        self.claim_seq.set(seq);
        Claim::Novel(NovelClaim {
            pending: self.pending.clone(),
            slot,
            backend,
            seq,
        })
    }

    /// The claim's store key, `prefix ‖ txid`, into `buf`; its length.
    fn key_of(&self, claim: &NovelClaim, buf: &mut [u8; KEY_MAX]) -> usize {
        let p = self.key_prefix.len();
        let pending = claim.pending.borrow();
        let txid = pending.key(claim.slot);
        buf[..p].copy_from_slice(&self.key_prefix);
        buf[p..p + txid.len()].copy_from_slice(txid);
        p + txid.len()
    }

    /// The claim's value, `instance:shard:seq` (unique per claim: a retry
    /// that reads it back knows its own write), into `buf`; its length.
    /// Composed without the formatting machinery, which costs more than the
    /// rest of the novel-claim path.
    fn value_of(&self, claim: &NovelClaim, buf: &mut [u8; VALUE_MAX]) -> usize {
        let mut num = itoa::Buffer::new();
        let mut len = 0;
        for part in [
            self.instance_id.as_bytes(),
            b":",
            num.format(self.shard).as_bytes(),
            b":",
        ] {
            buf[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        let seq = num.format(claim.seq).as_bytes();
        buf[len..len + seq.len()].copy_from_slice(seq);
        len + seq.len()
    }

    /// The backend half of a novel claim begun by [`TxIdSet::begin`] on this
    /// set: `set_nx`, then the outcome enters tier-1.
    pub async fn finish(&self, claim: NovelClaim) -> Verdict {
        self.count(|c| c.backend_calls += 1);
        let (mut key, mut value) = ([0; KEY_MAX], [0; VALUE_MAX]);
        let key_len = self.key_of(&claim, &mut key);
        let value_len = self.value_of(&claim, &mut value);
        let started = std::time::Instant::now();
        let outcome = claim
            .backend
            .set_nx(&key[..key_len], &value[..value_len], self.ttl)
            .await;
        self.conclude(claim, outcome, started)
    }

    /// [`TxIdSet::finish`] without building a future, for a store that
    /// answers at once (memory); gives the claim back when it would wait.
    pub fn finish_now(&self, claim: NovelClaim) -> Result<Verdict, NovelClaim> {
        if !claim.backend.answers_now() {
            return Err(claim);
        }
        let (mut key, mut value) = ([0; KEY_MAX], [0; VALUE_MAX]);
        let key_len = self.key_of(&claim, &mut key);
        let value_len = self.value_of(&claim, &mut value);
        let started = std::time::Instant::now();
        let Some(outcome) =
            claim
                .backend
                .set_nx_now(&key[..key_len], &value[..value_len], self.ttl)
        else {
            return Err(claim);
        };
        self.count(|c| c.backend_calls += 1);
        Ok(self.conclude(claim, outcome, started))
    }

    fn conclude(
        &self,
        claim: NovelClaim,
        outcome: Result<bool, crate::cache::CacheError>,
        started: std::time::Instant,
    ) -> Verdict {
        self.backend_latency.borrow_mut().record(started.elapsed());
        let mut txid = [0u8; crate::route::TXID_LEN_MAX];
        let txid = &mut txid[..self.txid_len];
        txid.copy_from_slice(self.pending.borrow().key(claim.slot));
        // Releases the single-flight slot (as would dropping it unfinished).
        drop(claim);
        self.remember(txid);
        match outcome {
            Ok(true) => {
                self.count(|c| c.won += 1);
                Verdict::Forward(Forward::Won)
            }
            Ok(false) => {
                self.count(|c| c.lost += 1);
                Verdict::Suppress(Suppress::Lost)
            }
            Err(e) => {
                tracing::debug!(shard = self.shard, error = %e, "claim fails open");
                self.count(|c| {
                    c.fail_open += 1;
                    c.backend_errors += 1;
                    c.backend_timeouts += e.is_timeout() as u64;
                });
                Verdict::Forward(Forward::FailOpen)
            }
        }
    }

    /// Latency of every `set_nx` this set issued, errors included.
    pub fn backend_latency(&self) -> LatencyHistogram {
        *self.backend_latency.borrow()
    }

    fn remember(&self, txid: &[u8]) {
        self.tier1
            .borrow_mut()
            .insert(txid, clock::coarse_ms() as u32);
    }
}

/// The single-flight table: TxIDs with a claim in flight on this shard.
/// Fixed-size key slots allocated once; no allocation per claim.
struct Pending {
    txid_len: usize,
    keys: Box<[u8]>,
    free: Vec<u32>,
    index: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
}

enum PendingInsert {
    Inserted(u32),
    Present,
    Full,
}

impl Pending {
    fn new(max: usize, txid_len: usize) -> Self {
        Self {
            txid_len,
            keys: vec![0; max * txid_len].into_boxed_slice(),
            free: (0..max as u32).rev().collect(),
            index: hashbrown::HashTable::with_capacity(max),
            hasher: ahash::RandomState::new(),
        }
    }

    fn key(&self, slot: u32) -> &[u8] {
        let at = slot as usize * self.txid_len;
        &self.keys[at..at + self.txid_len]
    }

    /// Whether a claim of `txid` is in flight.
    fn contains(&self, txid: &[u8]) -> bool {
        !self.index.is_empty()
            && self
                .index
                .find(self.hasher.hash_one(txid), |&s| self.key(s) == txid)
                .is_some()
    }

    fn insert(&mut self, txid: &[u8]) -> PendingInsert {
        let h = self.hasher.hash_one(txid);
        let Self {
            keys,
            index,
            free,
            txid_len,
            ..
        } = self;
        let key_at = |slot: u32| {
            let at = slot as usize * *txid_len;
            &keys[at..at + *txid_len]
        };
        if index.find(h, |&s| key_at(s) == txid).is_some() {
            return PendingInsert::Present;
        }
        let Some(slot) = free.pop() else {
            return PendingInsert::Full;
        };
        let at = slot as usize * *txid_len;
        keys[at..at + *txid_len].copy_from_slice(txid);
        let (keys, len) = (&*keys, *txid_len);
        index.insert_unique(h, slot, |&s| {
            self.hasher
                .hash_one(&keys[s as usize * len..(s as usize + 1) * len])
        });
        PendingInsert::Inserted(slot)
    }

    fn remove(&mut self, slot: u32) {
        let h = self.hasher.hash_one(self.key(slot));
        if let Ok(e) = self.index.find_entry(h, |&s| s == slot) {
            e.remove();
            self.free.push(slot);
        }
    }
}

/// What [`TxIdSet::begin`] decided.
pub enum Claim {
    /// Answered without the backend.
    Done(Verdict),
    /// Novel: the backend must be asked, via [`TxIdSet::finish`].
    Novel(NovelClaim),
}

/// A reserved novel claim: owns its single-flight slot (which holds the
/// TxID) and its sequence number, no borrows, so it can move into a task.
/// Small on purpose: it moves several times per claim, so key and value are
/// composed where the store call needs them. Dropping it unfinished
/// releases the slot here and remembers nothing; a store call already sent
/// may still create the key, so later copies can find it `Lost` with nobody
/// forwarding it. A caller that cannot finish (an engine stopping gives
/// `ShardStopped`) must fail open: forward, as the gate does.
#[must_use = "finish the claim, or the TxID is neither forwarded nor remembered"]
pub struct NovelClaim {
    pending: Rc<RefCell<Pending>>,
    slot: u32,
    backend: Rc<ShardBackend>,
    seq: u64,
}

impl Drop for NovelClaim {
    fn drop(&mut self) {
        self.pending.borrow_mut().remove(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryBackend;

    fn set(backend: Option<ShardBackend>) -> TxIdSet {
        let cfg = TxIdSetConfig {
            tier1_capacity: 1000,
            pending_max: 4,
            instance_id: "test".into(),
            ..Default::default()
        };
        TxIdSet::new(&cfg, 0, backend.map(Rc::new)).unwrap()
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    #[test]
    fn first_copy_wins_and_later_copies_are_seen() {
        let s = set(Some(ShardBackend::Memory(
            MemoryBackend::new(0).shard(0, 1),
        )));
        let id = [7u8; 16];
        assert_eq!(run(s.claim(&id)), Verdict::Forward(Forward::Won));
        assert_eq!(run(s.claim(&id)), Verdict::Suppress(Suppress::Seen));
        let c = s.counters();
        assert_eq!((c.won, c.seen, c.backend_calls), (1, 1, 1));
    }

    #[test]
    fn a_claim_held_by_another_instance_is_lost() {
        let shard = Rc::new(ShardBackend::Memory(MemoryBackend::new(0).shard(0, 1)));
        let a = set(None);
        a.set_backend(Some(shard.clone()));
        let id = [9u8; 16];
        let mut key = b"txgate:".to_vec();
        key.extend(id);
        assert!(run(shard.set_nx(&key, b"rival", Duration::ZERO)).unwrap());
        assert_eq!(run(a.claim(&id)), Verdict::Suppress(Suppress::Lost));
        assert_eq!(run(a.claim(&id)), Verdict::Suppress(Suppress::Seen));
    }

    #[test]
    fn claim_sequences_start_apart_in_every_set() {
        // A restart reusing instance id and shard must not reuse values.
        let starts: std::collections::HashSet<u64> =
            (0..64).map(|_| set(None).claim_seq.get()).collect();
        assert_eq!(starts.len(), 64);
        assert!(starts.iter().all(|s| s % (1 << 32) == 0));
    }

    #[test]
    fn stored_value_names_the_claimant_uniquely_per_claim() {
        let shard = Rc::new(ShardBackend::Memory(MemoryBackend::new(0).shard(0, 1)));
        let s = set(None);
        s.set_backend(Some(shard.clone()));
        run(s.claim(&[1u8; 16]));
        run(s.claim(&[2u8; 16]));
        let mut k1 = b"txgate:".to_vec();
        k1.extend([1u8; 16]);
        let mut k2 = b"txgate:".to_vec();
        k2.extend([2u8; 16]);
        let v1 = run(shard.get(&k1)).unwrap().unwrap();
        let v2 = run(shard.get(&k2)).unwrap().unwrap();
        let first = s.claim_seq.get() - 1;
        assert_eq!(v1, format!("test:0:{first}").as_bytes());
        assert_eq!(v2, format!("test:0:{}", first + 1).as_bytes());
    }

    #[test]
    fn single_flight_holds_when_the_backend_is_dropped_mid_claim() {
        let shard = Rc::new(ShardBackend::Memory(MemoryBackend::new(0).shard(0, 1)));
        let s = set(None);
        s.set_backend(Some(shard));
        let id = [4u8; 16];
        let Claim::Novel(first) = s.begin(&id) else {
            panic!("a novel claim")
        };
        // Down to tier-1 only while the first claim is in flight: a second
        // copy must not be forwarded too.
        s.set_backend(None);
        assert!(matches!(
            s.begin(&id),
            Claim::Done(Verdict::Suppress(Suppress::Pending))
        ));
        drop(first);
        assert!(matches!(
            s.begin(&id),
            Claim::Done(Verdict::Forward(Forward::Won))
        ));
    }

    #[test]
    fn without_a_backend_tier1_alone_decides() {
        let s = set(None);
        assert_eq!(run(s.claim(&[3u8; 16])), Verdict::Forward(Forward::Won));
        assert_eq!(run(s.claim(&[3u8; 16])), Verdict::Suppress(Suppress::Seen));
    }

    #[test]
    fn pending_table_reuses_slots_and_reports_full() {
        let mut p = Pending::new(2, 4);
        let PendingInsert::Inserted(a) = p.insert(b"aaaa") else {
            panic!()
        };
        assert!(matches!(p.insert(b"aaaa"), PendingInsert::Present));
        let PendingInsert::Inserted(_) = p.insert(b"bbbb") else {
            panic!()
        };
        assert!(matches!(p.insert(b"cccc"), PendingInsert::Full));
        p.remove(a);
        assert!(matches!(p.insert(b"cccc"), PendingInsert::Inserted(_)));
        assert!(matches!(p.insert(b"aaaa"), PendingInsert::Full));
    }
}
/// A claim's future is moved at least once per novel claim (and becomes the
/// task a gate spawns), so its size is hot-path cost: a cold path inlined in
/// it once made every claim copy ~20 KB.
#[cfg(test)]
mod future_size {
    use crate::cache::ShardBackend;

    fn claim_size<'a, F: std::future::Future + 'a>(
        _: impl FnOnce(&'a super::TxIdSet, &'a [u8]) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    fn set_nx_size<'a, F: std::future::Future + 'a>(
        _: impl FnOnce(&'a ShardBackend, &'a [u8]) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn claim_and_set_nx_futures_stay_small() {
        let set_nx = set_nx_size(|b, k| b.set_nx(k, k, std::time::Duration::ZERO));
        let claim = claim_size(|s, t| s.claim(t));
        assert!(
            set_nx <= 1536,
            "ShardBackend::set_nx future is {set_nx} bytes"
        );
        assert!(claim <= 3072, "TxIdSet::claim future is {claim} bytes");
        // It moves several times per novel claim (out of `begin`, into and
        // out of `finish_now`, into the task or future): no inline buffers.
        let novel = std::mem::size_of::<super::NovelClaim>();
        assert!(novel <= 32, "NovelClaim is {novel} bytes");
    }
}
