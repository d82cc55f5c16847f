//! The UDP ingress gate: datagrams in, one copy per TxID out.
//!
//! Each shard owns one socket of an `SO_REUSEPORT` group. With kernel
//! steering (see [`steering`]) every datagram arrives on its TxID's owner
//! shard; without it, the receiving shard hands it to the owner over a
//! bounded channel (a hop, counted). The owner claims the TxID through its
//! TxID set: won or fail-open → forwarded unchanged to every `--forward`
//! target; seen, lost or pending → dropped, counted by reason.
//!
//! The hot loop reads with `recvmmsg` and forwards with `sendmmsg`, a batch
//! per syscall. Claims answered without I/O (tier-1, memory backend) finish
//! inside the batch; a claim that waits on the store becomes a task that
//! forwards its own copy when the verdict comes.

mod shard;
pub mod steering;
pub mod udp;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cache::{self, Backend, BackendKind, CacheError};
use crate::engine::{Engine, EngineConfig, EngineError, affinity_cores};
use crate::metrics::{LatencyHistogram, family};
use crate::pipeline::PipelineCounters;
use crate::txidset::ClaimCounters;

use shard::{ShardIo, ShardPlan};

/// How datagrams reach their owner shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// The kernel program when it attaches, else hops (with a warning).
    Auto,
    /// The kernel program or fail to start.
    Cbpf,
    /// Hops only.
    Off,
}

impl std::str::FromStr for Steering {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cbpf" => Ok(Self::Cbpf),
            "off" => Ok(Self::Off),
            _ => Err(format!("'{s}' is not a steering mode: auto, cbpf or off")),
        }
    }
}

/// Socket options for multicast forward targets.
#[derive(Debug, Clone)]
pub struct Multicast {
    /// Hops a multicast datagram may take (IP_MULTICAST_TTL / HOPS).
    pub ttl: u32,
    /// Whether this host's own listeners get a copy (IP_MULTICAST_LOOP).
    pub loopback: bool,
    /// Outgoing interface: an IPv4 address, or an IPv6 interface index.
    pub interface_v4: Option<Ipv4Addr>,
    pub interface_v6: Option<u32>,
}

impl Default for Multicast {
    fn default() -> Self {
        Self {
            ttl: 1,
            loopback: true,
            interface_v4: None,
            interface_v6: None,
        }
    }
}

/// How a gate is built.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// Where datagrams arrive (one socket per shard, same address).
    pub listen: SocketAddr,
    /// Every forwarded datagram goes to each of these.
    pub forward: Vec<SocketAddr>,
    /// Where the TxID sits in the payload.
    pub txid_offset: usize,
    pub steering: Steering,
    /// Datagrams per `recvmmsg`.
    pub batch: usize,
    /// SO_RCVBUF per shard socket; 0 keeps the kernel default.
    pub recv_buffer_bytes: usize,
    pub multicast: Multicast,
    /// Shards, TxID set (TxID length, TTL, tier-1) and runtime knobs; its
    /// `backend` is ignored: the gate opens `store`.
    pub engine: EngineConfig,
    /// The shared store.
    pub store: cache::Config,
    /// Start on tier-1 only when the store is down, and switch to it when it
    /// comes up; otherwise an unreachable store fails start-up.
    pub fail_open_boot: bool,
    /// How often a fail-open boot retries the store.
    pub backend_retry: Duration,
    /// Hops queued per shard before senders wait.
    pub hop_capacity: usize,
}

impl GateConfig {
    /// A gate on `listen` forwarding to `forward`, defaults elsewhere.
    pub fn new(listen: SocketAddr, forward: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            forward,
            txid_offset: 0,
            steering: Steering::Auto,
            batch: 32,
            recv_buffer_bytes: 4 << 20,
            multicast: Multicast::default(),
            engine: EngineConfig::default(),
            store: cache::Config::default(),
            fail_open_boot: false,
            backend_retry: Duration::from_secs(1),
            hop_capacity: 4096,
        }
    }
}

/// Why a gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("no --forward target")]
    NoForward,
    #[error("batch size must be 1..=1024, got {0}")]
    Batch(usize),
    #[error("reading the CPU affinity mask: {0}")]
    Affinity(std::io::Error),
    #[error(transparent)]
    Steering(#[from] steering::SteeringError),
    #[error("socket setup for {what}: {source}")]
    Socket {
        what: String,
        source: std::io::Error,
    },
    #[error("{}", store_error_text(*kind, source))]
    Store {
        kind: BackendKind,
        source: CacheError,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A store that could not be opened: an outage (which `--fail-open-boot`
/// rides out), or a refusal of our settings, which no waiting fixes.
fn store_error_text(kind: BackendKind, e: &CacheError) -> String {
    if e.is_refusal() {
        format!("the {kind} store refused this gate's settings: {e} (fix the store flags)")
    } else {
        format!(
            "the {kind} store is unreachable: {e} (with --fail-open-boot the gate starts on \
             tier-1 only and connects when it can)"
        )
    }
}

/// One shard's figures as last published (at most ~100 ms old).
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardSnapshot {
    pub received: u64,
    /// Datagrams with a forward verdict (won or fail-open).
    pub forwarded: u64,
    /// Sends that failed, per target.
    pub forward_errors: u64,
    /// Too short to hold a TxID: dropped.
    pub short: u64,
    /// Handed to another shard (sent) and taken from one (received).
    pub hops_out: u64,
    pub hops_in: u64,
    pub recv_errors: u64,
    /// Datagrams the kernel dropped on the shard's socket (its receive
    /// buffer full, mostly), since the gate started.
    pub receive_dropped: u64,
    /// The socket's receive buffer as granted (`SO_RCVBUF`, in the
    /// request's terms); summed in totals.
    pub receive_buffer_bytes: u64,
    /// Still queued in the socket when the drain ended (past what it
    /// claims, or arrived later): read and counted, not forwarded.
    pub dropped_at_stop: u64,
    /// Forwarded without a verdict: still waiting on the store when a drain
    /// ran out of time (fail-open).
    pub drain_forwarded: u64,
    pub claims: ClaimCounters,
    pub tier1_entries: u64,
    /// Tier-1 entries dropped before their TTL because it was full: each
    /// shortens the dedup window of its TxID.
    pub tier1_evictions: u64,
    /// The same for the shard's memory-store partition; `None` for other
    /// stores.
    pub store_evictions: Option<u64>,
    /// From receipt to verdict.
    pub claim_latency: LatencyHistogram,
    /// Backend `set_nx` round trips.
    pub backend_latency: LatencyHistogram,
    /// The shard's store connections (zero for the in-process stores).
    pub connections: PipelineCounters,
    /// How many connections the shard has to the store, and how many of
    /// them are up now (the rest redial; claims routed there fail open).
    pub store_connections: u64,
    pub store_connections_up: u64,
    /// When the shard last published, on the precise monotonic clock (ms):
    /// its heartbeat. A shard whose runtime stopped turning stops publishing.
    pub published_ms: u64,
}

/// Totals over shards, and how the drain went.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateSummary {
    pub total: ShardSnapshot,
    /// Claims that had not finished even after the drain forwarded their
    /// datagrams (0 unless a shard is wedged).
    pub abandoned: u64,
    pub drain: Duration,
}

impl GateSummary {
    /// One JSON line for scripts.
    pub fn json(&self) -> String {
        let t = &self.total;
        serde_json::json!({
            "received": t.received,
            "forwarded": t.forwarded,
            "suppressed": t.claims.seen + t.claims.lost + t.claims.pending,
            "seen": t.claims.seen,
            "lost": t.claims.lost,
            "pending": t.claims.pending,
            "fail_open": t.claims.fail_open + t.drain_forwarded,
            "drain_forwarded": t.drain_forwarded,
            "backend_errors": t.claims.backend_errors,
            "short": t.short,
            "hops": t.hops_out,
            "forward_errors": t.forward_errors,
            "receive_dropped": t.receive_dropped,
            "dropped_at_stop": t.dropped_at_stop,
            "abandoned": self.abandoned,
            "drain_ms": self.drain.as_millis() as u64,
        })
        .to_string()
    }
}

fn add(a: &mut ShardSnapshot, b: &ShardSnapshot) {
    a.received += b.received;
    a.forwarded += b.forwarded;
    a.forward_errors += b.forward_errors;
    a.short += b.short;
    a.hops_out += b.hops_out;
    a.hops_in += b.hops_in;
    a.recv_errors += b.recv_errors;
    a.receive_dropped += b.receive_dropped;
    a.receive_buffer_bytes += b.receive_buffer_bytes;
    a.dropped_at_stop += b.dropped_at_stop;
    a.drain_forwarded += b.drain_forwarded;
    a.claims.add(&b.claims);
    a.tier1_entries += b.tier1_entries;
    a.tier1_evictions += b.tier1_evictions;
    a.store_connections += b.store_connections;
    a.store_connections_up += b.store_connections_up;
    a.store_evictions = match (a.store_evictions, b.store_evictions) {
        (None, None) => None,
        (x, y) => Some(x.unwrap_or(0) + y.unwrap_or(0)),
    };
    a.claim_latency.merge(&b.claim_latency);
    a.backend_latency.merge(&b.backend_latency);
    a.connections.add(&b.connections);
}

/// What a shard's serving job reports when it ends.
struct ShardEnd {
    snapshot: ShardSnapshot,
    abandoned: u64,
}

/// The thread that runs the shards' loops, ending with their figures.
type Serving = JoinHandle<Result<Vec<ShardEnd>, EngineError>>;

/// A running gate. Stop it with [`Gate::shutdown`] (or [`Gate::stop`] when
/// shared).
pub struct Gate {
    /// `None` once stopped. The parts a stop takes sit behind locks, so a
    /// gate shared with admin threads (an `Arc`) can be stopped from a
    /// shared reference: an admin request in flight at SIGTERM must not
    /// keep the drain from running.
    engine: Mutex<Option<Arc<Engine>>>,
    local_addr: SocketAddr,
    steering_active: bool,
    store_kind: BackendKind,
    stats: Vec<Arc<Mutex<ShardSnapshot>>>,
    stops: Vec<flume::Sender<()>>,
    serving: Mutex<Option<Serving>>,
    /// False while a fail-open boot waits for the store.
    connected: Arc<AtomicBool>,
    /// Why the store could not be opened, as last tried (fail-open boot).
    store_error: Arc<Mutex<Option<String>>>,
    upgrader: Mutex<Option<(flume::Sender<()>, JoinHandle<()>)>>,
    /// What the first stop returned; later stops return it again.
    stopped: Mutex<Option<GateSummary>>,
    /// How long a stopping shard waits for claims in flight.
    drain_timeout: Duration,
    started: Instant,
}

impl Gate {
    /// Binds the sockets, attaches steering, opens the store (or starts
    /// degraded, with `fail_open_boot`), starts the shards and serves.
    pub fn start(config: GateConfig) -> Result<Gate, GateError> {
        if config.forward.is_empty() {
            return Err(GateError::NoForward);
        }
        if !(1..=1024).contains(&config.batch) {
            return Err(GateError::Batch(config.batch));
        }
        let mut engine_cfg = config.engine.clone();
        if engine_cfg.cores.is_empty() {
            engine_cfg.cores = affinity_cores().map_err(GateError::Affinity)?;
        }
        let shards = engine_cfg.cores.len().max(1);
        let txid_len = engine_cfg.txidset.txid_len;
        crate::route::bpf_program(config.txid_offset, txid_len, shards as u32, 0)
            .map_err(steering::SteeringError::from)?;

        let sockets = steering::reuseport_group(config.listen, shards)?;
        let local_addr = sockets[0]
            .local_addr()
            .map_err(|source| GateError::Socket {
                what: "the listen address".into(),
                source,
            })?;
        let mut receive_buffers = Vec::with_capacity(shards);
        for (i, s) in sockets.iter().enumerate() {
            let sock = socket2::SockRef::from(s);
            let what = || format!("shard {i}'s listen socket");
            let granted =
                udp::set_receive_buffer(&sock, config.recv_buffer_bytes).map_err(|source| {
                    GateError::Socket {
                        what: format!("{} (SO_RCVBUF)", what()),
                        source,
                    }
                })?;
            receive_buffers.push(granted as u64);
            udp::blocking_with_timeout(&sock, shard::WAIT_SLICE).map_err(|source| {
                GateError::Socket {
                    what: what(),
                    source,
                }
            })?;
        }
        let granted = receive_buffers.iter().copied().min().unwrap_or(0);
        if granted < config.recv_buffer_bytes as u64 {
            warn_receive_buffer_capped(config.recv_buffer_bytes, granted);
        }
        let steering_active = match (config.steering, shards) {
            (_, 1) | (Steering::Off, _) => false,
            (mode, _) => match steering::attach_route_program(
                &sockets[0],
                config.txid_offset,
                txid_len,
                shards as u32,
                0,
            ) {
                Ok(()) => true,
                Err(e) if mode == Steering::Auto => {
                    tracing::warn!(
                        "kernel steering unavailable, shards hand packets over instead: {e}"
                    );
                    false
                }
                Err(e) => return Err(e.into()),
            },
        };

        let store_kind = config.store.backend;
        let store_error = Arc::new(Mutex::new(None));
        let (backend, connected) = match cache::open(&config.store) {
            Ok(b) => (b, true),
            Err(e)
                if config.fail_open_boot
                    && matches!(store_kind, BackendKind::Redis | BackendKind::Aerospike) =>
            {
                tracing::warn!(
                    "{}; serving on tier-1 only, retrying every {:?}",
                    store_error_text(store_kind, &e),
                    config.backend_retry
                );
                *lock(&store_error) = Some(e.to_string());
                (None, false)
            }
            Err(source) => {
                return Err(GateError::Store {
                    kind: store_kind,
                    source,
                });
            }
        };
        engine_cfg.backend = backend;
        let engine = Arc::new(Engine::start(engine_cfg)?);

        let mut io = Vec::with_capacity(shards);
        let (hop_txs, hop_rxs): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| flume::bounded::<Box<[u8]>>(config.hop_capacity.max(1)))
            .unzip();
        let mut stops = Vec::with_capacity(shards);
        let mut stats = Vec::with_capacity(shards);
        for (i, ((listen, hop_rx), receive_buffer_bytes)) in sockets
            .into_iter()
            .zip(hop_rxs)
            .zip(receive_buffers)
            .enumerate()
        {
            let (stop_tx, stop_rx) = flume::bounded(1);
            stops.push(stop_tx);
            // Shown from the first scrape, before the shard's first publish.
            let snapshot = Arc::new(Mutex::new(ShardSnapshot {
                receive_buffer_bytes,
                // Counts as a beat until the shard's first publish.
                published_ms: crate::clock::precise_ms(),
                ..ShardSnapshot::default()
            }));
            stats.push(snapshot.clone());
            io.push(Some(ShardIo {
                listen,
                targets: forward_sockets(i, &config.forward, &config.multicast)?,
                hop_rx,
                hop_txs: hop_txs.clone(),
                stop: stop_rx,
                stats: snapshot,
                receive_buffer_bytes,
            }));
        }
        drop(hop_txs);
        // The shards claim what their sockets still hold for up to
        // STOP_READ_MAX after the stop; those claims get the op timeout.
        let drain_timeout = config.store.op_timeout + shard::STOP_READ_MAX;
        let plan = Arc::new(ShardPlan {
            txid_offset: config.txid_offset,
            txid_len,
            batch: config.batch,
            drain_timeout,
            socket_only: shards == 1 || steering_active,
        });
        let io = Arc::new(Mutex::new(io));
        let serving = {
            let engine = engine.clone();
            std::thread::Builder::new()
                .name("txgate-gate".into())
                .spawn(move || {
                    futures_lite::future::block_on(engine.on_every_shard(move |s| {
                        let io = io.lock().expect("not poisoned")[s.index()].take();
                        let plan = plan.clone();
                        async move {
                            match io {
                                Some(io) => shard::serve(s, io, plan).await,
                                None => ShardEnd {
                                    snapshot: ShardSnapshot::default(),
                                    abandoned: 0,
                                },
                            }
                        }
                    }))
                })
                .map_err(|source| GateError::Socket {
                    what: "the gate thread".into(),
                    source,
                })?
        };

        let connected = Arc::new(AtomicBool::new(connected));
        let upgrader = (!connected.load(Ordering::Relaxed)).then(|| {
            let (tx, rx) = flume::bounded::<()>(1);
            let (engine, connected, store, every, last_error) = (
                engine.clone(),
                connected.clone(),
                config.store.clone(),
                config.backend_retry.max(Duration::from_millis(10)),
                store_error.clone(),
            );
            let h = std::thread::Builder::new()
                .name("txgate-upgrade".into())
                .spawn(move || {
                    upgrade_when_reachable(&engine, &store, every, &rx, &connected, &last_error)
                })
                .expect("spawning a thread");
            (tx, h)
        });

        Ok(Gate {
            engine: Mutex::new(Some(engine)),
            local_addr,
            steering_active,
            store_kind,
            stats,
            stops,
            serving: Mutex::new(Some(serving)),
            connected,
            store_error,
            upgrader: Mutex::new(upgrader),
            stopped: Mutex::new(None),
            drain_timeout,
            started: Instant::now(),
        })
    }

    /// The address the shards listen on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the kernel steers datagrams to their owner shards.
    pub fn steering_active(&self) -> bool {
        self.steering_active
    }

    /// Shards serving.
    pub fn shards(&self) -> usize {
        self.stats.len()
    }

    /// Whether the gate claims through its store (false while a fail-open
    /// boot is still waiting for it).
    pub fn store_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Each shard's last published figures.
    pub fn snapshots(&self) -> Vec<ShardSnapshot> {
        self.stats
            .iter()
            .map(|s| *s.lock().expect("not poisoned"))
            .collect()
    }

    /// `/livez`: live while every shard's runtime turns, shown by its
    /// metrics publish (every 100 ms). A shard stuck in a loop or a lock
    /// stops beating while its socket keeps taking its share of the
    /// traffic, queued where nobody reads it: only a restart helps.
    pub fn liveness(&self) -> (bool, String) {
        liveness_of(&self.snapshots(), crate::clock::precise_ms())
    }

    /// `/readyz`: ready when the store answers its health probe (or there is
    /// no remote store); degraded while a fail-open boot waits for it.
    pub fn readiness(&self) -> (bool, String) {
        let engine = lock(&self.engine).clone();
        let Some(engine) = engine else {
            return (false, "stopped".into());
        };
        if !self.store_connected() {
            let why = lock(&self.store_error)
                .as_ref()
                .map_or(String::new(), |e| format!(" (last try: {e})"));
            return (
                false,
                format!(
                    "degraded: the {} store cannot be used{why}; serving on tier-1 only \
                     (fail-open boot)",
                    self.store_kind
                ),
            );
        }
        // Every shard has connections of its own: one that cannot reach the
        // store fails its claims open while the others are fine.
        let probe = engine.on_every_shard(|s| async move {
            match s.backend() {
                Some(b) => b.healthy().await,
                None => true,
            }
        });
        match block_on_within(probe, READINESS_WAIT) {
            None => (
                false,
                format!("not ready: the shards did not answer the probe within {READINESS_WAIT:?}"),
            ),
            Some(Ok(healthy)) if healthy.iter().all(|&h| h) => (true, "ready".into()),
            Some(Ok(healthy)) => {
                let failing: Vec<String> = healthy
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| !**h)
                    .map(|(i, _)| i.to_string())
                    .collect();
                (
                    false,
                    format!(
                        "not ready: the {} store fails its health check from shard{} {} of {}; \
                         their claims fail open",
                        self.store_kind,
                        if failing.len() == 1 { "" } else { "s" },
                        failing.join(", "),
                        healthy.len()
                    ),
                )
            }
            Some(Err(e)) => (false, format!("not ready: {e}")),
        }
    }

    /// `/metrics` in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        render_metrics(
            &self.snapshots(),
            self.store_connected(),
            self.steering_active,
            self.started.elapsed(),
        )
    }

    /// Stops receiving, lets in-flight claims finish (bounded by the op
    /// timeout), then stops the shards. Returns the totals.
    pub fn shutdown(self) -> GateSummary {
        self.stop()
    }

    /// [`Gate::shutdown`] through a shared reference; a second call returns
    /// the first one's totals.
    pub fn stop(&self) -> GateSummary {
        let mut stopped = lock(&self.stopped);
        if let Some(summary) = *stopped {
            return summary;
        }
        let summary = self.stop_once();
        *stopped = Some(summary);
        summary
    }

    fn stop_once(&self) -> GateSummary {
        let began = Instant::now();
        // The whole stop, wedged parts included, fits the drain's promise:
        // one second past the op timeout (`drain_timeout` is the op timeout
        // plus 200 ms), with room left to print the summary.
        let end = began + self.drain_timeout + STOP_SLACK;
        if let Some((tx, h)) = lock(&self.upgrader).take() {
            drop(tx);
            // A store retry may be in a dial (up to the dial timeout): it
            // finds the shards gone and ends by itself.
            let _ = join_within(h, Duration::from_millis(100));
        }
        for s in &self.stops {
            let _ = s.try_send(());
        }
        let mut summary = GateSummary::default();
        let serving = lock(&self.serving).take();
        if let Some(h) = serving {
            // Bounded even if a shard wedges: the drain itself is bounded by
            // the op timeout (plus a 100 ms unwind), so this only waits
            // longer than that on a bug.
            let limit = end
                .saturating_duration_since(Instant::now())
                .saturating_sub(STOP_ENGINE);
            match join_within(h, limit) {
                None => tracing::warn!(
                    "gate shards did not stop within {limit:?}; figures may be stale"
                ),
                Some(Ok(Ok(ends))) => {
                    for e in ends {
                        add(&mut summary.total, &e.snapshot);
                        summary.abandoned += e.abandoned;
                    }
                }
                Some(Ok(Err(e))) => tracing::warn!("gate shards ended with an error: {e}"),
                Some(Err(_)) => tracing::warn!("the gate thread panicked"),
            }
        }
        if summary.total.received == 0 {
            for s in self.snapshots() {
                add(&mut summary.total, &s);
            }
        }
        summary.drain = began.elapsed();
        // Closed through the shared handle: a store retry still in a dial,
        // or a readiness probe, may hold a clone; they then find it stopped.
        let engine = lock(&self.engine).take();
        if let Some(engine) = engine {
            let stopping = std::thread::Builder::new()
                .name("txgate-stop".into())
                .spawn(move || engine.close());
            let limit = end
                .saturating_duration_since(Instant::now())
                .max(STOP_ENGINE);
            match stopping.map(|h| join_within(h, limit)) {
                Ok(Some(Ok(Ok(())))) => {}
                Ok(Some(Ok(Err(e)))) => tracing::warn!("engine shutdown: {e}"),
                Ok(None) => {
                    tracing::warn!("shard threads did not stop within {limit:?}; leaving them")
                }
                Ok(Some(Err(_))) | Err(_) => tracing::warn!("engine shutdown failed"),
            }
        }
        summary
    }
}

/// How far past `drain_timeout` a stop may run in all: the drain's 100 ms
/// unwind, the shards' and the engine's ends; under the one second the
/// drain promises past the op timeout (`drain_timeout` holds 200 ms of it).
const STOP_SLACK: Duration = Duration::from_millis(700);

/// What a stop keeps for the engine's shutdown after the shards end.
const STOP_ENGINE: Duration = Duration::from_millis(150);

/// Joins `h` if it finishes within `limit`; `None` leaves it running.
fn join_within<T>(h: JoinHandle<T>, limit: Duration) -> Option<std::thread::Result<T>> {
    let deadline = Instant::now() + limit;
    while !h.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Some(h.join())
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `m`'s contents; a poisoned lock (a panic elsewhere while holding it) is
/// still read: these hold plain handles, never half-updated state.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Retries the store until it opens, then installs it on every shard.
fn upgrade_when_reachable(
    engine: &Engine,
    store: &cache::Config,
    every: Duration,
    stop: &flume::Receiver<()>,
    connected: &AtomicBool,
    last_error: &Mutex<Option<String>>,
) {
    // A warning when the error changes, and once a minute while it lasts: a
    // store that stays away must not be silent (debug level is off by
    // default), nor flood the log.
    let mut warned: Option<(String, Instant)> = None;
    loop {
        if !matches!(
            stop.recv_timeout(every),
            Err(flume::RecvTimeoutError::Timeout)
        ) {
            return;
        }
        let backend: Backend = match cache::open(store) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                let text = e.to_string();
                // A changed error is news, but errors that alternate (a
                // refusal, then a timeout) must not warn every retry.
                let repeat = warned.as_ref().is_some_and(|(w, at)| {
                    let within = if *w == text {
                        STORE_WARN_EVERY
                    } else {
                        STORE_WARN_CHANGED_EVERY
                    };
                    at.elapsed() < within
                });
                if !repeat {
                    tracing::warn!(
                        "{}; still serving on tier-1 only",
                        store_error_text(store.backend, &e)
                    );
                    warned = Some((text.clone(), Instant::now()));
                }
                *lock(last_error) = Some(text);
                continue;
            }
        };
        // A retry after some shards connected leaves those as they are: a
        // second install would reset their connection counters.
        let installed = futures_lite::future::block_on(engine.on_every_shard(move |s| {
            let b = backend.clone();
            async move {
                if s.backend().is_some() {
                    return Ok(());
                }
                s.install_backend(&b).await.map_err(|e| e.to_string())
            }
        }));
        match installed {
            Ok(r) if r.iter().all(Result::is_ok) => {
                connected.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "the {} store is reachable: claims now go through it",
                    store.backend
                );
                return;
            }
            Ok(r) => {
                let e = r.into_iter().find_map(Result::err).unwrap_or_default();
                tracing::warn!("connecting shards to the store: {e}; retrying");
            }
            Err(e) => {
                tracing::warn!("connecting shards to the store: {e}");
                return;
            }
        }
    }
}

/// How often a fail-open boot repeats the same store error as a warning,
/// and how soon it warns of a different one.
const STORE_WARN_EVERY: Duration = Duration::from_secs(60);
const STORE_WARN_CHANGED_EVERY: Duration = Duration::from_secs(10);

/// Says once, at start, that the kernel cut the shard sockets' receive
/// buffer: a burst beyond it is dropped by the kernel, so the operator must
/// know which limit to raise.
fn warn_receive_buffer_capped(requested_bytes: usize, granted_bytes: u64) {
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    tracing::warn!(
        "--recv-buffer-bytes {requested_bytes}: the kernel granted {granted_bytes} bytes per \
         shard socket (net.core.rmem_max is {rmem_max}); bursts beyond that are dropped \
         (txgate_gate_receive_dropped_total). Raise it: sysctl -w \
         net.core.rmem_max={requested_bytes}"
    );
}

/// Shard `shard`'s sending sockets: one per target, connected to it (the
/// kernel then routes once, not per datagram), with the multicast options
/// set; blocking with a short send timeout, so a full send buffer costs a
/// bounded wait and then a counted error.
fn forward_sockets(
    shard: usize,
    forward: &[SocketAddr],
    mc: &Multicast,
) -> Result<Vec<(UdpSocket, SocketAddr)>, GateError> {
    let mut out = Vec::with_capacity(forward.len());
    for to in forward {
        // `[::ffff:a.b.c.d]` is an IPv4 target: on an IPv6 socket the kernel
        // would send it with IPv4 multicast options that were never set.
        let to = &SocketAddr::new(to.ip().to_canonical(), to.port());
        let err = |what: &str, source| GateError::Socket {
            what: format!("shard {shard}'s socket to {to} ({what})"),
            source,
        };
        let s = Socket::new(Domain::for_address(*to), Type::DGRAM, Some(Protocol::UDP))
            .map_err(|e| err("create", e))?;
        s.set_write_timeout(Some(Duration::from_millis(10)))
            .map_err(|e| err("send timeout", e))?;
        if to.is_ipv4() {
            s.set_multicast_ttl_v4(mc.ttl)
                .map_err(|e| err("IP_MULTICAST_TTL", e))?;
            s.set_multicast_loop_v4(mc.loopback)
                .map_err(|e| err("IP_MULTICAST_LOOP", e))?;
            if let Some(ifa) = mc.interface_v4 {
                s.set_multicast_if_v4(&ifa)
                    .map_err(|e| err("IP_MULTICAST_IF", e))?;
            }
        } else {
            s.set_multicast_hops_v6(mc.ttl)
                .map_err(|e| err("IPV6_MULTICAST_HOPS", e))?;
            s.set_multicast_loop_v6(mc.loopback)
                .map_err(|e| err("IPV6_MULTICAST_LOOP", e))?;
            if let Some(ifi) = mc.interface_v6 {
                s.set_multicast_if_v6(ifi)
                    .map_err(|e| err("IPV6_MULTICAST_IF", e))?;
            }
        }
        s.connect(&(*to).into()).map_err(|e| err("connect", e))?;
        out.push((s.into(), *to));
    }
    Ok(out)
}

/// How long a shard may go without publishing before `/livez` fails: 50
/// publish periods, far past any pause a turning runtime makes.
pub const SHARD_SILENT_MAX_MS: u64 = 5_000;

/// [`Gate::liveness`] for `shards` at `now_ms`.
pub fn liveness_of(shards: &[ShardSnapshot], now_ms: u64) -> (bool, String) {
    let silent: Vec<String> = shards
        .iter()
        .enumerate()
        .filter(|(_, s)| now_ms.saturating_sub(s.published_ms) > SHARD_SILENT_MAX_MS)
        .map(|(i, s)| format!("{i} ({} ms)", now_ms.saturating_sub(s.published_ms)))
        .collect();
    if silent.is_empty() {
        (true, "ok".into())
    } else {
        (
            false,
            format!(
                "shard{} {} of {} silent past {SHARD_SILENT_MAX_MS} ms: its runtime no \
                 longer turns",
                if silent.len() == 1 { "" } else { "s" },
                silent.join(", "),
                shards.len()
            ),
        )
    }
}

/// Renders per-shard snapshots as Prometheus text.
pub fn render_metrics(
    shards: &[ShardSnapshot],
    store_connected: bool,
    steering_active: bool,
    uptime: Duration,
) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(4096 + shards.len() * 4096);
    let per_shard = |out: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     get: &dyn Fn(&ShardSnapshot) -> u64| {
        family(out, name, kind, help);
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
        }
    };
    let counter =
        |out: &mut String, name: &str, help: &str, get: &dyn Fn(&ShardSnapshot) -> u64| {
            per_shard(out, name, "counter", help, get)
        };
    counter(
        &mut out,
        "txgate_gate_received_total",
        "Datagrams read from the shard's socket.",
        &|s| s.received,
    );
    counter(
        &mut out,
        "txgate_gate_forwarded_total",
        "Datagrams with a forward verdict (won or fail-open), sent to every target.",
        &|s| s.forwarded,
    );
    family(
        &mut out,
        "txgate_gate_suppressed_total",
        "counter",
        "Datagrams dropped as copies, by reason: seen (tier-1), lost (another claimant), pending (a claim in flight).",
    );
    for (i, s) in shards.iter().enumerate() {
        for (reason, n) in [
            ("seen", s.claims.seen),
            ("lost", s.claims.lost),
            ("pending", s.claims.pending),
        ] {
            let _ = writeln!(
                out,
                "txgate_gate_suppressed_total{{shard=\"{i}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    counter(
        &mut out,
        "txgate_gate_fail_open_total",
        "Datagrams forwarded because the store failed, timed out or too many claims were pending, or because a drain ran out of time.",
        &|s| s.claims.fail_open + s.drain_forwarded,
    );
    counter(
        &mut out,
        "txgate_gate_short_total",
        "Datagrams too short to hold a TxID: dropped.",
        &|s| s.short,
    );
    counter(
        &mut out,
        "txgate_gate_hops_total",
        "Datagrams this shard received for another shard and handed over (0 with kernel steering).",
        &|s| s.hops_out,
    );
    counter(
        &mut out,
        "txgate_gate_hops_received_total",
        "Datagrams handed to this shard by another.",
        &|s| s.hops_in,
    );
    counter(
        &mut out,
        "txgate_gate_forward_errors_total",
        "Sends to a forward target that failed.",
        &|s| s.forward_errors,
    );
    counter(
        &mut out,
        "txgate_gate_receive_errors_total",
        "Socket read errors.",
        &|s| s.recv_errors,
    );
    counter(
        &mut out,
        "txgate_gate_receive_dropped_total",
        "Datagrams the kernel dropped on the shard's socket, mostly because its receive buffer was full (raise --recv-buffer-bytes, and net.core.rmem_max if it caps it).",
        &|s| s.receive_dropped,
    );
    counter(
        &mut out,
        "txgate_gate_dropped_at_stop_total",
        "Datagrams still queued in the shard's socket when a stop's drain ended (past what it claims, or arrived later): read and dropped.",
        &|s| s.dropped_at_stop,
    );
    per_shard(
        &mut out,
        "txgate_gate_receive_buffer_bytes",
        "gauge",
        "The shard socket's receive buffer as granted (SO_RCVBUF: --recv-buffer-bytes, capped by net.core.rmem_max).",
        &|s| s.receive_buffer_bytes,
    );
    counter(
        &mut out,
        "txgate_backend_calls_total",
        "set_nx calls issued to the store.",
        &|s| s.claims.backend_calls,
    );
    counter(
        &mut out,
        "txgate_backend_errors_total",
        "Store errors, timeouts included (each claim failed open).",
        &|s| s.claims.backend_errors,
    );
    counter(
        &mut out,
        "txgate_backend_timeouts_total",
        "Store ops that timed out.",
        &|s| s.claims.backend_timeouts,
    );
    for (name, help, get) in [
        (
            "txgate_backend_requests_total",
            "Requests written to the store's connections (all ops, health checks included).",
            (|c: &PipelineCounters| c.calls) as fn(&PipelineCounters) -> u64,
        ),
        (
            "txgate_backend_replies_total",
            "Replies read from the store's connections, late ones included.",
            |c| c.replies,
        ),
        (
            "txgate_backend_reads_total",
            "Socket reads that returned replies' bytes (replies / reads: replies per wake-up).",
            |c| c.reads,
        ),
        (
            "txgate_backend_writes_total",
            "Socket writes that carried requests (requests / writes: batching).",
            |c| c.flushes,
        ),
        (
            "txgate_backend_late_replies_total",
            "Replies that came after their op had timed out (read and dropped: the connection stays in step).",
            |c| c.late_replies,
        ),
        (
            "txgate_backend_overflows_total",
            "Requests refused because a connection had too many in flight.",
            |c| c.overflows,
        ),
        (
            "txgate_backend_connects_total",
            "Store connections established, reconnects included.",
            |c| c.connects,
        ),
        (
            "txgate_backend_disconnects_total",
            "Store connections lost (each failed what it had in flight).",
            |c| c.disconnects,
        ),
    ] {
        counter(&mut out, name, help, &|s| get(&s.connections));
    }
    counter(
        &mut out,
        "txgate_pending_full_total",
        "Novel claims failed open because too many were in flight.",
        &|s| s.claims.pending_full,
    );
    per_shard(
        &mut out,
        "txgate_tier1_entries",
        "gauge",
        "TxIDs held in tier-1.",
        &|s| s.tier1_entries,
    );
    per_shard(
        &mut out,
        "txgate_store_connections",
        "gauge",
        "The shard's connections to the store (0 for the in-process stores and while a fail-open boot waits).",
        &|s| s.store_connections,
    );
    per_shard(
        &mut out,
        "txgate_store_connections_up",
        "gauge",
        "Those connections up now; the rest are redialing, and claims routed to them fail open.",
        &|s| s.store_connections_up,
    );
    counter(
        &mut out,
        "txgate_tier1_evictions_total",
        "TxIDs tier-1 dropped before their TTL because it was full (their dedup window cut short: raise --tier1-capacity).",
        &|s| s.tier1_evictions,
    );
    if shards.iter().any(|s| s.store_evictions.is_some()) {
        counter(
            &mut out,
            "txgate_store_evictions_total",
            "Keys the memory store's shard partition dropped before their TTL because it was full (their dedup window cut short: raise --ingress-dedup-memory-max-keys).",
            &|s| s.store_evictions.unwrap_or(0),
        );
    }
    family(
        &mut out,
        "txgate_claim_duration_seconds",
        "histogram",
        "From a datagram's receipt to its verdict.",
    );
    for (i, s) in shards.iter().enumerate() {
        s.claim_latency.render(
            &mut out,
            "txgate_claim_duration_seconds",
            &format!("shard=\"{i}\""),
        );
    }
    family(
        &mut out,
        "txgate_backend_op_duration_seconds",
        "histogram",
        "Store set_nx round trips, errors included.",
    );
    for (i, s) in shards.iter().enumerate() {
        s.backend_latency.render(
            &mut out,
            "txgate_backend_op_duration_seconds",
            &format!("shard=\"{i}\""),
        );
    }
    family(
        &mut out,
        "txgate_store_connected",
        "gauge",
        "1 once the store is opened (at start, or when a fail-open boot reaches it); it stays 1 through later outages: see txgate_store_connections_up and /readyz.",
    );
    let _ = writeln!(out, "txgate_store_connected {}", store_connected as u8);
    family(
        &mut out,
        "txgate_steering_active",
        "gauge",
        "1 when the kernel steers datagrams to their owner shard.",
    );
    let _ = writeln!(out, "txgate_steering_active {}", steering_active as u8);
    family(
        &mut out,
        "txgate_uptime_seconds",
        "gauge",
        "Seconds since the gate started.",
    );
    let _ = writeln!(out, "txgate_uptime_seconds {}", uptime.as_secs_f64());
    out
}

/// How long `/readyz` waits for the shards to run their store probes (each has its
/// own, shorter timeout): a shard that does not get to it in time is itself
/// a reason not to be ready, and an admin request must not wait forever.
const READINESS_WAIT: Duration = Duration::from_secs(2);

/// Runs `fut` on this thread until it completes or `limit` passes.
fn block_on_within<F: std::future::Future>(fut: F, limit: Duration) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + limit;
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_silent_past_the_bound_fails_liveness_naming_it() {
        let beat = |ms| ShardSnapshot {
            published_ms: ms,
            ..ShardSnapshot::default()
        };
        let now = 100_000;
        let fresh = [beat(now - 100), beat(now - SHARD_SILENT_MAX_MS)];
        assert_eq!(liveness_of(&fresh, now), (true, "ok".into()));
        let one_stuck = [beat(now - 100), beat(now - SHARD_SILENT_MAX_MS - 1)];
        let (live, why) = liveness_of(&one_stuck, now);
        assert!(!live);
        assert!(why.starts_with("shard 1 (5001 ms) of 2"), "{why}");
    }

    #[test]
    fn an_ipv4_mapped_target_gets_the_ipv4_multicast_options() {
        let mc = Multicast {
            ttl: 7,
            loopback: false,
            ..Multicast::default()
        };
        let mapped: SocketAddr = "[::ffff:239.1.2.3]:9000".parse().unwrap();
        let socks = forward_sockets(0, &[mapped], &mc).unwrap();
        let (sock, to) = &socks[0];
        assert_eq!(*to, "239.1.2.3:9000".parse::<SocketAddr>().unwrap());
        assert!(to.ip().is_multicast());
        let s = socket2::SockRef::from(sock);
        assert_eq!(s.multicast_ttl_v4().unwrap(), 7);
        assert!(!s.multicast_loop_v4().unwrap());
    }
}
