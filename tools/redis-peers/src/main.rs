//! `redis-peers`: txgate's novel-claim path against its peers, one shard,
//! one connection, one local redis-server, in one run.
//!
//! Peers, each at the same claims in flight (depth D), each run in its own
//! child process pinned to the client core so its CPU time is exact:
//! `txgate bench --backend redis --inflight D`, `redis-benchmark -c 1 -P D`,
//! redis-rs `MultiplexedConnection` and fred (both: D tokio tasks on one
//! current-thread runtime). Every op is a novel `SET k v NX PX 60000`.
//! Reports medians of ops/s, p50/p99/p99.9 and client CPU per op, p99 at half
//! of each peer's peak (open loop), and the four targets, as a table
//! and as JSON.

mod child;
mod client;
mod peers;
mod report;
mod server;
mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Args, Parser, Subcommand, value_parser};

use peers::{Ctx, Peer};
use server::Server;

#[derive(Parser)]
#[command(
    name = "redis-peers",
    version,
    about = "txgate vs redis-benchmark, redis-rs and fred: novel SET NX claims, one connection, one local redis-server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand)]
enum Mode {
    /// One in-process peer run (started by the parent in a pinned child).
    #[command(name = "__client", hide = true)]
    Client(client::ClientArgs),
}

#[derive(Args)]
struct Opts {
    /// Runs of each (peer, depth); the table shows medians
    #[arg(long, default_value_t = 3, value_parser = value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Claims in flight (txgate --inflight, redis-benchmark -P, tasks for redis-rs and fred)
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256",
          value_parser = value_parser!(u64).range(1..=65_536))]
    depths: Vec<u64>,
    /// Claims per run [default: 100000 at depth 1, 400000 deeper]
    #[arg(long, value_parser = value_parser!(u64).range(1000..=100_000_000))]
    ops: Option<u64>,
    /// Peers to run
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "txgate,redis-benchmark,redis-rs,fred"
    )]
    peers: Vec<Peer>,
    /// CPU for our redis-server
    #[arg(long, default_value_t = 1)]
    server_core: usize,
    /// CPU every peer's process is pinned to
    #[arg(long, default_value_t = 0)]
    client_core: usize,
    /// Use this server (HOST:PORT) instead of starting one; it is FLUSHALLed between runs!
    #[arg(long)]
    addr: Option<String>,
    /// The txgate binary [default: target/release/txgate in the txgate repository]
    #[arg(long)]
    txgate: Option<PathBuf>,
    /// Extra argument for `txgate bench` (repeat it), e.g.
    /// `--txgate-arg=--spin-before-park --txgate-arg=100us`; named in the output
    #[arg(long = "txgate-arg", allow_hyphen_values = true)]
    txgate_args: Vec<String>,
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    #[arg(long, default_value = "redis-benchmark")]
    redis_benchmark: String,
    /// Depth of the open-loop runs at half of each peer's peak
    #[arg(long, default_value_t = 64)]
    half_peak_depth: u64,
    /// Where the JSON goes [default: target/redis-peers.json in the txgate repository]
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Mode::Client(a)) = cli.mode {
        return client::main(a);
    }
    if let Err(e) = check_usage(&cli.opts) {
        eprintln!("redis-peers: {e}");
        return ExitCode::from(2);
    }
    match bench(cli.opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redis-peers: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Flag values clap cannot check alone; an error here exits 2.
fn check_usage(o: &Opts) -> Result<(), String> {
    let cpus = online_cpus();
    for (flag, core) in [
        ("--client-core", o.client_core),
        ("--server-core", o.server_core),
    ] {
        if core >= cpus {
            return Err(format!(
                "{flag} {core}: this machine has CPUs 0..={}",
                cpus - 1
            ));
        }
    }
    if let Some(a) = &o.addr
        && a.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!("--addr {a}: expected HOST:PORT"));
    }
    Ok(())
}

fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// The scratch folder of this run, for the signal watcher to remove.
static SCRATCH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Turns SIGTERM, SIGINT and SIGHUP into removing the scratch folder (with its
/// copy of txgate) and exiting 128 + signal; the children die with us
/// (PR_SET_PDEATHSIG). The signals are blocked in every thread and taken by
/// one that waits for them; every child unblocks them before exec
/// ([`child::unblocked_signals`]: std does not reset the mask).
fn watch_signals() {
    // SAFETY: plain sigset manipulation on a local set, then the calling
    // thread's mask; both calls only fail on invalid arguments.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            if let Some(dir) = SCRATCH.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
            eprintln!("redis-peers: signal {sig}: stopped, scratch folder removed");
            std::process::exit(128 + sig);
        }
    });
}

/// The txgate repository: this tool lives in its `tools/redis-peers`.
fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    here.canonicalize().unwrap_or(here)
}

/// Removes the scratch folder however the run ends (short of a kill).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A run where other work took more than this share of the client or server
/// core is listed as disturbed (/proc/stat has 10 ms ticks, so small shares
/// are accounting noise).
const NOISY: f64 = 0.10;

fn default_ops(depth: u64) -> u64 {
    if depth == 1 { 100_000 } else { 400_000 }
}

fn bench(o: Opts) -> Result<(), String> {
    let mut peers = o.peers.clone();
    peers.sort();
    peers.dedup();
    let mut depths = o.depths.clone();
    depths.dedup();
    let ops_for = |d: u64| o.ops.unwrap_or_else(|| default_ops(d));
    if o.addr.is_none() && o.server_core == o.client_core {
        eprintln!(
            "redis-peers: warning: server and client share core {}",
            o.client_core
        );
    }
    let repo = repo_root();
    let txgate = o
        .txgate
        .clone()
        .unwrap_or_else(|| repo.join("target/release/txgate"));
    if peers.contains(&Peer::Txgate) && !txgate.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release` in {}",
            txgate.display(),
            repo.display()
        ));
    }
    let json_path = o
        .json
        .clone()
        .unwrap_or_else(|| repo.join("target/redis-peers.json"));
    let scratch = Scratch(std::env::temp_dir().join(format!("redis-peers-{}", std::process::id())));
    let _ = SCRATCH.set(scratch.0.clone());
    watch_signals();
    std::fs::create_dir_all(&scratch.0)
        .map_err(|e| format!("creating {}: {e}", scratch.0.display()))?;

    let server = match &o.addr {
        Some(a) => Server::external(a)?,
        None => Server::start(
            &o.redis_server,
            o.server_core,
            &scratch.0.join("redis-server.log"),
        )?,
    };
    // Run a private copy, so a concurrent rebuild cannot swap txgate mid-run.
    let txgate_run = scratch.0.join("txgate");
    if peers.contains(&Peer::Txgate) {
        std::fs::copy(&txgate, &txgate_run)
            .map_err(|e| format!("copying {}: {e}", txgate.display()))?;
    }
    let mut ctx = Ctx {
        server,
        client_core: o.client_core,
        server_core: o.addr.is_none().then_some(o.server_core),
        txgate: txgate_run,
        txgate_args: o.txgate_args.clone(),
        redis_benchmark: o.redis_benchmark.clone(),
        self_exe: std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?,
        tmp: scratch.0.clone(),
    };
    let (server_version, io_threads) = ctx.server.describe()?;
    let mut versions = serde_json::Map::new();
    for &p in &peers {
        let v = match p {
            Peer::Txgate => txgate_version(&txgate, &repo),
            Peer::RedisBenchmark => first_line(&o.redis_benchmark, &["--version"]),
            Peer::RedisRs => format!("redis {}", env!("PEER_REDIS_RS_VERSION")),
            Peer::Fred => format!("fred {}", env!("PEER_FRED_VERSION")),
        };
        versions.insert(
            p.name().to_owned(),
            serde_json::json!({"version": v, "settings": peers::settings(p, &o.txgate_args)}),
        );
    }
    let server_desc = format!(
        "redis-server {server_version} at {}{}, io-threads {io_threads}",
        ctx.server.addr,
        if ctx.server.is_own() {
            format!(
                ", started here: --save '' --appendonly no, pinned to CPU {}",
                o.server_core
            )
        } else {
            " (external)".to_owned()
        }
    );
    eprintln!("redis-peers: {server_desc}");
    for (name, v) in &versions {
        eprintln!("  {name}: {}", v["version"].as_str().unwrap_or("?"));
    }
    eprintln!(
        "  every peer pinned to CPU {}; depths {depths:?}; {} runs each; ops per run {}",
        o.client_core,
        o.runs,
        depths
            .iter()
            .map(|&d| format!("{d}: {}", ops_for(d)))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let startup_cpu_ns = if peers.contains(&Peer::Txgate) {
        Some(ctx.txgate_startup_cpu_ns()?)
    } else {
        None
    };

    let mut results = Vec::new();
    for round in 1..=o.runs {
        for &depth in &depths {
            let mut order = peers.clone();
            let shift = (round as usize - 1) % order.len();
            order.rotate_left(shift);
            for &peer in &order {
                let r = ctx.run(peer, depth, ops_for(depth), None, round)?;
                progress(&r, o.runs);
                results.push(r);
            }
        }
    }

    // Open loop at half of each peer's own median peak.
    let peaks = report::summarize(&results);
    let half = o.half_peak_depth;
    if depths.contains(&half) {
        for round in 1..=o.runs {
            for &peer in peers.iter().filter(|p| p.can_pace()) {
                let Some(peak) = peaks
                    .iter()
                    .find(|s| s.peer == peer && s.depth == half)
                    .map(|s| s.ops_per_sec)
                else {
                    continue;
                };
                let rate = (peak / 2.0).max(1.0);
                // About 4 s of offered load, within 20k..=the closed-loop count.
                let ops = ((rate * 4.0) as u64).clamp(20_000, ops_for(half).max(20_000));
                let r = ctx.run(peer, half, ops, Some(rate), round)?;
                progress(&r, o.runs);
                results.push(r);
            }
        }
    } else {
        eprintln!("redis-peers: depth {half} not among --depths: no half-peak runs");
    }

    let summary = report::summarize(&results);
    let targets = report::targets(&summary, &depths, half);
    let notes = notes(&results, startup_cpu_ns, ops_for(64));
    println!("{server_desc}; peers on CPU {}", o.client_core);
    for (name, v) in &versions {
        println!("  {name}: {}", v["version"].as_str().unwrap_or("?"));
    }
    println!(
        "medians of {} runs; ops per run {}\n",
        o.runs,
        depths
            .iter()
            .map(|&d| format!("depth {d}: {}", ops_for(d)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    print!("{}", report::table(&summary));
    println!();
    print!("{}", report::targets_text(&targets));
    println!("\nNotes:");
    for n in &notes {
        println!("  - {n}");
    }

    let doc = serde_json::json!({
        "tool": format!("redis-peers {}", env!("CARGO_PKG_VERSION")),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": {
            "cpus": online_cpus(),
            "cpu_model": cpu_model(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).ok(),
            "client_core": o.client_core,
            "server_core": o.addr.is_none().then_some(o.server_core),
        },
        "server": {
            "addr": ctx.server.addr,
            "version": server_version,
            "io_threads": io_threads,
            "started_here": ctx.server.is_own(),
            "settings": if ctx.server.is_own() { "--save '' --appendonly no (loopback, pinned)" } else { "external" },
        },
        "peers": versions,
        "runs": o.runs,
        "depths": depths,
        "ops_per_run": depths.iter().map(|&d| (d.to_string(), serde_json::Value::from(ops_for(d)))).collect::<serde_json::Map<_, _>>(),
        "half_peak_depth": half,
        "txgate_startup_cpu_ns": startup_cpu_ns,
        "summary": summary,
        "targets": targets,
        "notes": notes,
        "results": results,
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text)
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    println!("\njson: {}", json_path.display());
    Ok(())
}

fn progress(r: &peers::RunResult, runs: u32) {
    eprintln!(
        "  run {}/{runs} depth {:>3} {:<15}{} {:>11}  p99 {:>9}  CPU {:>6.2} us/op  ({} ops, {} errors)",
        r.round,
        r.depth,
        r.peer.name(),
        r.rate
            .map_or(String::new(), |x| format!(" @ {}", report::fmt_rate(x))),
        report::fmt_rate(r.ops_per_sec),
        report::fmt_ns(r.p99_ns.map(|v| v as f64)),
        r.cpu_ns_per_op / 1e3,
        r.ops,
        r.errors,
    );
}

/// What the figures mean, with the measured fixed costs.
fn notes(results: &[peers::RunResult], startup_cpu_ns: Option<u64>, ops64: u64) -> Vec<String> {
    let mut n = vec![
        "ops/s and latencies are each peer's own measurement of its measured phase (txgate: \
         bench JSON total; redis-benchmark: its CSV rps and percentiles, which have no p99.9; \
         redis-rs/fred: timed in the child after connecting). Latency percentiles are \
         histogram bucket upper bounds (~0.8 %)."
            .to_owned(),
        "CPU us/op: user + sys of the peer's process on the client core divided by its ops. \
         txgate, redis-rs and fred: getrusage(RUSAGE_SELF) over the measured phase only \
         (txgate's own figure from its bench JSON); redis-benchmark: the whole process \
         (wait4), start-up and shutdown included. Every peer's whole-process figure is in \
         the JSON: process_cpu_us_per_op."
            .to_owned(),
        "srv us/op: redis-server's own CPU (INFO used_cpu_user + used_cpu_sys) over the \
         child's lifetime, per op."
            .to_owned(),
        "Half of peak: offered load = 0.5 x the peer's median closed-loop ops/s at that \
         depth, open loop, latency from each op's scheduled send time. txgate paces with \
         glommio timers; redis-rs and fred with tokio sleeps plus yielding for the last 2 ms \
         (tokio timers tick per ms), so their paced CPU includes that spinning. \
         redis-benchmark cannot pace."
            .to_owned(),
    ];
    if let Some(s) = startup_cpu_ns {
        let tx64 = results
            .iter()
            .filter(|r| r.peer == Peer::Txgate && r.depth == 64 && r.rate.is_none())
            .map(|r| r.process_user_ns + r.process_sys_ns)
            .min();
        n.push(format!(
            "txgate's fixed cost (a 1-claim run: start-up, connect, shutdown) is {:.1} ms of \
             CPU{}; its CPU us/op leaves it out (measured phase), process_cpu_us_per_op in \
             the JSON has it.",
            s as f64 / 1e6,
            tx64.map_or(String::new(), |t| format!(
                " = {:.1} % of a depth-64 run of {ops64} claims",
                s as f64 * 100.0 / t.max(1) as f64
            ))
        ));
    }
    let rb: Vec<_> = results
        .iter()
        .filter(|r| r.peer == Peer::RedisBenchmark)
        .collect();
    if !rb.is_empty() {
        let keys: u64 = rb.iter().map(|r| r.keys_created).sum();
        let ops: u64 = rb.iter().map(|r| r.ops).sum();
        n.push(format!(
            "redis-benchmark draws keys at random (-r 1e9), so a key may repeat (a lost SET, \
             still one round trip), and with -P it may send a few more than -n: its runs \
             created {keys} keys for {ops} requested SETs."
        ));
    }
    let noisy: Vec<String> = results
        .iter()
        .filter(|r| r.interference().is_some_and(|x| x > NOISY))
        .map(|r| {
            format!(
                "{} depth {}{} run {} ({:.0} %)",
                r.peer.name(),
                r.depth,
                if r.rate.is_some() { " paced" } else { "" },
                r.round,
                r.interference().unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    n.push(if noisy.is_empty() {
        "other %: share of the client or server core (the larger) that other work took \
         during a run (/proc/stat busy time minus the peer's and the server's own CPU, \
         approximate: 10 ms ticks, and kernel network work is not always charged to them); no \
         run saw more than 10 %."
            .to_owned()
    } else {
        format!(
            "other %: share of the client or server core (the larger) that other work took \
             during a run (/proc/stat busy time minus the peer's and the server's own CPU, \
             approximate: 10 ms ticks, and kernel network work is not always charged to them). \
             Runs above 10 %, whose figures are disturbed: {}",
            noisy.join(", ")
        )
    });
    let short: Vec<String> = results
        .iter()
        .filter(|r| r.peer != Peer::RedisBenchmark && r.keys_created + r.errors < r.ops)
        .map(|r| format!("{} depth {} run {}", r.peer.name(), r.depth, r.round))
        .collect();
    if !short.is_empty() {
        n.push(format!(
            "WARNING: fewer keys created than ops in: {}",
            short.join(", ")
        ));
    }
    n
}

fn first_line(bin: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(bin);
    child::unblocked_signals(&mut cmd);
    cmd.args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `txgate x.y.z (git abc1234[-dirty])`.
fn txgate_version(bin: &Path, repo: &Path) -> String {
    let v = first_line(&bin.to_string_lossy(), &["--version"]);
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        child::unblocked_signals(&mut cmd);
        cmd.arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let mut parts = Vec::new();
    if let Some(rev) = git(&["rev-parse", "--short", "HEAD"]) {
        let dirty = git(&[
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .is_some_and(|s| !s.is_empty());
        parts.push(format!(
            "repo at git {rev}{}",
            if dirty { " + local changes" } else { "" }
        ));
    }
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(newest)) = (built, newest_mtime(&repo.join("src")))
        && let Ok(behind) = newest.duration_since(built)
    {
        parts.push(format!(
            "binary {:.0} s older than the newest file in src/",
            behind.as_secs_f64()
        ));
    }
    if parts.is_empty() {
        v
    } else {
        format!("{v} ({})", parts.join("; "))
    }
}

/// The latest modification time of any file under `dir` (bounded depth).
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, depth: u32, newest: &mut Option<std::time::SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() && depth < 8 {
                walk(&e.path(), depth + 1, newest);
            } else if let Ok(t) = meta.modified() {
                *newest = (*newest).max(Some(t));
            }
        }
    }
    let mut newest = None;
    walk(dir, 0, &mut newest);
    newest
}

fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
}
