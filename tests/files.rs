//! The shared JPEG and WebP fixtures of `support::fixtures` against the public file checks of
//! `imagegate::edit::files` (the unit tests there cover the rules; this keeps the builders
//! that integration tests use honest).

mod support;

use imagegate::edit::files::{FileRules, ImageInfo, check_image, check_markup, inspect};
use imagegate::edit::sniff::ImageFormat;
use support::fixtures::*;

fn info(format: ImageFormat, width: u32, height: u32) -> ImageInfo {
    ImageInfo {
        format,
        width,
        height,
    }
}

#[test]
fn support_fixtures_pass_the_structural_checks() {
    let rules = FileRules::default();
    let cases = [
        (jpeg(40, 30), info(ImageFormat::Jpeg, 40, 30)),
        (jpeg_progressive(17, 5), info(ImageFormat::Jpeg, 17, 5)),
        (webp_lossless(9, 8), info(ImageFormat::Webp, 9, 8)),
        (webp_vp8x(3, 7), info(ImageFormat::Webp, 3, 7)),
        (
            webp_vp8x_with(0, 64, 48, &[webp_chunk(b"VP8 ", &webp_vp8_body(64, 48))]),
            info(ImageFormat::Webp, 64, 48),
        ),
        (rgba_png(16, true), info(ImageFormat::Png, 16, 16)),
    ];
    for (i, (bytes, expected)) in cases.iter().enumerate() {
        assert_eq!(
            check_image(i, cases.len(), bytes, expected.format, &rules),
            Ok(*expected)
        );
    }
}

#[test]
fn support_fixtures_for_refusals_are_refused() {
    let rules = FileRules::default();
    let bomb = jpeg_claiming(65535, 65535);
    assert_eq!(
        inspect(&bomb, ImageFormat::Jpeg).map(|i| (i.width, i.height)),
        Ok((65535, 65535))
    );
    assert!(check_image(0, 1, &bomb, ImageFormat::Jpeg, &rules).is_err());

    let huge = webp_vp8x_with(
        0x02,
        1 << 24,
        1 << 24,
        &[webp_chunk(b"ANIM", &[0; 6]), webp_chunk(b"ANMF", &[0; 16])],
    );
    assert!(check_image(0, 1, &huge, ImageFormat::Webp, &rules).is_err());

    let opaque = rgba_png(8, false);
    assert!(check_markup(&opaque, &info(ImageFormat::Png, 8, 8), &rules).is_err());
    assert!(check_markup(&rgba_png(8, true), &info(ImageFormat::Png, 8, 8), &rules).is_ok());
}
