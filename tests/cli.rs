//! The `txgate` binary: help, usage errors (exit 2, naming the flag), and a
//! short real `bench` run whose JSON has the documented shape.

use std::process::Command;

fn txgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_txgate"))
        .args(args)
        .env_remove("TXGATE_BACKEND")
        .output()
        .expect("txgate runs")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_subcommands_and_every_bench_flag() {
    let top = txgate(&["--help"]);
    assert!(top.status.success());
    assert!(String::from_utf8_lossy(&top.stdout).contains("bench"));
    let o = txgate(&["bench", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--duration",
        "--claims",
        "--duplicate-ratio",
        "--copies",
        "--inflight",
        "--seed",
        "--cores",
        "--shards",
        "--tier1-capacity",
        "--ttl",
        "--txid-len",
        "--json",
        "--plot",
        "--backend",
        "--memory-max-keys",
        "--redis-addr",
        "--aero-hosts",
        "--aero-namespace",
        "--aero-set",
        "--dial-timeout",
        "--op-timeout",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    assert!(help.contains("TXGATE_BACKEND"), "env twins are shown");
}

#[test]
fn unknown_backend_exits_2_naming_the_flag_and_allowed_values() {
    let o = txgate(&["bench", "--backend", "bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("--backend"), "{e}");
    for v in ["memory", "redis", "aerospike", "none"] {
        assert!(e.contains(v), "{e}");
    }
}

#[test]
fn unusable_combinations_exit_2_naming_the_flag() {
    for (args, flag) in [
        (&["bench", "--backend", "redis"][..], "--redis-addr"),
        (
            &["bench", "--backend", "aerospike", "--aero-namespace", "n"][..],
            "--aero-hosts",
        ),
        (
            &["bench", "--backend", "aerospike", "--aero-hosts", "h:3000"][..],
            "--aero-namespace",
        ),
        (&["bench", "--op-timeout", "50"][..], "--op-timeout"),
        (
            &["bench", "--duplicate-ratio", "1.5"][..],
            "--duplicate-ratio",
        ),
        (&["bench", "--cores", "3-1"][..], "--cores"),
        (&["bench", "--claims", "0"][..], "--claims"),
        (&["bench", "--txid-len", "4"][..], "--txid-len"),
        (&["bench", "--ttl", "600h"][..], "--ttl"),
        (
            &["bench", "--tier1-capacity", "1000000000", "--shards", "64"][..],
            "--tier1-capacity",
        ),
    ] {
        let o = txgate(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{args:?}: {}", stderr(&o));
    }
}

/// A flag beats its rival's environment variable; both on the command line
/// (or both in the environment) is a usage error.
#[test]
fn a_flag_beats_a_conflicting_environment_variable() {
    let run = |env: &[(&str, &str)], args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_txgate"))
            .args(args)
            .env_remove("TXGATE_BACKEND")
            .envs(env.iter().copied())
            .output()
            .expect("txgate runs")
    };
    let bench = ["bench", "--backend", "none", "--tier1-capacity", "1024"];
    let o = run(
        &[("TXGATE_DURATION", "30s"), ("TXGATE_CORES", "0")],
        &[&bench[..], &["--claims", "2000", "--shards", "1"]].concat(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for (env, args) in [
        (&[][..], &["--claims", "5", "--duration", "1s"][..]),
        (
            &[("TXGATE_CLAIMS", "5"), ("TXGATE_DURATION", "1s")][..],
            &[][..],
        ),
        (
            &[][..],
            &["--cores", "0", "--shards", "1", "--claims", "5"][..],
        ),
    ] {
        let o = run(env, &[&bench[..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{env:?} {args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    }
}

#[test]
fn bench_runs_and_writes_json_and_svg() {
    let dir = std::env::temp_dir().join(format!("txgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("b.json"), dir.join("b.svg"));
    let o = txgate(&[
        "bench",
        "--claims",
        "20000",
        "--shards",
        "2",
        "--tier1-capacity",
        "10000",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("total"), "{out}");
    assert!(out.contains("anomalies 0"), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["backend"], "memory");
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let mut claims = 0;
    for s in shards {
        for kind in ["duplicate", "novel"] {
            for k in ["count", "p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns"] {
                assert!(s[kind][k].is_u64(), "{kind}.{k}");
            }
            claims += s[kind]["count"].as_u64().unwrap();
        }
        assert!(s["claims_per_sec"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(claims, 20_000);
    assert!(v["total"]["claims_per_sec"].as_f64().unwrap() > 0.0);
    assert!(
        v["cpu"]["ns_per_claim"].as_f64().unwrap() > 0.0,
        "CPU per claim reported"
    );
    assert!(out.contains("ns per claim"), "{out}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unreachable_backends_are_runtime_errors_not_usage_errors() {
    // Redis is validated by flags and refused at open in this build: exit 1.
    let o = txgate(&[UNREACHABLE_REDIS, &["--claims", "10"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("redis"), "{}", stderr(&o));
}

/// A Redis bench against a port nothing listens on.
const UNREACHABLE_REDIS: &[&str] = &["bench", "--backend", "redis", "--redis-addr", "127.0.0.1:1"];

/// A one-shard tier-1-only bench with a small table: quick to start.
const SMALL_TIER1_ONLY: &[&str] = &[
    "bench",
    "--backend",
    "none",
    "--tier1-capacity",
    "1024",
    "--shards",
    "1",
];

/// A paced run's tasks sleep until each claim's start: one due after the
/// run's end is not made, so `--duration` bounds the run (50 tasks at 10
/// claims/s used to sleep up to 5 s past a 1 s run).
#[test]
fn a_paced_run_ends_by_its_duration() {
    let t0 = std::time::Instant::now();
    let o = txgate(
        &[
            SMALL_TIER1_ONLY,
            &["--rate", "10", "--inflight", "50", "--duration", "1s"],
        ]
        .concat(),
    );
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        took < std::time::Duration::from_secs(4),
        "a 1 s run took {took:?}"
    );
}

/// A paced run that cannot keep its pacing says so, on stderr and in its
/// JSON: its latencies leave out the claims it never made.
#[test]
fn a_paced_run_that_falls_behind_warns_about_it() {
    let dir = std::env::temp_dir().join(format!("txgate-cli-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let pacing = ["--rate", "100000000", "--duration", "300ms", "--json"];
    let o = txgate(&[SMALL_TIER1_ONLY, &pacing, &[json.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("WARNING: offered"), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let w = v["warnings"].as_array().expect("warnings array");
    assert!(
        w.iter()
            .any(|l| l.as_str().unwrap().contains("fell behind")),
        "{w:?}"
    );
    assert_eq!(v["settings"]["txid_len"], 16, "{}", v["settings"]);
    assert_eq!(v["settings"]["tier1_capacity"], 1024, "{}", v["settings"]);
    // Made and unmade claims together are the schedule: 10^8/s for 300 ms.
    let made = ["won", "fail_open", "seen", "lost", "pending"]
        .iter()
        .map(|k| v["verdicts"][k].as_u64().expect("verdict count"))
        .sum::<u64>();
    let unmade = v["unmade"]["claims"].as_u64().expect("unmade.claims");
    assert!(unmade > 0, "{}", v["unmade"]);
    assert!(
        (29_900_000..=30_000_100).contains(&(made + unmade)),
        "made {made} + unmade {unmade} is not the 30 M claims due"
    );
    let wait_ms = v["unmade"]["oldest_wait_ms"]
        .as_f64()
        .expect("oldest_wait_ms");
    assert!((1.0..=300.0).contains(&wait_ms), "{}", v["unmade"]);
}

/// An output file that cannot be written fails the command before the run
/// (it used to run to the end, then lose its results).
#[test]
fn an_unwritable_output_fails_before_the_run() {
    for flag in ["--json", "--plot"] {
        let args = ["--duration", "60s", flag, "/nonexistent-dir/out"];
        let o = txgate(&[SMALL_TIER1_ONLY, &args].concat());
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
    }
    // A run that fails after opening its outputs leaves none behind, empty.
    let json = std::env::temp_dir().join(format!("txgate-cli-failed-{}.json", std::process::id()));
    let o = txgate(&[UNREACHABLE_REDIS, &["--json", json.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!json.exists(), "an empty {} was left", json.display());
}
