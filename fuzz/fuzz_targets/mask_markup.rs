//! The gpt-image mask and markup checks (structure, size against the first image, the decode
//! and the tRNS conversion of a mask, the pixel walk of a markup), default limits.
//! Input: one flag byte (bits 0-1: first image format, bit 2: strict mask transparency), then
//! the file. The first image has the file's own header size (so the size rule passes) unless
//! the file's header cannot be read, then 1×1.
#![no_main]

use bytes::Bytes;
use imagegate::edit::files::{self, ImageInfo};
use imagegate::edit::png_check::Transparency;
use imagegate::edit::sniff::ImageFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let format = match flags & 3 {
        0 | 3 => ImageFormat::Png,
        1 => ImageFormat::Jpeg,
        _ => ImageFormat::Webp,
    };
    let mut rules = imagegate_fuzz::file_rules();
    if flags & 4 != 0 {
        rules.png.transparency = Transparency::Strict;
    }
    let (width, height) = files::inspect(file, ImageFormat::Png)
        .map(|i| (i.width, i.height))
        .unwrap_or((1, 1));
    let first = ImageInfo {
        format,
        width,
        height,
    };
    let _ = files::check_mask(Bytes::copy_from_slice(file), &first, &rules);
    let _ = files::check_markup(file, &first, &rules);
});
