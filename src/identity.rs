//! Who this process is, for the names it leaves in shared places: claim
//! values in the store, the Redis client name. Below the cache and the TxID
//! set, which both use it.

/// Longest instance id; values are built on the stack.
pub const INSTANCE_ID_MAX: usize = 40;

/// `hostname-pid`, trimmed to [`INSTANCE_ID_MAX`].
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "txgate".into());
    trim_front(format!("{host}-{}", std::process::id()), INSTANCE_ID_MAX)
}

/// The last `max` bytes of `id` or fewer, cut at a character boundary (a
/// hostname may hold multibyte characters).
fn trim_front(mut id: String, max: usize) -> String {
    if id.len() > max {
        let mut cut = id.len() - max;
        while !id.is_char_boundary(cut) {
            cut += 1;
        }
        id.drain(..cut);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_instance_ids_are_trimmed_at_a_character_boundary() {
        assert_eq!(trim_front("abc-1".into(), 40), "abc-1");
        assert_eq!(trim_front("abcdef-1".into(), 4), "ef-1");
        // "é" is two bytes: a cut inside it moves past it.
        assert_eq!(trim_front("aé-12".into(), 4), "-12");
        assert_eq!(trim_front("aé-12".into(), 5), "é-12");
    }
}
