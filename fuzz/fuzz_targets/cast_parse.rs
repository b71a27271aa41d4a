//! The asciicast parsers ingest and the indexer run on untrusted bytes: the header line, event
//! lines, resize data, and the per-chunk scan that counts events.
#![no_main]

use castvault_storage::cast::{CastHeader, parse_event, parse_resize};
use castvault_storage::chunk::ChunkStats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let first = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(header) = CastHeader::parse(first) {
        let _ = header.timestamp();
        let _ = header.src_node_tags();
        let _ = header.src_node_user_id();
        let _ = header.kubernetes("namespace");
        let value = header.into_value();
        // A header that parsed re-parses from its own serialization.
        let again = serde_json::to_vec(&value).unwrap();
        assert!(CastHeader::parse(&again).is_ok());
    }
    for line in data.split(|&b| b == b'\n') {
        let parsed = parse_event(line);
        if let Some((time, _code)) = parsed {
            assert!(time.is_finite() && time >= 0.0);
        }
        // The parser's fast path must agree with plain serde_json on every line.
        let reference =
            serde_json::from_slice::<(f64, String, serde::de::IgnoredAny)>(line.trim_ascii())
                .ok()
                .filter(|(t, _, _)| t.is_finite() && *t >= 0.0)
                .map(|(t, _, _)| t);
        assert_eq!(
            parsed.map(|(t, _)| t.to_bits()),
            reference.map(f64::to_bits),
            "{:?}",
            String::from_utf8_lossy(line)
        );
        if let Ok(text) = std::str::from_utf8(line) {
            let _ = parse_resize(text);
        }
    }
    let stats = ChunkStats::scan(data, true);
    let _ = ChunkStats::scan(data, false);
    assert!(stats.events <= data.len() as u64 + 1);
});
