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
    fn refuses_malformed_lists() {
        for bad in ["", "a", "3-1", "1,,2", "0-99999"] {
            assert!(parse_core_list(bad).is_err(), "{bad:?}");
        }
    }
}
