//! Latency histograms (the same shape as txgate's) and medians.

use histogram::{Histogram, Quantile};
use serde::{Deserialize, Serialize};

/// ~0.8 % relative error, values up to 2^40 ns: txgate bench's shape.
const GROUPING_POWER: u8 = 7;
const MAX_VALUE_POWER: u8 = 40;

pub fn new_histogram() -> Histogram {
    Histogram::new(GROUPING_POWER, MAX_VALUE_POWER).expect("valid constant shape")
}

/// Percentiles as bucket upper bounds (never understating), in ns.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram) -> Self {
        let Ok(Some(q)) = h.quantiles(&[0.5, 0.99, 0.999]) else {
            return Self::default();
        };
        let at = |p: f64| {
            Quantile::new(p)
                .ok()
                .and_then(|k| q.get(&k))
                .map_or(0, |b| b.end())
        };
        Self {
            count: u64::try_from(q.total_count()).unwrap_or(u64::MAX),
            p50_ns: at(0.5),
            p99_ns: at(0.99),
            p999_ns: at(0.999),
            max_ns: q.max().end(),
        }
    }
}

/// Median of the present values (the mean of the middle two for an even
/// count); `None` when there are none.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_missing_and_averages_the_middle_pair() {
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(
            median([Some(4.0), Some(1.0), Some(2.0), Some(3.0)]),
            Some(2.5)
        );
        assert_eq!(median([None]), None);
    }

    #[test]
    fn summary_reports_upper_bounds() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.increment(v * 1000).unwrap();
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 1000);
        assert!(s.p50_ns >= 500_000 && s.p50_ns < 505_000, "{s:?}");
        assert!(s.p99_ns >= 990_000 && s.p999_ns >= s.p99_ns);
    }
}
