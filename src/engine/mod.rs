//! Shards: one glommio executor pinned per core, each owning its tier-1
//! partition, single-flight table, backend connection(s) and counters.
//!
//! Everything keyed by a TxID runs on `route(txid)`'s shard, so all copies of a
//! TxID meet on one core and need no lock. Work reaches a shard through its
//! bounded inbox (a `flume` channel any thread can send on): from another
//! shard, from a plain thread, or from another runtime. Inside a shard the hot
//! path is plain method calls on `Rc` state.

pub mod cores;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::cache::{Backend, CacheError, ShardBackend};
use crate::framestore::{FrameStore, FrameStoreError};
use crate::route::route;
use crate::txidset::{TxIdSet, TxIdSetConfig, TxIdSetError, Verdict};

pub use cores::{affinity_cores, parse_core_list, parse_core_list_here};

/// io_uring registered-buffer memory per executor. We do no file I/O, so the
/// minimum: glommio's 10 MiB default would not fit an 8 MiB RLIMIT_MEMLOCK.
const IO_MEMORY_BYTES: usize = 64 << 10;
/// glommio's own preempt timer: see [`EngineConfig::preempt_every`].
pub const PREEMPT_EVERY_DEFAULT: Duration = Duration::from_millis(100);
/// How often a shard sweeps expired entries.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(100);
/// Expired tier-1 entries dropped per maintenance tick.
const TIER1_SWEEP_BUDGET: usize = 4096;

/// How an engine is built.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// One shard per entry, pinned to that CPU. Empty: the affinity mask.
    pub cores: Vec<usize>,
    /// The shared store; `None` runs on tier-1 only.
    pub backend: Option<Backend>,
    /// Each shard's TxID set.
    pub txidset: TxIdSetConfig,
    /// Bound on each shard's inbox; senders wait (or fail, for `try_`) past it.
    pub inbox_capacity: usize,
    /// Bound on submitted jobs running at once on a shard.
    pub jobs_max: usize,
    /// Key prefix and TTL of each shard's frame store (built when there is a
    /// backend).
    pub frame_prefix: Vec<u8>,
    /// Length of the frame store's hash keys (a digest's); one value for
    /// every instance sharing the store (see [`FrameStore`]).
    pub frame_hash_key_len: usize,
    pub frame_ttl: Duration,
    /// Bound on the whole start-up: executors, backend connections.
    pub start_timeout: Duration,
    /// How long an idle shard polls before sleeping in the kernel. Zero
    /// (default) sleeps at once; on a core dedicated to txgate, a few tens of
    /// µs turn each round trip's sleep and wake-up syscalls into polling.
    pub spin_before_park: Duration,
    /// How long a shard's tasks run before its executor polls I/O and fires
    /// timers again. Many tasks that never wait (claims failing open at
    /// once while a store is down) keep the queue from running dry, and the
    /// op-timeout sweep and the redial wait on them: the benchmark's tasks
    /// took a claim to 1.56 s against a 50 ms op timeout, so it sets 1 ms.
    /// The gate keeps glommio's 100 ms: its one loop steps aside by itself,
    /// and a shorter timer cut its 10 ms slices while it sleeps in its
    /// socket (5–10× the `io_uring_enter` calls, +12 % CPU per packet).
    pub preempt_every: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cores: Vec::new(),
            backend: None,
            txidset: TxIdSetConfig::default(),
            inbox_capacity: 1024,
            jobs_max: 4096,
            frame_prefix: b"txgate:frame:".to_vec(),
            frame_hash_key_len: 32,
            frame_ttl: Duration::from_secs(30),
            start_timeout: Duration::from_secs(10),
            spin_before_park: Duration::ZERO,
            preempt_every: PREEMPT_EVERY_DEFAULT,
        }
    }
}

/// Why the engine failed to start or to run a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no cores to run on")]
    NoCores,
    #[error("reading the CPU affinity mask: {0}")]
    Affinity(std::io::Error),
    #[error("shard {shard} on core {core} failed to start: {reason}")]
    Start {
        shard: usize,
        core: usize,
        reason: String,
    },
    #[error("shards did not all start within {0:?}")]
    StartTimeout(Duration),
    #[error("shard {0} has stopped")]
    ShardStopped(usize),
    #[error("shard {0}'s inbox is full")]
    InboxFull(usize),
    #[error("TxID is {got} bytes; this engine routes {want}-byte TxIDs")]
    TxIdLen { got: usize, want: usize },
    #[error(transparent)]
    TxIdSet(#[from] TxIdSetError),
    #[error(transparent)]
    FrameStore(#[from] FrameStoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

type Job = Box<dyn FnOnce(Rc<Shard>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

enum Msg {
    Job(Job),
}

/// A backend op that can be sent to the owner shard of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    SetNx {
        key: Vec<u8>,
        val: Vec<u8>,
        ttl: Duration,
    },
    Set {
        key: Vec<u8>,
        val: Vec<u8>,
        ttl: Duration,
    },
    Get {
        key: Vec<u8>,
    },
    Del {
        key: Vec<u8>,
    },
}

/// The result of an [`Op`], arm for arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    SetNx(bool),
    Set,
    Get(Option<Vec<u8>>),
    Del,
}

/// One shard's state, reachable only on its own thread (`Rc<Shard>`).
pub struct Shard {
    index: usize,
    core: usize,
    shards: usize,
    backend: RefCell<Option<Rc<ShardBackend>>>,
    /// Whether the backend is split by shard, so ops must run on the owner.
    partitioned: Cell<bool>,
    txids: TxIdSet,
    frames: Option<FrameStore>,
    peers: Vec<Door>,
}

/// How work reaches a shard: its inbox, and a channel that disconnects when
/// its thread ends. A thread that dies of a panic leaves its tasks (and the
/// inbox's receiver with them) leaked, not dropped; without this a caller
/// would wait on it for ever.
#[derive(Clone)]
struct Door {
    inbox: flume::Sender<Msg>,
    alive: flume::Receiver<()>,
}

thread_local! {
    /// A shard thread's end of its [`Door::alive`]: thread-local storage is
    /// dropped when the thread exits, a panic's unwinding included.
    static ALIVE: RefCell<Option<flume::Sender<()>>> = const { RefCell::new(None) };
}

impl Shard {
    /// This shard's index, 0-based.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The CPU this shard is pinned to.
    pub fn core(&self) -> usize {
        self.core
    }

    /// Shards in the engine.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shard that owns `key` (a TxID, or any routing key).
    pub fn owner(&self, key: &[u8]) -> usize {
        route(key, self.shards as u32) as usize
    }

    /// This shard's backend, `None` when running on tier-1 only.
    pub fn backend(&self) -> Option<Rc<ShardBackend>> {
        self.backend.borrow().clone()
    }

    /// Connects this shard to `backend` and makes it the store of its TxID
    /// set: how a fail-open boot upgrades once the store is reachable.
    /// Claims in flight finish on the previous one. The frame store stays as
    /// the engine started (none, when it started without a backend).
    pub async fn install_backend(&self, backend: &Backend) -> Result<(), EngineError> {
        let b = Rc::new(backend.connect_shard(self.index, self.shards).await?);
        self.partitioned.set(backend.partitioned_by_shard());
        self.txids.set_backend(Some(b.clone()));
        if let Some(old) = self.backend.replace(Some(b)) {
            old.close();
        }
        Ok(())
    }

    /// This shard's TxID set (owned TxIDs only).
    pub fn txids(&self) -> &TxIdSet {
        &self.txids
    }

    /// This shard's frame store, when there is a backend.
    pub fn frames(&self) -> Option<&FrameStore> {
        self.frames.as_ref()
    }

    /// Claims `txid` on its owner: here if this shard owns it, else by a hop
    /// through the owner's inbox.
    pub async fn claim(self: &Rc<Self>, txid: &[u8]) -> Result<Verdict, EngineError> {
        check_len(txid, self.txids.txid_len())?;
        let owner = self.owner(txid);
        if owner == self.index {
            return Ok(self.txids.claim(txid).await);
        }
        let txid = txid.to_vec();
        submit(&self.peers[owner], owner, move |s| async move {
            s.txids.claim(&txid).await
        })
        .await
    }

    /// Runs `op` where its key lives: the owner of `route_key` for a store
    /// partitioned by shard (memory), this shard for a shared store.
    pub async fn op(self: &Rc<Self>, route_key: &[u8], op: Op) -> Result<Reply, EngineError> {
        let owner = self.owner(route_key);
        if owner == self.index || !self.partitioned.get() {
            return self.op_here(op).await;
        }
        submit(&self.peers[owner], owner, move |s| async move {
            s.op_here(op).await
        })
        .await?
    }

    async fn op_here(&self, op: Op) -> Result<Reply, EngineError> {
        let b = self.backend().ok_or(CacheError::Config(
            "no backend: the engine runs on tier-1 only".into(),
        ))?;
        Ok(match op {
            Op::SetNx { key, val, ttl } => Reply::SetNx(b.set_nx(&key, &val, ttl).await?),
            Op::Set { key, val, ttl } => {
                b.set(&key, &val, ttl).await?;
                Reply::Set
            }
            Op::Get { key } => Reply::Get(b.get(&key).await?),
            Op::Del { key } => {
                b.del(&key).await?;
                Reply::Del
            }
        })
    }
}

fn check_len(txid: &[u8], want: usize) -> Result<(), EngineError> {
    if txid.len() == want {
        Ok(())
    } else {
        Err(EngineError::TxIdLen {
            got: txid.len(),
            want,
        })
    }
}

/// Sends `f` to a shard's inbox and awaits its result; works from any thread
/// and any executor.
async fn submit<F, Fut, T>(door: &Door, shard: usize, f: F) -> Result<T, EngineError>
where
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (tx, rx) = flume::bounded(1);
    let job: Job = Box::new(move |s| {
        Box::pin(async move {
            let _ = tx.send(f(s).await);
        })
    });
    send(door, shard, job).await?;
    until_dead(door, shard, rx.recv_async()).await
}

/// Queues `job` on the shard behind `door` (waiting while its inbox is
/// full), unless its thread has ended.
async fn send(door: &Door, shard: usize, job: Job) -> Result<(), EngineError> {
    until_dead(door, shard, door.inbox.send_async(Msg::Job(job))).await
}

/// `fut`, or `ShardStopped` once the shard's thread has ended (or when
/// `fut` fails: a channel the shard dropped).
async fn until_dead<T, E>(
    door: &Door,
    shard: usize,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, EngineError> {
    let dead = async {
        let _ = door.alive.recv_async().await;
        Err(EngineError::ShardStopped(shard))
    };
    futures_lite::future::or(
        async { fut.await.map_err(|_| EngineError::ShardStopped(shard)) },
        dead,
    )
    .await
}

/// A running set of shards. `Send + Sync`: share it by reference or `Arc`.
pub struct Engine {
    doors: Vec<Door>,
    /// Dropped to stop the shards: a signal outside the inboxes, so a full
    /// inbox, or a shard whose job slots are all taken, cannot hold it up.
    stops: Mutex<Vec<flume::Sender<()>>>,
    cores: Vec<usize>,
    txid_len: usize,
    threads: Mutex<Vec<ExecutorJoinHandle<()>>>,
}

impl Engine {
    /// Starts one pinned executor per core, builds each shard's state and
    /// backend, and returns once every shard is serving — or the first error.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let cores = if config.cores.is_empty() {
            affinity_cores().map_err(EngineError::Affinity)?
        } else {
            config.cores.clone()
        };
        if cores.is_empty() {
            return Err(EngineError::NoCores);
        }
        let n = cores.len();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| flume::bounded::<Msg>(config.inbox_capacity.max(1)))
            .unzip();
        let (alive_txs, alive_rxs): (Vec<_>, Vec<_>) =
            (0..n).map(|_| flume::bounded::<()>(0)).unzip();
        let doors: Vec<Door> = senders
            .iter()
            .zip(&alive_rxs)
            .map(|(inbox, alive)| Door {
                inbox: inbox.clone(),
                alive: alive.clone(),
            })
            .collect();
        let (stops, stop_rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| flume::bounded::<()>(1)).unzip();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<(), String>)>();
        let mut engine = Engine {
            doors: doors.clone(),
            stops: Mutex::new(stops),
            cores: cores.clone(),
            txid_len: config.txidset.txid_len,
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        for (index, (((core, inbox), stop), alive)) in cores
            .iter()
            .copied()
            .zip(receivers)
            .zip(stop_rxs)
            .zip(alive_txs)
            .enumerate()
        {
            let (peers, config, ready) = (doors.clone(), config.clone(), ready_tx.clone());
            let mut builder = LocalExecutorBuilder::new(Placement::Fixed(core))
                .name(&format!("txgate-shard-{index}"))
                .io_memory(IO_MEMORY_BYTES)
                .preempt_timer(config.preempt_every);
            if !config.spin_before_park.is_zero() {
                builder = builder.spin_before_park(config.spin_before_park);
            }
            let spawned = builder.spawn(move || async move {
                ALIVE.with(|a| *a.borrow_mut() = Some(alive));
                let wiring = Wiring {
                    peers,
                    inbox,
                    stop,
                    ready,
                };
                run_shard(index, core, n, config, wiring).await
            });
            match spawned {
                Ok(h) => engine.threads.get_mut().expect("not shared yet").push(h),
                Err(e) => {
                    engine.stop();
                    return Err(EngineError::Start {
                        shard: index,
                        core,
                        reason: e.to_string(),
                    });
                }
            }
        }
        drop(ready_tx);
        let deadline = std::time::Instant::now() + config.start_timeout;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let failure = match ready_rx.recv_timeout(left) {
                Ok((_, Ok(()))) => continue,
                Ok((shard, Err(reason))) => EngineError::Start {
                    shard,
                    core: cores[shard],
                    reason,
                },
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    EngineError::StartTimeout(config.start_timeout)
                }
                // Every shard thread is gone: an executor failed to build.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let reasons = engine.stop();
                    let (shard, reason) = reasons
                        .into_iter()
                        .next()
                        .unwrap_or((0, "executor exited".into()));
                    return Err(EngineError::Start {
                        shard,
                        core: cores[shard],
                        reason,
                    });
                }
            };
            engine.stop();
            return Err(failure);
        }
        Ok(engine)
    }

    /// Shards in the engine.
    pub fn shards(&self) -> usize {
        self.doors.len()
    }

    /// The CPU of each shard, by index.
    pub fn cores(&self) -> &[usize] {
        &self.cores
    }

    /// The shard owning `key`.
    pub fn owner(&self, key: &[u8]) -> usize {
        route(key, self.shards() as u32) as usize
    }

    /// Runs `f` on shard `shard` and returns its result. Callable from any
    /// thread or executor; waits while the shard's inbox is full.
    pub async fn run_on<F, Fut, T>(&self, shard: usize, f: F) -> Result<T, EngineError>
    where
        F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let door = self
            .doors
            .get(shard)
            .ok_or(EngineError::ShardStopped(shard))?;
        submit(door, shard, f).await
    }

    /// Runs `f` on every shard at once; results by shard index.
    pub async fn on_every_shard<F, Fut, T>(&self, f: F) -> Result<Vec<T>, EngineError>
    where
        F: Fn(Rc<Shard>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let mut replies = Vec::with_capacity(self.shards());
        for (i, door) in self.doors.iter().enumerate() {
            let (tx, rx) = flume::bounded(1);
            let f = f.clone();
            let job: Job = Box::new(move |s| {
                Box::pin(async move {
                    let _ = tx.send(f(s).await);
                })
            });
            send(door, i, job).await?;
            replies.push(rx);
        }
        let mut out = Vec::with_capacity(replies.len());
        for (i, rx) in replies.into_iter().enumerate() {
            out.push(until_dead(&self.doors[i], i, rx.recv_async()).await?);
        }
        Ok(out)
    }

    /// Claims `txid` on its owner shard: forward or suppress.
    pub async fn claim(&self, txid: &[u8]) -> Result<Verdict, EngineError> {
        check_len(txid, self.txid_len)?;
        let txid = txid.to_vec();
        self.run_on(self.owner(&txid), move |s| async move {
            s.txids.claim(&txid).await
        })
        .await
    }

    /// [`Engine::claim`] for plain threads: blocks until the verdict.
    pub fn claim_blocking(&self, txid: &[u8]) -> Result<Verdict, EngineError> {
        futures_lite::future::block_on(self.claim(txid))
    }

    /// Runs a backend op on the owner shard of `route_key`.
    pub async fn op(&self, route_key: &[u8], op: Op) -> Result<Reply, EngineError> {
        self.run_on(self.owner(route_key), move |s| async move {
            s.op_here(op).await
        })
        .await?
    }

    /// [`Engine::op`] for plain threads.
    pub fn op_blocking(&self, route_key: &[u8], op: Op) -> Result<Reply, EngineError> {
        futures_lite::future::block_on(self.op(route_key, op))
    }

    /// Stops every shard (in-flight jobs get a bounded grace) and joins them.
    pub fn shutdown(self) -> Result<(), EngineError> {
        self.close()
    }

    /// [`Engine::shutdown`] through a shared reference: the shards stop and
    /// their threads are joined; later calls get `ShardStopped`. For an
    /// engine others may still hold (a readiness probe, a store retry).
    pub fn close(&self) -> Result<(), EngineError> {
        match self.stop().into_iter().next() {
            None => Ok(()),
            Some((shard, reason)) => Err(EngineError::Start {
                shard,
                core: self.cores[shard],
                reason,
            }),
        }
    }

    /// Stops and joins; returns the errors shard threads ended with.
    fn stop(&self) -> Vec<(usize, String)> {
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut errors = Vec::new();
        for (i, h) in threads.into_iter().enumerate() {
            if let Err(e) = h.join() {
                errors.push((i, e.to_string()));
            }
        }
        errors
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a shard's thread is given to talk to the rest of the engine.
struct Wiring {
    /// Every shard's door, this one's included.
    peers: Vec<Door>,
    inbox: flume::Receiver<Msg>,
    /// Disconnects when the engine stops.
    stop: flume::Receiver<()>,
    /// Where the shard reports that it serves, or why it could not start.
    ready: std::sync::mpsc::Sender<(usize, Result<(), String>)>,
}

async fn run_shard(index: usize, core: usize, shards: usize, config: EngineConfig, wiring: Wiring) {
    let Wiring {
        peers,
        inbox,
        stop,
        ready,
    } = wiring;
    let built = async {
        let backend = match &config.backend {
            Some(b) => Some(Rc::new(b.connect_shard(index, shards).await?)),
            None => None,
        };
        let txids = TxIdSet::new(&config.txidset, index, backend.clone())?;
        let frames = match &backend {
            Some(b) => Some(FrameStore::new(
                Some(b.clone()),
                &config.frame_prefix,
                config.frame_hash_key_len,
                config.frame_ttl,
            )?),
            None => None,
        };
        Ok::<_, EngineError>(Rc::new(Shard {
            index,
            core,
            shards,
            partitioned: Cell::new(
                config
                    .backend
                    .as_ref()
                    .is_some_and(Backend::partitioned_by_shard),
            ),
            backend: RefCell::new(backend),
            txids,
            frames,
            peers,
        }))
    }
    .await;
    let shard = match built {
        Ok(s) => {
            let _ = ready.send((index, Ok(())));
            s
        }
        Err(e) => {
            let _ = ready.send((index, Err(e.to_string())));
            return;
        }
    };
    drop(ready);

    // Kept, not detached: dropping the handle at exit cancels the task, so
    // nothing holds the shard (and its tier-1 memory) after shutdown.
    let upkeep = shard.clone();
    let upkeep = glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(MAINTENANCE_INTERVAL).await;
            upkeep.txids.sweep(TIER1_SWEEP_BUDGET);
            if let Some(b) = upkeep.backend() {
                b.maintain();
            }
        }
    });

    let jobs_max = config.jobs_max.max(1) as u64;
    let jobs = Rc::new(glommio::sync::Semaphore::new(jobs_max));
    // Closed at the end of the grace period: every job still running then
    // is dropped, which drops its reply sender (its caller sees ShardStopped).
    let cancel = Rc::new(glommio::sync::Semaphore::new(0));
    loop {
        // Jobs already queued first: submitted before the stop, they get the
        // grace; the stop wins once the inbox is empty.
        let next =
            futures_lite::future::or(async { inbox.recv_async().await.ok() }, stopped(&stop));
        let Some(Msg::Job(job)) = next.await else {
            break;
        };
        // A free slot (first: a job taken before the stop runs if one is
        // free) or the stop while waiting for one: jobs that never end must
        // not hold the stop up.
        let slot = futures_lite::future::or(
            async { jobs.acquire_static_permit(1).await.ok() },
            stopped(&stop),
        );
        let Some(permit) = slot.await else {
            // Dropped unrun: its caller sees ShardStopped.
            break;
        };
        let (s, cancel) = (shard.clone(), cancel.clone());
        glommio::spawn_local(async move {
            let cancelled = async {
                let _ = cancel.acquire(1).await;
            };
            futures_lite::future::or(job(s), cancelled).await;
            drop(permit);
        })
        .detach();
    }
    // Stop: refuse what is queued, give running jobs a bounded grace, then
    // cancel the rest and wait (briefly) for them to unwind.
    drop(inbox.drain());
    let grace = Duration::from_secs(1);
    if glommio::timer::timeout(grace, jobs.acquire(jobs_max))
        .await
        .is_err()
    {
        cancel.close();
        let unwind = Duration::from_millis(100);
        let _ = glommio::timer::timeout(unwind, jobs.acquire(jobs_max)).await;
    }
    drop(upkeep);
    if let Some(b) = shard.backend() {
        b.close();
    }
}

/// `None` once the engine drops its stop sender: raced against every wait
/// of a shard's job loop.
async fn stopped<T>(stop: &flume::Receiver<()>) -> Option<T> {
    let _ = stop.recv_async().await;
    None
}

/// Runs `fut` to completion on a fresh, unpinned executor on this thread,
/// sized like the engine's (small io_uring memory). For tools and tests.
pub fn run_local<T>(fut: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(IO_MEMORY_BYTES)
        .make()
        .expect("building a glommio executor (is RLIMIT_MEMLOCK at least 512 KiB?)")
        .run(fut)
}
