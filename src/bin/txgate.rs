//! The `txgate` command: `serve` (the UDP ingress gate) and `bench`
//! (per-core claim latency).
//!
//! Exit codes: 0 success, 1 runtime failure (backend unreachable, engine
//! failed to start, file not writable), 2 usage error (bad flag or value).

/// Huge pages for tier-1 and the memory store (see `txgate::hugepages`).
#[global_allocator]
static ALLOC: txgate::hugepages::HugePageAlloc = txgate::hugepages::HugePageAlloc;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::error::ErrorKind;
use clap::{Arg, ArgMatches, Command, value_parser};

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use txgate::admin::{Admin, Response};
use txgate::bench::{self, BenchConfig, Stop, report};
use txgate::cache::{self, BackendKind, register_flags};
use txgate::engine::{Engine, EngineConfig, affinity_cores, parse_core_list_here};
use txgate::gate::{Gate, GateConfig, Multicast, Steering};
use txgate::txidset::TxIdSetConfig;
use txgate::units::parse_duration;

fn bench_command() -> (Command, cache::flags::CacheFlags) {
    let arg = |name: &'static str, env: &'static str| Arg::new(name).long(name).env(env);
    let cmd = Command::new("bench")
        .about("Measure claim latency per core on a synthetic TxID stream")
        .long_about(
            "Measure claim latency per core on a synthetic TxID stream.\n\n\
             Each shard (one pinned core) generates TxIDs it owns, a chosen share of them \
             repeats of recent ones, and claims every one through its two-tier TxID set \
             (tier-1, then the store for novel TxIDs). Prints claims/s and latency \
             percentiles per shard and in total, duplicates and novel claims apart.",
        )
        .next_help_heading("Run")
        .arg(
            arg("duration", "TXGATE_DURATION")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .help("Run for this long (default 10s unless --claims is given; not with --claims)"),
        )
        .arg(
            arg("claims", "TXGATE_CLAIMS")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..))
                .help("Run until this many claims over all shards"),
        )
        .arg(
            arg("duplicate-ratio", "TXGATE_DUPLICATE_RATIO")
                .value_name("FRACTION")
                .value_parser(parse_fraction)
                .default_value("0.9")
                .help("Share of claims that repeat an earlier TxID, 0..=1"),
        )
        .arg(
            arg("copies", "TXGATE_COPIES")
                .value_name("N")
                .value_parser(value_parser!(u32).range(1..=1_000_000))
                .default_value("16")
                .help("Most copies of one TxID, the first included; caps the duplicate ratio at (N-1)/N"),
        )
        .arg(
            arg("inflight", "TXGATE_INFLIGHT")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..=65_536))
                .default_value("1")
                .help("Claims outstanding per shard"),
        )
        .arg(
            arg("rate", "TXGATE_RATE")
                .value_name("CLAIMS_PER_SEC")
                .value_parser(parse_rate)
                .help("Offered load over all shards, open loop (default: as fast as --inflight allows); latency counts from each claim's scheduled start"),
        )
        .arg(
            arg("seed", "TXGATE_SEED")
                .value_name("N")
                .value_parser(value_parser!(u64))
                .help("TxID generator seed (default: from the clock, so runs never share keys)"),
        )
        .next_help_heading("Shards")
        .arg(
            arg("cores", "TXGATE_CORES")
                .value_name("LIST")
                .value_parser(parse_core_list_here)
                .help("CPUs to pin shards to, one shard each, e.g. 0-3,8 (default: the affinity mask; not with --shards)"),
        )
        .arg(
            arg("shards", "TXGATE_SHARDS")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..=1024))
                .help("Shard count: the first N CPUs of the affinity mask, reused in turn when N is larger"),
        )
        .arg(
            arg("spin-before-park", "TXGATE_SPIN_BEFORE_PARK")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .default_value("0")
                .help("How long an idle shard polls before sleeping (e.g. 50us; 0 = sleep at once): trades CPU on dedicated cores for fewer syscalls and faster wake-ups"),
        )
        .arg(
            arg("tier1-capacity", "TXGATE_TIER1_CAPACITY")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..=1_000_000_000))
                .default_value("1048576")
                .help("Tier-1 bound, TxIDs per shard (~37 bytes each for 16-byte TxIDs)"),
        )
        .arg(
            arg("ttl", "TXGATE_TTL")
                .value_name("DURATION")
                .value_parser(parse_ttl)
                .default_value("60s")
                .help("How long a claimed TxID stays claimed (tier-1 and store)"),
        )
        .arg(
            arg("txid-len", "TXGATE_TXID_LEN")
                .value_name("BYTES")
                .value_parser(value_parser!(u64).range(8..=64))
                .default_value("16")
                .help("TxID length (at least 8: novel TxIDs come from a 64-bit counter, so none repeats)"),
        )
        .next_help_heading("Output")
        .arg(
            arg("json", "TXGATE_JSON")
                .value_name("FILE")
                .value_parser(value_parser!(PathBuf))
                .help("Also write the figures as JSON"),
        )
        .arg(
            arg("plot", "TXGATE_PLOT")
                .value_name("FILE.svg")
                .value_parser(value_parser!(PathBuf))
                .help("Draw latency percentile curves per shard as SVG"),
        );
    register_flags(cmd, "", "TXGATE_")
}

/// What is allocated and touched at start: each shard's tier-1 table, and
/// the memory store's tables when that is the store.
struct StartMemory {
    tier1_capacity: usize,
    txid_len: usize,
    shards: usize,
    /// The store flag bounding it (`--memory-max-keys` as spelt here) and
    /// its value, when the store is the memory one.
    memory_store: Option<(String, usize)>,
}

/// Exits 2 naming the flags when what the shards allocate at start (tier-1
/// and the memory store, each table's pages touched then) exceeds the memory
/// this process may use: a clear refusal instead of an allocation abort, an
/// OOM kill, or a container's restart loop. Returns the bytes it counted.
fn check_start_memory_fits(cmd: &mut Command, want: &StartMemory) -> u128 {
    let tier1 =
        txgate::tier1::Tier1::bytes_for(want.tier1_capacity, want.txid_len) * want.shards as u128;
    let store = want.memory_store.as_ref().map_or(0, |(_, keys)| {
        cache::memory::MemoryBackend::start_bytes(*keys, want.shards)
    });
    let Some((limit, what)) = memory_limit_bytes() else {
        return tier1 + store;
    };
    if tier1 + store <= u128::from(limit) {
        return tier1 + store;
    }
    let gib = |b: u128| b as f64 / f64::from(1u32 << 30);
    let mut parts = vec![format!(
        "--tier1-capacity {} needs {:.1} GiB of tier-1 ({} shard(s) of {}-byte TxIDs)",
        want.tier1_capacity,
        gib(tier1),
        want.shards,
        want.txid_len
    )];
    if let Some((flag, keys)) = &want.memory_store {
        parts.push(format!(
            "{flag} {keys} {:.1} GiB of store tables",
            gib(store)
        ));
    }
    cmd.error(
        ErrorKind::ValueValidation,
        format!(
            "{}: more than the {:.1} GiB this process may use ({what})",
            parts.join(" and "),
            gib(u128::from(limit))
        ),
    )
    .exit();
}

/// The bound on start-up for shards that touch `bytes` of tables in all:
/// the engine's default, plus two seconds a GiB (a page fault per 4 KiB,
/// and page cache to reclaim on a busy host: 6.5 GB took 11.6 s here).
fn start_timeout_for(bytes: u128) -> Duration {
    EngineConfig::default().start_timeout + Duration::from_secs(2 * (bytes >> 30) as u64)
}

/// The least of what limits this process's memory, and which it is: the
/// machine's `MemTotal`, a cgroup v2 `memory.max` on the way up from this
/// process's cgroup (a container or a systemd `MemoryMax=`), and
/// `RLIMIT_AS`.
fn memory_limit_bytes() -> Option<(u64, &'static str)> {
    let mut least: Option<(u64, &'static str)> = None;
    let mut take = |bytes: Option<u64>, what: &'static str| {
        if let Some(b) = bytes
            && least.is_none_or(|(l, _)| b < l)
        {
            least = Some((b, what));
        }
    };
    take(mem_total_bytes(), "MemTotal");
    take(cgroup_memory_max_bytes(), "cgroup memory.max");
    // SAFETY: getrlimit writes one rlimit into `r`.
    let r = unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        (libc::getrlimit(libc::RLIMIT_AS, &mut r) == 0).then_some(r)
    };
    take(
        r.filter(|r| r.rlim_cur != libc::RLIM_INFINITY)
            .map(|r| r.rlim_cur),
        "RLIMIT_AS",
    );
    least
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn mem_total_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The least `memory.max` from this process's cgroup v2 up to the root of
/// the hierarchy it can see; `None` without cgroup v2 or without a limit.
fn cgroup_memory_max_bytes() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = std::path::PathBuf::from("/sys/fs/cgroup");
    dir.push(path.trim_start_matches('/'));
    // Bounded by the path's depth.
    dir.ancestors()
        .take_while(|d| d.starts_with("/sys/fs/cgroup"))
        .filter_map(|d| std::fs::read_to_string(d.join("memory.max")).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .min()
}

/// A dedup TTL: a duration tier-1 can hold (about 24.8 days at most).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let max = Duration::from_millis(txgate::tier1::TTL_MS_MAX);
    if d > max {
        return Err(format!(
            "'{s}' is longer than the most a TTL can be, {max:?}"
        ));
    }
    Ok(d)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && (1.0..=1e9).contains(&r) => Ok(r),
        _ => Err(format!("'{s}' is not a rate between 1 and 1e9 claims/s")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "'{s}' is not a fraction between 0 and 1 (e.g. 0.9)"
        )),
    }
}

fn cli() -> (Command, cache::flags::CacheFlags, cache::flags::CacheFlags) {
    let (bench, store) = bench_command();
    let (serve, ingress) = serve_command();
    let cmd = Command::new("txgate")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Thread-per-core TxID dedup: forward one copy of each transaction, suppress the rest",
        )
        .long_about(
            "txgate decides \"forward or suppress\" for each copy of a transaction id (TxID): \
             nanoseconds for a TxID it has seen, one pipelined round trip to a shared store \
             (memory, Redis, Aerospike) for a novel one. If the store fails, it forwards.\n\n\
             Every flag has an UPPERCASE env twin: serve's store flags --ingress-dedup-NAME \
             read INGRESS_DEDUP_NAME, every other flag --NAME reads TXGATE_NAME (bench's \
             --backend: TXGATE_BACKEND; serve's --listen: TXGATE_LISTEN). A store setting \
             under the other subcommand's name alone (TXGATE_BACKEND for serve) exits 2; a \
             variable with either prefix that no flag reads gets a warning.",
        )
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(serve)
        .subcommand(bench);
    (cmd, store, ingress)
}

fn main() -> ExitCode {
    init_logging();
    let (mut cmd, store, ingress) = cli();
    let matches = cmd.get_matches_mut();
    let names: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    let (serve_env, bench_env) = (
        env_twins(cmd.find_subcommand("serve").expect("registered")),
        env_twins(cmd.find_subcommand("bench").expect("registered")),
    );
    match matches.subcommand() {
        Some(("serve", m)) => {
            let sub = cmd.find_subcommand_mut("serve").expect("registered");
            match check_env(&names, ("serve", &serve_env), &bench_env) {
                Ok(warnings) => warnings
                    .iter()
                    .for_each(|w| say_err(format_args!("txgate serve: warning: {w}"))),
                Err(e) => sub.error(ErrorKind::UnknownArgument, e).exit(),
            }
            run_serve(sub, m, &ingress)
        }
        Some(("bench", m)) => {
            let sub = cmd.find_subcommand_mut("bench").expect("registered");
            match check_env(&names, ("bench", &bench_env), &serve_env) {
                Ok(warnings) => warnings
                    .iter()
                    .for_each(|w| say_err(format_args!("txgate bench: warning: {w}"))),
                Err(e) => sub.error(ErrorKind::UnknownArgument, e).exit(),
            }
            run_bench(sub, m, &store)
        }
        _ => unreachable!("subcommand_required"),
    }
}

/// Which of two flags that exclude each other to use: a flag given on the
/// command line beats its rival's environment variable (a flag always beats
/// an env twin); both given the same way is a usage error. `Some(true)`:
/// `a`, `Some(false)`: `b`, `None`: neither.
fn first_of(cmd: &mut Command, m: &ArgMatches, a: &str, b: &str) -> Option<bool> {
    use clap::parser::ValueSource;
    let source = |id: &str| {
        m.value_source(id)
            .filter(|s| *s != ValueSource::DefaultValue)
    };
    match (source(a), source(b)) {
        (None, None) => None,
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(x), Some(y)) if x == y => cmd
            .error(
                ErrorKind::ArgumentConflict,
                format!("--{a} cannot be used with --{b}"),
            )
            .exit(),
        (Some(x), Some(_)) => Some(x == ValueSource::CommandLine),
    }
}

fn run_bench(cmd: &mut Command, m: &ArgMatches, store: &cache::flags::CacheFlags) -> ExitCode {
    let config = match store.config(m) {
        Ok(c) => c,
        Err(e) => cmd.error(ErrorKind::ValueValidation, e.to_string()).exit(),
    };
    let by_cores = first_of(cmd, m, "cores", "shards");
    let cores = if let Some(list) = m
        .get_one::<Vec<usize>>("cores")
        .filter(|_| by_cores == Some(true))
    {
        list.clone()
    } else {
        let mine = match affinity_cores() {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => return fail("the affinity mask has no CPUs"),
            Err(e) => return fail(&format!("reading the CPU affinity mask: {e}")),
        };
        let n = m
            .get_one::<u64>("shards")
            .filter(|_| by_cores == Some(false))
            .map_or(mine.len(), |&n| n as usize);
        (0..n).map(|i| mine[i % mine.len()]).collect()
    };
    let store_cfg = match store.config(m) {
        Ok(c) => c,
        Err(e) => cmd.error(ErrorKind::ValueValidation, e.to_string()).exit(),
    };
    let start_bytes = check_start_memory_fits(
        cmd,
        &StartMemory {
            tier1_capacity: *m.get_one::<u64>("tier1-capacity").expect("default") as usize,
            txid_len: *m.get_one::<u64>("txid-len").expect("default") as usize,
            shards: cores.len(),
            memory_store: (store_cfg.backend == BackendKind::Memory)
                .then(|| (store.flag("memory-max-keys"), store_cfg.memory_max_keys)),
        },
    );
    let by_duration = first_of(cmd, m, "duration", "claims");
    let stop = match (
        m.get_one::<Duration>("duration")
            .filter(|_| by_duration == Some(true)),
        m.get_one::<u64>("claims")
            .filter(|_| by_duration == Some(false)),
    ) {
        (_, Some(&n)) => Stop::Claims(n),
        (Some(&d), None) => Stop::Duration(d),
        (None, None) => Stop::Duration(Duration::from_secs(10)),
    };
    if stop == Stop::Duration(Duration::ZERO) {
        cmd.error(
            ErrorKind::ValueValidation,
            "--duration must be greater than zero",
        )
        .exit();
    }
    let seed = m.get_one::<u64>("seed").copied().unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let bench_cfg = BenchConfig {
        stop,
        duplicate_ratio: *m.get_one::<f64>("duplicate-ratio").expect("default"),
        copies: *m.get_one::<u32>("copies").expect("default"),
        inflight: *m.get_one::<u64>("inflight").expect("default") as usize,
        seed,
        progress: std::io::stdout().is_terminal(),
        rate: m.get_one::<f64>("rate").copied(),
    };
    // The output files are opened now: a path that cannot be written fails
    // the command before the run, not after it (losing its results).
    let mut outputs = Outputs(Vec::new());
    for flag in ["json", "plot"] {
        if let Some(path) = m.get_one::<PathBuf>(flag) {
            match std::fs::File::create(path) {
                Ok(f) => outputs.0.push((flag, path.clone(), Some(f))),
                Err(e) => return fail(&format!("--{flag} {}: {e}", path.display())),
            }
        }
    }
    let backend = match cache::open(&config) {
        Ok(b) => b,
        Err(e) => return fail(&format!("opening the {} backend: {e}", config.backend)),
    };
    let backend_name = backend
        .as_ref()
        .map_or(BackendKind::None.as_str(), |b| b.kind());
    let engine = match Engine::start(EngineConfig {
        cores: cores.clone(),
        spin_before_park: *m.get_one::<Duration>("spin-before-park").expect("default"),
        // Its claim tasks never wait while a store fails at once.
        preempt_every: Duration::from_millis(1),
        start_timeout: start_timeout_for(start_bytes),
        backend,
        txidset: TxIdSetConfig {
            txid_len: *m.get_one::<u64>("txid-len").expect("default") as usize,
            tier1_capacity: *m.get_one::<u64>("tier1-capacity").expect("default") as usize,
            ttl: *m.get_one::<Duration>("ttl").expect("default"),
            // Short enough that key and value stay inline in the memory backend.
            key_prefix: format!("txb:{:x}:", seed as u32).into_bytes(),
            // Room for every claim in flight: past the single-flight bound a
            // claim fails open without asking the store.
            pending_max: TxIdSetConfig::default().pending_max.max(bench_cfg.inflight),
            ..Default::default()
        },
        ..Default::default()
    }) {
        Ok(e) => e,
        Err(e) => return fail(&format!("starting shards on cores {cores:?}: {e}")),
    };
    println!(
        "txgate bench: backend {backend_name}, {} shards on cores {:?}, {}, duplicate ratio {}, copies {}, inflight {}, {}",
        engine.shards(),
        engine.cores(),
        match stop {
            Stop::Duration(d) => format!("{:?}", d),
            Stop::Claims(n) => format!("{n} claims"),
        },
        bench_cfg.duplicate_ratio,
        bench_cfg.copies,
        bench_cfg.inflight,
        match bench_cfg.rate {
            Some(r) => format!("paced at {r} claims/s (open loop)"),
            None => "closed loop".to_owned(),
        },
    );
    let outcome = match bench::run(&engine, backend_name, &bench_cfg) {
        Ok(o) => o,
        Err(e) => return fail(&format!("benchmark failed: {e}")),
    };
    if let Err(e) = engine.shutdown() {
        tracing::warn!("shutdown: {e}");
    }
    print!("{}", report::render_table(&outcome.result));
    println!("{}", bench::verdict_line(&outcome));
    println!("{}", bench::cpu_line(&outcome));
    for w in bench::warnings(&outcome, &bench_cfg) {
        eprintln!("txgate bench: WARNING: {w}");
    }
    for (flag, path, file) in outputs.0.iter_mut() {
        let mut file = file.take().expect("written once");
        let text = if *flag == "json" {
            let mut v: serde_json::Value =
                serde_json::from_str(&bench::outcome_json(&outcome, &bench_cfg))
                    .expect("the bench JSON parses");
            // What the run was, beyond the stream's settings.
            let settings = &mut v["settings"];
            settings["cores"] = serde_json::json!(cores);
            settings["txid_len"] = serde_json::json!(m.get_one::<u64>("txid-len"));
            settings["tier1_capacity"] = serde_json::json!(m.get_one::<u64>("tier1-capacity"));
            settings["ttl_ms"] =
                serde_json::json!(m.get_one::<Duration>("ttl").map(|d| d.as_millis() as u64));
            serde_json::to_string_pretty(&v).expect("serializable")
        } else {
            report::render_svg(&outcome.result)
        };
        if let Err(e) = file.write_all(text.as_bytes()) {
            return fail(&format!("writing {}: {e}", path.display()));
        }
        println!("{flag}: {}", path.display());
    }
    ExitCode::SUCCESS
}

/// `bench`'s output files, opened before the run; the ones not written (the
/// run failed) are removed rather than left empty.
struct Outputs(Vec<(&'static str, PathBuf, Option<std::fs::File>)>);

impl Drop for Outputs {
    fn drop(&mut self) {
        for (_, path, file) in &self.0 {
            if file.is_some() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("txgate: {msg}");
    ExitCode::FAILURE
}

fn serve_command() -> (Command, cache::flags::CacheFlags) {
    let arg = |name: &'static str, env: &'static str| Arg::new(name).long(name).env(env);
    let cmd = Command::new("serve")
        .about("Run the UDP ingress gate: one copy of each TxID forwarded, the rest dropped")
        .long_about(
            "Run the UDP ingress gate: datagrams in, one copy per TxID out.\n\n\
             One socket per shard (pinned core) in an SO_REUSEPORT group; the kernel steers \
             each datagram to its TxID's owner shard (classic BPF), or shards hand packets \
             over. Each TxID is claimed through tier-1 and the ingress store: won or \
             fail-open → forwarded unchanged to every --forward target; copies dropped and \
             counted. SIGTERM/SIGINT drain in-flight claims and exit 0.",
        )
        .next_help_heading("Gate")
        .arg(
            arg("listen", "TXGATE_LISTEN")
                .value_name("ADDR")
                .value_parser(parse_addr)
                .required(true)
                .help("Address to receive datagrams on, HOST:PORT"),
        )
        .arg(
            arg("forward", "TXGATE_FORWARD")
                .value_name("ADDR[,ADDR…]")
                .value_parser(parse_addr)
                .value_delimiter(',')
                .required(true)
                .help("Where forwarded datagrams go; each goes to every target (unicast or multicast)"),
        )
        .arg(
            arg("txid-offset", "TXGATE_TXID_OFFSET")
                .value_name("BYTES")
                .value_parser(value_parser!(u64).range(0..=65_000))
                .default_value("0")
                .help("Where the TxID starts in the payload"),
        )
        .arg(
            arg("txid-len", "TXGATE_TXID_LEN")
                .value_name("BYTES")
                .value_parser(value_parser!(u64).range(1..=64))
                .default_value("16")
                .help("TxID length; shorter datagrams are dropped and counted"),
        )
        .arg(
            arg("dedup-ttl", "TXGATE_DEDUP_TTL")
                .value_name("DURATION")
                .value_parser(parse_ttl)
                .default_value("60s")
                .help("How long a claimed TxID stays claimed (tier-1 and store)"),
        )
        .arg(
            arg("tier1-capacity", "TXGATE_TIER1_CAPACITY")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..=1_000_000_000))
                .default_value("1048576")
                .help("Tier-1 bound, TxIDs per shard (~37 bytes each for 16-byte TxIDs)"),
        )
        .arg(
            arg("cores", "TXGATE_CORES")
                .value_name("LIST")
                .value_parser(parse_core_list_here)
                .help("CPUs to pin shards to, one shard each, e.g. 0-3,8 (default: the affinity mask)"),
        )
        .arg(
            arg("steering", "TXGATE_STEERING")
                .value_name("MODE")
                .value_parser(|s: &str| s.parse::<Steering>())
                .default_value("auto")
                .help("auto: kernel steering when the kernel takes the program, else hand-overs; cbpf: kernel steering or fail; off: hand-overs"),
        )
        .arg(
            arg("fail-open-boot", "TXGATE_FAIL_OPEN_BOOT")
                .value_name("BOOL")
                .value_parser(clap::builder::BoolishValueParser::new())
                .num_args(0..=1)
                .default_missing_value("true")
                .default_value("false")
                .help("When the store is down at start, serve on tier-1 only, report degraded on /readyz, and switch to the store when it comes up (default: fail to start)"),
        )
        .arg(
            arg("instance-id", "TXGATE_INSTANCE_ID")
                .value_name("NAME")
                .value_parser(parse_instance_id)
                .help("Names this instance in stored claims (default: hostname-pid, ≤ 40 bytes)"),
        )
        .arg(
            arg("key-prefix", "TXGATE_KEY_PREFIX")
                .value_name("PREFIX")
                .default_value("txgate:")
                .value_parser(parse_key_prefix)
                .help("Namespaces store keys (prefix ‖ TxID); every instance of one fleet must agree"),
        )
        .next_help_heading("Sockets")
        .arg(
            arg("batch", "TXGATE_BATCH")
                .value_name("N")
                .value_parser(value_parser!(u64).range(1..=1024))
                .default_value("32")
                .help("Datagrams per recvmmsg/sendmmsg"),
        )
        .arg(
            arg("recv-buffer-bytes", "TXGATE_RECV_BUFFER_BYTES")
                .value_name("BYTES")
                .value_parser(value_parser!(u64).range(0..=1 << 31))
                .default_value("4194304")
                .help("SO_RCVBUF per shard socket (capped by net.core.rmem_max, with a warning at start); 0 keeps the kernel default"),
        )
        .arg(
            arg("multicast-ttl", "TXGATE_MULTICAST_TTL")
                .value_name("HOPS")
                .value_parser(value_parser!(u32).range(0..=255))
                .default_value("1")
                .help("TTL of forwarded multicast datagrams"),
        )
        .arg(
            arg("multicast-loop", "TXGATE_MULTICAST_LOOP")
                .value_name("BOOL")
                .value_parser(clap::builder::BoolishValueParser::new())
                .num_args(0..=1)
                .default_missing_value("true")
                .default_value("true")
                .help("Whether listeners on this host get forwarded multicast datagrams"),
        )
        .arg(
            arg("multicast-interface", "TXGATE_MULTICAST_INTERFACE")
                .value_name("IPV4|INDEX")
                .help("Outgoing interface for multicast: an IPv4 address (IPv4 targets) or an interface index (IPv6 targets)"),
        )
        .arg(
            arg("spin-before-park", "TXGATE_SPIN_BEFORE_PARK")
                .value_name("DURATION")
                .value_parser(parse_duration)
                .default_value("0")
                .help("How long an idle shard polls before sleeping (e.g. 50us; 0 = sleep at once)"),
        )
        .next_help_heading("Admin")
        .arg(
            arg("admin", "TXGATE_ADMIN")
                .value_name("ADDR|off")
                .value_parser(parse_admin)
                .default_value("127.0.0.1:9090")
                .help("HTTP listener for /metrics (Prometheus), /readyz and /livez; off disables it"),
        );
    register_flags(cmd, "ingress-dedup-", "INGRESS_DEDUP_")
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.trim().parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.trim().to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("'{s}' resolves to no address")),
        Err(e) => Err(format!("'{s}' is not HOST:PORT ({e})")),
    }
}

fn parse_admin(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.trim() == "off" {
        Ok(None)
    } else {
        parse_addr(s).map(Some)
    }
}

fn parse_instance_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > txgate::txidset::INSTANCE_ID_MAX {
        Err(format!(
            "'{s}' must be 1..={} bytes",
            txgate::txidset::INSTANCE_ID_MAX
        ))
    } else {
        Ok(s.to_owned())
    }
}

fn parse_key_prefix(s: &str) -> Result<String, String> {
    if s.len() > txgate::txidset::KEY_PREFIX_MAX {
        Err(format!(
            "'{s}' is longer than {} bytes",
            txgate::txidset::KEY_PREFIX_MAX
        ))
    } else {
        Ok(s.to_owned())
    }
}

/// Warnings and errors to stderr by default; `RUST_LOG` (e.g. `info`,
/// `txgate=debug`) chooses otherwise, and a bad one is named and ignored.
/// Colour only on a terminal, so journald and log files get plain text.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new("warn"),
                Some(format!("RUST_LOG='{spec}': {e}")),
            ),
        },
        _ => (EnvFilter::new("warn"), None),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    if let Some(bad) = bad {
        tracing::warn!("ignoring {bad}; logging warnings and errors");
    }
}

/// Prefixes of the env twins: a variable with one of them is meant for us.
const ENV_PREFIXES: [&str; 2] = ["TXGATE_", "INGRESS_DEDUP_"];

/// The env twins of `cmd`'s flags.
fn env_twins(cmd: &Command) -> Vec<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// Checks environment variables with our prefixes that subcommand `this.0`
/// (whose twins are `this.1`) would ignore. A store setting under the other
/// subcommand's spelling while this one's is not set (`TXGATE_BACKEND` for
/// serve, which reads `INGRESS_DEDUP_BACKEND`) is refused: serve used to
/// ignore it and run on a per-process memory store. A name no flag reads
/// (a typo, or a Kubernetes service link such as `TXGATE_SERVICE_HOST`)
/// gets a warning. The other subcommand's own variables pass, so one
/// environment can carry both.
fn check_env(
    names: &[String],
    this: (&str, &[String]),
    other: &[String],
) -> Result<Vec<String>, String> {
    let suffix = |name: &str| {
        ENV_PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .map(str::to_owned)
    };
    let mut warnings = Vec::new();
    for name in names {
        let Some(tail) = suffix(name) else { continue };
        if this.1.contains(name) {
            continue;
        }
        if let Some(twin) = this.1.iter().find(|t| suffix(t).as_deref() == Some(&tail)) {
            if names.contains(twin) {
                continue;
            }
            return Err(format!(
                "environment variable {name} is not read by {}: its setting is {twin} here",
                this.0
            ));
        }
        if !other.contains(name) {
            warnings.push(format!(
                "environment variable {name} is not read by any txgate flag (a typo?); \
                 `txgate {} --help` lists each flag's env twin",
                this.0
            ));
        }
    }
    Ok(warnings)
}

/// One line on stderr, ignoring a failure: `eprintln!` panics on a closed
/// or hung-up terminal (EIO), and a panic aborts `serve`, so a line about
/// SIGHUP would have killed the gate the signal was meant to spare.
fn say_err(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and every thread it
/// starts afterwards), so [`wait_for_stop_signal`] can take them
/// synchronously. SIGHUP's default action would kill the gate with no
/// drain, and a supervisor counts that death as a clean exit.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the calls only read and write `set`
    // and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_stop_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is initialised and blocked in every thread; sigwait
    // writes the signal number into `sig`.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn run_serve(cmd: &mut Command, m: &ArgMatches, ingress: &cache::flags::CacheFlags) -> ExitCode {
    let signals = block_stop_signals();
    // A panic in any thread ends the process (after the usual message), so
    // a supervisor restarts it: a shard thread that died alone would leave
    // its socket in the group, its share of the traffic queued where nobody
    // reads it (lost, not failed open) while /livez still said ok.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let store = match ingress.config(m) {
        Ok(c) => c,
        Err(e) => cmd.error(ErrorKind::ValueValidation, e.to_string()).exit(),
    };
    let forward: Vec<SocketAddr> = m
        .get_many::<SocketAddr>("forward")
        .expect("required")
        .copied()
        .collect();
    let mut multicast = Multicast {
        ttl: *m.get_one::<u32>("multicast-ttl").expect("default"),
        loopback: *m.get_one::<bool>("multicast-loop").expect("default"),
        ..Multicast::default()
    };
    if let Some(ifc) = m.get_one::<String>("multicast-interface") {
        // Each form applies to one family's multicast targets only: one
        // that names none would be ignored, and multicast would leave by
        // the default route, maybe onto the wrong network.
        let has_target = |v6: bool| {
            forward
                .iter()
                .any(|t| t.ip().is_multicast() && t.is_ipv6() == v6)
        };
        let refuse = |what: &str| {
            format!(
                "--multicast-interface: '{ifc}' is {what}, and --forward names no such \
                 multicast group, so it would be ignored"
            )
        };
        if let Ok(v4) = ifc.parse() {
            if !has_target(false) {
                let msg = refuse("an IPv4 address (for IPv4 groups)");
                cmd.error(ErrorKind::ValueValidation, msg).exit();
            }
            multicast.interface_v4 = Some(v4);
        } else if let Ok(index) = ifc.parse() {
            if !has_target(true) {
                let msg = refuse("an interface index (for IPv6 groups)");
                cmd.error(ErrorKind::ValueValidation, msg).exit();
            }
            multicast.interface_v6 = Some(index);
        } else {
            cmd.error(
                ErrorKind::ValueValidation,
                format!("--multicast-interface: '{ifc}' is neither an IPv4 address nor an interface index"),
            )
            .exit();
        }
    }
    let listen = *m.get_one::<SocketAddr>("listen").expect("required");
    let mut config = GateConfig::new(listen, forward.clone());
    config.txid_offset = *m.get_one::<u64>("txid-offset").expect("default") as usize;
    config.steering = *m.get_one::<Steering>("steering").expect("default");
    config.batch = *m.get_one::<u64>("batch").expect("default") as usize;
    config.recv_buffer_bytes = *m.get_one::<u64>("recv-buffer-bytes").expect("default") as usize;
    config.multicast = multicast;
    config.fail_open_boot = *m.get_one::<bool>("fail-open-boot").expect("default");
    config.engine.cores = m
        .get_one::<Vec<usize>>("cores")
        .cloned()
        .unwrap_or_default();
    config.engine.spin_before_park = *m.get_one::<Duration>("spin-before-park").expect("default");
    config.engine.txidset = TxIdSetConfig {
        txid_len: *m.get_one::<u64>("txid-len").expect("default") as usize,
        tier1_capacity: *m.get_one::<u64>("tier1-capacity").expect("default") as usize,
        ttl: *m.get_one::<Duration>("dedup-ttl").expect("default"),
        key_prefix: m
            .get_one::<String>("key-prefix")
            .expect("default")
            .clone()
            .into_bytes(),
        instance_id: m
            .get_one::<String>("instance-id")
            .cloned()
            .unwrap_or_else(txgate::txidset::default_instance_id),
        ..TxIdSetConfig::default()
    };
    let shards = match config.engine.cores.len() {
        0 => affinity_cores().map_or(1, |c| c.len().max(1)),
        n => n,
    };
    let start_bytes = check_start_memory_fits(
        cmd,
        &StartMemory {
            tier1_capacity: config.engine.txidset.tier1_capacity,
            txid_len: config.engine.txidset.txid_len,
            shards,
            memory_store: (store.backend == BackendKind::Memory)
                .then(|| (ingress.flag("memory-max-keys"), store.memory_max_keys)),
        },
    );
    config.engine.start_timeout = start_timeout_for(start_bytes);
    if config.engine.txidset.ttl.is_zero() {
        cmd.error(
            ErrorKind::ValueValidation,
            "--dedup-ttl must be greater than zero",
        )
        .exit();
    }
    let mut store = store;
    // The store's client name follows a chosen instance id unless set too.
    if m.get_one::<String>("instance-id").is_some()
        && store.redis_client_name == cache::Config::default().redis_client_name
    {
        store.redis_client_name = cache::redis::client_name_for(&config.engine.txidset.instance_id);
    }
    let store_kind = store.backend;
    config.store = store;
    // Bound before the gate starts: a taken admin port fails the start-up
    // before any datagram is claimed or forwarded.
    let admin_listener = match m.get_one::<Option<SocketAddr>>("admin").expect("default") {
        Some(addr) => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => return fail(&format!("serve: --admin {addr}: cannot listen there: {e}")),
        },
        None => None,
    };
    // Answering from the start: until the gate is up (a store dial, large
    // tables to touch) /livez says ok and the rest 503 `starting`, rather
    // than leave probes hanging on a port nobody accepts on.
    let started: Arc<std::sync::OnceLock<Arc<Gate>>> = Arc::default();
    let admin = match admin_listener {
        Some(listener) => {
            let up = started.clone();
            let handler = Arc::new(move |path: &str| match (path, up.get()) {
                ("/livez", None) => Response::text(200, "ok\n"),
                ("/livez", Some(g)) => {
                    let (live, why) = g.liveness();
                    Response::text(if live { 200 } else { 503 }, why + "\n")
                }
                ("/metrics" | "/readyz", None) => Response::text(503, "starting\n"),
                ("/metrics", Some(g)) => Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: g.render_metrics(),
                },
                ("/readyz", Some(g)) => {
                    let (ready, why) = g.readiness();
                    Response::text(if ready { 200 } else { 503 }, why + "\n")
                }
                _ => Response::text(404, "not found: try /metrics, /readyz or /livez\n"),
            });
            match Admin::serve(listener, handler) {
                Ok(a) => Some(a),
                Err(e) => return fail(&format!("serve: starting the admin listener: {e}")),
            }
        }
        None => None,
    };
    let gate = match Gate::start(config) {
        Ok(g) => Arc::new(g),
        Err(e) => return fail(&format!("serve: {e}")),
    };
    let _ = started.set(gate.clone());
    say_err(format_args!(
        "txgate serve: listening on {} with {} shard{}, {}, {} store {}, forwarding to {}{}",
        gate.local_addr(),
        gate.shards(),
        if gate.shards() == 1 { "" } else { "s" },
        if gate.shards() == 1 {
            "no steering needed"
        } else if gate.steering_active() {
            "steering by the kernel (cBPF)"
        } else {
            "steering by hand-over"
        },
        store_kind,
        if gate.store_connected() {
            "connected"
        } else {
            "unreachable (tier-1 only until it is)"
        },
        forward
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        admin.as_ref().map_or(String::new(), |a| format!(
            ", admin on http://{}",
            a.local_addr()
        )),
    ));
    // Turns again only on SIGHUP, which is ignored.
    let sig = loop {
        match wait_for_stop_signal(&signals) {
            libc::SIGHUP => say_err(format_args!(
                "txgate serve: SIGHUP ignored: there is nothing to reload (SIGTERM or SIGINT \
                 stops the gate; restart it to change its settings)"
            )),
            sig => break sig,
        }
    };
    say_err(format_args!("txgate serve: signal {sig}: draining"));
    // Admin threads answering now may hold the gate: it stops through the
    // shared handle rather than waiting for them.
    drop(admin);
    let summary = gate.stop();
    let _ = writeln!(std::io::stdout(), "{}", summary.json());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        super::cli().0.debug_assert();
    }

    #[test]
    fn env_names_no_flag_reads_are_refused() {
        let (cmd, _, _) = super::cli();
        let serve = super::env_twins(cmd.find_subcommand("serve").unwrap());
        let bench = super::env_twins(cmd.find_subcommand("bench").unwrap());
        let check = |names: &[&str], this, mine: &[String], other: &[String]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            super::check_env(&names, (this, mine), other)
        };
        let ok = [
            "PATH",
            "TXGATE_LISTEN",
            "INGRESS_DEDUP_BACKEND",
            "TXGATE_DURATION",
        ];
        assert_eq!(check(&ok, "serve", &serve, &bench), Ok(vec![]));
        let e = check(&["TXGATE_BACKEND"], "serve", &serve, &bench).unwrap_err();
        assert!(e.contains("INGRESS_DEDUP_BACKEND"), "{e}");
        let e = check(&["INGRESS_DEDUP_REDIS_ADDR"], "bench", &bench, &serve).unwrap_err();
        assert!(e.contains("TXGATE_REDIS_ADDR"), "{e}");
        // One environment for both: each reads its own spelling.
        let both = ["TXGATE_BACKEND", "INGRESS_DEDUP_BACKEND"];
        assert_eq!(check(&both, "serve", &serve, &bench), Ok(vec![]));
        assert_eq!(check(&both, "bench", &bench, &serve), Ok(vec![]));
        // Names no flag reads (a typo, a Kubernetes service link) warn.
        let names = ["TXGATE_LISTN", "TXGATE_SERVICE_HOST"];
        let w = check(&names, "serve", &serve, &bench).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("TXGATE_LISTN") && w[0].contains("typo"),
            "{w:?}"
        );
        assert_eq!(
            check(&["TXGATE_LISTEN"], "bench", &bench, &serve),
            Ok(vec![])
        );
    }

    #[test]
    fn forward_lists_resolve_and_refuse_garbage() {
        let v = super::parse_addr("127.0.0.1:9").unwrap();
        assert_eq!(v.port(), 9);
        assert!(super::parse_addr("localhost:9").is_ok());
        assert!(
            super::parse_addr("127.0.0.1")
                .unwrap_err()
                .contains("HOST:PORT")
        );
        assert!(super::parse_admin("off").unwrap().is_none());
    }
}
