//! The manifest reader: a manifest and its seal as `verify` reads them from a store or a
//! bundle. Input: manifest bytes, a NUL, seal bytes.
#![no_main]

use castvault_storage::manifest::{CatalogRow, Manifest};
use castvault_storage::verify::{KeyRing, Report, check_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (manifest, seal) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    if let Ok(m) = serde_json::from_slice::<Manifest>(manifest) {
        let _ = CatalogRow::from_manifest(&m);
    }
    let mut report = Report::default();
    let keys = KeyRing::default();
    // No key is known, so nothing may pass the seal check.
    assert!(
        check_manifest(
            "01a22dca58cd5aa017911204a9ab-local",
            manifest,
            seal,
            &keys,
            &mut report
        )
        .is_err()
            || report.failure.is_some()
    );
});
