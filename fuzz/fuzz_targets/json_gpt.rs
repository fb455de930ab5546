//! The gpt-image JSON body (`images` as `data:` URLs, file ids, URLs), with the default limits.
#![no_main]

use imagegate::edit::gpt::json::parse_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let models = imagegate_fuzz::FuzzModels::new();
    let limits = imagegate_fuzz::gpt_limits();
    let _ = parse_json(data, &models, &limits);
});
