//! A fault-injecting backend: the memory backend behind a switch that adds
//! delay, fails every op, or stalls every op until the op timeout. It shows
//! fail-open behaviour (and single-flight under latency) without a real outage;
//! the switch is shared by all shards and can be flipped while claims run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use super::CacheError;
use super::memory::{MemoryBackend, MemoryShard};

/// What every op does while the switch is in this position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultMode {
    /// Ops reach the memory store after the configured delay. A delay at or
    /// past the op timeout turns into a timeout error at the op timeout.
    Healthy = 0,
    /// Ops fail at once with a backend error.
    Error = 1,
    /// Ops hang until the op timeout, then fail with a timeout error.
    Stall = 2,
}

#[derive(Debug)]
struct FaultState {
    mode: AtomicU8,
    delay_us: AtomicU64,
    op_timeout: Duration,
    set_nx_calls: AtomicU64,
}

/// The process-wide fault backend; clones share the switch and counters.
#[derive(Debug, Clone)]
pub struct FaultBackend {
    memory: MemoryBackend,
    state: Arc<FaultState>,
}

impl FaultBackend {
    /// A healthy fault backend over an unbounded memory store whose ops time
    /// out after `op_timeout`.
    pub fn new(op_timeout: Duration) -> Self {
        Self {
            memory: MemoryBackend::new(0),
            state: Arc::new(FaultState {
                mode: AtomicU8::new(FaultMode::Healthy as u8),
                delay_us: AtomicU64::new(0),
                op_timeout,
                set_nx_calls: AtomicU64::new(0),
            }),
        }
    }

    /// Flips the switch for every shard.
    pub fn set_mode(&self, mode: FaultMode) {
        self.state.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// Latency added to every healthy op.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// `set_nx` calls received so far, whatever their outcome.
    pub fn set_nx_calls(&self) -> u64 {
        self.state.set_nx_calls.load(Ordering::Relaxed)
    }

    pub(super) fn shard(&self, shard: usize, shards: usize) -> FaultShard {
        FaultShard {
            memory: self.memory.shard(shard, shards),
            state: self.state.clone(),
        }
    }
}

/// One shard's fault backend.
pub struct FaultShard {
    memory: MemoryShard,
    state: Arc<FaultState>,
}

impl FaultShard {
    pub(super) fn memory(&self) -> &MemoryShard {
        &self.memory
    }

    async fn gate(&self, op: &'static str) -> Result<(), CacheError> {
        let timeout = self.state.op_timeout;
        let timed_out = CacheError::Timeout {
            op,
            after_ms: timeout.as_millis() as u64,
        };
        match self.state.mode.load(Ordering::Relaxed) {
            m if m == FaultMode::Error as u8 => Err(CacheError::Backend {
                op,
                detail: "injected fault".into(),
            }),
            m if m == FaultMode::Stall as u8 => {
                glommio::timer::sleep(timeout).await;
                Err(timed_out)
            }
            _ => {
                let delay = Duration::from_micros(self.state.delay_us.load(Ordering::Relaxed));
                if delay >= timeout {
                    glommio::timer::sleep(timeout).await;
                    return Err(timed_out);
                }
                if !delay.is_zero() {
                    glommio::timer::sleep(delay).await;
                }
                Ok(())
            }
        }
    }

    pub(super) async fn set_nx(
        &self,
        key: &[u8],
        val: &[u8],
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        self.state.set_nx_calls.fetch_add(1, Ordering::Relaxed);
        self.gate("set_nx").await?;
        self.memory.set_nx(key, val, ttl)
    }

    pub(super) async fn set(
        &self,
        key: &[u8],
        val: &[u8],
        ttl: Duration,
    ) -> Result<(), CacheError> {
        self.gate("set").await?;
        self.memory.set(key, val, ttl)
    }

    pub(super) async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        self.gate("get").await?;
        self.memory.get(key)
    }

    pub(super) async fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        self.gate("del").await?;
        self.memory.del(key)
    }

    pub(super) fn healthy(&self) -> bool {
        self.state.mode.load(Ordering::Relaxed) == FaultMode::Healthy as u8
    }
}
