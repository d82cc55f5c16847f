//! The measuring core of `benches/aerospike_peers.rs`, shared with its smoke
//! test (`tests/aerospike_peers_smoke.rs`): txgate's Aerospike backend
//! against the official client (`aerospike-core`, its async API), both
//! issuing novel create-only writes against the same server with the same
//! number of writes in flight.
//!
//! - txgate: `cache::open` and one `ShardBackend` on one glommio executor
//!   (pinned to the client core when asked), `depth` tasks calling `set_nx`
//!   — the shard's pipelined connections, `conns_per_node` per node.
//! - official: one `aerospike_core::Client` on a tokio runtime of ours,
//!   `depth` tasks calling `put` with `RecordExistsAction::CreateOnly`. It
//!   sends one command per connection at a time, so `depth` in flight means
//!   up to `depth` connections per node.
//! - blocking (depth 1 only): one `std::net::TcpStream` to the first seed,
//!   each write encoded with txgate's codec, one `write(2)` and blocking
//!   `read(2)`s until the reply is whole. No client can spend less CPU on an
//!   op that must wait out a round trip (one sleep and wake-up per op), so
//!   its row is the floor the others are judged against at depth 1.
//!
//! Every write is a fresh 24-byte blob key (16 bytes unique to the run, then
//! the op number), one 16-byte blob bin `v`, TTL `ttl_s`, no key sent. Each
//! run connects, warms up at its depth (connections opened, pools filled;
//! with `settle`, twice with a pause between, so a connection whose SYN a
//! busy listener dropped is up too), then measures: ops/s over the phase, every op's latency (exact
//! percentiles), and the process's CPU (`getrusage(RUSAGE_SELF)`, all
//! threads) over the phase. The server must not live in this process for
//! the CPU figure to be the client's alone: the bench runs its test server
//! in a child process.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The bin every write sets; txgate's default `--aero-bin`.
pub const BIN: &str = "v";
/// The value every write stores (16 bytes).
pub const VALUE: &[u8] = b"aerospike-peers!";
/// Key length: 16 bytes of run id, 8 bytes of op number.
pub const KEY_LEN: usize = 24;
/// Glommio's io_uring memory per executor, as txgate's engine sizes it.
const IO_MEMORY_BYTES: usize = 64 << 10;
/// Bound on the official client's `Client::new` (its tend must settle).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client side of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Client {
    /// txgate's backend with this many connections per node (one shard),
    /// pausing this many microseconds before reading more replies
    /// (`--aero-reply-gather`).
    Txgate {
        conns_per_node: usize,
        gather_us: u64,
    },
    /// The official Rust client's async API.
    Official,
    /// A bare blocking round trip per write (depth 1 only): the least CPU
    /// any client can spend when every op waits for its reply.
    Blocking,
}

impl Client {
    /// Short id for JSON and command lines: `txgate-c1-g30`, `official`,
    /// `blocking`.
    pub fn id(self) -> String {
        match self {
            Self::Txgate {
                conns_per_node,
                gather_us,
            } => format!("txgate-c{conns_per_node}-g{gather_us}"),
            Self::Official => "official".to_owned(),
            Self::Blocking => "blocking".to_owned(),
        }
    }

    /// Whether this client runs at `depth`: the blocking floor only at 1,
    /// the one depth where every client waits out a round trip per op.
    pub fn runs_at(self, depth: usize) -> bool {
        match self {
            Self::Blocking => depth <= 1,
            _ => true,
        }
    }

    /// Name for the table.
    pub fn label(self, default_conns: usize) -> String {
        match self {
            Self::Txgate {
                conns_per_node: n,
                gather_us: g,
            } => format!(
                "txgate {n} conn{}/node, gather {g}us{}",
                if n == 1 { "" } else { "s" },
                if n == default_conns && g == default_gather_us() {
                    " (default)"
                } else {
                    ""
                }
            ),
            Self::Official => "official client".to_owned(),
            Self::Blocking => "blocking round trip (floor)".to_owned(),
        }
    }
}

/// txgate's default `--aero-reply-gather`, in microseconds.
pub fn default_gather_us() -> u64 {
    txgate::cache::Config::default()
        .aero_reply_gather
        .as_micros() as u64
}

/// When a measured phase ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this many writes over all tasks.
    Ops(u64),
    /// After this long.
    Seconds(f64),
}

impl Stop {
    /// Whether op number `k` (0-based) should still be issued.
    #[inline]
    fn more(self, k: u64, started: Instant) -> bool {
        match self {
            Self::Ops(n) => k < n,
            Self::Seconds(s) => started.elapsed().as_secs_f64() < s,
        }
    }

    /// A capacity hint for one task's latency log.
    fn per_task_hint(self, depth: usize) -> usize {
        match self {
            Self::Ops(n) => (n as usize).div_ceil(depth.max(1)) + 16,
            Self::Seconds(_) => 4096,
        }
    }
}

/// How long each measured phase is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    /// This many writes at depth 1, and at every deeper depth.
    Ops {
        depth_1: u64,
        deeper: u64,
    },
    Seconds(f64),
}

impl Length {
    pub fn at(self, depth: usize) -> Stop {
        match self {
            Self::Ops { depth_1, .. } if depth <= 1 => Stop::Ops(depth_1),
            Self::Ops { deeper, .. } => Stop::Ops(deeper),
            Self::Seconds(s) => Stop::Seconds(s),
        }
    }
}

/// Enough writes to open every connection the depth needs and fill pools.
pub fn default_warmup_ops(depth: usize) -> u64 {
    (depth as u64 * 8).max(1000)
}

/// What to measure, against which server.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Seed nodes, `HOST:PORT`.
    pub hosts: Vec<String>,
    pub namespace: String,
    pub set: String,
    pub clients: Vec<Client>,
    pub depths: Vec<usize>,
    /// The measured phase's length.
    pub length: Length,
    /// Writes before each measured phase, at the same depth; `None`:
    /// [`default_warmup_ops`].
    pub warmup_ops: Option<u64>,
    pub runs: u32,
    /// CPU the client (this process) is pinned to; `None`: not pinned.
    pub core: Option<usize>,
    /// CPU the server process is pinned to, and its pid, when it is ours.
    pub server_core: Option<usize>,
    pub server_pid: Option<u32>,
    /// Every client's per-op deadline.
    pub op_timeout: Duration,
    /// Record TTL in seconds; 0 = never expire.
    pub ttl_s: u32,
    /// The official client's tokio runtime: 0 = current-thread, else a
    /// multi-thread runtime with this many workers.
    pub official_workers: usize,
    /// txgate's default `--aero-conns-per-node`, to name the default row.
    pub default_conns: usize,
    /// Pause between two warm-up passes, so connections whose SYN a busy
    /// listener dropped (retried after 1 s) are up before measuring; zero:
    /// one warm-up pass.
    pub settle: Duration,
    /// Before each run, wait up to this long for the client and server
    /// CPUs to be quiet (other work under [`QUIET_SHARE`]); zero: don't.
    pub quiet_wait: Duration,
    /// Print a line per run on stderr.
    pub progress: bool,
}

/// A CPU counts as quiet while other work takes less than this share of it.
pub const QUIET_SHARE: f64 = 0.10;
/// A run whose client CPU lost more than this share to other work is
/// listed as disturbed.
pub const DISTURBED_SHARE: f64 = 0.10;

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub client: String,
    pub conns_per_node: Option<usize>,
    /// txgate's reply gather in microseconds (`None`: the official and
    /// blocking clients).
    pub reply_gather_us: Option<u64>,
    pub depth: usize,
    pub round: u32,
    /// Writes completed in the measured phase (created + exists + errors).
    pub ops: u64,
    pub created: u64,
    /// Answered "exists": 0 with unique keys.
    pub exists: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Errors of the measured phase by message.
    pub error_kinds: BTreeMap<String, u64>,
    pub warmup_ops: u64,
    pub warmup_errors: u64,
    pub elapsed_ns: u64,
    pub ops_per_sec: f64,
    /// Exact percentiles over the phase's successful writes.
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    /// This process's user and system CPU over the phase (all threads).
    pub cpu_user_ns: u64,
    pub cpu_sys_ns: u64,
    pub cpu_ns_per_op: f64,
    /// The server process's CPU over the phase, per op (our server only;
    /// 10 ms ticks).
    pub server_cpu_ns_per_op: Option<f64>,
    /// Share of the server's core busy during the phase (our server only).
    pub server_core_busy: Option<f64>,
    /// Share of the client core that other processes took during the phase
    /// (`/proc/stat` busy time minus this process's CPU; pinned runs only).
    pub client_core_other: Option<f64>,
    /// TCP segments retransmitted and retransmission timeouts on the whole
    /// machine during the phase: a stall with these is the network's.
    pub tcp_retrans_segs: Option<u64>,
    pub tcp_rto_timeouts: Option<u64>,
    /// How long the run waited for quiet CPUs (`None`: not asked, or they
    /// never were within the bound).
    pub quiet_wait_ms: Option<u64>,
}

/// Medians over the runs of one (client, depth).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub client: String,
    pub label: String,
    pub conns_per_node: Option<usize>,
    /// txgate's reply gather in microseconds (`None`: the official and
    /// blocking clients).
    pub reply_gather_us: Option<u64>,
    pub depth: usize,
    pub runs: usize,
    pub ops_per_sec: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
    pub cpu_us_per_op: f64,
    pub server_cpu_us_per_op: Option<f64>,
    pub server_core_busy: Option<f64>,
    pub client_core_other: Option<f64>,
    /// Over all runs.
    pub ops: u64,
    pub exists: u64,
    pub errors: u64,
}

/// One of the targets, from the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub claim: String,
    pub measured: String,
    /// `None`: not measurable with this run's clients and depths, or
    /// informational.
    pub pass: Option<bool>,
    /// A figure to read the targets by, not a target (no verdict).
    pub informational: bool,
}

// ---------------------------------------------------------------- running

/// Runs every (round, depth, client) of `plan`; `before_run` is called
/// before each run (our server clears its records there).
pub fn run_all(
    plan: &Plan,
    mut before_run: impl FnMut() -> Result<(), String>,
) -> Result<Vec<RunResult>, String> {
    let mut results = Vec::new();
    let mut seq = 0u64;
    for round in 1..=plan.runs {
        for &depth in &plan.depths {
            // Rotate the order each round, so a drift of the machine or the
            // server's state does not always favour the same client.
            let mut order = plan.clients.clone();
            let n = order.len().max(1);
            order.rotate_left((round as usize - 1) % n);
            for client in order.into_iter().filter(|c| c.runs_at(depth)) {
                before_run()?;
                let waited = wait_quiet(plan);
                seq += 1;
                let mut r = run_one(plan, client, depth, round, seq)?;
                r.quiet_wait_ms = waited.map(|w| w.as_millis() as u64);
                if plan.progress {
                    eprintln!(
                        "  run {round}/{} depth {depth:>3} {:<28} {:>10}  p99 {:>9}  CPU {:>6.2} us/op  ({} ops, {} errors)",
                        plan.runs,
                        client.label(plan.default_conns),
                        fmt_rate(r.ops_per_sec),
                        fmt_ns(r.p99_ns as f64),
                        r.cpu_ns_per_op / 1e3,
                        r.ops,
                        r.errors
                    );
                }
                results.push(r);
            }
        }
    }
    Ok(results)
}

/// Waits (at most `plan.quiet_wait`) until the client and server CPUs are
/// quiet over 250 ms; returns how long it waited, `None` when not asked or
/// it gave up.
fn wait_quiet(plan: &Plan) -> Option<Duration> {
    if plan.quiet_wait.is_zero() {
        return None;
    }
    let cores: Vec<usize> = plan.core.into_iter().chain(plan.server_core).collect();
    if cores.is_empty() {
        return None;
    }
    let started = Instant::now();
    while started.elapsed() < plan.quiet_wait {
        let busy = |stat: &str| -> Vec<Option<f64>> {
            cores.iter().map(|&c| core_busy_ms(stat, c)).collect()
        };
        let (Ok(a), t0) = (std::fs::read_to_string("/proc/stat"), Instant::now()) else {
            return None;
        };
        std::thread::sleep(Duration::from_millis(250));
        let Ok(b) = std::fs::read_to_string("/proc/stat") else {
            return None;
        };
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        let quiet = busy(&a).iter().zip(busy(&b)).all(|(x, y)| {
            x.zip(y)
                .is_some_and(|(x, y)| (y - x) / wall_ms < QUIET_SHARE)
        });
        if quiet {
            return Some(started.elapsed());
        }
    }
    None
}

/// One measured run of `client` at `depth`.
pub fn run_one(
    plan: &Plan,
    client: Client,
    depth: usize,
    round: u32,
    seq: u64,
) -> Result<RunResult, String> {
    let depth = depth.max(1);
    let run_id = run_id(seq);
    let spec = Spec {
        hosts: plan.hosts.clone(),
        namespace: plan.namespace.clone(),
        set: plan.set.clone(),
        depth,
        stop: plan.length.at(depth),
        warmup: Stop::Ops(plan.warmup_ops.unwrap_or_else(|| default_warmup_ops(depth))),
        op_timeout: plan.op_timeout,
        ttl_s: plan.ttl_s,
        core: plan.core,
        probe: Probe {
            core: plan.core,
            server_core: plan.server_core,
            server_pid: plan.server_pid,
        },
        run_id,
        settle: plan.settle,
    };
    let m = match client {
        Client::Txgate {
            conns_per_node,
            gather_us,
        } => run_txgate(&spec, conns_per_node, gather_us)?,
        Client::Official => run_official(&spec, plan.official_workers)?,
        Client::Blocking => run_blocking(&spec)?,
    };
    Ok(m.into_result(client, depth, round))
}

/// 16 bytes no other run (of this process or an earlier one) uses.
fn run_id(seq: u64) -> [u8; 16] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(nanos ^ u64::from(std::process::id()) << 40).to_be_bytes());
    id[8..].copy_from_slice(&seq.to_be_bytes());
    id
}

struct Spec {
    hosts: Vec<String>,
    namespace: String,
    set: String,
    depth: usize,
    stop: Stop,
    warmup: Stop,
    op_timeout: Duration,
    ttl_s: u32,
    core: Option<usize>,
    probe: Probe,
    run_id: [u8; 16],
    settle: Duration,
}

/// The key prefix of pass `pass` of a run (0: measured, 1 and 2: warm-ups):
/// the passes' keys differ in the last byte.
fn prefix_of(run_id: [u8; 16], pass: u8) -> [u8; 16] {
    let mut p = run_id;
    p[15] ^= pass << 6;
    p
}

/// What one task saw.
#[derive(Debug, Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    created: u64,
    exists: u64,
    errors: u64,
    first_error: Option<String>,
    /// Errors by message (first line, at most [`ERROR_KINDS_MAX`] kinds).
    error_kinds: BTreeMap<String, u64>,
}

/// Distinct error messages a run keeps count of; the rest count as "other".
const ERROR_KINDS_MAX: usize = 8;

fn count_error(kinds: &mut BTreeMap<String, u64>, e: &str, n: u64) {
    let line = e.lines().next().unwrap_or_default();
    let key = if kinds.contains_key(line) || kinds.len() < ERROR_KINDS_MAX {
        line.to_owned()
    } else {
        "other".to_owned()
    };
    *kinds.entry(key).or_default() += n;
}

impl Tally {
    fn with_capacity(n: usize) -> Self {
        Self {
            latencies_ns: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    #[inline]
    fn record(&mut self, ns: u64, outcome: Result<bool, String>) {
        match outcome {
            Ok(created) => {
                self.latencies_ns.push(ns);
                if created {
                    self.created += 1;
                } else {
                    self.exists += 1;
                }
            }
            Err(e) => {
                self.errors += 1;
                count_error(&mut self.error_kinds, &e, 1);
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(mut self, o: Tally) -> Tally {
        self.latencies_ns.extend_from_slice(&o.latencies_ns);
        self.created += o.created;
        self.exists += o.exists;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        for (e, n) in &o.error_kinds {
            count_error(&mut self.error_kinds, e, *n);
        }
        self
    }

    fn ops(&self) -> u64 {
        self.created + self.exists + self.errors
    }
}

/// What a run measured, before it becomes a [`RunResult`].
struct Measured {
    warmup: Tally,
    phase: Tally,
    before: Snapshot,
    after: Snapshot,
}

impl Measured {
    fn into_result(self, client: Client, depth: usize, round: u32) -> RunResult {
        let Measured {
            warmup,
            mut phase,
            before,
            after,
        } = self;
        let ops = phase.ops();
        let elapsed_ns = after.at.duration_since(before.at).as_nanos() as u64;
        phase.latencies_ns.sort_unstable();
        let lat = &phase.latencies_ns;
        let cpu_user_ns = after.user_ns.saturating_sub(before.user_ns);
        let cpu_sys_ns = after.sys_ns.saturating_sub(before.sys_ns);
        let wall_ms = elapsed_ns as f64 / 1e6;
        let share = |busy: Option<f64>| busy.filter(|_| wall_ms > 0.0).map(|b| b / wall_ms);
        let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a - b).max(0.0));
        let server_cpu_ms = delta(after.server_cpu_ms, before.server_cpu_ms);
        let own_ms = (cpu_user_ns + cpu_sys_ns) as f64 / 1e6;
        RunResult {
            client: client.id(),
            reply_gather_us: match client {
                Client::Txgate { gather_us, .. } => Some(gather_us),
                Client::Official | Client::Blocking => None,
            },
            conns_per_node: match client {
                Client::Txgate { conns_per_node, .. } => Some(conns_per_node),
                Client::Official | Client::Blocking => None,
            },
            depth,
            round,
            ops,
            created: phase.created,
            exists: phase.exists,
            errors: phase.errors,
            first_error: phase.first_error.or(warmup.first_error.clone()),
            error_kinds: phase.error_kinds,
            warmup_ops: warmup.ops(),
            warmup_errors: warmup.errors,
            elapsed_ns,
            ops_per_sec: if elapsed_ns == 0 {
                0.0
            } else {
                ops as f64 * 1e9 / elapsed_ns as f64
            },
            p50_ns: percentile(lat, 0.5),
            p99_ns: percentile(lat, 0.99),
            p999_ns: percentile(lat, 0.999),
            max_ns: lat.last().copied().unwrap_or(0),
            cpu_user_ns,
            cpu_sys_ns,
            cpu_ns_per_op: (cpu_user_ns + cpu_sys_ns) as f64 / ops.max(1) as f64,
            server_cpu_ns_per_op: server_cpu_ms.map(|ms| ms * 1e6 / ops.max(1) as f64),
            server_core_busy: share(delta(after.server_core_busy_ms, before.server_core_busy_ms)),
            client_core_other: share(
                delta(after.client_core_busy_ms, before.client_core_busy_ms)
                    .map(|busy| (busy - own_ms).max(0.0)),
            ),
            tcp_retrans_segs: after
                .tcp_retrans
                .zip(before.tcp_retrans)
                .map(|(a, b)| a.0.saturating_sub(b.0)),
            tcp_rto_timeouts: after
                .tcp_retrans
                .zip(before.tcp_retrans)
                .map(|(a, b)| a.1.saturating_sub(b.1)),
            quiet_wait_ms: None,
        }
    }
}

/// Nearest-rank percentile of sorted values; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Where the CPU and core figures come from.
#[derive(Debug, Clone, Copy)]
struct Probe {
    core: Option<usize>,
    server_core: Option<usize>,
    server_pid: Option<u32>,
}

/// CPU and clock at one instant of a run.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    user_ns: u64,
    sys_ns: u64,
    client_core_busy_ms: Option<f64>,
    server_core_busy_ms: Option<f64>,
    server_cpu_ms: Option<f64>,
    /// System-wide TCP segments retransmitted and retransmission timeouts.
    tcp_retrans: Option<(u64, u64)>,
}

impl Probe {
    fn snapshot(&self) -> Snapshot {
        let (user_ns, sys_ns) = self_cpu_ns();
        let stat = std::fs::read_to_string("/proc/stat").ok();
        let busy = |core: Option<usize>| core.and_then(|c| core_busy_ms(stat.as_deref()?, c));
        Snapshot {
            at: Instant::now(),
            user_ns,
            sys_ns,
            client_core_busy_ms: busy(self.core),
            server_core_busy_ms: busy(self.server_core),
            server_cpu_ms: self.server_pid.and_then(process_cpu_ms),
            tcp_retrans: tcp_retrans(),
        }
    }
}

/// This process's user and system CPU so far, ns (all threads).
pub fn self_cpu_ns() -> (u64, u64) {
    // SAFETY: rusage is plain data that getrusage fills; RUSAGE_SELF always
    // exists.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    (ns(ru.ru_utime), ns(ru.ru_stime))
}

fn ms_per_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1000.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Busy time of CPU `core` so far (user, nice, system, irq, softirq and
/// steal), ms, from `/proc/stat`.
fn core_busy_ms(stat: &str, core: usize) -> Option<f64> {
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    Some(busy * ms_per_tick())
}

/// `name` from the header/value line pairs of `/proc/net/snmp` or
/// `/proc/net/netstat` (`Tcp: RetransSegs …` / `Tcp: 1011 …`).
fn net_counter(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(head), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = head.split_whitespace().position(|h| h == name) {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

/// System-wide (retransmitted TCP segments, TCP retransmission timeouts).
fn tcp_retrans() -> Option<(u64, u64)> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    Some((
        net_counter(&snmp, "Tcp:", "RetransSegs")?,
        net_counter(&netstat, "TcpExt:", "TCPTimeouts")?,
    ))
}

/// User + system CPU of process `pid` so far, ms (`/proc/<pid>/stat`).
fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which ends with the last ')': state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * ms_per_tick())
}

// ---------------------------------------------------------------- txgate

fn run_txgate(spec: &Spec, conns_per_node: usize, gather_us: u64) -> Result<Measured, String> {
    use txgate::cache::{BackendKind, Config};
    let config = Config {
        backend: BackendKind::Aerospike,
        aero_hosts: spec.hosts.clone(),
        aero_namespace: Some(spec.namespace.clone()),
        aero_set: spec.set.clone(),
        aero_bin: BIN.to_owned(),
        aero_conns_per_node: conns_per_node,
        aero_reply_gather: Duration::from_micros(gather_us),
        dial_timeout: Duration::from_secs(2),
        op_timeout: spec.op_timeout,
        ..Config::default()
    };
    let backend = txgate::cache::open(&config)
        .map_err(|e| format!("txgate: opening the backend: {e}"))?
        .ok_or("txgate: no backend")?;
    let placement = match spec.core {
        Some(c) => glommio::Placement::Fixed(c),
        None => glommio::Placement::Unbound,
    };
    let (depth, stop, warmup, probe) = (spec.depth, spec.stop, spec.warmup, spec.probe);
    let (run_id, settle) = (spec.run_id, spec.settle);
    let warm_prefix = move |pass: u8| prefix_of(run_id, pass);
    let prefix = prefix_of(run_id, 0);
    let ttl = Duration::from_secs(u64::from(spec.ttl_s));
    let handle = glommio::LocalExecutorBuilder::new(placement)
        .name("peers-txgate")
        .io_memory(IO_MEMORY_BYTES)
        .spawn(move || async move {
            let shard = backend
                .connect_shard(0, 1)
                .await
                .map_err(|e| format!("txgate: connecting the shard: {e}"))?;
            let shard = Rc::new(shard);
            let mut warmed = txgate_phase(&shard, depth, warmup, warm_prefix(1), ttl).await;
            if !settle.is_zero() {
                glommio::timer::sleep(settle).await;
                let again = txgate_phase(&shard, depth, warmup, warm_prefix(2), ttl).await;
                warmed = warmed.merge(again);
            }
            let warmup = warmed;
            let before = probe.snapshot();
            let phase = txgate_phase(&shard, depth, stop, prefix, ttl).await;
            let after = probe.snapshot();
            shard.close();
            Ok::<_, String>(Measured {
                warmup,
                phase,
                before,
                after,
            })
        })
        .map_err(|e| format!("txgate: starting a glommio executor: {e}"))?;
    handle
        .join()
        .map_err(|e| format!("txgate: executor failed: {e}"))?
}

async fn txgate_phase(
    shard: &Rc<txgate::cache::ShardBackend>,
    depth: usize,
    stop: Stop,
    prefix: [u8; 16],
    ttl: Duration,
) -> Tally {
    let next = Rc::new(Cell::new(0u64));
    let started = Instant::now();
    let hint = stop.per_task_hint(depth);
    let tasks: Vec<_> = (0..depth)
        .map(|_| {
            let (shard, next) = (shard.clone(), next.clone());
            glommio::spawn_local(async move {
                let mut t = Tally::with_capacity(hint);
                let mut key = [0u8; KEY_LEN];
                key[..16].copy_from_slice(&prefix);
                loop {
                    let k = next.get();
                    if !stop.more(k, started) {
                        break;
                    }
                    next.set(k + 1);
                    key[16..].copy_from_slice(&k.to_be_bytes());
                    let t0 = Instant::now();
                    let r = shard.set_nx(&key, VALUE, ttl).await;
                    let ns = t0.elapsed().as_nanos() as u64;
                    t.record(ns, r.map_err(|e| e.to_string()));
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        all = all.merge(task.await);
    }
    all
}

// ---------------------------------------------------------------- official

/// The official client's policies, as this bench sets them.
pub fn official_policies(
    op_timeout: Duration,
    ttl_s: u32,
    depth: usize,
) -> (aerospike_core::ClientPolicy, aerospike_core::WritePolicy) {
    use aerospike_core::{BasePolicy, ClientPolicy, Expiration, RecordExistsAction, WritePolicy};
    let ms = op_timeout.as_millis().min(u128::from(u32::MAX)) as u32;
    let client = ClientPolicy {
        timeout: CONNECT_TIMEOUT.as_millis() as u32,
        // One command per connection: `depth` in flight needs that many.
        max_conns_per_node: depth.max(ClientPolicy::default().max_conns_per_node),
        ..ClientPolicy::default()
    };
    let write = WritePolicy {
        record_exists_action: RecordExistsAction::CreateOnly,
        expiration: if ttl_s == 0 {
            Expiration::Never
        } else {
            Expiration::Seconds(ttl_s)
        },
        send_key: false,
        base_policy: BasePolicy {
            total_timeout: ms,
            socket_timeout: ms,
            max_retries: 0,
            ..WritePolicy::default().base_policy
        },
        ..WritePolicy::default()
    };
    (client, write)
}

fn run_official(spec: &Spec, workers: usize) -> Result<Measured, String> {
    let rt = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("official: tokio runtime: {e}"))?;
    let (client_policy, write_policy) = official_policies(spec.op_timeout, spec.ttl_s, spec.depth);
    let write_policy = Arc::new(write_policy);
    let hosts = spec.hosts.join(",");
    let (depth, stop, warmup, probe) = (spec.depth, spec.stop, spec.warmup, spec.probe);
    let (run_id, settle) = (spec.run_id, spec.settle);
    let warm_prefix = move |pass: u8| prefix_of(run_id, pass);
    let prefix = prefix_of(run_id, 0);
    let (ns, set): (Arc<str>, Arc<str>) =
        (spec.namespace.as_str().into(), spec.set.as_str().into());
    rt.block_on(async move {
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT,
            aerospike_core::Client::new(&client_policy, &hosts),
        )
        .await
        .map_err(|_| format!("official: no cluster within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("official: connecting to {hosts}: {e}"))?;
        let client = Arc::new(client);
        let ctx = OfficialCtx {
            client: client.clone(),
            policy: write_policy,
            ns,
            set,
        };
        let mut warmed = official_phase(&ctx, depth, warmup, warm_prefix(1)).await?;
        if !settle.is_zero() {
            tokio::time::sleep(settle).await;
            let again = official_phase(&ctx, depth, warmup, warm_prefix(2)).await?;
            warmed = warmed.merge(again);
        }
        let warmup = warmed;
        let before = probe.snapshot();
        let phase = official_phase(&ctx, depth, stop, prefix).await?;
        let after = probe.snapshot();
        let _ = client.close().await;
        Ok(Measured {
            warmup,
            phase,
            before,
            after,
        })
    })
}

#[derive(Clone)]
struct OfficialCtx {
    client: Arc<aerospike_core::Client>,
    policy: Arc<aerospike_core::WritePolicy>,
    ns: Arc<str>,
    set: Arc<str>,
}

async fn official_phase(
    ctx: &OfficialCtx,
    depth: usize,
    stop: Stop,
    prefix: [u8; 16],
) -> Result<Tally, String> {
    use aerospike_core::{Bin, Key, ResultCode, Value};
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let hint = stop.per_task_hint(depth);
    let tasks: Vec<_> = (0..depth)
        .map(|_| {
            let (ctx, next) = (ctx.clone(), next.clone());
            tokio::spawn(async move {
                let mut t = Tally::with_capacity(hint);
                // One bin for all of this task's writes: `put` borrows it.
                let bins = [Bin::new(BIN, Value::Blob(VALUE.to_vec()))];
                let mut raw = [0u8; KEY_LEN];
                raw[..16].copy_from_slice(&prefix);
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if !stop.more(k, started) {
                        break;
                    }
                    raw[16..].copy_from_slice(&k.to_be_bytes());
                    let t0 = Instant::now();
                    let r = match Key::new(&*ctx.ns, &*ctx.set, Value::Blob(raw.to_vec())) {
                        Ok(key) => match ctx.client.put(&ctx.policy, &key, &bins).await {
                            Ok(()) => Ok(true),
                            Err(e)
                                if e.server_result_code() == Some(ResultCode::KeyExistsError) =>
                            {
                                Ok(false)
                            }
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(format!("key: {e}")),
                    };
                    let ns = t0.elapsed().as_nanos() as u64;
                    t.record(ns, r);
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        all = all.merge(
            task.await
                .map_err(|e| format!("official: task failed: {e}"))?,
        );
    }
    Ok(all)
}

// ---------------------------------------------------------------- blocking

/// Bound on one reply of the blocking client: a create-only write's reply
/// is a few dozen bytes, so anything near this is a broken stream.
const BLOCKING_REPLY_MAX: usize = 1 << 20;
/// The blocking client's connect bound, as txgate's `dial_timeout` here.
const BLOCKING_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// The floor at depth 1: one blocking `TcpStream` to the FIRST seed, one
/// create-only write at a time, encoded with txgate's codec into a reused
/// buffer, one `write(2)`, then blocking `read(2)`s into a reused buffer
/// until the reply is whole. It does not route: on a multi-node cluster a
/// write whose partition another node masters is proxied by the seed (a
/// real server proxies, and so does our test server), so every write is
/// still served. What is measured is this process's CPU, which does not
/// depend on which node masters the key.
struct BlockingClient {
    host: String,
    op_timeout: Duration,
    /// `None` after an I/O or protocol error (the stream's state is then
    /// unknown: a late reply would be taken for the next op's); the next op
    /// connects again.
    stream: Option<std::net::TcpStream>,
    namespace: Vec<u8>,
    set: Vec<u8>,
    bin: txgate::cache::aerospike::codec::BinName,
    ttl: txgate::cache::aerospike::codec::Ttl,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl BlockingClient {
    fn new(spec: &Spec) -> Result<Self, String> {
        use txgate::cache::aerospike::codec::{BinName, Ttl};
        let host = spec.hosts.first().ok_or("blocking: no seed host")?.clone();
        let mut c = Self {
            host,
            op_timeout: spec.op_timeout.max(Duration::from_millis(1)),
            stream: None,
            namespace: spec.namespace.as_bytes().to_vec(),
            set: spec.set.as_bytes().to_vec(),
            bin: BinName::new(BIN.as_bytes()).map_err(|e| format!("blocking: bin name: {e}"))?,
            // As txgate's backend and the official client's `Expiration`.
            ttl: if spec.ttl_s == 0 {
                Ttl::Never
            } else {
                Ttl::Seconds(spec.ttl_s)
            },
            out: Vec::with_capacity(256),
            buf: vec![0; 4096],
        };
        // Connect before the warm-up, as the other clients do.
        c.connect()?;
        Ok(c)
    }

    fn connect(&mut self) -> Result<&mut std::net::TcpStream, String> {
        use std::net::{TcpStream, ToSocketAddrs};
        let host = &self.host;
        let addrs = host
            .to_socket_addrs()
            .map_err(|e| format!("blocking: resolving {host}: {e}"))?;
        let mut last = format!("blocking: {host} resolved to no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, BLOCKING_DIAL_TIMEOUT) {
                Ok(s) => {
                    let setup = s
                        .set_nodelay(true)
                        .and_then(|()| s.set_read_timeout(Some(self.op_timeout)))
                        .and_then(|()| s.set_write_timeout(Some(self.op_timeout)));
                    if let Err(e) = setup {
                        last = format!("blocking: setting up the socket to {addr}: {e}");
                        continue;
                    }
                    return Ok(self.stream.insert(s));
                }
                Err(e) => last = format!("blocking: connecting to {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// One create-only write of `key`: `Ok(true)` created, `Ok(false)` the
    /// record exists.
    fn set_nx(&mut self, key: &[u8]) -> Result<bool, String> {
        let r = self.round_trip(key);
        if r.as_ref().is_err_and(|(broken, _)| *broken) {
            self.stream = None;
        }
        r.map_err(|(_, e)| e)
    }

    /// The write and its reply; an error says whether the stream is broken.
    fn round_trip(&mut self, key: &[u8]) -> Result<bool, (bool, String)> {
        use std::io::{Read, Write};
        use txgate::cache::aerospike::codec::{
            Op, Request, ResultCode, digest, encode_request, parse_reply,
        };
        let d = digest(&self.set, key);
        let req = Request {
            namespace: &self.namespace,
            set: &self.set,
            digest: &d,
            timeout_ms: self.op_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            op: Op::SetNx {
                ttl: self.ttl,
                bin: self.bin,
                value: VALUE,
            },
        };
        self.out.clear();
        encode_request(&req, &mut self.out)
            .map_err(|e| (false, format!("blocking: encoding: {e}")))?;
        let timeout = self.op_timeout;
        let stream = match self.stream.as_mut() {
            Some(s) => s,
            None => {
                // Borrow dance: `connect` needs all of `self`.
                self.connect().map_err(|e| (false, e))?;
                self.stream
                    .as_mut()
                    .ok_or((false, "blocking: not connected".to_owned()))?
            }
        };
        let started = Instant::now();
        stream
            .write_all(&self.out)
            .map_err(|e| (true, format!("blocking: writing: {}", io_text(&e, timeout))))?;
        // Bounded: each read waits at most the op timeout, a read after the
        // deadline is not made, and the buffer stops at BLOCKING_REPLY_MAX.
        let mut filled = 0;
        loop {
            match parse_reply(&self.buf[..filled]) {
                Ok(Some((reply, used))) => {
                    if used != filled {
                        return Err((
                            true,
                            format!("blocking: {} bytes after the reply", filled - used),
                        ));
                    }
                    return match reply.result {
                        ResultCode::OK => Ok(true),
                        ResultCode::RECORD_EXISTS => Ok(false),
                        code => Err((
                            false,
                            format!("blocking: server answered {}", code.name().unwrap_or("?")),
                        )),
                    };
                }
                Ok(None) => {}
                Err(e) => return Err((true, format!("blocking: reply: {e}"))),
            }
            if filled == self.buf.len() {
                if filled >= BLOCKING_REPLY_MAX {
                    return Err((
                        true,
                        format!("blocking: reply over {BLOCKING_REPLY_MAX} bytes"),
                    ));
                }
                self.buf.resize((filled * 2).min(BLOCKING_REPLY_MAX), 0);
            }
            if filled > 0 && started.elapsed() >= timeout {
                return Err((true, format!("blocking: timed out after {timeout:?}")));
            }
            match stream.read(&mut self.buf[filled..]) {
                Ok(0) => return Err((true, "blocking: the server closed the connection".into())),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err((true, format!("blocking: reading: {}", io_text(&e, timeout))));
                }
            }
        }
    }
}

/// An I/O error's text, a socket timeout named as one.
fn io_text(e: &std::io::Error, timeout: Duration) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("timed out after {timeout:?}"),
        _ => e.to_string(),
    }
}

fn run_blocking(spec: &Spec) -> Result<Measured, String> {
    let mut client = BlockingClient::new(spec)?;
    let (stop, warmup, probe) = (spec.stop, spec.warmup, spec.probe);
    let mut warmed = blocking_phase(&mut client, warmup, prefix_of(spec.run_id, 1));
    if !spec.settle.is_zero() {
        std::thread::sleep(spec.settle);
        let again = blocking_phase(&mut client, warmup, prefix_of(spec.run_id, 2));
        warmed = warmed.merge(again);
    }
    let before = probe.snapshot();
    let phase = blocking_phase(&mut client, stop, prefix_of(spec.run_id, 0));
    let after = probe.snapshot();
    Ok(Measured {
        warmup: warmed,
        phase,
        before,
        after,
    })
}

/// One pass of the blocking client, bounded by `stop`.
fn blocking_phase(client: &mut BlockingClient, stop: Stop, prefix: [u8; 16]) -> Tally {
    let started = Instant::now();
    let mut t = Tally::with_capacity(stop.per_task_hint(1));
    let mut key = [0u8; KEY_LEN];
    key[..16].copy_from_slice(&prefix);
    let mut k = 0u64;
    while stop.more(k, started) {
        key[16..].copy_from_slice(&k.to_be_bytes());
        k += 1;
        let t0 = Instant::now();
        let r = client.set_nx(&key);
        let ns = t0.elapsed().as_nanos() as u64;
        t.record(ns, r);
    }
    t
}

// ---------------------------------------------------------------- report

/// Median of the values (mean of the middle two for an even count); `None`
/// when there are none.
pub fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians per (depth, client), in table order.
pub fn summarize(results: &[RunResult], default_conns: usize) -> Vec<Summary> {
    let mut groups: BTreeMap<(usize, Client), Vec<&RunResult>> = BTreeMap::new();
    let blocking = Client::Blocking.id();
    for r in results {
        let client = match r.conns_per_node {
            Some(n) => Client::Txgate {
                conns_per_node: n,
                gather_us: r.reply_gather_us.unwrap_or_else(default_gather_us),
            },
            None if r.client == blocking => Client::Blocking,
            None => Client::Official,
        };
        groups.entry((r.depth, client)).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|((depth, client), rs)| {
            let m = |f: &dyn Fn(&RunResult) -> Option<f64>| median(rs.iter().map(|r| f(r)));
            Summary {
                client: client.id(),
                label: client.label(default_conns),
                conns_per_node: rs[0].conns_per_node,
                reply_gather_us: rs[0].reply_gather_us,
                depth,
                runs: rs.len(),
                ops_per_sec: m(&|r| Some(r.ops_per_sec)).unwrap_or(0.0),
                p50_ns: m(&|r| Some(r.p50_ns as f64)).unwrap_or(0.0),
                p99_ns: m(&|r| Some(r.p99_ns as f64)).unwrap_or(0.0),
                p999_ns: m(&|r| Some(r.p999_ns as f64)).unwrap_or(0.0),
                cpu_us_per_op: m(&|r| Some(r.cpu_ns_per_op / 1e3)).unwrap_or(0.0),
                server_cpu_us_per_op: m(&|r| r.server_cpu_ns_per_op.map(|v| v / 1e3)),
                server_core_busy: m(&|r| r.server_core_busy),
                client_core_other: m(&|r| r.client_core_other),
                ops: rs.iter().map(|r| r.ops).sum(),
                exists: rs.iter().map(|r| r.exists).sum(),
                errors: rs.iter().map(|r| r.errors).sum(),
            }
        })
        .collect()
}

fn find(s: &[Summary], client: Client, depth: usize) -> Option<&Summary> {
    let id = client.id();
    s.iter().find(|x| x.client == id && x.depth == depth)
}

/// `txgate / official` of `f` at every depth: the per-depth text, and
/// whether `ok` holds at all of them (`None` when a row is missing, or when
/// either client had failed writes at a depth: they count in its ops and
/// its CPU per op, so a client that fails fast would look good).
fn ratios(
    s: &[Summary],
    txgate: Client,
    depths: &[usize],
    f: fn(&Summary) -> f64,
    ok: impl Fn(f64) -> bool,
) -> (String, Option<bool>) {
    let mut parts = Vec::new();
    let mut pass = Some(true);
    for &d in depths {
        match (find(s, txgate, d), find(s, Client::Official, d)) {
            (Some(t), Some(o)) if f(o) > 0.0 => {
                let r = f(t) / f(o);
                let errors = t.errors + o.errors;
                if errors > 0 {
                    parts.push(format!(
                        "depth {d}: {r:.2}x ({errors} failed writes: no verdict)"
                    ));
                    pass = None;
                } else {
                    parts.push(format!("depth {d}: {r:.2}x"));
                    pass = pass.map(|p| p && ok(r));
                }
            }
            _ => pass = None,
        }
    }
    (parts.join(", "), pass)
}

/// The targets, at every measured depth.
pub fn targets(s: &[Summary], depths: &[usize], default_conns: usize) -> Vec<Target> {
    let one = Client::Txgate {
        conns_per_node: 1,
        gather_us: default_gather_us(),
    };
    let default = Client::Txgate {
        conns_per_node: default_conns,
        gather_us: default_gather_us(),
    };
    let mut out = Vec::new();
    let mut cpu_rows = vec![one];
    if default_conns != 1 {
        cpu_rows.push(default);
    }
    for c in cpu_rows {
        let (measured, pass) = ratios(s, c, depths, |x| x.cpu_us_per_op, |r| r <= 0.4);
        out.push(Target {
            claim: format!(
                "client CPU per op of {} <= 0.4x the official client's, every depth",
                c.label(default_conns)
            ),
            measured,
            pass,
            informational: false,
        });
    }
    let (measured, pass) = ratios(s, one, depths, |x| x.ops_per_sec, |r| r >= 0.8);
    out.push(Target {
        claim: "ops/s with 1 conn/node >= 0.8x the official client's, every depth".to_owned(),
        measured,
        pass,
        informational: false,
    });
    let (measured, pass) = ratios(s, default, depths, |x| x.ops_per_sec, |r| r >= 1.0);
    out.push(Target {
        claim: format!(
            "ops/s at the default connection count ({default_conns}/node) >= 1.0x the official client's, every depth"
        ),
        measured,
        pass,
        informational: false,
    });
    if depths.contains(&1) {
        out.push(Target {
            claim: "depth 1 floor: client CPU per op of a bare blocking round trip (one \
                    write(2), blocking read(2) until the reply is whole)"
                .to_owned(),
            measured: floor_text(s, one).unwrap_or_default(),
            pass: None,
            informational: true,
        });
    }
    out
}

/// The blocking floor's CPU per op at depth 1 over the official client's:
/// below 0.4 no client can meet the CPU target at depth 1. `None` without
/// both rows.
pub fn floor_ratio(s: &[Summary]) -> Option<(f64, f64)> {
    let floor = find(s, Client::Blocking, 1)?.cpu_us_per_op;
    let official = find(s, Client::Official, 1)?.cpu_us_per_op;
    (official > 0.0).then(|| (floor, floor / official))
}

/// The depth-1 floor line: the floor, its share of the official client's
/// CPU per op, what 0.4x would take, and txgate's 1-conn row against it.
fn floor_text(s: &[Summary], txgate: Client) -> Option<String> {
    let (floor, ratio) = floor_ratio(s)?;
    let official = find(s, Client::Official, 1)?.cpu_us_per_op;
    let need = 0.4 * official;
    let mut t = format!(
        "a blocking round trip costs {floor:.2} us of CPU, {ratio:.2}x the official client's \
         {official:.2} us; a client at <= 0.4x would need <= {need:.2} us{}",
        if need < floor {
            ", below the floor"
        } else {
            ""
        }
    );
    if let Some(x) = find(s, txgate, 1).filter(|_| floor > 0.0) {
        t.push_str(&format!(
            "; txgate 1 conn/node: {:.2} us, {:.2}x the floor",
            x.cpu_us_per_op,
            x.cpu_us_per_op / floor
        ));
    }
    Some(t)
}

pub fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

pub fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} us", ns / 1e3)
    }
}

fn fmt_share(v: Option<f64>) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{:.0}", v * 100.0))
}

/// The table of medians, then `txgate / official` ratios per depth.
pub fn table(s: &[Summary], depths: &[usize]) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "{:>5}  {:<42} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6}\n",
        "depth",
        "client",
        "ops/s",
        "p50",
        "p99",
        "p99.9",
        "CPU us/op",
        "srv us/op",
        "srv %",
        "other%",
        "errors"
    ));
    let mut last = None;
    for x in s {
        if last.is_some_and(|d| d != x.depth) {
            t.push('\n');
        }
        last = Some(x.depth);
        t.push_str(&format!(
            "{:>5}  {:<42} {:>10} {:>9} {:>9} {:>9} {:>9.2} {:>9} {:>6} {:>6} {:>6}\n",
            x.depth,
            x.label,
            fmt_rate(x.ops_per_sec),
            fmt_ns(x.p50_ns),
            fmt_ns(x.p99_ns),
            fmt_ns(x.p999_ns),
            x.cpu_us_per_op,
            x.server_cpu_us_per_op
                .map_or("n/a".to_owned(), |v| format!("{v:.2}")),
            fmt_share(x.server_core_busy),
            fmt_share(x.client_core_other),
            x.errors
        ));
    }
    let mut txgates: Vec<(Client, String)> = s
        .iter()
        .filter_map(|x| {
            let gather_us = x.reply_gather_us?;
            x.conns_per_node.map(|n| {
                let c = Client::Txgate {
                    conns_per_node: n,
                    gather_us,
                };
                (c, x.label.clone())
            })
        })
        .collect();
    txgates.sort();
    txgates.dedup();
    let official = Client::Official.id();
    if !txgates.is_empty() && s.iter().any(|x| x.client == official) {
        t.push_str("\ntxgate / official client (medians):\n");
        t.push_str(&format!("{:<48}", ""));
        for d in depths {
            t.push_str(&format!(" {:>9}", format!("depth {d}")));
        }
        t.push('\n');
        for (what, f) in [
            (
                "ops/s",
                (|x: &Summary| x.ops_per_sec) as fn(&Summary) -> f64,
            ),
            ("CPU/op", |x: &Summary| x.cpu_us_per_op),
        ] {
            for &(c, ref label) in &txgates {
                t.push_str(&format!("{:<48}", format!("{what:<7} {label}")));
                for &d in depths {
                    let cell = match (find(s, c, d), find(s, Client::Official, d)) {
                        (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}x", f(a) / f(b)),
                        _ => "n/a".to_owned(),
                    };
                    t.push_str(&format!(" {cell:>9}"));
                }
                t.push('\n');
            }
        }
        // The floor's row: what no client can beat at depth 1.
        if s.iter().any(|x| x.client == Client::Blocking.id()) {
            let label = Client::Blocking.label(0);
            t.push_str(&format!("{:<48}", format!("CPU/op  {label}")));
            for &d in depths {
                let cell = match (find(s, Client::Blocking, d), find(s, Client::Official, d)) {
                    (Some(a), Some(b)) if b.cpu_us_per_op > 0.0 => {
                        format!("{:.2}x", a.cpu_us_per_op / b.cpu_us_per_op)
                    }
                    _ => "n/a".to_owned(),
                };
                t.push_str(&format!(" {cell:>9}"));
            }
            t.push('\n');
        }
    }
    t
}

pub fn targets_text(ts: &[Target]) -> String {
    let mut t = String::from("Targets (from the medians):\n");
    for x in ts {
        let verdict = match x.pass {
            _ if x.informational => "info",
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        let measured = if x.measured.is_empty() {
            "not measured in this run"
        } else {
            &x.measured
        };
        t.push_str(&format!("  {verdict}  {}: {measured}\n", x.claim));
    }
    t
}

/// What a reader should know before trusting the rows: disturbed runs,
/// a saturated server, failed or lost writes.
pub fn notes(results: &[RunResult], summary: &[Summary]) -> Vec<String> {
    let mut n = Vec::new();
    let disturbed: Vec<String> = results
        .iter()
        .filter(|r| r.client_core_other.is_some_and(|x| x > DISTURBED_SHARE))
        .map(|r| {
            format!(
                "{} depth {} run {} ({:.0} %)",
                r.client,
                r.depth,
                r.round,
                r.client_core_other.unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    if !disturbed.is_empty() {
        n.push(format!(
            "runs whose client CPU lost more than {:.0} % to other processes (their figures \
             are disturbed): {}",
            DISTURBED_SHARE * 100.0,
            disturbed.join(", ")
        ));
    }
    let retrans: Vec<String> = results
        .iter()
        .filter(|r| r.tcp_retrans_segs.is_some_and(|n| n > 0))
        .map(|r| {
            format!(
                "{} depth {} run {} ({} segments, {} RTOs)",
                r.client,
                r.depth,
                r.round,
                r.tcp_retrans_segs.unwrap_or(0),
                r.tcp_rto_timeouts.unwrap_or(0)
            )
        })
        .collect();
    if !retrans.is_empty() {
        n.push(format!(
            "TCP retransmitted on this machine during (a stall there may be the network's): {}",
            retrans.join(", ")
        ));
    }
    let saturated: Vec<String> = summary
        .iter()
        .filter(|s| s.server_core_busy.is_some_and(|b| b >= 0.9))
        .map(|s| format!("{} depth {}", s.client, s.depth))
        .collect();
    if !saturated.is_empty() {
        n.push(format!(
            "the server's CPU was at least 90 % busy (the server, not the client, is the \
             ceiling) for: {}",
            saturated.join(", ")
        ));
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.errors > 0 || r.exists > 0)
        .map(|r| {
            format!(
                "{} depth {} run {}: {} errors ({}), {} exists; first: {}",
                r.client,
                r.depth,
                r.round,
                r.errors,
                r.error_kinds
                    .iter()
                    .map(|(e, n)| format!("{n} x {e}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.exists,
                r.first_error.as_deref().unwrap_or("-")
            )
        })
        .collect();
    if !failed.is_empty() {
        n.push(format!(
            "WARNING: writes that failed: {}",
            failed.join("; ")
        ));
    }
    if let Some((floor, ratio)) = floor_ratio(summary)
        && ratio > 0.4
    {
        n.push(format!(
            "at depth 1 a bare blocking round trip already costs {floor:.2} us of CPU per op, \
             {ratio:.2}x the official client's: no client that waits for each reply can be \
             at <= 0.4x there on this machine"
        ));
    }
    n
}

/// A package's version as Cargo.lock pins it.
pub fn locked_version(name: &str) -> String {
    let lock = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"));
    let needle = format!("name = \"{name}\"\nversion = \"");
    lock.find(&needle)
        .and_then(|i| {
            let rest = &lock[i + needle.len()..];
            rest.find('"').map(|j| rest[..j].to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Every client, with its version and every setting that matters.
pub fn clients_json(plan: &Plan) -> serde_json::Value {
    let (cp, wp) = official_policies(plan.op_timeout, plan.ttl_s, 1);
    serde_json::json!({
        "txgate": {
            "version": format!("txgate {}", env!("CARGO_PKG_VERSION")),
            "how": "txgate::cache::open(Config { backend: aerospike, .. }) then one ShardBackend \
                    (Backend::connect_shard) on one glommio executor, D glommio tasks each \
                    looping ShardBackend::set_nx(key, value, ttl) (CREATE_ONLY write)",
            "settings": {
                "aero_conns_per_node": plan.clients.iter().filter_map(|c| match c {
                    Client::Txgate { conns_per_node, .. } => Some(*conns_per_node), _ => None }).collect::<Vec<_>>(),
                "aero_reply_gather_us": plan.clients.iter().filter_map(|c| match c {
                    Client::Txgate { gather_us, .. } => Some(*gather_us), _ => None }).collect::<Vec<_>>(),
                "aero_reply_gather_us_default": default_gather_us(),
                "aero_conns_per_node_default": plan.default_conns,
                "op_timeout_ms": plan.op_timeout.as_millis() as u64,
                "dial_timeout_ms": 2000,
                "aero_set": plan.set,
                "aero_bin": BIN,
                "glommio_io_memory_bytes": IO_MEMORY_BYTES,
                "executor": match plan.core { Some(c) => format!("pinned to CPU {c}"), None => "unbound".to_owned() },
            },
        },
        "official": {
            "version": format!("aerospike-core {} (the async API of the aerospike {} crate), tokio {}",
                locked_version("aerospike-core"), locked_version("aerospike"), locked_version("tokio")),
            "how": "one aerospike_core::Client, D tokio tasks each looping \
                    Client::put(&write_policy, &Key::new(ns, set, Value::Blob(key)), &[bin]); \
                    one command per connection at a time, so up to D connections per node",
            "settings": {
                "runtime": if plan.official_workers == 0 {
                    "tokio current_thread".to_owned()
                } else {
                    format!("tokio multi_thread, {} workers", plan.official_workers)
                },
                "client_policy": {
                    "max_conns_per_node": format!("max(D, {})", cp.max_conns_per_node),
                    "conn_pools_per_node": cp.conn_pools_per_node,
                    "min_conns_per_node": cp.min_conns_per_node,
                    "tend_interval_ms": cp.tend_interval,
                    "use_buffer_pool": cp.use_buffer_pool,
                    "timeout_ms": cp.timeout,
                },
                "write_policy": {
                    "record_exists_action": format!("{:?}", wp.record_exists_action),
                    "expiration": format!("{:?}", wp.expiration),
                    "send_key": wp.send_key,
                    "total_timeout_ms": wp.base_policy.total_timeout,
                    "socket_timeout_ms": wp.base_policy.socket_timeout,
                    "max_retries": wp.base_policy.max_retries,
                    "commit_level": format!("{:?}", wp.commit_level),
                },
                "thread": match plan.core { Some(c) => format!("process pinned to CPU {c}"), None => "unbound".to_owned() },
            },
        },
        "blocking": {
            "version": "std::net::TcpStream, txgate codec",
            "how": "one std::net::TcpStream to the first seed; per write: \
                    txgate::cache::aerospike::codec::encode_request (CREATE_ONLY, digest of the \
                    blob key) into a reused buffer, write_all, then blocking read(2) into a \
                    reused buffer until parse_reply has the whole reply. No routing: writes \
                    whose partition another node masters are proxied by the seed",
            "in_this_run": plan.clients.contains(&Client::Blocking) && plan.depths.contains(&1),
            "settings": {
                "io": "blocking",
                "connections": "one, to the first seed",
                "seed": plan.hosts.first(),
                "depths": "1 only",
                "tcp_nodelay": true,
                "read_write_timeout_ms": plan.op_timeout.as_millis() as u64,
                "dial_timeout_ms": BLOCKING_DIAL_TIMEOUT.as_millis() as u64,
                "reply_max_bytes": BLOCKING_REPLY_MAX,
                "aero_set": plan.set,
                "aero_bin": BIN,
                "thread": match plan.core { Some(c) => format!("process pinned to CPU {c}"), None => "unbound".to_owned() },
            },
        },
        "workload": {
            "op": "create-only write of a novel key",
            "key": format!("{KEY_LEN}-byte blob, unique per run and op; the key itself is not sent (digest only)"),
            "bin": format!("{BIN} = {}-byte blob", VALUE.len()),
            "ttl_s": plan.ttl_s,
            "warmup": "warm-up writes at the run's depth, then (settle_ms > 0) a pause and \
                       the warm-up again, then the measured phase; connections stay open",
            "settle_ms": plan.settle.as_millis() as u64,
        },
    })
}

/// The JSON document: plan, clients, medians, targets and every run.
pub fn document(
    plan: &Plan,
    server: serde_json::Value,
    results: &[RunResult],
    extra: serde_json::Value,
) -> serde_json::Value {
    let summary = summarize(results, plan.default_conns);
    let targets = targets(&summary, &plan.depths, plan.default_conns);
    let ops_per_run: serde_json::Map<String, serde_json::Value> = plan
        .depths
        .iter()
        .map(|&d| {
            let warmup = plan.warmup_ops.unwrap_or_else(|| default_warmup_ops(d));
            let v = match plan.length.at(d) {
                Stop::Ops(n) => serde_json::json!({ "ops": n, "warmup_ops": warmup }),
                Stop::Seconds(s) => serde_json::json!({ "seconds": s, "warmup_ops": warmup }),
            };
            (d.to_string(), v)
        })
        .collect();
    serde_json::json!({
        "tool": "benches/aerospike_peers.rs",
        "server": server,
        "clients": clients_json(plan),
        "runs": plan.runs,
        "depths": plan.depths,
        "per_run": ops_per_run,
        "client_core": plan.core,
        "server_core": plan.server_core,
        "summary": summary,
        "targets": targets,
        "notes": notes(results, &summary),
        "results": results,
        "extra": extra,
    })
}
