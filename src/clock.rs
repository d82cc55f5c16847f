//! Cheap monotonic clocks for TTLs.
//!
//! TTL checks run on every claim, so they read `CLOCK_MONOTONIC_COARSE`
//! (a vDSO read of the last tick, a few ns, resolution 1–4 ms) rather than the
//! precise clock. TTLs are seconds; a few ms of slack is fine.

/// Milliseconds on the coarse monotonic clock.
#[inline]
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE
    // exists on every Linux since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Milliseconds on the precise monotonic clock, for backends whose TTLs are
/// checked against short test deadlines.
#[inline]
pub fn precise_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above, with CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn clocks_are_monotonic_and_agree_within_a_tick() {
        let a = super::coarse_ms();
        let p = super::precise_ms();
        let b = super::coarse_ms();
        assert!(b >= a);
        assert!(p + 20 >= a && p <= b + 20, "coarse {a}..{b}, precise {p}");
    }
}
