//! The dall-e-2 PNG checks: `check_image` (with and without a mask, strict and compatible
//! transparency) and `check_mask` against the file's own dimensions, default limits.
//! Input: one flag byte (bit 0: has mask, bit 1: compatible), then the file.
#![no_main]

use bytes::Bytes;
use imagegate::edit::files;
use imagegate::edit::png_check::{self, Transparency};
use imagegate::edit::sniff::ImageFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let mut rules = imagegate_fuzz::png_rules();
    if flags & 2 != 0 {
        rules.transparency = Transparency::Compatible;
    }
    let bytes = Bytes::copy_from_slice(file);
    let _ = png_check::check_image(bytes.clone(), flags & 1 != 0, &rules);
    // A mask the size of its header, so the decode is reached.
    if let Ok(info) = files::inspect(file, ImageFormat::Png) {
        let _ = png_check::check_mask(bytes, (info.width, info.height), &rules);
    }
});
