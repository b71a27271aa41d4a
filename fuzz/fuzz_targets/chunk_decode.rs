//! A stored chunk read back from the store: any bytes, bounded output.
#![no_main]

use castvault_storage::chunk::{ChunkDecoder, ChunkEncoder, decode};
use libfuzzer_sys::fuzz_target;

/// The decode capacity the reader uses for a chunk whose manifest says it is this long.
const CAPACITY: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = decode(data, CAPACITY) {
        assert!(raw.len() <= CAPACITY);
    }
    let mut decoder = ChunkDecoder::new().unwrap();
    let _ = decoder.decode(data, 4096);
    // Whatever goes in comes back out.
    let mut encoder = ChunkEncoder::new(1).unwrap();
    let stored = encoder.encode(data).unwrap();
    assert_eq!(decoder.decode(&stored, data.len()).unwrap(), data);
});
