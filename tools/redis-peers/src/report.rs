//! Medians over runs, the table, the four targets and the JSON document.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::peers::{Peer, RunResult};
use crate::stats::median;

/// Medians of one (peer, depth, paced or not) over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub peer: Peer,
    pub depth: u64,
    /// Offered load (median over runs) of a paced run; `None`: closed loop.
    pub rate: Option<f64>,
    pub runs: usize,
    pub ops_per_sec: f64,
    pub p50_ns: Option<f64>,
    pub p99_ns: Option<f64>,
    pub p999_ns: Option<f64>,
    pub cpu_us_per_op: f64,
    /// Whole-process CPU per op (wait4), start-up included, for every peer.
    pub process_cpu_us_per_op: f64,
    pub server_cpu_us_per_op: Option<f64>,
    /// Summed over runs.
    pub errors: u64,
    /// Median share of a core that other work took during the runs.
    pub interference: Option<f64>,
}

/// Medians per (peer, depth), closed-loop and paced apart, in table order.
pub fn summarize(results: &[RunResult]) -> Vec<Summary> {
    let mut groups: BTreeMap<(bool, u64, Peer), Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        groups
            .entry((r.rate.is_some(), r.depth, r.peer))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|((_, depth, peer), rs)| {
            let m = |f: &dyn Fn(&RunResult) -> Option<f64>| median(rs.iter().map(|r| f(r)));
            Summary {
                peer,
                depth,
                rate: m(&|r| r.rate),
                runs: rs.len(),
                ops_per_sec: m(&|r| Some(r.ops_per_sec)).unwrap_or(0.0),
                p50_ns: m(&|r| r.p50_ns.map(|v| v as f64)),
                p99_ns: m(&|r| r.p99_ns.map(|v| v as f64)),
                p999_ns: m(&|r| r.p999_ns.map(|v| v as f64)),
                cpu_us_per_op: m(&|r| Some(r.cpu_ns_per_op / 1e3)).unwrap_or(0.0),
                process_cpu_us_per_op: m(&|r| {
                    Some((r.process_user_ns + r.process_sys_ns) as f64 / r.ops.max(1) as f64 / 1e3)
                })
                .unwrap_or(0.0),
                server_cpu_us_per_op: m(&|r| r.server_cpu_ns_per_op.map(|v| v / 1e3)),
                errors: rs.iter().map(|r| r.errors).sum(),
                interference: m(&|r| r.interference()),
            }
        })
        .collect()
}

/// One of the targets, computed from the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub claim: &'static str,
    /// The measured ratios or values behind the verdict.
    pub measured: String,
    /// `None`: not measurable with the peers and depths of this run.
    pub pass: Option<bool>,
}

fn find(s: &[Summary], peer: Peer, depth: u64, paced: bool) -> Option<&Summary> {
    s.iter()
        .find(|x| x.peer == peer && x.depth == depth && x.rate.is_some() == paced)
}

/// Share of its offered load a paced run must achieve to be judged.
const KEPT_UP: f64 = 0.95;

pub fn targets(s: &[Summary], depths: &[u64], half_depth: u64) -> Vec<Target> {
    let mut out = Vec::new();

    // 1. ≥ 95 % of redis-benchmark's ops/s at every depth.
    let mut parts = Vec::new();
    let mut pass = Some(true);
    for &d in depths {
        match (
            find(s, Peer::Txgate, d, false),
            find(s, Peer::RedisBenchmark, d, false),
        ) {
            (Some(t), Some(b)) if b.ops_per_sec > 0.0 => {
                let ratio = t.ops_per_sec / b.ops_per_sec;
                parts.push(format!("depth {d}: {:.1} %", ratio * 100.0));
                pass = pass.map(|p| p && ratio >= 0.95);
            }
            _ => pass = None,
        }
    }
    let behind: Vec<_> = depths
        .iter()
        .flat_map(|&d| [Peer::Txgate, Peer::RedisBenchmark].map(|p| find(s, p, d, false)))
        .collect();
    out.push(unless_errors(
        Target {
            claim: "txgate ops/s >= 95 % of redis-benchmark -c 1 -P D at every depth",
            measured: parts.join(", "),
            pass,
        },
        &behind,
    ));

    // 2. ≥ 1.2× the better of redis-rs and fred at depths 16 and 64.
    let mut parts = Vec::new();
    let mut pass = Some(true);
    for d in [16, 64] {
        let t = find(s, Peer::Txgate, d, false);
        let best = [Peer::RedisRs, Peer::Fred]
            .into_iter()
            .filter_map(|p| find(s, p, d, false))
            .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
        match (t, best) {
            (Some(t), Some(b)) if b.ops_per_sec > 0.0 => {
                let ratio = t.ops_per_sec / b.ops_per_sec;
                parts.push(format!("depth {d}: {ratio:.2}x {}", b.peer.name()));
                pass = pass.map(|p| p && ratio >= 1.2);
            }
            _ => pass = None,
        }
    }
    let behind: Vec<_> = [16, 64]
        .into_iter()
        .flat_map(|d| [Peer::Txgate, Peer::RedisRs, Peer::Fred].map(|p| find(s, p, d, false)))
        .collect();
    out.push(unless_errors(
        Target {
            claim: "txgate ops/s >= 1.2x the better of redis-rs and fred at depths 16 and 64",
            measured: parts.join(", "),
            pass,
        },
        &behind,
    ));

    // 3. CPU per claim at depth 64 ≤ 0.5× redis-rs's.
    let (measured, pass) = match (
        find(s, Peer::Txgate, 64, false),
        find(s, Peer::RedisRs, 64, false),
    ) {
        (Some(t), Some(r)) if r.cpu_us_per_op > 0.0 => {
            let ratio = t.cpu_us_per_op / r.cpu_us_per_op;
            (
                format!(
                    "{:.2} vs {:.2} us/claim: {ratio:.2}x",
                    t.cpu_us_per_op, r.cpu_us_per_op
                ),
                Some(ratio <= 0.5),
            )
        }
        _ => (String::new(), None),
    };
    out.push(unless_errors(
        Target {
            claim: "txgate client CPU per claim at depth 64 <= 0.5x redis-rs's",
            measured,
            pass,
        },
        &[
            find(s, Peer::Txgate, 64, false),
            find(s, Peer::RedisRs, 64, false),
        ],
    ));

    // 4. p99 ≤ 1 ms at half of peak — judged only on a run that carried the
    // load it was offered: one that fell behind measured its own backlog.
    let (measured, pass) = match find(s, Peer::Txgate, half_depth, true) {
        Some(t) => match t.p99_ns {
            Some(p99) => {
                let offered = t.rate.unwrap_or(0.0);
                let kept_up = t.ops_per_sec >= KEPT_UP * offered;
                let mut m = format!(
                    "p99 {} at {} offered (depth {half_depth})",
                    fmt_ns(Some(p99)),
                    fmt_rate(offered)
                );
                if !kept_up {
                    m += &format!("; achieved only {}, so no verdict", fmt_rate(t.ops_per_sec));
                }
                (m, kept_up.then_some(p99 <= 1e6))
            }
            None => (String::new(), None),
        },
        None => (String::new(), None),
    };
    out.push(unless_errors(
        Target {
            claim: "txgate p99 <= 1 ms at half of its peak load (open loop)",
            measured,
            pass,
        },
        &[find(s, Peer::Txgate, half_depth, true)],
    ));
    out
}

/// A target judged on runs that had errors has no verdict: a peer's failed
/// ops (txgate's fail open in microseconds, the others' are left out) would
/// make its figures say more than its runs did.
fn unless_errors(mut t: Target, behind: &[Option<&Summary>]) -> Target {
    let errors: u64 = behind.iter().flatten().map(|x| x.errors).sum();
    if errors > 0 {
        t.pass = None;
        t.measured = format!(
            "{} (no verdict: {errors} errors in the runs behind it)",
            t.measured
        );
    }
    t
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

pub fn fmt_ns(v: Option<f64>) -> String {
    match v {
        None => "n/a".to_owned(),
        Some(ns) if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        Some(ns) => format!("{:.1} us", ns / 1e3),
    }
}

fn fmt_share(v: Option<f64>) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{:.1}", v * 100.0))
}

/// The text table: closed-loop rows by depth and peer, then the paced rows.
pub fn table(s: &[Summary]) -> String {
    let mut t = String::new();
    let head = format!(
        "{:>5}  {:<15} {:>11} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6} {:>7}\n",
        "depth",
        "peer",
        "ops/s",
        "p50",
        "p99",
        "p99.9",
        "CPU us/op",
        "srv us/op",
        "errors",
        "other %"
    );
    let row = |x: &Summary| {
        format!(
            "{:>5}  {:<15} {:>11} {:>10} {:>10} {:>10} {:>9.2} {:>9} {:>6} {:>7}\n",
            x.depth,
            x.peer.name(),
            fmt_rate(x.ops_per_sec),
            fmt_ns(x.p50_ns),
            fmt_ns(x.p99_ns),
            fmt_ns(x.p999_ns),
            x.cpu_us_per_op,
            x.server_cpu_us_per_op
                .map_or("n/a".to_owned(), |v| format!("{v:.2}")),
            x.errors,
            fmt_share(x.interference)
        )
    };
    t.push_str("Peak (closed loop, D in flight):\n");
    t.push_str(&head);
    let mut last_depth = None;
    for x in s.iter().filter(|x| x.rate.is_none()) {
        if last_depth.is_some_and(|d| d != x.depth) {
            t.push('\n');
        }
        last_depth = Some(x.depth);
        t.push_str(&row(x));
    }
    let paced: Vec<&Summary> = s.iter().filter(|x| x.rate.is_some()).collect();
    if !paced.is_empty() {
        t.push_str("\nHalf of each peer's own peak (open loop; latency from scheduled send):\n");
        t.push_str(&format!(
            "{:>5}  {:<15} {:>11} {:>11} {:>10} {:>10} {:>10} {:>9} {:>7}\n",
            "depth", "peer", "offered", "achieved", "p50", "p99", "p99.9", "CPU us/op", "other %"
        ));
        for x in paced {
            t.push_str(&format!(
                "{:>5}  {:<15} {:>11} {:>11} {:>10} {:>10} {:>10} {:>9.2} {:>7}\n",
                x.depth,
                x.peer.name(),
                fmt_rate(x.rate.unwrap_or(0.0)),
                fmt_rate(x.ops_per_sec),
                fmt_ns(x.p50_ns),
                fmt_ns(x.p99_ns),
                fmt_ns(x.p999_ns),
                x.cpu_us_per_op,
                fmt_share(x.interference)
            ));
        }
    }
    t
}

pub fn targets_text(ts: &[Target]) -> String {
    let mut t = String::from("Targets:\n");
    for x in ts {
        let verdict = match x.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        let measured = if x.measured.is_empty() {
            "not measured in this run".to_owned()
        } else {
            x.measured.clone()
        };
        t.push_str(&format!("  {verdict}  {}: {measured}\n", x.claim));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(peer: Peer, depth: u64, ops: f64, cpu: f64, rate: Option<f64>) -> Summary {
        Summary {
            peer,
            depth,
            rate,
            runs: 1,
            ops_per_sec: ops,
            p50_ns: Some(1e4),
            p99_ns: Some(5e5),
            p999_ns: None,
            cpu_us_per_op: cpu,
            process_cpu_us_per_op: cpu,
            server_cpu_us_per_op: None,
            errors: 0,
            interference: None,
        }
    }

    /// Every peer at depths 16 and 64 and txgate's paced run, every target
    /// met.
    fn passing() -> Vec<Summary> {
        let mut s = Vec::new();
        for d in [16, 64] {
            s.push(sum(Peer::Txgate, d, 110.0, 1.0, None));
            s.push(sum(Peer::RedisBenchmark, d, 112.0, 1.0, None));
            s.push(sum(Peer::RedisRs, d, 80.0, 3.0, None));
            s.push(sum(Peer::Fred, d, 85.0, 3.0, None));
        }
        s.push(sum(Peer::Txgate, 64, 50.0, 1.0, Some(50.0)));
        s
    }

    #[test]
    fn a_target_behind_runs_with_errors_has_no_verdict() {
        let mut s = passing();
        // txgate's depth-16 runs had errors: the ops/s targets that use them
        // lose their verdict; the CPU target (depth 64) keeps its own.
        s[0].errors = 3;
        let t = targets(&s, &[16, 64], 64);
        assert_eq!(t[0].pass, None, "{:?}", t[0]);
        assert!(t[0].measured.contains("3 errors"), "{:?}", t[0]);
        assert_eq!(t[1].pass, None, "{:?}", t[1]);
        assert_eq!(t[2].pass, Some(true), "{:?}", t[2]);
        assert_eq!(t[3].pass, Some(true), "{:?}", t[3]);
    }

    #[test]
    fn a_paced_run_that_fell_behind_its_offered_load_has_no_verdict() {
        let mut s = passing();
        let last = s.len() - 1;
        s[last].ops_per_sec = 40.0; // 40 of 50 offered
        let t = targets(&s, &[16, 64], 64);
        assert_eq!(t[3].pass, None, "{:?}", t[3]);
        assert!(t[3].measured.contains("achieved only"), "{:?}", t[3]);
        s[last].ops_per_sec = 49.0; // within the margin
        assert_eq!(targets(&s, &[16, 64], 64)[3].pass, Some(true));
    }

    #[test]
    fn targets_are_computed_from_the_medians() {
        let mut s = passing();
        let t = targets(&s, &[16, 64], 64);
        assert_eq!(t[0].pass, Some(true), "{:?}", t[0]);
        assert_eq!(t[1].pass, Some(true), "{:?}", t[1]);
        assert_eq!(t[2].pass, Some(true), "{:?}", t[2]);
        assert_eq!(t[3].pass, Some(true), "{:?}", t[3]);
        s[0].ops_per_sec = 90.0; // depth 16: 90 / 112 < 95 %
        let t = targets(&s, &[16, 64], 64);
        assert_eq!(t[0].pass, Some(false));
        assert_eq!(t[1].pass, Some(false)); // 90 / 85 < 1.2
        let t = targets(&s, &[1, 16, 64], 64);
        assert_eq!(t[0].pass, None, "depth 1 was not measured");
    }
}
