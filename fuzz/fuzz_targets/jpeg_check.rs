//! The gpt-image Jpeg structure walk (`files::inspect`) and the image check with the default
//! limits (`files::check_image`, one image).
#![no_main]

use imagegate::edit::files;
use imagegate::edit::sniff::ImageFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rules = imagegate_fuzz::file_rules();
    let _ = files::inspect(data, ImageFormat::Jpeg);
    let _ = files::check_image(0, 1, data, ImageFormat::Jpeg, &rules);
});
