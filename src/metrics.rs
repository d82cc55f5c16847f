//! Latency histograms and Prometheus text output, shared by the gate and the
//! admin listener.
//!
//! A shard records into a plain [`LatencyHistogram`] (no atomics on the hot
//! path) and publishes `Copy` snapshots on its cold path for the admin
//! thread. Buckets are fixed, so per-shard histograms always merge.

use std::fmt::Write;
use std::time::Duration;

/// Bucket upper bounds, nanoseconds: 1 µs to 2.5 s in 1-2.5-5 steps. Claims
/// answered from tier-1 land in the first; backend round trips in the middle;
/// the op timeout bounds the top.
pub const LATENCY_BOUNDS_NS: [u64; 20] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// A latency histogram owned by one shard: plain counts, `Copy` snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: [u64; BUCKETS],
    sum_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Counts one observation of `ns` nanoseconds.
    #[inline]
    pub fn record_ns(&mut self, ns: u64) {
        self.record_n(ns, 1);
    }

    /// Counts `n` observations of `ns` nanoseconds each (a batch answered
    /// together).
    #[inline]
    pub fn record_n(&mut self, ns: u64, n: u64) {
        let i = LATENCY_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKETS - 1);
        self.counts[i] += n;
        self.sum_ns = self.sum_ns.saturating_add(ns.saturating_mul(n));
    }

    /// Counts one observation.
    #[inline]
    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of observations, nanoseconds.
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// Adds `other`'s observations.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// The smallest bucket bound at or above quantile `q` (0..=1), in ns;
    /// `None` when empty or past the last finite bound.
    pub fn quantile_bound_ns(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return LATENCY_BOUNDS_NS.get(i).copied();
            }
        }
        None
    }

    /// Writes the histogram as Prometheus `_bucket`/`_sum`/`_count` lines
    /// (seconds), `labels` being e.g. `shard="0"` (may be empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            match LATENCY_BOUNDS_NS.get(i) {
                Some(&b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                        b as f64 / 1e9
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
                    );
                }
            }
        }
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(labels),
            self.sum_ns as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// Writes the `# HELP` and `# TYPE` header of one metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        let mut h = LatencyHistogram::default();
        h.record_ns(0);
        h.record_ns(1_000);
        h.record_ns(1_001);
        h.record_ns(u64::MAX);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[BUCKETS - 1], 1);
        assert_eq!(h.count(), 4);
        assert_eq!(h.quantile_bound_ns(0.5), Some(1_000));
        assert_eq!(h.quantile_bound_ns(0.75), Some(2_500));
        assert_eq!(h.quantile_bound_ns(1.0), None);
    }

    #[test]
    fn renders_cumulative_prometheus_buckets() {
        let mut h = LatencyHistogram::default();
        h.record_n(3_000, 2);
        h.record(Duration::from_millis(2));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "shard=\"1\"");
        assert!(
            out.contains("x_seconds_bucket{shard=\"1\",le=\"0.000001\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{shard=\"1\",le=\"0.000005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{shard=\"1\",le=\"0.0025\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{shard=\"1\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{shard=\"1\"} 3\n"), "{out}");
        assert!(
            out.contains("x_seconds_sum{shard=\"1\"} 0.002006\n"),
            "{out}"
        );
        let mut bare = String::new();
        h.render(&mut bare, "y", "");
        assert!(bare.contains("y_bucket{le=\"+Inf\"} 3\n") && bare.contains("y_count 3\n"));
    }

    #[test]
    fn merges_add_counts_and_sums() {
        let mut h = LatencyHistogram::default();
        h.record_ns(7_000_000);
        let mut total = h;
        total.merge(&h);
        assert_eq!(total.count(), 2);
        assert_eq!(total.sum_ns(), 14_000_000);
    }
}
