//! Parsing of human-written quantities in flags: durations like `50ms`, `2s`.

use std::time::Duration;

/// Parses `0`, or a number with a unit: `ns`, `us` (or `µs`), `ms`, `s`, `m`,
/// `h`. Fractions are allowed (`1.5s`). A bare non-zero number is refused:
/// `50` could mean anything.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{s}' has no unit: write e.g. 50ms, 2s, 1m"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: write e.g. 50ms, 2s, 1m"))?;
    let unit_ns = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        other => {
            return Err(format!(
                "'{s}' has unknown unit '{other}': use ns, us, ms, s, m or h"
            ));
        }
    };
    let ns = n * unit_ns;
    if !ns.is_finite() || !(0.0..=1e18).contains(&ns) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_nanos(ns.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_ambiguous_or_malformed_durations() {
        for bad in ["50", "", "ms", "1x", "-1s", "1..2s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
