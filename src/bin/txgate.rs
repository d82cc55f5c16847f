//! The `txgate` command: `bench` (per-core claim latency) today; the UDP
//! gate joins as `serve`.
//!
//! Exit codes: 0 success, 1 runtime failure (backend unreachable, engine
//! failed to start, file not writable), 2 usage error (bad flag or value).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::error::ErrorKind;
use clap::{Arg, ArgMatches, Command, value_parser};

use txgate::bench::{self, BenchConfig, Stop, report};
use txgate::cache::{self, BackendKind, register_flags};
use txgate::engine::{Engine, EngineConfig, affinity_cores, parse_core_list};
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
                .conflicts_with("claims")
                .help("Run for this long (default 10s unless --claims is given)"),
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
                .value_parser(parse_core_list)
                .conflicts_with("shards")
                .help("CPUs to pin shards to, one shard each, e.g. 0-3,8 (default: the affinity mask)"),
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
                .value_parser(parse_duration)
                .default_value("60s")
                .help("How long a claimed TxID stays claimed (tier-1 and store)"),
        )
        .arg(
            arg("txid-len", "TXGATE_TXID_LEN")
                .value_name("BYTES")
                .value_parser(value_parser!(u64).range(1..=64))
                .default_value("16")
                .help("TxID length"),
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

fn cli() -> (Command, cache::flags::CacheFlags) {
    let (bench, store) = bench_command();
    let cmd = Command::new("txgate")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Thread-per-core TxID dedup: forward one copy of each transaction, suppress the rest",
        )
        .long_about(
            "txgate decides \"forward or suppress\" for each copy of a transaction id (TxID): \
             nanoseconds for a TxID it has seen, one pipelined round trip to a shared store \
             (memory, Redis, Aerospike) for a novel one. If the store fails, it forwards.\n\n\
             Every flag has an UPPERCASE env twin (e.g. --backend / TXGATE_BACKEND).",
        )
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(bench);
    (cmd, store)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let (mut cmd, store) = cli();
    let matches = cmd.get_matches_mut();
    match matches.subcommand() {
        Some(("bench", m)) => {
            let sub = cmd.find_subcommand_mut("bench").expect("registered");
            run_bench(sub, m, &store)
        }
        _ => unreachable!("subcommand_required"),
    }
}

fn run_bench(cmd: &mut Command, m: &ArgMatches, store: &cache::flags::CacheFlags) -> ExitCode {
    let config = match store.config(m) {
        Ok(c) => c,
        Err(e) => cmd.error(ErrorKind::ValueValidation, e.to_string()).exit(),
    };
    let cores = if let Some(list) = m.get_one::<Vec<usize>>("cores") {
        list.clone()
    } else {
        let mine = match affinity_cores() {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => return fail("the affinity mask has no CPUs"),
            Err(e) => return fail(&format!("reading the CPU affinity mask: {e}")),
        };
        let n = m
            .get_one::<u64>("shards")
            .map_or(mine.len(), |&n| n as usize);
        (0..n).map(|i| mine[i % mine.len()]).collect()
    };
    let stop = match (
        m.get_one::<Duration>("duration"),
        m.get_one::<u64>("claims"),
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
        backend,
        txidset: TxIdSetConfig {
            txid_len: *m.get_one::<u64>("txid-len").expect("default") as usize,
            tier1_capacity: *m.get_one::<u64>("tier1-capacity").expect("default") as usize,
            ttl: *m.get_one::<Duration>("ttl").expect("default"),
            // Short enough that key and value stay inline in the memory backend.
            key_prefix: format!("txb:{:x}:", seed as u32).into_bytes(),
            ..Default::default()
        },
        ..Default::default()
    }) {
        Ok(e) => e,
        Err(e) => return fail(&format!("starting shards on cores {cores:?}: {e}")),
    };
    println!(
        "txgate bench: backend {backend_name}, {} shards on cores {:?}, {}, duplicate ratio {}, copies {}, inflight {}",
        engine.shards(),
        engine.cores(),
        match stop {
            Stop::Duration(d) => format!("{:?}", d),
            Stop::Claims(n) => format!("{n} claims"),
        },
        bench_cfg.duplicate_ratio,
        bench_cfg.copies,
        bench_cfg.inflight,
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
    if let Some(path) = m.get_one::<PathBuf>("json") {
        if let Err(e) = std::fs::write(path, bench::outcome_json(&outcome, &bench_cfg)) {
            return fail(&format!("writing {}: {e}", path.display()));
        }
        println!("json: {}", path.display());
    }
    if let Some(path) = m.get_one::<PathBuf>("plot") {
        if let Err(e) = std::fs::write(path, report::render_svg(&outcome.result)) {
            return fail(&format!("writing {}: {e}", path.display()));
        }
        println!("plot: {}", path.display());
    }
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("txgate: {msg}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        super::cli().0.debug_assert();
    }
}
