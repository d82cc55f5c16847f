//! The retry endpoint's frame store: raw frames under `prefix ‖ HashKey ‖
//! SeqNum`, served on NACK, with retransmissions deduplicated.
//!
//! Like dedup, it never blocks forwarding on the store: a failed `get` is a
//! miss, a failed `put` is a frame not kept, a failed dedup check lets the
//! frame through. Each is counted. It needs a store, so `none` is refused.
//!
//! A retransmission mark lives at `prefix ‖ HashKey ‖ SeqNum ‖ ":seen"`. That
//! is unambiguous only while every hash key has one length (a digest's): with
//! two lengths, a mark's key is also some other frame's key. So the length is
//! configuration ([`crate::engine::EngineConfig::frame_hash_key_len`]), the
//! same for every shard and instance sharing the store, and a call with a
//! hash key of another length is refused (counted).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use crate::cache::ShardBackend;

/// Why a frame store could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameStoreError {
    #[error(
        "the frame store needs a backend to keep frames in; backend 'none' has none: choose memory, redis or aerospike"
    )]
    NoBackend,
}

/// Frame store outcomes, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounters {
    pub puts: u64,
    pub put_errors: u64,
    pub hits: u64,
    pub misses: u64,
    /// `get`s that failed and were answered as misses.
    pub get_errors: u64,
    pub retransmissions: u64,
    /// Dedup checks that failed and let the frame through.
    pub dedup_errors: u64,
    /// Calls refused because their hash key's length differed from the
    /// store's (a put not kept, a get missed, a dedup check let through).
    pub bad_keys: u64,
}

/// One shard's frame store over its backend.
pub struct FrameStore {
    backend: Rc<ShardBackend>,
    prefix: Vec<u8>,
    ttl: Duration,
    counters: Cell<FrameCounters>,
    /// The length every hash key must have.
    hash_key_len: usize,
}

impl FrameStore {
    /// A store keeping frames for `ttl` under `prefix`, for hash keys of
    /// `hash_key_len` bytes; `None` (backend `none`) is refused.
    pub fn new(
        backend: Option<Rc<ShardBackend>>,
        prefix: &[u8],
        hash_key_len: usize,
        ttl: Duration,
    ) -> Result<Self, FrameStoreError> {
        Ok(Self {
            backend: backend.ok_or(FrameStoreError::NoBackend)?,
            prefix: prefix.to_vec(),
            ttl,
            counters: Cell::default(),
            hash_key_len,
        })
    }

    /// Whether `hash_key` has the store's hash key length; counts a refusal.
    fn key_fits(&self, hash_key: &[u8]) -> bool {
        let len = self.hash_key_len;
        let fits = len == hash_key.len();
        if !fits {
            tracing::debug!(
                len,
                got = hash_key.len(),
                "frame store: hash key of another length refused"
            );
            self.count(|c| c.bad_keys += 1);
        }
        fits
    }

    fn key(&self, hash_key: &[u8], seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + hash_key.len() + 8);
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(hash_key);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    fn count(&self, f: impl FnOnce(&mut FrameCounters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    /// Counters so far.
    pub fn counters(&self) -> FrameCounters {
        self.counters.get()
    }

    /// Keeps `frame` for later NACKs; returns whether it was stored.
    pub async fn put(&self, hash_key: &[u8], seq: u64, frame: &[u8]) -> bool {
        if !self.key_fits(hash_key) {
            return false;
        }
        match self
            .backend
            .set(&self.key(hash_key, seq), frame, self.ttl)
            .await
        {
            Ok(()) => {
                self.count(|c| c.puts += 1);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "frame put failed");
                self.count(|c| c.put_errors += 1);
                false
            }
        }
    }

    /// The frame for a NACK, or `None` when missing, expired or unreachable.
    pub async fn get(&self, hash_key: &[u8], seq: u64) -> Option<Vec<u8>> {
        if !self.key_fits(hash_key) {
            return None;
        }
        match self.backend.get(&self.key(hash_key, seq)).await {
            Ok(Some(f)) => {
                self.count(|c| c.hits += 1);
                Some(f)
            }
            Ok(None) => {
                self.count(|c| c.misses += 1);
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "frame get failed: counted as a miss");
                self.count(|c| {
                    c.misses += 1;
                    c.get_errors += 1;
                });
                None
            }
        }
    }

    /// Whether this is the first sighting of `(hash_key, seq)`: false for a
    /// retransmission. Fails open (true) when the store errs.
    pub async fn first_sighting(&self, hash_key: &[u8], seq: u64) -> bool {
        if !self.key_fits(hash_key) {
            return true;
        }
        let mut key = self.key(hash_key, seq);
        key.extend_from_slice(b":seen");
        match self.backend.set_nx(&key, b"1", self.ttl).await {
            Ok(true) => true,
            Ok(false) => {
                self.count(|c| c.retransmissions += 1);
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "frame dedup failed: letting it through");
                self.count(|c| c.dedup_errors += 1);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Backend;
    use crate::cache::fault::{FaultBackend, FaultMode};
    use crate::cache::memory::MemoryBackend;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    #[test]
    fn refuses_the_none_backend() {
        let e = FrameStore::new(None, b"f:", 4, Duration::from_secs(1))
            .err()
            .unwrap();
        assert_eq!(e, FrameStoreError::NoBackend);
        assert!(e.to_string().contains("'none'"));
    }

    #[test]
    fn put_get_and_retransmission_dedup() {
        let b = Rc::new(ShardBackend::Memory(MemoryBackend::new(0).shard(0, 1)));
        let fs = FrameStore::new(Some(b), b"f:", 4, Duration::from_secs(60)).unwrap();
        assert!(run(fs.put(b"hash", 1, b"frame-1")));
        assert_eq!(run(fs.get(b"hash", 1)).as_deref(), Some(&b"frame-1"[..]));
        assert_eq!(run(fs.get(b"hash", 2)), None);
        assert!(run(fs.first_sighting(b"hash", 1)));
        assert!(!run(fs.first_sighting(b"hash", 1)));
        let c = fs.counters();
        assert_eq!((c.puts, c.hits, c.misses, c.retransmissions), (1, 1, 1, 1));
    }

    /// With two hash key lengths a mark's key would be another frame's key
    /// (`h ‖ seq ‖ ":seen"` is the frame key of `h ‖ seq[..5]` and a sequence
    /// number ending in ":seen"): the store refuses the second length.
    #[test]
    fn a_mark_is_never_served_as_a_frame() {
        let b = Rc::new(ShardBackend::Memory(MemoryBackend::new(0).shard(0, 1)));
        let fs = FrameStore::new(Some(b), b"f:", 9, Duration::from_secs(60)).unwrap();
        let (h, seq) = (b"hashkey-A".as_slice(), 0x0102_0304_0506_0708u64);
        assert!(run(fs.first_sighting(h, seq)));
        let be = seq.to_be_bytes();
        let h2 = [h, &be[..5]].concat();
        let seq2 = u64::from_be_bytes([be[5], be[6], be[7], b':', b's', b'e', b'e', b'n']);
        assert_eq!(run(fs.get(&h2, seq2)), None);
        assert!(!run(fs.put(&h2, seq2, b"frame")));
        assert!(!run(fs.first_sighting(h, seq)), "the mark is intact");
        assert_eq!(fs.counters().bad_keys, 2);
    }

    #[test]
    fn store_errors_count_as_misses_and_dedup_fails_open() {
        crate::engine::run_local(store_errors_body());
    }

    async fn store_errors_body() {
        let fault = FaultBackend::new(Duration::from_millis(5));
        let b = Backend::Fault(fault.clone())
            .connect_shard(0, 1)
            .await
            .unwrap();
        let fs = FrameStore::new(Some(Rc::new(b)), b"f:", 1, Duration::from_secs(60)).unwrap();
        assert!(fs.put(b"h", 1, b"x").await);
        fault.set_mode(FaultMode::Error);
        assert_eq!(fs.get(b"h", 1).await, None);
        assert!(!fs.put(b"h", 2, b"y").await);
        assert!(fs.first_sighting(b"h", 1).await);
        assert!(fs.first_sighting(b"h", 1).await);
        let c = fs.counters();
        assert_eq!(
            (c.get_errors, c.misses, c.put_errors, c.dedup_errors),
            (1, 1, 1, 2)
        );
    }
}
