//! The Aerospike reply parsers must survive any bytes from the network: no
//! panic, no allocation beyond the input's size, and a consumed length
//! within the input. Run: `cargo fuzz run aerospike_reply` (from the repo root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use txgate::cache::aerospike::codec::{parse_info_reply, parse_reply};

fuzz_target!(|data: &[u8]| {
    // Whole input, then every way the stream could be cut into two reads.
    if let Ok(Some((_, used))) = parse_reply(data) {
        assert!(used <= data.len());
        // A complete reply stays the same reply with trailing bytes.
        let mut more = data[..used].to_vec();
        more.extend_from_slice(&[2, 3]);
        let again = parse_reply(&more).expect("prefix parsed before");
        assert_eq!(again.map(|(_, n)| n), Some(used));
    }
    if let Ok(Some((_, used))) = parse_info_reply(data) {
        assert!(used <= data.len());
    }
    for cut in [1usize, 2, 7, 8, 30, data.len() / 2] {
        if cut < data.len() {
            let _ = parse_reply(&data[..cut]);
            let _ = parse_info_reply(&data[..cut]);
        }
    }
});
