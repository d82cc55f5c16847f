//! The shipped harness, run by the test command: `tools/udp-tools` (generator, sink,
//! baselines) passes its own tests, and `tools/exactly-once` passes against two real
//! gates sharing a real redis-server, still passes (with duplicates reported) when that
//! server is killed mid-run, and fails when the gates do not share a store.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// `cargo` as the test command was started with it.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Its own target directory whatever the caller's `CARGO_TARGET_DIR` says: the
/// harness finds the binaries there.
fn udp_tools_target() -> PathBuf {
    Path::new(REPO).join("tools/udp-tools/target")
}

fn run(mut c: Command) -> Output {
    let o = c.output().expect("command starts");
    let text = format!(
        "{c:?}\nexit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() && o.status.code() != Some(1) {
        panic!("{text}");
    }
    o
}

/// `cargo SUBCOMMAND` on tools/udp-tools, in its own target directory.
fn udp_tools_cargo(subcommand: &str) -> Command {
    let mut c = cargo();
    c.arg(subcommand)
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(Path::new(REPO).join("tools/udp-tools/Cargo.toml"))
        .arg("--target-dir")
        .arg(udp_tools_target());
    c
}

/// Builds the udp-tools binaries (debug: they only need to outpace a few thousand
/// datagrams a second here) once per test process; returns their directory.
fn udp_tools_bins() -> &'static Path {
    static BINS: OnceLock<PathBuf> = OnceLock::new();
    BINS.get_or_init(|| {
        let o = run(udp_tools_cargo("build"));
        assert!(
            o.status.success(),
            "building tools/udp-tools failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        udp_tools_target().join("debug")
    })
}

/// Runs `tools/exactly-once` with `args` against `txgate`; its exit code and its one
/// summary line as (key, value) pairs.
fn exactly_once(txgate: &Path, args: &[&str]) -> (i32, Vec<(String, String)>, String) {
    support::redis::require_redis();
    let mut c = Command::new(Path::new(REPO).join("tools/exactly-once"));
    c.arg("--txgate")
        .arg(txgate)
        .arg("--udp-tools-dir")
        .arg(udp_tools_bins())
        .args(args);
    let o = run(c);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    // A run that did not pass keeps its logs; they are in `stderr` already.
    if let Some(dir) = stderr
        .lines()
        .find_map(|l| l.strip_prefix("exactly-once: logs kept in "))
    {
        let _ = std::fs::remove_dir_all(dir.trim());
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with("exactly-once "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"))
        .to_owned();
    let fields = line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (o.status.code().unwrap_or(-1), fields, line + "\n" + &stderr)
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"))
}

fn txgate() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_txgate"))
}

/// Small and slow enough for a debug build of the gate on a loaded 2-core machine.
const SMALL: &[&str] = &["--copies", "3", "--instances", "2", "--settle-ms", "700"];
/// A store op timeout with room for a stall of the loaded machine: at the
/// default 50 ms a stalled redis-server makes claims fail open, which is a
/// duplicate the healthy run would (rightly) fail on.
const PATIENT: &[&str] = &["--serve-arg=--ingress-dedup-op-timeout=1s"];

/// A directory removed however the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn udp_tools_pass_their_own_tests() {
    let o = run(udp_tools_cargo("test"));
    assert!(
        o.status.success(),
        "cargo test of tools/udp-tools failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn exactly_once_passes_with_two_gates_sharing_a_healthy_store() {
    let mut args = vec!["--txids", "2000", "--rate", "5000"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(PATIENT);
    let (rc, f, text) = exactly_once(&txgate(), &args);
    assert_eq!(field(&f, "result"), "PASS", "{text}");
    assert_eq!(rc, 0, "{text}");
    assert_eq!(field(&f, "unique"), "2000", "{text}");
    assert_eq!(field(&f, "duplicates"), "0", "{text}");
    assert_eq!(field(&f, "lost"), "0", "{text}");
    assert_eq!(field(&f, "backend_keys"), "2000", "{text}");
}

#[test]
fn exactly_once_loses_nothing_when_the_store_is_killed_mid_run() {
    let mut args = vec![
        "--txids",
        "5000",
        "--rate",
        "5000",
        "--kill-backend-at",
        "0.4",
    ];
    args.extend_from_slice(SMALL);
    let (rc, f, text) = exactly_once(&txgate(), &args);
    assert_eq!(field(&f, "result"), "PASS", "{text}");
    assert_eq!(rc, 0, "{text}");
    assert!(field(&f, "backend").starts_with("killed@"), "{text}");
    assert_eq!(field(&f, "lost"), "0", "{text}");
    assert_eq!(field(&f, "unique"), "5000", "{text}");
    assert!(field(&f, "fail_open").parse::<u64>().unwrap() > 0, "{text}");
}

/// Gates that each keep their own store (the harness's redis flags swapped for the
/// in-process store by a wrapper) forward a TxID once per instance: the harness must
/// say FAIL, and why.
#[test]
fn exactly_once_fails_when_the_gates_do_not_share_a_store() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("txgate-eo-wrapper-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let wrapper = dir.0.join("txgate-own-store");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nout=()\nwhile [ $# -gt 0 ]; do\n  case \"$1\" in\n    \
             --ingress-dedup-backend) out+=(\"$1\" memory); shift 2;;\n    \
             --ingress-dedup-redis-addr) shift 2;;\n    *) out+=(\"$1\"); shift;;\n  \
             esac\ndone\nexec {} \"${{out[@]}}\"\n",
            txgate().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut args = vec!["--txids", "1000", "--rate", "5000"];
    args.extend_from_slice(SMALL);
    let (rc, f, text) = exactly_once(&wrapper, &args);
    assert_eq!(field(&f, "result"), "FAIL", "{text}");
    assert_eq!(rc, 1, "{text}");
    assert!(field(&f, "why").contains("duplicates"), "{text}");
    assert_eq!(field(&f, "lost"), "0", "{text}");
}
