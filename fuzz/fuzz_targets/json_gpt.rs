//! The gpt-image JSON body (`images` as `data:` URLs, file ids, URLs), with the default limits.
//!
//! Invariant: the canonical JSON built from an accepted edit (what goes upstream) is accepted
//! again as the same edit.
#![no_main]

use imagegate::edit::gpt::{canonical, json::parse_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let models = imagegate_fuzz::FuzzModels::new();
    let limits = imagegate_fuzz::gpt_limits();
    let Ok(edit) = parse_json(data, &models, &limits) else {
        return;
    };
    let again = parse_json(&canonical::json(&edit), &models, &limits)
        .unwrap_or_else(|e| panic!("the canonical body of an accepted edit is refused: {e:?}"));
    assert_eq!(edit, again, "the canonical body changed the edit");
});
