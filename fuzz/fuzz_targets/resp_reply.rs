//! The Redis reply parser must survive any bytes from the network: no panic,
//! no unbounded recursion or allocation, and a consumed length within the
//! input. Run: `cargo fuzz run resp_reply` (from the repo root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use txgate::cache::redis::resp::decode_reply;

fuzz_target!(|data: &[u8]| {
    // Whole input, then every way the stream could be cut into two reads.
    if let Ok(Some((_, used))) = decode_reply(data) {
        assert!(used <= data.len());
        // A complete reply stays the same reply with trailing bytes.
        let mut more = data[..used].to_vec();
        more.extend_from_slice(b"+OK\r\n");
        let again = decode_reply(&more).expect("prefix decoded before");
        assert_eq!(again.map(|(_, n)| n), Some(used));
    }
    for cut in [1usize, 2, 3, data.len() / 2] {
        if cut < data.len() {
            let _ = decode_reply(&data[..cut]);
        }
    }
});
