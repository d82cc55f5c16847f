//! One measured run of one peer: each in its own child process pinned to the
//! client core, against a freshly flushed server, with novel keys only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::child::{Exit, run_pinned};
use crate::server::Server;
use crate::stats::LatencySummary;

/// Bound on one child run, start to exit, before its share per op: past
/// [`run_limit`] the child is killed.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The slowest rate a run is allowed before it counts as hung: a run of `ops`
/// gets [`RUN_LIMIT`] plus `ops` at this many per second.
const SLOWEST_OPS_PER_S: u64 = 2_000;

/// How long a run of `ops` may take: large `--ops` get room, a hang is still
/// caught.
pub fn run_limit(ops: u64) -> Duration {
    RUN_LIMIT + Duration::from_secs(ops / SLOWEST_OPS_PER_S)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Peer {
    Txgate,
    #[value(name = "redis-benchmark")]
    RedisBenchmark,
    #[value(name = "redis-rs")]
    RedisRs,
    Fred,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Self::Txgate => "txgate",
            Self::RedisBenchmark => "redis-benchmark",
            Self::RedisRs => "redis-rs",
            Self::Fred => "fred",
        }
    }

    /// Whether this peer can run open loop (`--rate`) for the half-peak run.
    pub fn can_pace(self) -> bool {
        self != Self::RedisBenchmark
    }

    /// Where its CPU figure comes from.
    pub fn cpu_basis(self) -> &'static str {
        match self {
            Self::RedisBenchmark => "whole process (wait4), start-up included",
            Self::Txgate => "measured phase (getrusage(RUSAGE_SELF) in txgate bench, its JSON cpu)",
            Self::RedisRs | Self::Fred => "measured phase (getrusage(RUSAGE_SELF) in the child)",
        }
    }
}

/// What the runs share.
pub struct Ctx {
    pub server: Server,
    pub client_core: usize,
    /// The core our own redis-server is pinned to (`None`: external server).
    pub server_core: Option<usize>,
    pub txgate: PathBuf,
    /// Extra arguments for every `txgate bench` run.
    pub txgate_args: Vec<String>,
    pub redis_benchmark: String,
    pub self_exe: PathBuf,
    /// Scratch folder for logs and result files.
    pub tmp: PathBuf,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub peer: Peer,
    pub depth: u64,
    pub round: u32,
    /// Offered load (open loop), or `None` for as fast as `depth` allows.
    pub rate: Option<f64>,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub p999_ns: Option<u64>,
    pub max_ns: Option<u64>,
    /// The CPU figure the table shows: see `cpu_basis`.
    pub cpu_ns_per_op: f64,
    pub cpu_basis: &'static str,
    /// user + sys of the whole child process, from wait4.
    pub process_user_ns: u64,
    pub process_sys_ns: u64,
    pub process_wall_ns: u64,
    /// user + sys over the measured phase only (in-process peers).
    pub phase_cpu_ns: Option<u64>,
    /// redis-server's own CPU (INFO cpu delta) per op, start-up to exit of the child.
    pub server_cpu_ns_per_op: Option<f64>,
    /// DBSIZE after the run: the novel keys really created.
    pub keys_created: u64,
    /// Ops that failed (errors, timeouts; txgate: fail-open).
    pub errors: u64,
    /// CPU time that other work took on the client core during the run
    /// (busy time from /proc/stat, 10 ms ticks, minus the peer's own), ms.
    pub other_ms_client_core: Option<f64>,
    /// The same on the server core, minus redis-server's own CPU (our server only).
    pub other_ms_server_core: Option<f64>,
    /// Hypervisor steal time on both cores during the run, ms.
    pub steal_ms: Option<f64>,
}

impl RunResult {
    /// The larger share of a core that other work took during the run.
    pub fn interference(&self) -> Option<f64> {
        let wall = self.process_wall_ns as f64 / 1e6;
        let worst = self
            .other_ms_client_core
            .into_iter()
            .chain(self.other_ms_server_core)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))?;
        (wall > 0.0).then(|| worst / wall)
    }
}

/// Idle and steal time of one CPU so far, in ms (from /proc/stat ticks).
#[derive(Debug, Clone, Copy)]
struct CoreTimes {
    idle_ms: f64,
    steal_ms: f64,
}

fn core_times(core: usize) -> Option<CoreTimes> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ms_per_tick = 1000.0 / if hz > 0 { hz as f64 } else { 100.0 };
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    // user nice system idle iowait irq softirq steal ...
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    Some(CoreTimes {
        idle_ms: (f.get(3)? + f.get(4)?) * ms_per_tick,
        steal_ms: f.get(7).copied().unwrap_or(0.0) * ms_per_tick,
    })
}

/// CPU that work other than `own_ms` took on a core between two readings.
fn other_ms(
    before: Option<CoreTimes>,
    after: Option<CoreTimes>,
    wall_ms: f64,
    own_ms: f64,
) -> Option<f64> {
    let (b, a) = (before?, after?);
    let busy = wall_ms - (a.idle_ms - b.idle_ms);
    Some((busy - own_ms).max(0.0))
}

/// A random id so that no two runs share a key.
pub fn run_id() -> u32 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = t ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// The command line of each peer, for the report.
pub fn settings(peer: Peer, txgate_args: &[String]) -> String {
    match peer {
        Peer::Txgate => format!(
            "txgate bench --backend redis --duplicate-ratio 0 --inflight D --cores C \
             --claims N [--rate R] {}; defaults otherwise (16-byte TxIDs, 29-byte keys, \
             op timeout 50 ms, one glommio shard, one connection)",
            txgate_args.join(" ")
        ),
        Peer::RedisBenchmark => "redis-benchmark -c 1 -P D -n N -r 1000000000 --csv \
                                 SET txb:<run>:0000__rand_int__ v NX PX 60000 (29-byte keys, \
                                 single-threaded; p99.9 not reported by it)"
            .to_owned(),
        Peer::RedisRs => format!(
            "redis {} MultiplexedConnection (AsyncConnectionConfig defaults: response timeout \
             500 ms), TCP_NODELAY on, tokio {} current_thread, D tasks, SET k v NX PX 60000, \
             29-byte keys",
            env!("PEER_REDIS_RS_VERSION"),
            env!("PEER_TOKIO_VERSION")
        ),
        Peer::Fred => format!(
            "fred {} one centralized Client (one connection, pipelined; default \
             PerformanceConfig: no command timeout, max_feed_count 200), TCP_NODELAY on, \
             tokio {} current_thread, D tasks, SET k v NX PX 60000, 29-byte keys",
            env!("PEER_FRED_VERSION"),
            env!("PEER_TOKIO_VERSION")
        ),
    }
}

impl Ctx {
    /// Runs `peer` once: `ops` novel claims, `depth` in flight, optionally
    /// paced at `rate` ops/s.
    pub fn run(
        &mut self,
        peer: Peer,
        depth: u64,
        ops: u64,
        rate: Option<f64>,
        round: u32,
    ) -> Result<RunResult, String> {
        self.server.flushall()?;
        let id = run_id();
        let out = self.tmp.join(format!("{}-{depth}.out", peer.name()));
        let log = self.tmp.join(format!("{}-{depth}.log", peer.name()));
        let _ = std::fs::remove_file(&out);
        let mut cmd = self.command(peer, depth, ops, rate, id, &out)?;
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file);
        if peer == Peer::RedisBenchmark {
            // Its CSV goes to stdout; keep stderr in the log.
            let f = std::fs::File::create(&out).map_err(|e| e.to_string())?;
            cmd.stdout(f);
        }
        let srv0 = self.server.cpu_ns()?;
        let cores0 = (
            core_times(self.client_core),
            self.server_core.and_then(core_times),
        );
        let exit = run_pinned(&mut cmd, self.client_core, run_limit(ops))?;
        let cores1 = (
            core_times(self.client_core),
            self.server_core.and_then(core_times),
        );
        let srv1 = self.server.cpu_ns()?;
        let keys_created = self.server.dbsize()?;
        self.server.flushall()?;
        if !exit.ok() {
            return Err(format!(
                "{} (depth {depth}) failed: {}; its output:\n{}",
                peer.name(),
                exit.describe(),
                tail(&log, 15)
            ));
        }
        let mut r = match peer {
            Peer::Txgate => parse_txgate(&out, &exit)?,
            Peer::RedisBenchmark => parse_redis_benchmark(&out, ops, &exit)?,
            Peer::RedisRs | Peer::Fred => parse_client(&out, &exit)?,
        };
        r.peer = peer;
        r.depth = depth;
        r.round = round;
        r.rate = rate;
        r.cpu_basis = peer.cpu_basis();
        r.keys_created = keys_created;
        r.server_cpu_ns_per_op =
            (r.ops > 0).then(|| srv1.saturating_sub(srv0) as f64 / r.ops as f64);
        let wall_ms = exit.wall.as_secs_f64() * 1e3;
        r.other_ms_client_core = other_ms(cores0.0, cores1.0, wall_ms, exit.cpu_ns() as f64 / 1e6);
        r.other_ms_server_core = other_ms(
            cores0.1,
            cores1.1,
            wall_ms,
            srv1.saturating_sub(srv0) as f64 / 1e6,
        );
        r.steal_ms = match (cores0, cores1) {
            ((Some(c0), s0), (Some(c1), s1)) => Some(
                c1.steal_ms - c0.steal_ms
                    + s0.zip(s1).map_or(0.0, |(s0, s1)| s1.steal_ms - s0.steal_ms),
            ),
            _ => None,
        };
        Ok(r)
    }

    /// txgate's fixed cost: one process with a single claim (start-up,
    /// connect, shutdown), user + sys ns.
    pub fn txgate_startup_cpu_ns(&mut self) -> Result<u64, String> {
        let out = self.tmp.join("txgate-startup.out");
        let mut cmd = self.command(Peer::Txgate, 1, 1, None, run_id(), &out)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let exit = run_pinned(&mut cmd, self.client_core, RUN_LIMIT)?;
        self.server.flushall()?;
        if !exit.ok() {
            return Err(format!("txgate start-up probe: {}", exit.describe()));
        }
        Ok(exit.cpu_ns())
    }

    fn command(
        &self,
        peer: Peer,
        depth: u64,
        ops: u64,
        rate: Option<f64>,
        id: u32,
        out: &Path,
    ) -> Result<Command, String> {
        let addr = &self.server.addr;
        let mut cmd;
        match peer {
            Peer::Txgate => {
                cmd = Command::new(&self.txgate);
                // Settings come from the flags only.
                for (k, _) in std::env::vars_os() {
                    if k.to_string_lossy().starts_with("TXGATE_") {
                        cmd.env_remove(k);
                    }
                }
                cmd.args(["bench", "--backend", "redis", "--redis-addr", addr])
                    .args(["--duplicate-ratio", "0"])
                    .args(["--inflight", &depth.to_string()])
                    .args(["--cores", &self.client_core.to_string()])
                    .args(["--claims", &ops.to_string()])
                    .arg("--json")
                    .arg(out);
                if let Some(r) = rate {
                    cmd.args(["--rate", &format!("{r:.0}")]);
                }
                cmd.args(&self.txgate_args);
            }
            Peer::RedisBenchmark => {
                let (host, port) = self.server.host_port();
                cmd = Command::new(&self.redis_benchmark);
                cmd.args(["-h", &host, "-p", &port.to_string(), "-c", "1"])
                    .args(["-P", &depth.to_string(), "-n", &ops.to_string()])
                    .args(["-r", "1000000000", "--csv", "SET"])
                    .arg(format!("txb:{id:08x}:0000__rand_int__"))
                    .args(["v", "NX", "PX", "60000"]);
                if rate.is_some() {
                    return Err("redis-benchmark cannot pace its load".to_owned());
                }
            }
            Peer::RedisRs | Peer::Fred => {
                cmd = Command::new(&self.self_exe);
                let lib = if peer == Peer::RedisRs {
                    "redis-rs"
                } else {
                    "fred"
                };
                cmd.args(["__client", "--lib", lib, "--addr", addr])
                    .args(["--depth", &depth.to_string(), "--ops", &ops.to_string()])
                    .arg("--prefix")
                    .arg(format!("txp:{id:08x}:"))
                    .arg("--out")
                    .arg(out);
                if let Some(r) = rate {
                    cmd.args(["--rate", &format!("{r:.0}")]);
                }
            }
        }
        Ok(cmd)
    }
}

fn empty(exit: &Exit) -> RunResult {
    RunResult {
        peer: Peer::Txgate,
        depth: 0,
        round: 0,
        rate: None,
        ops: 0,
        ops_per_sec: 0.0,
        p50_ns: None,
        p99_ns: None,
        p999_ns: None,
        max_ns: None,
        cpu_ns_per_op: 0.0,
        cpu_basis: "",
        process_user_ns: exit.user_ns,
        process_sys_ns: exit.sys_ns,
        process_wall_ns: exit.wall.as_nanos() as u64,
        phase_cpu_ns: None,
        server_cpu_ns_per_op: None,
        keys_created: 0,
        errors: 0,
        other_ms_client_core: None,
        other_ms_server_core: None,
        steal_ms: None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
}

fn parse_txgate(path: &Path, exit: &Exit) -> Result<RunResult, String> {
    let v = read_json(path)?;
    let num = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("txgate JSON has no {p}"))
    };
    let ops = num("/total/novel/count")? as u64 + num("/total/duplicate/count")? as u64;
    let mut r = empty(exit);
    r.ops = ops;
    r.ops_per_sec = num("/total/claims_per_sec")?;
    r.p50_ns = Some(num("/total/novel/p50_ns")? as u64);
    r.p99_ns = Some(num("/total/novel/p99_ns")? as u64);
    r.p999_ns = Some(num("/total/novel/p999_ns")? as u64);
    r.max_ns = Some(num("/total/novel/max_ns")? as u64);
    r.errors = num("/verdicts/fail_open")? as u64;
    // Its measured phase, as for redis-rs and fred: the start-up (tier-1's
    // pages zeroed) is a one-off a long-running gate never pays per claim.
    let phase = (num("/cpu/user_ns")? + num("/cpu/sys_ns")?) as u64;
    r.phase_cpu_ns = Some(phase);
    r.cpu_ns_per_op = phase as f64 / ops.max(1) as f64;
    Ok(r)
}

/// redis-benchmark 7 `--csv`: a header row naming `rps` and
/// `*_latency_ms` columns, then one row per test.
fn parse_redis_benchmark(path: &Path, ops: u64, exit: &Exit) -> Result<RunResult, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.starts_with('"'))
        .map(|l| {
            l.split(',')
                .map(|c| c.trim_matches('"').to_owned())
                .collect()
        })
        .collect();
    let (Some(head), Some(row)) = (rows.first(), rows.get(1)) else {
        return Err(format!("redis-benchmark printed no CSV result:\n{text}"));
    };
    let col = |name: &str| -> Option<f64> {
        let i = head.iter().position(|h| h == name)?;
        row.get(i)?.parse().ok()
    };
    let ms = |name: &str| col(name).map(|v| (v * 1e6).round() as u64);
    let mut r = empty(exit);
    r.ops = ops;
    r.ops_per_sec = col("rps").ok_or_else(|| format!("no rps column in:\n{text}"))?;
    r.p50_ns = ms("p50_latency_ms");
    r.p99_ns = ms("p99_latency_ms");
    r.p999_ns = ms("p999_latency_ms"); // absent in 7.0: null
    r.max_ns = ms("max_latency_ms");
    r.cpu_ns_per_op = exit.cpu_ns() as f64 / ops.max(1) as f64;
    Ok(r)
}

fn parse_client(path: &Path, exit: &Exit) -> Result<RunResult, String> {
    let v = read_json(path)?;
    let u = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let lat: LatencySummary = serde_json::from_value(v["latency"].clone())
        .map_err(|e| format!("client JSON latency: {e}"))?;
    let mut r = empty(exit);
    r.ops = u("ops");
    r.ops_per_sec = v["ops_per_sec"].as_f64().unwrap_or(0.0);
    r.p50_ns = Some(lat.p50_ns);
    r.p99_ns = Some(lat.p99_ns);
    r.p999_ns = Some(lat.p999_ns);
    r.max_ns = Some(lat.max_ns);
    r.errors = u("errors");
    let phase = u("phase_user_ns") + u("phase_sys_ns");
    r.phase_cpu_ns = Some(phase);
    r.cpu_ns_per_op = phase as f64 / r.ops.max(1) as f64;
    if r.errors > 0 {
        eprintln!(
            "  warning: {} errors, first: {}",
            r.errors,
            v["first_error"].as_str().unwrap_or("?")
        );
    }
    Ok(r)
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
