//! The config loader: any TOML text through the typed config and `config check`.
#![no_main]

use castvault::config::Config;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut config) = toml::from_str::<Config>(text) {
        // The default store lives under `data_dir`; keep it in one scratch folder.
        config.data_dir = scratch().to_owned();
        // Validation opens each store, which for a `file://` store creates its directory: the
        // fuzzer must not make directories anywhere on the machine, so those skip it.
        if !text.to_ascii_lowercase().contains("file") && !text.contains('\\') {
            let _ = config.validate();
        }
        let _ = config.ack_level();
    }
});
