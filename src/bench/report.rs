//! Renderings of `txgate bench` results: a text table, JSON and an SVG plot.
//!
//! Everything here is a pure function from a [`BenchResult`] to a `String`, so
//! the bench driver owns all I/O and every rendering can be unit-tested.

use histogram::{Histogram, Quantile};
use serde::Serialize;

/// Histogram shape used by every recorder: ~0.8 % relative error, values up to 2^40 ns.
///
/// Shared so that per-shard histograms can always be merged into a total.
pub const GROUPING_POWER: u8 = 7;
/// See [`GROUPING_POWER`]; 2^40 ns is about 18 minutes, far beyond any sane claim.
pub const MAX_VALUE_POWER: u8 = 40;

// `Histogram::new` rejects these exact conditions, so `new_histogram` cannot fail.
const _: () = assert!(GROUPING_POWER < MAX_VALUE_POWER && MAX_VALUE_POWER <= 64);

/// A new empty latency histogram with the shared shape, so recorders never disagree.
pub fn new_histogram() -> Histogram {
    Histogram::new(GROUPING_POWER, MAX_VALUE_POWER).expect("shape is checked at compile time")
}

/// One shard's raw results.
pub struct ShardResult {
    pub shard: usize,
    pub core: usize,
    /// Time this shard spent issuing claims.
    pub elapsed_ns: u64,
    pub duplicate: Histogram,
    pub novel: Histogram,
}

/// A whole run.
pub struct BenchResult {
    /// Backend kind name, e.g. "memory", "redis".
    pub backend: String,
    pub shards: Vec<ShardResult>,
    /// Wall-clock time of the whole run.
    pub elapsed_ns: u64,
}

/// Percentile summary of one histogram; bucket upper bounds, in ns. All zeros when count == 0.
///
/// Upper bounds are reported so that a summary never understates latency.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl LatencySummary {
    /// Summarises `h`; an empty histogram yields all zeros rather than an error,
    /// because a run may legitimately issue no claims of one kind.
    pub fn from_histogram(h: &Histogram) -> Self {
        let Ok(Some(q)) = h.quantiles(&[0.5, 0.9, 0.99, 0.999]) else {
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
            p90_ns: at(0.9),
            p99_ns: at(0.99),
            p999_ns: at(0.999),
            max_ns: q.max().end(),
        }
    }
}

/// Claims per second of one shard: (duplicate + novel count) / elapsed_ns (0 when elapsed is 0).
///
/// Uses the shard's own busy time, so it measures per-core capacity.
pub fn shard_claims_per_sec(s: &ShardResult) -> f64 {
    per_sec(
        sample_count(&s.duplicate).saturating_add(sample_count(&s.novel)),
        s.elapsed_ns,
    )
}

/// Claims per second of the run: all claims / run wall time.
///
/// Uses wall time rather than summing shard rates, so start-up skew and
/// stragglers count against the result as they would in production.
pub fn total_claims_per_sec(r: &BenchResult) -> f64 {
    let claims = r.shards.iter().fold(0u64, |acc, s| {
        acc.saturating_add(sample_count(&s.duplicate))
            .saturating_add(sample_count(&s.novel))
    });
    per_sec(claims, r.elapsed_ns)
}

fn per_sec(count: u64, elapsed_ns: u64) -> f64 {
    if elapsed_ns == 0 {
        0.0
    } else {
        count as f64 * 1e9 / elapsed_ns as f64
    }
}

fn sample_count(h: &Histogram) -> u64 {
    h.as_slice()
        .iter()
        .fold(0, |acc: u64, &n| acc.saturating_add(n))
}

/// Merges one histogram per shard. A shard whose histogram cannot be merged
/// (different shape, counter overflow) is left out rather than failing the report.
fn merged<'a>(mut hs: impl Iterator<Item = &'a Histogram>) -> Histogram {
    let Some(first) = hs.next() else {
        return new_histogram();
    };
    hs.fold(first.clone(), |acc, h| acc.checked_add(h).unwrap_or(acc))
}

/// Summaries of the merged duplicate and novel histograms of all shards.
fn total_summaries(r: &BenchResult) -> (LatencySummary, LatencySummary) {
    let duplicate = merged(r.shards.iter().map(|s| &s.duplicate));
    let novel = merged(r.shards.iter().map(|s| &s.novel));
    (
        LatencySummary::from_histogram(&duplicate),
        LatencySummary::from_histogram(&novel),
    )
}

// ---------------------------------------------------------------------------
// Text table
// ---------------------------------------------------------------------------

/// Width of one "count + five latencies" column group in the table.
const GROUP_WIDTH: usize = 10 + 5 * 8;

/// A fixed-width text table: one row per shard and a "total" row, columns: shard, core,
/// claims/s, then for duplicate and for novel: count, p50, p90, p99, p99.9, max.
///
/// Latencies are rounded to three significant digits because the histogram
/// cannot resolve more; every line, the last included, ends in `'\n'`.
pub fn render_table(r: &BenchResult) -> String {
    let (total_dup, total_novel) = total_summaries(r);
    let mut lines = vec![
        format!(
            "backend {}: {} shard(s), {} claims/s over {}",
            r.backend,
            r.shards.len(),
            fmt_rate(total_claims_per_sec(r)),
            fmt_ns(r.elapsed_ns),
        ),
        format!(
            "{:20} |{:^GROUP_WIDTH$} |{:^GROUP_WIDTH$}",
            "", "duplicate", "novel"
        ),
    ];
    let group_header = format!(
        " {:>9}{}",
        "count",
        ["p50", "p90", "p99", "p99.9", "max"]
            .map(|h| format!(" {h:>7}"))
            .concat()
    );
    lines.push(format!(
        "{:>5} {:>4} {:>9} |{group_header} |{group_header}",
        "shard", "core", "claims/s"
    ));
    for s in &r.shards {
        lines.push(table_row(
            &s.shard.to_string(),
            &s.core.to_string(),
            shard_claims_per_sec(s),
            &LatencySummary::from_histogram(&s.duplicate),
            &LatencySummary::from_histogram(&s.novel),
        ));
    }
    lines.push(table_row(
        "total",
        "-",
        total_claims_per_sec(r),
        &total_dup,
        &total_novel,
    ));
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn table_row(
    shard: &str,
    core: &str,
    claims_per_sec: f64,
    duplicate: &LatencySummary,
    novel: &LatencySummary,
) -> String {
    format!(
        "{shard:>5} {core:>4} {:>9} |{} |{}",
        fmt_rate(claims_per_sec),
        table_group(duplicate),
        table_group(novel),
    )
}

/// Count and latencies of one summary; latencies are "-" without samples,
/// since "0ns" would read as a measurement.
fn table_group(s: &LatencySummary) -> String {
    let latencies = [s.p50_ns, s.p90_ns, s.p99_ns, s.p999_ns, s.max_ns].map(|v| {
        let cell = if s.count == 0 {
            "-".to_owned()
        } else {
            fmt_ns(v)
        };
        format!(" {cell:>7}")
    });
    format!(" {:>9}{}", s.count, latencies.concat())
}

/// Human-friendly nanoseconds: "23ns", "1.20µs", "3.40ms", "12.0s".
fn fmt_ns(ns: u64) -> String {
    fmt_scaled(
        ns as f64,
        &[(1.0, "ns"), (1e3, "µs"), (1e6, "ms"), (1e9, "s")],
    )
}

/// Human-friendly rate: "950", "12.3k", "1.20M".
fn fmt_rate(per_sec: f64) -> String {
    fmt_scaled(per_sec, &[(1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G")])
}

/// Formats `v` with three significant digits in the largest unit it reaches;
/// the base unit is printed as a whole number.
fn fmt_scaled(v: f64, units: &[(f64, &str)]) -> String {
    let v = round_sig3(v);
    let (scale, unit) = units
        .iter()
        .rev()
        .find(|(scale, _)| v >= *scale)
        .unwrap_or(&units[0]);
    let x = v / scale;
    if *scale == units[0].0 {
        format!("{x:.0}{unit}")
    } else if x < 10.0 {
        format!("{x:.2}{unit}")
    } else if x < 100.0 {
        format!("{x:.1}{unit}")
    } else {
        format!("{x:.0}{unit}")
    }
}

/// Rounds to three significant digits up front, so that e.g. 999 999 ns
/// becomes "1.00ms" instead of "1000µs".
fn round_sig3(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 0.0;
    }
    let step = 10f64.powf(v.log10().floor() - 2.0);
    (v / step).round() * step
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct JsonReport<'a> {
    backend: &'a str,
    elapsed_ns: u64,
    shards: Vec<JsonShard>,
    total: JsonTotal,
}

#[derive(Serialize)]
struct JsonShard {
    shard: usize,
    core: usize,
    elapsed_ns: u64,
    claims_per_sec: f64,
    duplicate: LatencySummary,
    novel: LatencySummary,
}

#[derive(Serialize)]
struct JsonTotal {
    claims_per_sec: f64,
    duplicate: LatencySummary,
    novel: LatencySummary,
}

/// Pretty-printed JSON of the run, for machines to diff between runs.
///
/// Shape: `{"backend", "elapsed_ns", "shards": [{"shard", "core", "elapsed_ns",
/// "claims_per_sec", "duplicate": {summary}, "novel": {summary}}], "total":
/// {"claims_per_sec", "duplicate", "novel"}}`, where a summary is a
/// [`LatencySummary`] and the totals come from the merged histograms.
pub fn render_json(r: &BenchResult) -> String {
    let (duplicate, novel) = total_summaries(r);
    let report = JsonReport {
        backend: &r.backend,
        elapsed_ns: r.elapsed_ns,
        shards: r
            .shards
            .iter()
            .map(|s| JsonShard {
                shard: s.shard,
                core: s.core,
                elapsed_ns: s.elapsed_ns,
                claims_per_sec: shard_claims_per_sec(s),
                duplicate: LatencySummary::from_histogram(&s.duplicate),
                novel: LatencySummary::from_histogram(&s.novel),
            })
            .collect(),
        total: JsonTotal {
            claims_per_sec: total_claims_per_sec(r),
            duplicate,
            novel,
        },
    };
    serde_json::to_string_pretty(&report).expect("report has string keys and finite numbers")
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

const SVG_WIDTH: f64 = 900.0;
const SVG_MIN_HEIGHT: f64 = 500.0;
const PLOT_LEFT: f64 = 80.0;
const PLOT_RIGHT: f64 = 660.0;
const PLOT_TOP: f64 = 50.0;
const PLOT_BOTTOM: f64 = 440.0;
const LEGEND_X: f64 = 675.0;
const LEGEND_ROW: f64 = 16.0;
/// Where "max" sits on the nines axis: one step past p99.99.
const MAX_NINES: f64 = 5.0;
/// Colour-blind-friendly "tab10" palette, cycled per shard.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One percentile curve: points of (nines, latency in ns).
struct Curve {
    label: String,
    colour: &'static str,
    dashed: bool,
    points: Vec<(f64, u64)>,
}

/// An SVG latency-percentile plot, one solid (duplicate) and one dashed (novel)
/// line per shard, on a nines × log10 scale so that tail latency is as visible
/// as the median. Curves without samples are left out.
pub fn render_svg(r: &BenchResult) -> String {
    let curves: Vec<Curve> = r
        .shards
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            let colour = PALETTE[i % PALETTE.len()];
            [
                ("duplicate", &s.duplicate, false),
                ("novel", &s.novel, true),
            ]
            .into_iter()
            .filter_map(move |(kind, h, dashed)| {
                Some(Curve {
                    label: format!("shard {} (core {}) {kind}", s.shard, s.core),
                    colour,
                    dashed,
                    points: curve_points(h)?,
                })
            })
        })
        .collect();

    // Whole decades spanning every plotted latency; 1 ns is the floor of the log scale.
    let (lo, hi) = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|&(_, ns)| log_ns(ns)))
        .fold(None, |acc: Option<(f64, f64)>, v| {
            Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
        })
        .unwrap_or((1.0, 3.0));
    let lo_exp = lo.floor() as i32;
    let hi_exp = (hi.ceil() as i32).max(lo_exp + 1);
    let x_of = |nines: f64| PLOT_LEFT + nines / MAX_NINES * (PLOT_RIGHT - PLOT_LEFT);
    let y_of = |ns: u64| {
        PLOT_BOTTOM
            - (log_ns(ns) - f64::from(lo_exp)) / f64::from(hi_exp - lo_exp)
                * (PLOT_BOTTOM - PLOT_TOP)
    };

    let height = SVG_MIN_HEIGHT.max(PLOT_TOP + 10.0 + LEGEND_ROW * curves.len() as f64 + 20.0);
    let mut out = vec![
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{height}" viewBox="0 0 {SVG_WIDTH} {height}" font-family="sans-serif" font-size="11">"#
        ),
        r#"<rect x="0" y="0" width="100%" height="100%" fill="white"/>"#.to_owned(),
        text(
            SVG_WIDTH / 2.0,
            25.0,
            r#"text-anchor="middle" font-size="15" font-weight="bold""#,
            &format!(
                "txgate bench: {} claim latency by percentile ({} shard(s))",
                r.backend,
                r.shards.len()
            ),
        ),
    ];

    // Horizontal gridlines, one per decade of latency.
    for exp in lo_exp..=hi_exp {
        let y = PLOT_BOTTOM
            - f64::from(exp - lo_exp) / f64::from(hi_exp - lo_exp) * (PLOT_BOTTOM - PLOT_TOP);
        out.push(format!(
            r##"<line x1="{PLOT_LEFT}" y1="{y:.1}" x2="{PLOT_RIGHT}" y2="{y:.1}" stroke="#dddddd"/>"##
        ));
        out.push(text(
            PLOT_LEFT - 6.0,
            y + 4.0,
            r#"text-anchor="end""#,
            &decade_label(exp),
        ));
    }
    // Vertical gridlines at the conventional percentiles.
    let ticks = [
        (0.0, "p0"),
        (2f64.log10(), "p50"),
        (1.0, "p90"),
        (2.0, "p99"),
        (3.0, "p99.9"),
        (4.0, "p99.99"),
        (MAX_NINES, "max"),
    ];
    for (nines, label) in ticks {
        let x = x_of(nines);
        out.push(format!(
            r##"<line x1="{x:.1}" y1="{PLOT_TOP}" x2="{x:.1}" y2="{PLOT_BOTTOM}" stroke="#dddddd"/>"##
        ));
        out.push(text(
            x,
            PLOT_BOTTOM + 16.0,
            r#"text-anchor="middle""#,
            label,
        ));
    }
    out.push(format!(
        r#"<rect x="{PLOT_LEFT}" y="{PLOT_TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        PLOT_RIGHT - PLOT_LEFT,
        PLOT_BOTTOM - PLOT_TOP
    ));
    out.push(text(
        (PLOT_LEFT + PLOT_RIGHT) / 2.0,
        PLOT_BOTTOM + 36.0,
        r#"text-anchor="middle""#,
        "percentile",
    ));
    let y_mid = (PLOT_TOP + PLOT_BOTTOM) / 2.0;
    out.push(text(
        20.0,
        y_mid,
        &format!(r#"text-anchor="middle" transform="rotate(-90 20 {y_mid})""#),
        "latency (log scale)",
    ));
    if curves.is_empty() {
        out.push(text(
            (PLOT_LEFT + PLOT_RIGHT) / 2.0,
            y_mid,
            r##"text-anchor="middle" fill="#888888""##,
            "no samples",
        ));
    }

    for (i, c) in curves.iter().enumerate() {
        let dash = if c.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let points: Vec<String> = c
            .points
            .iter()
            .map(|&(nines, ns)| format!("{:.1},{:.1}", x_of(nines), y_of(ns)))
            .collect();
        out.push(format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5"{dash} points="{}"/>"#,
            c.colour,
            points.join(" ")
        ));
        let y = PLOT_TOP + 10.0 + LEGEND_ROW * i as f64;
        out.push(format!(
            r#"<line x1="{LEGEND_X}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="1.5"{dash}/>"#,
            LEGEND_X + 22.0,
            c.colour
        ));
        out.push(text(LEGEND_X + 28.0, y + 4.0, "", &c.label));
    }
    out.push("</svg>".to_owned());
    out.join("\n")
}

/// Points of `h`'s percentile curve, or `None` when it has no samples.
fn curve_points(h: &Histogram) -> Option<Vec<(f64, u64)>> {
    // Quarter-nine steps from p0 to p99.99 keep the curve smooth; p50 and the
    // max sit on gridlines. The result is keyed, hence sorted, by quantile.
    let quantiles: Vec<f64> = (0..=16)
        .map(|i| 1.0 - 10f64.powf(-f64::from(i) / 4.0))
        .chain([0.5, 1.0])
        .collect();
    let q = h.quantiles(&quantiles).ok()??;
    let points = q
        .entries()
        .iter()
        .map(|(k, b)| {
            let p = k.as_f64();
            let nines = if p >= 1.0 {
                MAX_NINES
            } else {
                -(1.0 - p).log10()
            };
            (nines.clamp(0.0, MAX_NINES), b.end())
        })
        .collect();
    Some(points)
}

/// log10 of a latency, treating 0 ns as 1 ns so the log scale stays finite.
fn log_ns(ns: u64) -> f64 {
    (ns.max(1) as f64).log10()
}

/// Gridline label for 10^exp ns: "1ns", "100ns", "1µs", "10ms", "1000s".
fn decade_label(exp: i32) -> String {
    let exp = exp.max(0);
    let unit = (exp / 3).min(3);
    let mantissa = 10u64.pow((exp - 3 * unit).unsigned_abs());
    let name = ["ns", "µs", "ms", "s"][unit as usize];
    format!("{mantissa}{name}")
}

/// A `<text>` element with `content` escaped; `attrs` are trusted markup.
fn text(x: f64, y: f64, attrs: &str, content: &str) -> String {
    let sep = if attrs.is_empty() { "" } else { " " };
    format!(
        r#"<text x="{x:.1}" y="{y:.1}"{sep}{attrs}>{}</text>"#,
        xml_escape(content)
    )
}

/// Escapes markup characters and drops control characters XML 1.0 forbids.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram {
        let mut h = new_histogram();
        for v in values {
            h.increment(v).unwrap();
        }
        h
    }

    fn shard(
        shard: usize,
        core: usize,
        elapsed_ns: u64,
        dup: Histogram,
        novel: Histogram,
    ) -> ShardResult {
        ShardResult {
            shard,
            core,
            elapsed_ns,
            duplicate: dup,
            novel,
        }
    }

    /// Two shards: shard 0 has both kinds, shard 1 only duplicates.
    fn sample_run(backend: &str) -> BenchResult {
        BenchResult {
            backend: backend.to_owned(),
            shards: vec![
                shard(0, 3, 1_000_000, hist(1..=300), hist(1_000..1_700)),
                shard(1, 5, 2_000_000, hist(10_000..11_000), new_histogram()),
            ],
            elapsed_ns: 2_000_000,
        }
    }

    fn within(actual: u64, expected: f64, rel: f64) -> bool {
        (actual as f64 - expected).abs() <= expected * rel
    }

    #[test]
    fn summary_of_known_values() {
        let s = LatencySummary::from_histogram(&hist(1..=1000));
        assert_eq!(s.count, 1000);
        assert!(within(s.p50_ns, 500.0, 0.01), "{s:?}");
        assert!(within(s.p90_ns, 900.0, 0.01), "{s:?}");
        assert!(within(s.p99_ns, 990.0, 0.01), "{s:?}");
        assert!(within(s.p999_ns, 999.0, 0.01), "{s:?}");
        assert!(s.max_ns >= 1000 && s.max_ns <= 1010, "{s:?}");
        assert!(s.p50_ns <= s.p90_ns && s.p90_ns <= s.p99_ns && s.p99_ns <= s.p999_ns);
        assert!(s.p999_ns <= s.max_ns);
    }

    #[test]
    fn summary_of_empty_histogram_is_zero() {
        let s = LatencySummary::from_histogram(&new_histogram());
        assert_eq!(
            s,
            LatencySummary {
                count: 0,
                p50_ns: 0,
                p90_ns: 0,
                p99_ns: 0,
                p999_ns: 0,
                max_ns: 0
            }
        );
    }

    #[test]
    fn histogram_covers_the_declared_range() {
        let mut h = new_histogram();
        h.increment((1 << MAX_VALUE_POWER) - 1).unwrap();
        assert!(h.increment(1 << MAX_VALUE_POWER).is_err());
    }

    #[test]
    fn claims_per_sec_arithmetic() {
        // 300 + 700 claims in 1 ms.
        let s = shard(0, 0, 1_000_000, hist(1..=300), hist(1..=700));
        assert!((shard_claims_per_sec(&s) - 1e6).abs() < 1e-6);
        let idle = shard(0, 0, 0, hist(1..=10), new_histogram());
        assert_eq!(shard_claims_per_sec(&idle), 0.0);

        // 300 + 700 + 1000 claims in 2 ms of wall time.
        let r = sample_run("memory");
        assert!((total_claims_per_sec(&r) - 1e6).abs() < 1e-6);
        let r = BenchResult {
            elapsed_ns: 0,
            ..sample_run("memory")
        };
        assert_eq!(total_claims_per_sec(&r), 0.0);
    }

    #[test]
    fn human_formats() {
        assert_eq!(fmt_ns(0), "0ns");
        assert_eq!(fmt_ns(23), "23ns");
        assert_eq!(fmt_ns(999), "999ns");
        assert_eq!(fmt_ns(1_000), "1.00µs");
        assert_eq!(fmt_ns(1_234), "1.23µs");
        assert_eq!(fmt_ns(45_678), "45.7µs");
        assert_eq!(fmt_ns(999_999), "1.00ms");
        assert_eq!(fmt_ns(3_400_000), "3.40ms");
        assert_eq!(fmt_ns(12_000_000_000), "12.0s");
        assert_eq!(fmt_rate(950.0), "950");
        assert_eq!(fmt_rate(1_234_567.0), "1.23M");
        assert_eq!(decade_label(0), "1ns");
        assert_eq!(decade_label(2), "100ns");
        assert_eq!(decade_label(3), "1µs");
        assert_eq!(decade_label(7), "10ms");
        assert_eq!(decade_label(12), "1000s");
    }

    #[test]
    fn table_has_a_row_per_shard_and_a_total() {
        let r = sample_run("memory");
        let table = render_table(&r);
        let lines: Vec<&str> = table.lines().collect();
        // Title, group header, column header, 2 shards, total.
        assert_eq!(lines.len(), 6, "{table}");
        assert!(table.ends_with('\n'));
        assert!(lines[0].contains("memory"));
        assert!(lines[1].contains("duplicate") && lines[1].contains("novel"));
        for col in ["shard", "core", "claims/s", "count", "p50", "p99.9", "max"] {
            assert!(lines[2].contains(col), "missing {col}: {table}");
        }
        assert!(lines[3].trim_start().starts_with("0    3"), "{table}");
        assert!(lines[4].trim_start().starts_with("1    5"), "{table}");
        assert!(lines[5].trim_start().starts_with("total"), "{table}");
        // Shard 1 has no novel samples: placeholders, not "0ns".
        assert!(lines[4].ends_with(" -"), "{table}");
        // Merged duplicate max comes from shard 1 (10 999 ns → "11.0µs").
        assert!(lines[5].contains("11.0µs"), "{table}");
        // Fixed width: every data row lines up with the header.
        let width = lines[2].chars().count();
        for line in &lines[3..] {
            assert_eq!(line.chars().count(), width, "{table}");
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let r = sample_run("memory");
        let v: serde_json::Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(v["backend"], "memory");
        assert_eq!(v["elapsed_ns"], 2_000_000);
        let shards = v["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0]["shard"], 0);
        assert_eq!(shards[0]["core"], 3);
        assert_eq!(shards[1]["core"], 5);
        assert!((shards[0]["claims_per_sec"].as_f64().unwrap() - 1e6).abs() < 1e-6);
        assert!((shards[1]["claims_per_sec"].as_f64().unwrap() - 5e5).abs() < 1e-6);
        for key in ["count", "p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns"] {
            for kind in ["duplicate", "novel"] {
                assert!(shards[0][kind][key].is_u64(), "shards[0].{kind}.{key}");
                assert!(v["total"][kind][key].is_u64(), "total.{kind}.{key}");
            }
        }
        assert_eq!(shards[0]["duplicate"]["count"], 300);
        assert_eq!(shards[0]["novel"]["count"], 700);
        assert_eq!(shards[1]["novel"]["count"], 0);
        assert_eq!(shards[1]["novel"]["max_ns"], 0);
        let expected = LatencySummary::from_histogram(&hist(1..=300));
        assert_eq!(shards[0]["duplicate"]["p50_ns"], expected.p50_ns);

        // Totals come from the merged histograms.
        let total = &v["total"];
        assert!((total["claims_per_sec"].as_f64().unwrap() - 1e6).abs() < 1e-6);
        assert_eq!(total["duplicate"]["count"], 1300);
        assert_eq!(total["novel"]["count"], 700);
        let merged = LatencySummary::from_histogram(&hist((1..=300).chain(10_000..11_000)));
        assert_eq!(total["duplicate"]["max_ns"], merged.max_ns);
        assert_eq!(total["duplicate"]["p50_ns"], merged.p50_ns);
    }

    #[test]
    fn json_of_an_empty_run() {
        let r = BenchResult {
            backend: "redis".to_owned(),
            shards: vec![],
            elapsed_ns: 0,
        };
        let v: serde_json::Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(v["shards"].as_array().unwrap().len(), 0);
        assert_eq!(v["total"]["claims_per_sec"], 0.0);
        assert_eq!(v["total"]["duplicate"]["count"], 0);
    }

    /// Checks that every non-self-closing tag is closed in order.
    fn assert_balanced(svg: &str) {
        let mut stack = Vec::new();
        for chunk in svg.split('<').skip(1) {
            let tag = chunk.split('>').next().unwrap();
            let name = |t: &str| t.split_whitespace().next().unwrap_or("").to_owned();
            if let Some(closing) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name(closing)), "unbalanced </{closing}>");
            } else if !tag.ends_with('/') {
                stack.push(name(tag));
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    /// (x, y) pairs of every polyline, in document order.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("<polyline")
            .skip(1)
            .map(|p| {
                let pts = p
                    .split("points=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap();
                pts.split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn svg_draws_one_line_per_non_empty_curve() {
        let svg = render_svg(&sample_run("<redis & \"co\">"));
        assert!(svg.starts_with("<svg"));
        assert!(svg.ends_with("</svg>"));
        assert!(svg.contains(r#"fill="white""#));
        assert_balanced(&svg);

        // Shard 0: duplicate + novel; shard 1: duplicate only.
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 3);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2); // novel curve + its legend key
        for line in &lines {
            assert!(line.len() >= 2);
            for w in line.windows(2) {
                // Left to right, latency never decreasing (SVG y grows downwards).
                assert!(w[0].0 < w[1].0 && w[0].1 >= w[1].1, "{line:?}");
            }
            for &(x, y) in line {
                assert!((PLOT_LEFT..=PLOT_RIGHT).contains(&x), "{x}");
                assert!((PLOT_TOP..=PLOT_BOTTOM).contains(&y), "{y}");
            }
        }

        assert!(svg.contains("shard 0 (core 3) duplicate"));
        assert!(svg.contains("shard 0 (core 3) novel"));
        assert!(svg.contains("shard 1 (core 5) duplicate"));
        assert!(!svg.contains("shard 1 (core 5) novel"));
        assert!(svg.contains("&lt;redis &amp; &quot;co&quot;&gt;"));
        assert!(!svg.contains("<redis"));
        // Latencies span 1 ns to ~11 µs: decades 1ns..100µs are labelled.
        for label in [">1ns<", ">100ns<", ">1µs<", ">10µs<", ">100µs<"] {
            assert!(svg.contains(label), "missing {label}");
        }
        for tick in [">p50<", ">p90<", ">p99<", ">p99.9<", ">p99.99<", ">max<"] {
            assert!(svg.contains(tick), "missing {tick}");
        }
    }

    #[test]
    fn svg_without_samples_is_still_valid() {
        let r = BenchResult {
            backend: "memory".to_owned(),
            shards: vec![shard(0, 0, 0, new_histogram(), new_histogram())],
            elapsed_ns: 0,
        };
        let svg = render_svg(&r);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_balanced(&svg);
        assert!(!svg.contains("<polyline"));
        assert!(svg.contains("no samples"));
    }

    #[test]
    fn svg_grows_to_fit_a_long_legend() {
        let r = BenchResult {
            backend: "memory".to_owned(),
            shards: (0..20)
                .map(|i| shard(i, i, 1, hist([10 + i as u64]), hist([100])))
                .collect(),
            elapsed_ns: 1,
        };
        let svg = render_svg(&r);
        assert_eq!(polylines(&svg).len(), 40);
        let height: f64 = svg
            .split("height=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        let last_legend_y = PLOT_TOP + 10.0 + LEGEND_ROW * 39.0;
        assert!(height > last_legend_y + 4.0, "{height}");
    }

    #[test]
    fn xml_escape_handles_markup_and_controls() {
        assert_eq!(xml_escape("a<b>&'\"\u{0}c"), "a&lt;b&gt;&amp;&apos;&quot;c");
    }
}
