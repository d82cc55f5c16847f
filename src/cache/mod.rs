//! The backend contract: a TTL'd key-value store with an atomic create-only
//! write, shared by the dedup claim path and the frame store.
//!
//! | op | meaning |
//! |---|---|
//! | `set_nx(key, val, ttl)` | create iff absent: `Ok(true)` won, `Ok(false)` already there, `Err` fail open |
//! | `set(key, val, ttl)` | unconditional write |
//! | `get(key)` | `Ok(None)` on a miss or expiry, never an error for a miss |
//! | `del(key)` | an absent key is fine |
//! | `healthy()` | cold-path readiness probe |
//! | `close()` | release connections and background work |
//!
//! A ttl of zero means "no expiry". Keys and values are opaque bytes; callers
//! namespace them. [`open`] is fail-closed; `none` yields no backend.
//!
//! Two levels: [`Backend`] is the process-wide, `Send` description made by
//! [`open`]; each shard turns it into its own [`ShardBackend`] (its memory
//! partition, its connections). Shard backends are an enum, so a call on the
//! hot path is a `match`, not a boxed future.

pub mod aerospike;
mod blocking;
pub mod fault;
pub mod flags;
pub mod memory;
pub mod redis;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use flags::{FlagError, register_flags};

/// Default bound on connection establishment.
pub const DIAL_TIMEOUT_DEFAULT: Duration = Duration::from_millis(200);
/// Default bound on one operation: short, so a slow backend becomes an error
/// (and a fail-open forward) fast.
pub const OP_TIMEOUT_DEFAULT: Duration = Duration::from_millis(50);
/// Default longest pause before reading more Aerospike replies (see
/// [`Config::aero_reply_gather`]); measured against a real server (README).
pub const AERO_REPLY_GATHER_DEFAULT: Duration = Duration::from_micros(200);
/// Default bound on requests in flight per Redis connection.
pub const REDIS_INFLIGHT_MAX_DEFAULT: usize = 4096;
/// Default bound on the memory backend's keys, over all shards.
pub const MEMORY_MAX_KEYS_DEFAULT: usize = 1_000_000;

/// Which store backs a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// Per-process memory, partitioned by shard: no cross-instance coordination.
    #[default]
    Memory,
    /// Any Redis-protocol server or Redis Cluster, by address.
    Redis,
    /// An Aerospike Community Edition cluster.
    Aerospike,
    /// No backend: dedup runs on tier-1 only.
    None,
}

impl BackendKind {
    /// Every accepted name, in the order help texts list them.
    pub const NAMES: [&'static str; 4] = ["memory", "redis", "aerospike", "none"];

    /// The name accepted by flags and printed in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
            Self::Aerospike => "aerospike",
            Self::None => "none",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Self::Memory),
            "redis" => Ok(Self::Redis),
            "aerospike" => Ok(Self::Aerospike),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown backend '{other}': expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// A password: its `Debug` shows no characters of it, so configs and
/// backends can be printed (test failures, debug logs) without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// Construction parameters for [`open`]: every field of the reference
/// package. Only the fields of the chosen backend are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub backend: BackendKind,
    /// Bound on the memory backend's keys over all shards (0 = unbounded).
    pub memory_max_keys: usize,
    /// `host:port` of a Redis-protocol server (or any node of a Redis
    /// Cluster); required for `redis`.
    pub redis_addr: Option<String>,
    /// ACL user for `AUTH user password`; `None` with a password: `AUTH password`.
    pub redis_username: Option<String>,
    pub redis_password: Option<Secret>,
    /// Database for `SELECT` (standalone servers only).
    pub redis_db: u32,
    /// `CLIENT SETNAME` prefix; each shard's connection adds `-s{shard}`.
    /// Default `txgate-{instance id}` (`{hostname}-{pid}` unless set):
    /// `CLIENT LIST` shows who is who.
    pub redis_client_name: String,
    /// Bound on requests in flight per connection; past it ops fail fast.
    pub redis_inflight_max: usize,
    /// Speak TLS to every Redis node.
    pub redis_tls: bool,
    /// PEM roots to verify servers with (default: the system bundle).
    pub redis_tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate chain and key, for servers that ask for one.
    pub redis_tls_cert_file: Option<std::path::PathBuf>,
    pub redis_tls_key_file: Option<std::path::PathBuf>,
    /// Name the server certificate must carry (default: the host dialed).
    pub redis_tls_server_name: Option<String>,
    /// Aerospike seed nodes (`host:port`); required for `aerospike`.
    pub aero_hosts: Vec<String>,
    /// Aerospike namespace; required for `aerospike`.
    pub aero_namespace: Option<String>,
    /// Aerospike set within the namespace.
    pub aero_set: String,
    /// Aerospike bin holding the value (≤ 15 bytes).
    pub aero_bin: String,
    /// Connections per node per shard: the server works through one request
    /// per connection at a time, so a second buys server-side parallelism.
    pub aero_conns_per_node: usize,
    /// Longest pause before reading more replies while several requests
    /// are in flight: a node answers them one by one, and without a pause
    /// each reply costs the shard a wake-up (zero: read at once). The pause
    /// adapts below this bound (`pipeline::GatherPace`); it adds up to this
    /// much latency to a pipelined op and saves CPU and server work at depth.
    pub aero_reply_gather: Duration,
    /// Bound on establishing a connection.
    pub dial_timeout: Duration,
    /// Bound on each operation.
    pub op_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: BackendKind::Memory,
            memory_max_keys: MEMORY_MAX_KEYS_DEFAULT,
            redis_addr: None,
            redis_username: None,
            redis_password: None,
            redis_db: 0,
            redis_client_name: redis::client_name_for(&crate::identity::default_instance_id()),
            redis_inflight_max: REDIS_INFLIGHT_MAX_DEFAULT,
            redis_tls: false,
            redis_tls_ca_file: None,
            redis_tls_cert_file: None,
            redis_tls_key_file: None,
            redis_tls_server_name: None,
            aero_hosts: Vec::new(),
            aero_namespace: None,
            aero_set: "txgate".to_owned(),
            aero_bin: "v".to_owned(),
            aero_conns_per_node: 1,
            aero_reply_gather: AERO_REPLY_GATHER_DEFAULT,
            dial_timeout: DIAL_TIMEOUT_DEFAULT,
            op_timeout: OP_TIMEOUT_DEFAULT,
        }
    }
}

/// What a backend operation or [`open`] reports when it fails.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("{op} timed out after {after_ms} ms")]
    Timeout { op: &'static str, after_ms: u64 },
    #[error("backend error during {op}: {detail}")]
    Backend { op: &'static str, detail: String },
    #[error("backend is closed")]
    Closed,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{addr}: connection refused")]
    Refused { addr: String },
    #[error("{addr}: no answer within the dial timeout ({after_ms} ms)")]
    DialTimeout { addr: String, after_ms: u64 },
    #[error("{addr}: authentication failed: {detail}")]
    Auth { addr: String, detail: String },
    #[error("{addr} is not a Redis-protocol server (it answered {got:?})")]
    NotRedis { addr: String, got: String },
    #[error("{addr}: {detail}")]
    Connect { addr: String, detail: String },
}

impl CacheError {
    /// What a failed pipelined call means for op `op` with deadline `timeout`.
    pub fn from_call(op: &'static str, e: crate::pipeline::CallError, timeout: Duration) -> Self {
        match e {
            crate::pipeline::CallError::Timeout(_) => Self::Timeout {
                op,
                after_ms: timeout.as_millis() as u64,
            },
            crate::pipeline::CallError::Closed => Self::Closed,
            other => Self::Backend {
                op,
                detail: other.to_string(),
            },
        }
    }

    /// True for timeouts, which callers count apart from other errors.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// True when the store answered and refused what we asked of it (a
    /// password, a database, a namespace, a protocol): waiting will not fix
    /// it, so an operator must be told it is not a mere outage.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Auth { .. } | Self::NotRedis { .. } | Self::Config(_)
        )
    }
}

/// A backend as opened: `Send + Sync`, cloned into every shard, which calls
/// [`Backend::connect_shard`] on its own thread.
#[derive(Debug, Clone)]
pub enum Backend {
    Memory(memory::MemoryBackend),
    /// Any Redis-protocol server, by address.
    Redis(redis::RedisBackend),
    /// An Aerospike cluster, by seed hosts.
    Aerospike(aerospike::AerospikeBackend),
    /// A test backend wrapping memory with switchable faults (errors, stalls,
    /// delays); it proves fail-open behaviour without a real outage.
    Fault(fault::FaultBackend),
}

impl Backend {
    /// The kind name for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
            Self::Aerospike(_) => "aerospike",
            Self::Fault(_) => "fault",
        }
    }

    /// Whether every op on a key must run on one shard because the store
    /// itself is partitioned by shard (memory). Shared stores (Redis,
    /// Aerospike) can be reached from any shard.
    pub fn partitioned_by_shard(&self) -> bool {
        match self {
            Self::Memory(_) | Self::Fault(_) => true,
            Self::Redis(_) | Self::Aerospike(_) => false,
        }
    }

    /// Builds shard `shard` of `shards`'s own backend: its partition, its
    /// connections. Runs on that shard's thread.
    pub async fn connect_shard(
        &self,
        shard: usize,
        shards: usize,
    ) -> Result<ShardBackend, CacheError> {
        match self {
            Self::Memory(m) => Ok(ShardBackend::Memory(m.shard(shard, shards))),
            Self::Redis(r) => Ok(ShardBackend::Redis(r.shard(shard).await?)),
            Self::Aerospike(a) => Ok(ShardBackend::Aerospike(a.shard(shard).await?)),
            Self::Fault(f) => Ok(ShardBackend::Fault(f.shard(shard, shards))),
        }
    }
}

/// Opens the backend `config` selects. Fail-closed: a backend that cannot be
/// reached is an error, never a degraded backend. `none` yields `Ok(None)`:
/// the caller runs on tier-1 only.
pub fn open(config: &Config) -> Result<Option<Backend>, CacheError> {
    match config.backend {
        BackendKind::None => Ok(None),
        BackendKind::Memory => Ok(Some(Backend::Memory(memory::MemoryBackend::new(
            config.memory_max_keys,
        )))),
        BackendKind::Redis => Ok(Some(Backend::Redis(redis::open(config)?))),
        BackendKind::Aerospike => Ok(Some(Backend::Aerospike(aerospike::open(config)?))),
    }
}

/// One shard's backend: the hot-path handle. `!Send`; owned by its shard.
pub enum ShardBackend {
    Memory(memory::MemoryShard),
    Redis(redis::RedisShard),
    Aerospike(aerospike::AerospikeShard),
    Fault(fault::FaultShard),
}

impl ShardBackend {
    /// Creates `key = val` iff absent: `Ok(true)` when this call created it.
    #[inline]
    pub async fn set_nx(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<bool, CacheError> {
        match self {
            Self::Memory(m) => m.set_nx(key, val, ttl),
            Self::Redis(r) => r.set_nx(key, val, ttl).await,
            Self::Aerospike(a) => a.set_nx(key, val, ttl).await,
            Self::Fault(f) => f.set_nx(key, val, ttl).await,
        }
    }

    /// Whether [`ShardBackend::set_nx_now`] may answer (memory always; a
    /// Redis shard with a connection down, whose calls would fail at once):
    /// callers skip preparing a call that would only be handed back.
    #[inline]
    pub fn answers_now(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(r) => r.any_down(),
            Self::Aerospike(_) | Self::Fault(_) => false,
        }
    }

    /// [`ShardBackend::set_nx`] for a store that answers without waiting
    /// (memory): `None` means this store must be awaited.
    #[inline]
    pub fn set_nx_now(
        &self,
        key: &[u8],
        val: &[u8],
        ttl: Duration,
    ) -> Option<Result<bool, CacheError>> {
        match self {
            Self::Memory(m) => Some(m.set_nx(key, val, ttl)),
            // A connection that is down fails the call at once: answered
            // here, the claim fails open inside its batch instead of
            // costing a task and a send of its own (an outage is when the
            // gate forwards the most).
            Self::Redis(r) => r.fails_now(key).map(Err),
            Self::Aerospike(_) | Self::Fault(_) => None,
        }
    }

    /// Writes `key = val`, replacing any value.
    pub async fn set(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<(), CacheError> {
        match self {
            Self::Memory(m) => m.set(key, val, ttl),
            Self::Redis(r) => r.set(key, val, ttl).await,
            Self::Aerospike(a) => a.set(key, val, ttl).await,
            Self::Fault(f) => f.set(key, val, ttl).await,
        }
    }

    /// The value under `key`; `Ok(None)` on a miss or expiry.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        match self {
            Self::Memory(m) => m.get(key),
            Self::Redis(r) => r.get(key).await,
            Self::Aerospike(a) => a.get(key).await,
            Self::Fault(f) => f.get(key).await,
        }
    }

    /// Removes `key`; an absent key is not an error.
    pub async fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        match self {
            Self::Memory(m) => m.del(key),
            Self::Redis(r) => r.del(key).await,
            Self::Aerospike(a) => a.del(key).await,
            Self::Fault(f) => f.del(key).await,
        }
    }

    /// Cold-path readiness probe; memory is always healthy.
    pub async fn healthy(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(r) => r.healthy().await,
            Self::Aerospike(a) => a.healthy().await,
            Self::Fault(f) => f.healthy(),
        }
    }

    /// Periodic upkeep (expiry sweeps); bounded work per call.
    pub fn maintain(&self) {
        match self {
            Self::Memory(m) => m.sweep(memory::SWEEP_BUDGET),
            // The stores expire keys themselves; op timeouts have their own sweep.
            Self::Redis(_) | Self::Aerospike(_) => {}
            Self::Fault(f) => f.memory().sweep(memory::SWEEP_BUDGET),
        }
    }

    /// (up now, all) of the shard's store connections: zero for the
    /// in-process stores.
    pub fn connections_up(&self) -> (u64, u64) {
        match self {
            Self::Redis(r) => r.connections_up(),
            Self::Aerospike(a) => a.connections_up(),
            Self::Memory(_) | Self::Fault(_) => (0, 0),
        }
    }

    /// Counters of the shard's pipelined store connections, summed (zero
    /// for the in-process stores): requests, replies, reads and writes,
    /// timeouts, late replies, overflows, connects and disconnects.
    pub fn connection_counters(&self) -> crate::pipeline::PipelineCounters {
        match self {
            Self::Redis(r) => r.counters(),
            Self::Aerospike(a) => a.counters(),
            Self::Memory(_) | Self::Fault(_) => Default::default(),
        }
    }

    /// Live entries the shard's own partition dropped because it was full
    /// (each a claim forgotten before its TTL); `None` for stores that
    /// evict, if at all, out of our sight (Redis, Aerospike).
    pub fn evictions(&self) -> Option<u64> {
        match self {
            Self::Memory(m) => Some(m.evictions()),
            Self::Fault(f) => Some(f.memory().evictions()),
            Self::Redis(_) | Self::Aerospike(_) => None,
        }
    }

    /// Releases the shard's resources; later ops fail with `Closed`.
    pub fn close(&self) {
        match self {
            Self::Memory(m) => m.close(),
            Self::Redis(r) => r.close(),
            Self::Aerospike(a) => a.close(),
            Self::Fault(f) => f.memory().close(),
        }
    }
}
