//! The config parser: TOML → `Config` (unknown keys, types, then every value rule).
#![no_main]

use imagegate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text);
    }
});
