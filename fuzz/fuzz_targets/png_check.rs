//! The dall-e-2 PNG checks: `check_image` (with and without a mask, strict and compatible
//! transparency) and `check_mask` against the file's own dimensions, default limits.
//! Input: one flag byte (bit 0: has mask, bit 1: compatible), then the file.
//!
//! Invariants: an accepted file is forwarded as sent unless converted; a converted file (tRNS
//! to RGBA) passes the same check again, unconverted, with the same size.
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
    let has_mask = flags & 1 != 0;
    if let Ok(checked) = png_check::check_image(bytes.clone(), has_mask, &rules) {
        if checked.converted {
            let again = png_check::check_image(checked.bytes.clone(), has_mask, &rules)
                .unwrap_or_else(|e| panic!("the converted file is refused: {e:?}"));
            assert!(!again.converted, "a converted file is converted again");
            assert_eq!((again.width, again.height), (checked.width, checked.height));
        } else {
            assert_eq!(checked.bytes, bytes, "an unconverted file was changed");
        }
    }
    // A mask the size of its header, so the decode is reached.
    if let Ok(info) = files::inspect(file, ImageFormat::Png) {
        let _ = png_check::check_mask(bytes, (info.width, info.height), &rules);
    }
});
