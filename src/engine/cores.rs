//! Which cores shards run on: the process's affinity mask by default (so
//! `taskset` and cpuset containers are honoured), or a list like `0-3,8`.

use std::io;

/// The CPUs this process may run on, ascending.
pub fn affinity_cores() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        set
    };
    let cores: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE, the set's size.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    Ok(cores)
}

/// Parses a core list: comma-separated CPUs and inclusive ranges (`0-3,8`).
/// A CPU may repeat (two shards sharing a core, for tests). At most 1024 shards.
pub fn parse_core_list(s: &str) -> Result<Vec<usize>, String> {
    const SHARDS_MAX: usize = 1024;
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("'{s}' has an empty item: write e.g. 0-3,8"));
        }
        let parse = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{x}' is not a CPU number: write e.g. 0-3,8"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(part)?, parse(part)?),
        };
        if lo > hi {
            return Err(format!("range '{part}' runs backwards"));
        }
        if hi >= libc::CPU_SETSIZE as usize {
            return Err(format!("CPU {hi} is beyond {}", libc::CPU_SETSIZE - 1));
        }
        cores.extend(lo..=hi);
        if cores.len() > SHARDS_MAX {
            return Err(format!("more than {SHARDS_MAX} shards"));
        }
    }
    Ok(cores)
}

/// [`parse_core_list`], refusing CPUs outside this process's affinity mask
/// (missing, or outside its cpuset): a shard pinned there fails to start,
/// and that is a usage error to report with the flag, not a runtime one.
pub fn parse_core_list_here(s: &str) -> Result<Vec<usize>, String> {
    let cores = parse_core_list(s)?;
    let allowed = affinity_cores().map_err(|e| format!("reading the affinity mask: {e}"))?;
    match cores.iter().find(|c| !allowed.contains(c)) {
        None => Ok(cores),
        Some(c) => Err(format!(
            "CPU {c} is not one this process may run on (allowed: {})",
            ranges(&allowed)
        )),
    }
}

/// `0-3,8` for [0, 1, 2, 3, 8] (ascending input).
fn ranges(cores: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_has_at_least_one_core() {
        assert!(!affinity_cores().unwrap().is_empty());
    }

    #[test]
    fn parses_lists_and_ranges() {
        assert_eq!(parse_core_list("0-3,8"), Ok(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_core_list("1,1"), Ok(vec![1, 1]));
        assert_eq!(parse_core_list(" 2 "), Ok(vec![2]));
    }

    #[test]
    fn ranges_print_as_a_core_list_reads_them() {
        assert_eq!(ranges(&[0, 1, 2, 3, 8]), "0-3,8");
        assert_eq!(ranges(&[1, 3, 4]), "1,3-4");
        assert_eq!(
            parse_core_list(&ranges(&[0, 2, 3, 4, 9])),
            Ok(vec![0, 2, 3, 4, 9])
        );
    }

    #[test]
    fn a_cpu_outside_the_mask_is_refused_naming_the_allowed_ones() {
        let allowed = affinity_cores().unwrap();
        let first = allowed[0].to_string();
        assert_eq!(parse_core_list_here(&first), Ok(vec![allowed[0]]));
        let outside = (0..libc::CPU_SETSIZE as usize)
            .find(|c| !allowed.contains(c))
            .unwrap();
        let e = parse_core_list_here(&outside.to_string()).unwrap_err();
        assert!(
            e.contains(&format!("CPU {outside}")) && e.contains(&ranges(&allowed)),
            "{e}"
        );
    }

    #[test]
    fn refuses_malformed_lists() {
        for bad in ["", "a", "3-1", "1,,2", "0-99999"] {
            assert!(parse_core_list(bad).is_err(), "{bad:?}");
        }
    }
}
