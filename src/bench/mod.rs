//! `txgate bench`: the per-core claim latency benchmark.
//!
//! Every shard generates its own synthetic TxID stream (only TxIDs it owns, so
//! no claim crosses cores), claims each one through its TxID set exactly as the
//! gate would, and records the latency of every claim in one histogram for
//! duplicates and one for novel TxIDs. `inflight` tasks per shard keep that
//! many claims outstanding (it matters for network backends).

pub mod report;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineError};
use crate::route::{TXID_LEN_MAX, route};
use crate::txidset::{ClaimCounters, Forward, Suppress, Verdict};
use report::{BenchResult, ShardResult, new_histogram};

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long.
    Duration(Duration),
    /// After this many claims over all shards.
    Claims(u64),
}

/// What stream to generate and how hard to push it.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub stop: Stop,
    /// Fraction of claims that repeat an earlier TxID (0..=1).
    pub duplicate_ratio: f64,
    /// Most copies of one TxID, the first included (≥ 1).
    pub copies: u32,
    /// Claims outstanding per shard.
    pub inflight: usize,
    /// Seeds the TxID generator; vary it so runs against a shared store
    /// never collide with earlier runs' keys.
    pub seed: u64,
    /// Print a live progress line (stdout is a terminal).
    pub progress: bool,
    /// Offered load in claims/s over all shards (open loop); `None`: as fast
    /// as `inflight` allows. Paced latency runs from each claim's scheduled
    /// start, so a stall shows in the figures instead of hiding
    /// (coordinated omission).
    pub rate: Option<f64>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            stop: Stop::Duration(Duration::from_secs(10)),
            duplicate_ratio: 0.9,
            copies: 16,
            inflight: 1,
            seed: 1,
            progress: false,
            rate: None,
        }
    }
}

/// Results plus what the stream really was.
pub struct BenchOutcome {
    pub result: BenchResult,
    /// Claim outcomes summed over shards, from the TxID sets' counters.
    pub verdicts: ClaimCounters,
    /// Duplicates the stream generated / all claims.
    pub duplicate_ratio: f64,
    /// Duplicates that were forwarded or novel TxIDs that were suppressed:
    /// 0 on a healthy backend.
    pub anomalies: u64,
    /// Process CPU time (user, system) spent during the run, ns: on pinned
    /// cores, CPU per claim is what a deployment pays.
    pub cpu_user_ns: u64,
    pub cpu_sys_ns: u64,
    /// Paced duration runs only: claims due before the end that were never
    /// made. Their latency is missing from the histograms, so a run that
    /// fell behind must say how much it left out.
    pub unmade: Unmade,
}

/// Claims a paced run scheduled before its end but never started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unmade {
    /// How many, over all shards.
    pub claims: u64,
    /// How long the oldest of them had been due when the run ended, ns: a
    /// lower bound on the latency it would have had.
    pub oldest_wait_ns: u64,
}

/// What a paced shard left unmade: claims `made..due` of a schedule with one
/// claim every `every` from `started`, the run ending at `deadline`.
fn unmade(started: Instant, every: Duration, deadline: Instant, made: u64) -> Unmade {
    let span = deadline.saturating_duration_since(started);
    // Claim k is due at started + k·every; those with a due time before the
    // deadline were owed.
    let due = span.as_nanos().div_ceil(every.as_nanos().max(1)) as u64;
    if made >= due {
        return Unmade::default();
    }
    let oldest_due = started + every.mul_f64(made as f64);
    Unmade {
        claims: due - made,
        oldest_wait_ns: deadline.saturating_duration_since(oldest_due).as_nanos() as u64,
    }
}

/// This process's (user, system) CPU time so far, ns.
fn process_cpu_ns() -> (u64, u64) {
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_SELF always exists.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    (ns(usage.ru_utime), ns(usage.ru_stime))
}

/// Most TxIDs kept for repeating; duplicates are drawn from this window.
const WINDOW: usize = 4096;
/// Leading bytes of a novel TxID taken from a counter: the shortest TxID the
/// benchmark generates.
pub const NOVEL_COUNTER_BYTES: usize = 8;

/// splitmix64's finalizer: a bijection on u64.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
/// Claims between cooperative yields, so a shard's other tasks (inbox,
/// maintenance) run even when claims never wait.
const YIELD_EVERY: u32 = 64;
/// A paced claim this close to its start time goes now rather than sleeping.
const PACE_SLACK: Duration = Duration::from_micros(20);

/// A shard's synthetic stream: TxIDs owned by `shard`, a chosen share of them
/// repeats of recent ones, each TxID at most `copies` times.
pub struct Stream {
    shard: u32,
    shards: u32,
    txid_len: usize,
    rng: u64,
    dup_ratio: f64,
    copies: u32,
    ids: Vec<u8>,
    left: Vec<u32>,
    next_slot: usize,
    /// Novel TxIDs are a bijection of this counter (salted per shard), so
    /// none repeats by chance.
    novel_seq: u64,
    salt: u64,
}

impl Stream {
    /// A stream for `shard` of `shards`.
    pub fn new(shard: usize, shards: usize, txid_len: usize, cfg: &BenchConfig) -> Self {
        assert!(
            (NOVEL_COUNTER_BYTES..=TXID_LEN_MAX).contains(&txid_len),
            "bench TxIDs are {NOVEL_COUNTER_BYTES}..={TXID_LEN_MAX} bytes"
        );
        let rng = cfg.seed ^ (shard as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            shard: shard as u32,
            shards: shards as u32,
            txid_len,
            rng,
            dup_ratio: cfg.duplicate_ratio.clamp(0.0, 1.0),
            copies: cfg.copies.max(1),
            ids: vec![0; WINDOW * txid_len],
            left: vec![0; WINDOW],
            next_slot: 0,
            novel_seq: 0,
            salt: mix64(rng ^ 0x5851_F42D_4C95_7F2D),
        }
    }

    fn rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.rng)
    }

    /// Writes the next TxID into `out` (its first `txid_len` bytes); true
    /// when it repeats an earlier one.
    pub fn next_into(&mut self, out: &mut [u8]) -> bool {
        let n = self.txid_len;
        let unit = (self.rand() >> 11) as f64 / (1u64 << 53) as f64;
        let want_dup = unit < self.dup_ratio;
        if want_dup {
            let slot = (self.rand() % WINDOW as u64) as usize;
            if self.left[slot] > 0 {
                self.left[slot] -= 1;
                out[..n].copy_from_slice(&self.ids[slot * n..(slot + 1) * n]);
                return true;
            }
        }
        // A novel TxID owned by this shard: expect `shards` tries; the bound
        // only guards against a broken route. Its first 8 bytes are a
        // bijection of a counter, so it never equals an earlier one (a
        // random draw could, and at short lengths often did: a false
        // anomaly); the rest is random.
        for _ in 0..self.shards as usize * 64 + 64 {
            self.novel_seq += 1;
            let unique = mix64(self.novel_seq ^ self.salt).to_le_bytes();
            out[..NOVEL_COUNTER_BYTES].copy_from_slice(&unique);
            for chunk in out[NOVEL_COUNTER_BYTES..n].chunks_mut(8) {
                let r = self.rand().to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
            if route(&out[..n], self.shards) == self.shard {
                break;
            }
        }
        let slot = self.next_slot;
        self.next_slot = (slot + 1) % WINDOW;
        self.ids[slot * n..(slot + 1) * n].copy_from_slice(&out[..n]);
        self.left[slot] = self.copies - 1;
        false
    }
}

/// Runs the benchmark on every shard of `engine` and gathers the results.
pub fn run(engine: &Engine, backend: &str, cfg: &BenchConfig) -> Result<BenchOutcome, EngineError> {
    let shards = engine.shards();
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let progress = cfg.progress.then(|| {
        let (done, finished, stop) = (done.clone(), finished.clone(), cfg.stop);
        std::thread::spawn(move || progress_line(&done, &finished, stop))
    });
    let started = Instant::now();
    let cpu_before = process_cpu_ns();
    let cfg2 = cfg.clone();
    let done2 = done.clone();
    let per_shard = futures_lite::future::block_on(engine.on_every_shard(move |s| {
        let (cfg, done) = (cfg2.clone(), done2.clone());
        async move { run_shard(s, cfg, done).await }
    }));
    // The measured phase ends here, before the progress thread is joined
    // (it may be in a 250 ms sleep).
    let elapsed_ns = started.elapsed().as_nanos() as u64;
    let cpu_after = process_cpu_ns();
    finished.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let per_shard = per_shard?;
    let mut verdicts = ClaimCounters::default();
    let (mut dups, mut anomalies) = (0u64, 0u64);
    let mut results = Vec::with_capacity(shards);
    let mut unmade = Unmade::default();
    for (r, c, a, u) in per_shard {
        verdicts.add(&c);
        dups += r.duplicate.as_slice().iter().sum::<u64>();
        anomalies += a;
        unmade.claims += u.claims;
        unmade.oldest_wait_ns = unmade.oldest_wait_ns.max(u.oldest_wait_ns);
        results.push(r);
    }
    let claims = verdicts.claims().max(1);
    Ok(BenchOutcome {
        result: BenchResult {
            backend: backend.to_owned(),
            shards: results,
            elapsed_ns,
        },
        verdicts,
        duplicate_ratio: dups as f64 / claims as f64,
        anomalies,
        cpu_user_ns: cpu_after.0.saturating_sub(cpu_before.0),
        cpu_sys_ns: cpu_after.1.saturating_sub(cpu_before.1),
        unmade,
    })
}

async fn run_shard(
    s: Rc<crate::engine::Shard>,
    cfg: BenchConfig,
    done: Arc<AtomicU64>,
) -> (ShardResult, ClaimCounters, u64, Unmade) {
    let before = s.txids().counters();
    let quota = match cfg.stop {
        Stop::Claims(n) => {
            let (q, r) = (n / s.shards() as u64, n % s.shards() as u64);
            q + (s.index() < r as usize) as u64
        }
        Stop::Duration(_) => u64::MAX,
    };

    let txid_len = s.txids().txid_len();
    let state = Rc::new(ShardRun {
        stream: RefCell::new(Stream::new(s.index(), s.shards(), txid_len, &cfg)),
        duplicate: RefCell::new(new_histogram()),
        novel: RefCell::new(new_histogram()),
        issued: Cell::new(0),
        made: Cell::new(0),
        anomalies: Cell::new(0),
    });
    let started = Instant::now();
    // From the same instant as the pacing: claims due before it are owed.
    let deadline = match cfg.stop {
        Stop::Duration(d) => Some(started + d),
        Stop::Claims(_) => None,
    };
    let interval = cfg
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(s.shards() as f64 / r));
    let tasks: Vec<_> = (0..cfg.inflight.max(1))
        .map(|_| {
            let (s, st, done) = (s.clone(), state.clone(), done.clone());
            glommio::spawn_local(async move {
                let mut id = [0u8; TXID_LEN_MAX];
                let mut since_yield = 0u32;
                let mut unreported = 0u64;
                loop {
                    if st.issued.get() >= quota {
                        break;
                    }
                    let k = st.issued.get();
                    st.issued.set(k + 1);
                    let dup = st.stream.borrow_mut().next_into(&mut id);
                    let t0 = match interval {
                        Some(every) => {
                            let due = started + every.mul_f64(k as f64);
                            // A claim due after the run's end is not made:
                            // a task must not sleep past the deadline.
                            if deadline.is_some_and(|d| due >= d) {
                                break;
                            }
                            let now = Instant::now();
                            if due > now + PACE_SLACK {
                                glommio::timer::sleep(due - now).await;
                            }
                            // From the scheduled start when it is late (a
                            // stall counts), from now when it went early.
                            due.min(Instant::now())
                        }
                        None => Instant::now(),
                    };
                    st.made.set(st.made.get() + 1);
                    let v = s.txids().claim(&id[..txid_len]).await;
                    let t1 = Instant::now();
                    let ns = (t1 - t0).as_nanos() as u64;
                    let h = if dup { &st.duplicate } else { &st.novel };
                    let _ = h.borrow_mut().increment(ns);
                    st.anomalies
                        .set(st.anomalies.get() + is_anomaly(dup, v) as u64);
                    unreported += 1;
                    if unreported == 1024 {
                        done.fetch_add(unreported, Ordering::Relaxed);
                        unreported = 0;
                    }
                    if deadline.is_some_and(|d| t1 >= d) {
                        break;
                    }
                    since_yield += 1;
                    if since_yield == YIELD_EVERY {
                        since_yield = 0;
                        glommio::yield_if_needed().await;
                    }
                }
                done.fetch_add(unreported, Ordering::Relaxed);
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let elapsed_ns = started.elapsed().as_nanos() as u64;
    let after = s.txids().counters();
    let state = Rc::try_unwrap(state).ok().expect("all tasks joined");
    let unmade = match (interval, deadline) {
        (Some(every), Some(deadline)) => unmade(started, every, deadline, state.made.get()),
        _ => Unmade::default(),
    };
    (
        ShardResult {
            shard: s.index(),
            core: s.core(),
            elapsed_ns,
            duplicate: state.duplicate.into_inner(),
            novel: state.novel.into_inner(),
        },
        diff(&after, &before),
        state.anomalies.get(),
        unmade,
    )
}

struct ShardRun {
    stream: RefCell<Stream>,
    duplicate: RefCell<histogram::Histogram>,
    novel: RefCell<histogram::Histogram>,
    issued: Cell<u64>,
    /// Claims started (`issued` also counts the one a task drew and then
    /// left because it was due after the end).
    made: Cell<u64>,
    anomalies: Cell<u64>,
}

/// A duplicate that went out, or a novel TxID that did not (fail-open
/// forwards of duplicates are the backend's fault, counted apart).
fn is_anomaly(dup: bool, v: Verdict) -> bool {
    matches!(
        (dup, v),
        (true, Verdict::Forward(Forward::Won))
            | (false, Verdict::Suppress(Suppress::Seen | Suppress::Lost))
    )
}

fn diff(a: &ClaimCounters, b: &ClaimCounters) -> ClaimCounters {
    ClaimCounters {
        won: a.won - b.won,
        fail_open: a.fail_open - b.fail_open,
        seen: a.seen - b.seen,
        lost: a.lost - b.lost,
        pending: a.pending - b.pending,
        backend_errors: a.backend_errors - b.backend_errors,
        backend_timeouts: a.backend_timeouts - b.backend_timeouts,
        pending_full: a.pending_full - b.pending_full,
        backend_calls: a.backend_calls - b.backend_calls,
    }
}

fn progress_line(done: &AtomicU64, finished: &AtomicBool, stop: Stop) {
    use std::io::Write;
    let start = Instant::now();
    let mut last = (start, 0u64);
    // Bounded: the run ends by duration or count; this loop ends with it.
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        if now - last.0 < Duration::from_secs(1) {
            continue;
        }
        let n = done.load(Ordering::Relaxed);
        let rate = (n - last.1) as f64 / (now - last.0).as_secs_f64();
        let of = match stop {
            Stop::Duration(d) => {
                format!("{:.0}/{:.0}s", (now - start).as_secs_f64(), d.as_secs_f64())
            }
            Stop::Claims(c) => format!("{n}/{c} claims"),
        };
        print!("\r  {of}  {n} claims  {:.0} claims/s    ", rate);
        let _ = std::io::stdout().flush();
        last = (now, n);
    }
    print!("\r{:60}\r", "");
    let _ = std::io::stdout().flush();
}

/// The report's JSON plus what the stream and the verdicts were.
pub fn outcome_json(o: &BenchOutcome, cfg: &BenchConfig) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&report::render_json(&o.result)).expect("report renders valid JSON");
    let c = &o.verdicts;
    v["settings"] = serde_json::json!({
        "duplicate_ratio_requested": cfg.duplicate_ratio,
        "duplicate_ratio": o.duplicate_ratio,
        "copies": cfg.copies,
        "inflight": cfg.inflight,
        "rate": cfg.rate,
        "seed": cfg.seed,
    });
    v["verdicts"] = serde_json::json!({
        "won": c.won, "fail_open": c.fail_open, "seen": c.seen, "lost": c.lost,
        "pending": c.pending, "backend_errors": c.backend_errors,
        "backend_timeouts": c.backend_timeouts, "pending_full": c.pending_full,
        "anomalies": o.anomalies,
    });
    if cfg.rate.is_some() {
        v["unmade"] = serde_json::json!({
            "claims": o.unmade.claims,
            "oldest_wait_ms": o.unmade.oldest_wait_ns as f64 / 1e6,
        });
    }
    v["warnings"] = serde_json::json!(warnings(o, cfg));
    v["cpu"] = serde_json::json!({
        "user_ns": o.cpu_user_ns,
        "sys_ns": o.cpu_sys_ns,
        "ns_per_claim": cpu_ns_per_claim(o),
    });
    serde_json::to_string_pretty(&v).expect("serializable")
}

/// Share of its offered load a paced run must achieve to have kept up.
const KEPT_UP: f64 = 0.95;

/// Why a run's figures may not measure what they say, one line each: claims
/// that failed open (counted in claims/s and in the latencies, but not store
/// round trips), and a paced run that fell behind its offered load.
pub fn warnings(o: &BenchOutcome, cfg: &BenchConfig) -> Vec<String> {
    let mut w = Vec::new();
    let c = &o.verdicts;
    if c.fail_open > 0 {
        w.push(format!(
            "{} of {} claims failed open ({} store errors, {} of them timeouts, {} with the \
             single-flight table full): claims/s and the latencies include them, so they \
             do not measure store round trips alone",
            c.fail_open,
            c.claims(),
            c.backend_errors,
            c.backend_timeouts,
            c.pending_full
        ));
    }
    if let Some(rate) = cfg.rate {
        let achieved = report::total_claims_per_sec(&o.result);
        if achieved < KEPT_UP * rate {
            w.push(format!(
                "offered {rate:.0} claims/s, achieved {achieved:.0}: the run fell behind its \
                 pacing; {} claims due before the end were never made (the oldest had \
                 waited {:.1} ms) and are not in the latencies",
                o.unmade.claims,
                o.unmade.oldest_wait_ns as f64 / 1e6
            ));
        }
    }
    w
}

/// User + system CPU of the whole process during the run, per claim.
pub fn cpu_ns_per_claim(o: &BenchOutcome) -> f64 {
    (o.cpu_user_ns + o.cpu_sys_ns) as f64 / o.verdicts.claims().max(1) as f64
}

/// One line on the CPU the run cost.
pub fn cpu_line(o: &BenchOutcome) -> String {
    format!(
        "cpu: {:.0} ns per claim (user {:.2} s, sys {:.2} s over the run, all shards)",
        cpu_ns_per_claim(o),
        o.cpu_user_ns as f64 / 1e9,
        o.cpu_sys_ns as f64 / 1e9
    )
}

/// One line on what happened to the claims.
pub fn verdict_line(o: &BenchOutcome) -> String {
    let c = &o.verdicts;
    format!(
        "verdicts: forwarded {} (won {}, fail-open {}), suppressed {} (seen {}, lost {}, pending {}); duplicates {:.1}% of claims; anomalies {}",
        c.won + c.fail_open,
        c.won,
        c.fail_open,
        c.seen + c.lost + c.pending,
        c.seen,
        c.lost,
        c.pending,
        o.duplicate_ratio * 100.0,
        o.anomalies
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_yields_owned_txids_at_about_the_requested_duplicate_ratio() {
        let cfg = BenchConfig {
            duplicate_ratio: 0.5,
            copies: 1000,
            ..Default::default()
        };
        let mut s = Stream::new(2, 4, 16, &cfg);
        let mut id = [0u8; TXID_LEN_MAX];
        let mut dups = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let dup = s.next_into(&mut id);
            assert_eq!(route(&id[..16], 4), 2);
            assert_eq!(
                dup,
                !seen.insert(id[..16].to_vec()),
                "duplicate flag matches history"
            );
            dups += dup as u32;
        }
        let ratio = dups as f64 / 100_000.0;
        assert!((0.45..0.55).contains(&ratio), "{ratio}");
    }

    #[test]
    fn unmade_claims_are_the_schedule_past_those_made() {
        let t0 = Instant::now();
        let every = Duration::from_millis(1);
        let end = t0 + Duration::from_millis(100);
        // Claims 0..=99 were due before the end.
        assert_eq!(unmade(t0, every, end, 100), Unmade::default());
        assert_eq!(unmade(t0, every, end, 120), Unmade::default());
        let u = unmade(t0, every, end, 40);
        assert_eq!(u.claims, 60);
        assert_eq!(u.oldest_wait_ns, 60_000_000);
        // A deadline not on the grid still owes the claim due just before it.
        let u = unmade(t0, every, end + Duration::from_micros(500), 100);
        assert_eq!(u.claims, 1);
        assert_eq!(u.oldest_wait_ns, 500_000);
    }

    #[test]
    fn copies_bound_repeats_of_one_txid() {
        let cfg = BenchConfig {
            duplicate_ratio: 1.0,
            copies: 3,
            ..Default::default()
        };
        let mut s = Stream::new(0, 1, 8, &cfg);
        let mut id = [0u8; TXID_LEN_MAX];
        let mut counts = std::collections::HashMap::new();
        for _ in 0..50_000 {
            s.next_into(&mut id);
            *counts.entry(id[..8].to_vec()).or_insert(0u32) += 1;
        }
        assert!(counts.values().all(|&n| n <= 3));
        assert!(counts.values().any(|&n| n == 3));
    }
}
