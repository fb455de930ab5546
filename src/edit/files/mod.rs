//! Byte-level checks of the files of a GPT-image edit: `image` (I3), `mask` (I4) and `markup`
//! (I5) of `gpt-image-models.md` §9. Pure, synchronous functions for a blocking pool; they
//! return errors and log nothing.
//!
//! **Input images** are checked by structure, never decoded (16 images of 50 MiB must not cost
//! 16 decodes): one linear pass walks the container to its end and reads width and height from
//! its header.
//! - PNG: the chunk walk of [`png_check`] (lengths, CRCs, IHDR first and valid, PLTE/tRNS/IDAT
//!   order, IEND present). Bytes after IEND are ignored, not refused: decoders never read them,
//!   and cropped screenshots from some editors (the "aCropalypse" files) carry the old image
//!   there.
//! - JPEG: `jpeg.rs` (SOI, exactly one SOFn, at least one scan, EOI; bytes after EOI ignored for
//!   Multi-Picture and Motion Photo files).
//! - WebP: `webp.rs` (RIFF size + 8 equal to the file length; VP8 / VP8L / VP8X headers).
//!
//! A broken container or a zero dimension is G12: `Invalid image file or mode for image {i+1},
//! please check your image file.` (`image_generation_user_error`, `invalid_image_file`, param
//! `image` for a single image, else `image[{i}]`). Width × height above
//! [`FileRules::max_pixels`] gets the same type, param and code, with G12's sentence followed by
//! one naming the limit, so the sender can tell a refusal by size from a corrupt file.
//!
//! **Mask** (I4): a PNG by bytes, else G11's shape (`Invalid file 'mask': unsupported mimetype
//! ('image/jpeg'). Supported file formats are 'image/png'.`, `invalid_request_error`,
//! `unsupported_file_mimetype`). A broken mask gets G12's shape for the part:
//! `Invalid image file or mode for mask, please check your image file.` (`invalid_image_file`,
//! param `mask`); the pixel cap applies as for images. Then, in this order:
//! 1. the size against the first image, only when that is a PNG → G33 (checked before the alpha
//!    rule: one weak observation has a grayscale mask draw G33, §2.5);
//! 2. no alpha channel and no tRNS → G34;
//! 3. colour types 4 and 6 are forwarded unchanged without decoding (like input images), unless
//!    `rules.png.transparency` is `Strict`, which decodes row by row and requires a pixel with
//!    alpha 0; colour types 0, 2 and 3 with tRNS are decoded and re-encoded as RGBA losslessly by
//!    [`png_check`]'s converter, whose output must stay below `rules.png.max_bytes`; an
//!    interlaced one is converted from a whole frame in memory, so its sides must be at most
//!    `rules.png.max_dimension` (`invalid_image_file`, param `mask`, naming the limit).
//!    Conversion faults: the converter's wording, `invalid_mask_image_format`.
//!
//! **Markup** (I5): a PNG by bytes (else G11's shape, param `markup`); broken → G12's shape for
//! `markup`; the pixel cap; the same size as the first image when that is a PNG or WebP; then a
//! row-by-row decode that stops at the first pixel with alpha 0 (tRNS counts; a file with neither
//! alpha nor tRNS is refused without decoding).
//!
//! The caller does the byte-size limits (§9 P3) and the sniffing that picks G11 for images.

mod jpeg;
mod webp;

use std::borrow::Cow;

use bytes::Bytes;

use crate::edit::cancel::Cancel;
use crate::edit::png_check::{self, PngRejection, PngRules, Trailing, Transparency};
use crate::edit::sniff::{ImageFormat, Sniffed, sniff};
use crate::error::GatewayError;

/// Limits for the file checks.
#[derive(Debug, Clone)]
pub struct FileRules {
    /// Width × height may not exceed this, for images, mask and markup. Default
    /// [`FileRules::DEFAULT_MAX_PIXELS`].
    pub max_pixels: u64,
    /// For the mask: `max_bytes` bounds the RGBA file a tRNS conversion produces (default 4 MiB,
    /// the mask's own limit); `transparency` says whether a mask needs a pixel with alpha 0
    /// (default `Compatible`: no such rule is documented); `max_dimension` (default 4096)
    /// bounds only an *interlaced* tRNS mask, whose conversion holds one whole RGBA frame
    /// (width × height × 4 or 8 bytes). Every other file is held to `max_pixels` alone, and
    /// the decoders' limits follow the file's own size.
    pub png: PngRules,
}

impl FileRules {
    /// [`crate::config::DEFAULT_MAX_PIXELS`]: Pillow's `MAX_IMAGE_PIXELS`.
    pub const DEFAULT_MAX_PIXELS: u64 = crate::config::DEFAULT_MAX_PIXELS;
}

impl Default for FileRules {
    fn default() -> Self {
        FileRules {
            max_pixels: Self::DEFAULT_MAX_PIXELS,
            png: PngRules {
                max_bytes: 4 * 1024 * 1024,
                max_dimension: 4096,
                transparency: Transparency::Compatible,
                max_conversion_bytes: PngRules::DEFAULT_MAX_CONVERSION_BYTES,
            },
        }
    }
}

/// What the header of a checked image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// Why a container walk failed, for logs and tests; the client only sees G12.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken(pub Cow<'static, str>);

const fn broken(reason: &'static str) -> Broken {
    Broken(Cow::Borrowed(reason))
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Walks the container of `bytes` as `format` and returns its header dimensions, or why the
/// walk failed. No limits are applied: [`check_image`] adds them. Useful to log the reason of
/// a G12.
pub fn inspect(bytes: &[u8], format: ImageFormat) -> Result<ImageInfo, Broken> {
    if sniff(bytes) != Sniffed::Supported(format) {
        return Err(broken("the signature does not match the format"));
    }
    let (width, height) = match format {
        ImageFormat::Png => {
            let header = png_check::walk(bytes, Trailing::Ignore).map_err(png_broken)?;
            (header.width, header.height)
        }
        ImageFormat::Jpeg => jpeg::walk(bytes)?,
        ImageFormat::Webp => webp::walk(bytes)?,
    };
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// I3: checks input image `index` of `count` (0-based) by structure, as `format` (sniffed by
/// the caller; checked again). Param `image` when `count == 1`, else `image[{index}]`.
pub fn check_image(
    index: usize,
    count: usize,
    bytes: &[u8],
    format: ImageFormat,
    rules: &FileRules,
) -> Result<ImageInfo, GatewayError> {
    image_within_limits(bytes, format, rules).map_err(|fault| {
        let param = if count == 1 {
            "image".to_string()
        } else {
            format!("image[{index}]")
        };
        fault.into_error(&param, &format!("image {}", index + 1), rules)
    })
}

/// [`check_image`] with the param given, for bodies that name it otherwise (JSON `data:` URLs:
/// `images[{index}]`, §9 J2).
pub fn check_image_as(
    param: &str,
    index: usize,
    bytes: &[u8],
    format: ImageFormat,
    rules: &FileRules,
) -> Result<ImageInfo, GatewayError> {
    image_within_limits(bytes, format, rules)
        .map_err(|fault| fault.into_error(param, &format!("image {}", index + 1), rules))
}

fn image_within_limits(
    bytes: &[u8],
    format: ImageFormat,
    rules: &FileRules,
) -> Result<ImageInfo, Fault> {
    let info = inspect(bytes, format).map_err(|_| Fault::Broken)?;
    limits(info.width, info.height, rules)?;
    Ok(info)
}

/// I4: checks the mask against the first image and returns the bytes to forward: the same
/// `Bytes` (no copy) unless a tRNS mask was converted to RGBA.
pub fn check_mask(
    bytes: Bytes,
    first: &ImageInfo,
    rules: &FileRules,
) -> Result<Bytes, GatewayError> {
    check_mask_with(bytes, first, rules, &Cancel::never())
}

/// [`check_mask`] whose decode stops at the next row once `cancel` is cancelled (then
/// [`GatewayError::Internal`]: the caller left and nobody reads the answer).
pub fn check_mask_with(
    bytes: Bytes,
    first: &ImageInfo,
    rules: &FileRules,
    cancel: &Cancel,
) -> Result<Bytes, GatewayError> {
    const PART: &str = "mask";
    require_png(PART, &bytes)?;
    let header = png_check::walk(&bytes, Trailing::Ignore).map_err(|_| invalid_file(PART, PART))?;
    part_within_limits(PART, header.width, header.height, rules)?;
    mask_fits((header.width, header.height), first)?;
    if !header.has_alpha_channel() && !header.has_trns {
        return Err(mask_error(
            "Invalid mask image format - mask image missing alpha channel",
        ));
    }
    if header.has_alpha_channel() && rules.png.transparency == Transparency::Compatible {
        return Ok(bytes);
    }
    let max_side = rules.png.max_dimension;
    if header.needs_conversion()
        && header.interlaced
        && (header.width > max_side || header.height > max_side)
    {
        return Err(GatewayError::image_user_error(
            Some(PART),
            Some("invalid_image_file"),
            format!(
                "Invalid image file or mode for mask, please check your image file. An \
                 interlaced mask whose transparency comes from tRNS is converted in memory, so \
                 its width and height must be at most {max_side} pixels."
            ),
        ));
    }
    let decode_rules = PngRules {
        max_dimension: header.width.max(header.height),
        ..rules.png.clone()
    };
    match png_check::decode_mask(bytes, &header, &decode_rules, cancel) {
        Ok(checked) => Ok(checked.bytes),
        Err(PngRejection::Cancelled) => Err(GatewayError::Internal),
        Err(PngRejection::ConversionTooLarge { needed, limit, .. }) => {
            Err(GatewayError::image_user_error(
                Some(PART),
                Some("invalid_image_file"),
                format!(
                    "Invalid image file or mode for mask, please check your image file. An \
                     interlaced mask whose transparency comes from tRNS is converted in memory; \
                     this one needs {needed} bytes, more than the limit of {limit} bytes."
                ),
            ))
        }
        Err(
            rejection @ (PngRejection::NotTransparent | PngRejection::ConvertedTooLarge { .. }),
        ) => Err(mask_error(
            rejection.message_with_limit(PART, rules.png.max_bytes),
        )),
        Err(_) => Err(invalid_file(PART, PART)),
    }
}

/// The rule of [`check_mask`] that depends on the request rather than the mask alone: a mask
/// sent with a PNG first image has its size (also applied to a mask known valid from the
/// validated cache).
pub fn mask_fits(mask_dims: (u32, u32), first: &ImageInfo) -> Result<(), GatewayError> {
    if first.format == ImageFormat::Png && mask_dims != (first.width, first.height) {
        return Err(mask_error(
            "Invalid mask image format - mask size does not match image size",
        ));
    }
    Ok(())
}

/// The rule of [`check_markup`] that depends on the request: a markup sent with a PNG or WebP
/// first image has its size.
pub fn markup_fits(markup_dims: (u32, u32), first: &ImageInfo) -> Result<(), GatewayError> {
    if matches!(first.format, ImageFormat::Png | ImageFormat::Webp)
        && markup_dims != (first.width, first.height)
    {
        return Err(markup_error(
            "Invalid markup image - markup size does not match image size",
        ));
    }
    Ok(())
}

/// I5: checks the markup against the first image.
pub fn check_markup(
    bytes: &[u8],
    first: &ImageInfo,
    rules: &FileRules,
) -> Result<(), GatewayError> {
    check_markup_with(bytes, first, rules, &Cancel::never())
}

/// [`check_markup`] whose decode stops at the next row once `cancel` is cancelled (then
/// [`GatewayError::Internal`]: the caller left and nobody reads the answer).
pub fn check_markup_with(
    bytes: &[u8],
    first: &ImageInfo,
    rules: &FileRules,
    cancel: &Cancel,
) -> Result<(), GatewayError> {
    const PART: &str = "markup";
    require_png(PART, bytes)?;
    let header = png_check::walk(bytes, Trailing::Ignore).map_err(|_| invalid_file(PART, PART))?;
    part_within_limits(PART, header.width, header.height, rules)?;
    markup_fits((header.width, header.height), first)?;
    let decode_rules = PngRules {
        max_bytes: bytes.len().saturating_add(1),
        max_dimension: header.width.max(header.height),
        transparency: Transparency::Compatible,
        max_conversion_bytes: rules.png.max_conversion_bytes,
    };
    match png_check::has_transparent_pixel(bytes, &header, &decode_rules, cancel) {
        Ok(true) => Ok(()),
        Ok(false) => Err(markup_error(
            "Invalid markup image - markup image must contain transparent pixels",
        )),
        Err(PngRejection::Cancelled) => Err(GatewayError::Internal),
        Err(_) => Err(invalid_file(PART, PART)),
    }
}

fn png_broken(rejection: PngRejection) -> Broken {
    match rejection {
        PngRejection::Corrupt(detail) => Broken(Cow::Owned(detail)),
        other => Broken(Cow::Owned(other.to_string())),
    }
}

/// G12 for `subject` ("image 2", "mask", "markup").
fn invalid_file(param: &str, subject: &str) -> GatewayError {
    GatewayError::image_user_error(
        Some(param),
        Some("invalid_image_file"),
        format!("Invalid image file or mode for {subject}, please check your image file."),
    )
}

/// A fault shared by every file, before its param is known (errors are built only on failure).
enum Fault {
    /// A broken container or a zero dimension: G12.
    Broken,
    TooManyPixels {
        width: u32,
        height: u32,
    },
}

impl Fault {
    /// G12's shape for `subject` ("image 2", "mask", "markup"); above the cap with a second
    /// sentence naming it.
    fn into_error(self, param: &str, subject: &str, rules: &FileRules) -> GatewayError {
        match self {
            Fault::Broken => invalid_file(param, subject),
            Fault::TooManyPixels { width, height } => GatewayError::image_user_error(
                Some(param),
                Some("invalid_image_file"),
                format!(
                    "Invalid image file or mode for {subject}, please check your image file. \
                     Its size of {width}x{height} pixels is above the limit of {} pixels.",
                    rules.max_pixels
                ),
            ),
        }
    }
}

fn limits(width: u32, height: u32, rules: &FileRules) -> Result<(), Fault> {
    if width == 0 || height == 0 {
        return Err(Fault::Broken);
    }
    if u64::from(width) * u64::from(height) > rules.max_pixels {
        return Err(Fault::TooManyPixels { width, height });
    }
    Ok(())
}

/// [`limits`] for the mask and the markup, whose param and subject are their part name.
fn part_within_limits(
    part: &str,
    width: u32,
    height: u32,
    rules: &FileRules,
) -> Result<(), GatewayError> {
    limits(width, height, rules).map_err(|fault| fault.into_error(part, part, rules))
}

/// G11's shape for a part that must be a PNG.
fn require_png(part: &str, bytes: &[u8]) -> Result<(), GatewayError> {
    let mime = match sniff(bytes) {
        Sniffed::Supported(ImageFormat::Png) => return Ok(()),
        Sniffed::Supported(other) => other.mime(),
        Sniffed::Other(mime) => mime,
        Sniffed::Unknown => "application/octet-stream",
    };
    Err(GatewayError::invalid_request(
        Some(part),
        Some("unsupported_file_mimetype"),
        format!(
            "Invalid file '{part}': unsupported mimetype ('{mime}'). Supported file formats are \
             'image/png'."
        ),
    ))
}

fn mask_error(message: impl Into<String>) -> GatewayError {
    GatewayError::image_user_error(Some("mask"), Some("invalid_mask_image_format"), message)
}

fn markup_error(message: &str) -> GatewayError {
    GatewayError::image_user_error(Some("markup"), Some("invalid_markup_image_format"), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{
        jpeg, jpeg_with, png_samples as png, rgb_png_wh as rgb_png, rgba_png_holes as rgba_png,
        webp_lossless, webp_vp8x as webp_extended,
    };
    use png::ColorType;

    fn rules() -> FileRules {
        FileRules::default()
    }

    /// (type, param, code, message) of an error.
    fn parts(err: GatewayError) -> (&'static str, Option<String>, Option<&'static str>, String) {
        let p = err.parts();
        assert_eq!(p.status, http::StatusCode::BAD_REQUEST);
        (p.kind, p.param, p.code, p.message)
    }

    fn image(format: ImageFormat, width: u32, height: u32) -> ImageInfo {
        ImageInfo {
            format,
            width,
            height,
        }
    }

    fn assert_g12(err: GatewayError, param: &str, number: usize) {
        assert_eq!(
            parts(err),
            (
                "image_generation_user_error",
                Some(param.to_string()),
                Some("invalid_image_file"),
                format!(
                    "Invalid image file or mode for image {number}, please check your image file."
                ),
            )
        );
    }

    fn check1(bytes: &[u8], format: ImageFormat) -> Result<ImageInfo, GatewayError> {
        check_image(0, 1, bytes, format, &rules())
    }

    // ---- input images -----------------------------------------------------------------------

    #[test]
    fn valid_images_report_format_and_size() {
        let cases = [
            (rgba_png(7, 3, &[]), ImageFormat::Png, 7, 3),
            (rgb_png(1, 1), ImageFormat::Png, 1, 1),
            (jpeg(33, 20), ImageFormat::Jpeg, 33, 20),
            (jpeg_with(33, 20, true, None), ImageFormat::Jpeg, 33, 20),
            (webp_lossless(12, 30), ImageFormat::Webp, 12, 30),
            (webp_extended(5, 6), ImageFormat::Webp, 5, 6),
        ];
        for (bytes, format, width, height) in cases {
            assert_eq!(check1(&bytes, format), Ok(image(format, width, height)));
        }
    }

    #[test]
    fn every_truncation_of_every_format_is_g12() {
        let cases = [
            (rgba_png(9, 4, &[(0, 0)]), ImageFormat::Png),
            (jpeg(16, 9), ImageFormat::Jpeg),
            (jpeg_with(16, 9, true, Some(1)), ImageFormat::Jpeg),
            (webp_lossless(6, 6), ImageFormat::Webp),
            (webp_extended(6, 6), ImageFormat::Webp),
        ];
        for (bytes, format) in cases {
            for cut in 0..bytes.len() {
                let err = check_image(1, 2, &bytes[..cut], format, &rules())
                    .expect_err(&format!("{format:?} cut at {cut} accepted"));
                assert_g12(err, "image[1]", 2);
            }
        }
    }

    #[test]
    fn png_corruption_is_g12_and_trailing_bytes_are_ignored() {
        let good = rgb_png(4, 4);
        // Flip one bit in every byte after the signature: a CRC (or a framing) check fails.
        for at in 8..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert!(
                check1(&bad, ImageFormat::Png).is_err(),
                "flip at {at} accepted"
            );
        }
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"leftover pixels of a cropped screenshot");
        assert_eq!(
            check1(&trailing, ImageFormat::Png),
            Ok(image(ImageFormat::Png, 4, 4))
        );
        assert!(
            inspect(&good[..good.len() - 1], ImageFormat::Png)
                .unwrap_err()
                .0
                .contains("truncated")
        );
    }

    #[test]
    fn a_signature_that_does_not_match_the_format_is_g12() {
        assert_g12(
            check1(&jpeg(4, 4), ImageFormat::Png).unwrap_err(),
            "image",
            1,
        );
        assert_g12(
            check1(&rgb_png(4, 4), ImageFormat::Webp).unwrap_err(),
            "image",
            1,
        );
        assert_g12(check1(b"", ImageFormat::Jpeg).unwrap_err(), "image", 1);
    }

    #[test]
    fn params_and_numbers_follow_the_index() {
        let broken = &jpeg(4, 4)[..20];
        assert_g12(
            check_image(0, 1, broken, ImageFormat::Jpeg, &rules()).unwrap_err(),
            "image",
            1,
        );
        assert_g12(
            check_image(0, 3, broken, ImageFormat::Jpeg, &rules()).unwrap_err(),
            "image[0]",
            1,
        );
        assert_g12(
            check_image(15, 16, broken, ImageFormat::Jpeg, &rules()).unwrap_err(),
            "image[15]",
            16,
        );
        assert_g12(
            check_image_as("images[2]", 2, broken, ImageFormat::Jpeg, &rules()).unwrap_err(),
            "images[2]",
            3,
        );
    }

    /// Offset of the SOF0 marker of encoder output.
    fn sof0(jpeg: &[u8]) -> usize {
        jpeg.windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("SOF0")
    }

    #[test]
    fn jpeg_bomb_header_is_refused_by_the_cap_naming_it() {
        let mut bomb = jpeg(8, 8);
        let at = sof0(&bomb);
        bomb[at + 5..at + 9].copy_from_slice(&[0xFF; 4]);
        let (kind, param, code, message) = parts(check1(&bomb, ImageFormat::Jpeg).unwrap_err());
        assert_eq!(kind, "image_generation_user_error");
        assert_eq!(param.as_deref(), Some("image"));
        assert_eq!(code, Some("invalid_image_file"));
        assert_eq!(
            message,
            "Invalid image file or mode for image 1, please check your image file. Its size of \
             65535x65535 pixels is above the limit of 89478485 pixels."
        );
    }

    #[test]
    fn the_cap_is_inclusive_and_configurable() {
        let bytes = jpeg(10, 10);
        let at_cap = FileRules {
            max_pixels: 100,
            ..rules()
        };
        assert!(check_image(0, 1, &bytes, ImageFormat::Jpeg, &at_cap).is_ok());
        let below = FileRules {
            max_pixels: 99,
            ..rules()
        };
        assert!(check_image(0, 1, &bytes, ImageFormat::Jpeg, &below).is_err());
    }

    #[test]
    fn zero_dimensions_are_g12() {
        let mut zero = jpeg(8, 8);
        let at = sof0(&zero);
        zero[at + 5..at + 7].copy_from_slice(&[0, 0]);
        assert_g12(check1(&zero, ImageFormat::Jpeg).unwrap_err(), "image", 1);
    }

    #[test]
    fn jpeg_without_frame_header_is_g12() {
        let mut no_sof = jpeg(8, 8);
        let at = sof0(&no_sof);
        no_sof[at + 1] = 0xEE;
        assert_g12(check1(&no_sof, ImageFormat::Jpeg).unwrap_err(), "image", 1);
    }

    #[test]
    fn jpeg_with_bytes_after_eoi_passes() {
        let mut bytes = jpeg(8, 8);
        bytes.extend_from_slice(&jpeg(2, 2));
        bytes.extend_from_slice(b"trailing");
        assert_eq!(
            check1(&bytes, ImageFormat::Jpeg),
            Ok(image(ImageFormat::Jpeg, 8, 8))
        );
    }

    #[test]
    fn webp_with_wrong_riff_size_and_huge_canvas() {
        let mut bad = webp_lossless(4, 4);
        bad[4] ^= 2;
        assert_g12(check1(&bad, ImageFormat::Webp).unwrap_err(), "image", 1);

        // An animated VP8X canvas of 16777216 x 16777216 with one (empty) frame.
        let mut huge = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x02\0\0\0\xff\xff\xff\xff\xff\xff".to_vec();
        huge.extend_from_slice(b"ANMF\x02\0\0\0\0\0");
        let size = (huge.len() - 8) as u32;
        huge[4..8].copy_from_slice(&size.to_le_bytes());
        let (_, _, code, message) = parts(check1(&huge, ImageFormat::Webp).unwrap_err());
        assert_eq!(code, Some("invalid_image_file"));
        assert!(message.contains("16777216x16777216"), "{message}");
    }

    // ---- mask -------------------------------------------------------------------------------

    fn mask_err(err: GatewayError, message: &str) {
        assert_eq!(
            parts(err),
            (
                "image_generation_user_error",
                Some("mask".to_string()),
                Some("invalid_mask_image_format"),
                message.to_string(),
            )
        );
    }

    const G33: &str = "Invalid mask image format - mask size does not match image size";
    const G34: &str = "Invalid mask image format - mask image missing alpha channel";

    #[test]
    fn rgba_mask_is_forwarded_without_a_copy() {
        let mask = Bytes::from(rgba_png(6, 4, &[(1, 1)]));
        let out = check_mask(mask.clone(), &image(ImageFormat::Png, 6, 4), &rules()).unwrap();
        assert_eq!(out, mask);
        assert_eq!(out.as_ptr(), mask.as_ptr(), "the same buffer, not a copy");
        // Gray + alpha too, and a fully opaque mask under the default (compatible) policy.
        let la = Bytes::from(png(
            2,
            1,
            ColorType::GrayscaleAlpha,
            &[9, 0, 9, 255],
            None,
            None,
        ));
        assert_eq!(
            check_mask(la.clone(), &image(ImageFormat::Webp, 50, 50), &rules()).unwrap(),
            la
        );
        let opaque = Bytes::from(rgba_png(2, 2, &[]));
        assert!(check_mask(opaque, &image(ImageFormat::Png, 2, 2), &rules()).is_ok());
    }

    #[test]
    fn mask_without_alpha_is_g34() {
        let mask = Bytes::from(rgb_png(4, 4));
        mask_err(
            check_mask(mask, &image(ImageFormat::Png, 4, 4), &rules()).unwrap_err(),
            G34,
        );
        let gray = Bytes::from(png(2, 2, ColorType::Grayscale, &[0, 1, 2, 3], None, None));
        mask_err(
            check_mask(gray, &image(ImageFormat::Jpeg, 9, 9), &rules()).unwrap_err(),
            G34,
        );
    }

    #[test]
    fn mask_size_is_checked_against_a_png_first_image_only() {
        let mask = Bytes::from(rgba_png(4, 3, &[]));
        mask_err(
            check_mask(mask.clone(), &image(ImageFormat::Png, 3, 4), &rules()).unwrap_err(),
            G33,
        );
        for format in [ImageFormat::Jpeg, ImageFormat::Webp] {
            assert_eq!(
                check_mask(mask.clone(), &image(format, 3, 4), &rules()).unwrap(),
                mask
            );
        }
        // The size rule comes before the alpha rule.
        let gray = Bytes::from(png(2, 2, ColorType::Grayscale, &[0, 1, 2, 3], None, None));
        mask_err(
            check_mask(gray, &image(ImageFormat::Png, 4, 4), &rules()).unwrap_err(),
            G33,
        );
    }

    #[test]
    fn trns_masks_are_converted_losslessly() {
        // RGB with a tRNS colour: pixel (1, 0) is transparent.
        let data = [10, 20, 30, 1, 2, 3, 10, 20, 31, 1, 2, 3];
        let trns = [0, 1, 0, 2, 0, 3];
        let mask = Bytes::from(png(2, 2, ColorType::Rgb, &data, None, Some(&trns)));
        let out = check_mask(mask.clone(), &image(ImageFormat::Png, 2, 2), &rules()).unwrap();
        assert_ne!(out, mask);
        let mut decoder = png::Decoder::new(std::io::Cursor::new(out.to_vec()));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(frame.color_type, ColorType::Rgba);
        assert_eq!(
            pixels,
            [10, 20, 30, 255, 1, 2, 3, 0, 10, 20, 31, 255, 1, 2, 3, 0]
        );

        // Palette with tRNS.
        let palette = [0, 0, 0, 255, 255, 255];
        let mask = Bytes::from(png(
            2,
            1,
            ColorType::Indexed,
            &[0, 1],
            Some(&palette),
            Some(&[0]),
        ));
        let out = check_mask(mask, &image(ImageFormat::Png, 2, 1), &rules()).unwrap();
        assert_eq!(inspect(&out, ImageFormat::Png).unwrap().width, 2);
    }

    #[test]
    fn conversion_output_is_bounded() {
        let trns = [0, 1, 0, 2, 0, 3];
        let mask = Bytes::from(png(2, 2, ColorType::Rgb, &[0; 12], None, Some(&trns)));
        let mut tight = rules();
        tight.png.max_bytes = 40;
        let (kind, param, code, message) =
            parts(check_mask(mask, &image(ImageFormat::Png, 2, 2), &tight).unwrap_err());
        assert_eq!(
            (kind, param.as_deref(), code),
            (
                "image_generation_user_error",
                Some("mask"),
                Some("invalid_mask_image_format")
            )
        );
        assert!(message.contains("converting its transparency"), "{message}");
    }

    #[test]
    fn strict_policy_requires_a_transparent_mask_pixel() {
        let mut strict = rules();
        strict.png.transparency = Transparency::Strict;
        let first = image(ImageFormat::Png, 3, 3);
        assert!(check_mask(Bytes::from(rgba_png(3, 3, &[(2, 2)])), &first, &strict).is_ok());
        let err = check_mask(Bytes::from(rgba_png(3, 3, &[])), &first, &strict).unwrap_err();
        assert_eq!(parts(err).2, Some("invalid_mask_image_format"));
    }

    fn framed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(body);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
        out
    }

    #[test]
    fn interlaced_trns_masks_are_bounded_before_decoding() {
        // Gray 8-bit, Adam7, tRNS; the IDAT is not even zlib: refused from the header alone.
        let (width, height) = (5000u32, 10u32);
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 1]);
        let mut file = b"\x89PNG\r\n\x1a\n".to_vec();
        for chunk in [
            framed(b"IHDR", &ihdr),
            framed(b"tRNS", &[0, 0]),
            framed(b"IDAT", b"not zlib"),
            framed(b"IEND", b""),
        ] {
            file.extend_from_slice(&chunk);
        }
        let first = image(ImageFormat::Png, width, height);
        let (_, param, code, message) =
            parts(check_mask(Bytes::from(file.clone()), &first, &rules()).unwrap_err());
        assert_eq!(
            (param.as_deref(), code),
            (Some("mask"), Some("invalid_image_file"))
        );
        assert!(message.contains("at most 4096 pixels"), "{message}");
        // Within the bound, the same file reaches the decoder, which finds the bad IDAT.
        let mut wide = rules();
        wide.png.max_dimension = 5000;
        let (_, _, _, message) = parts(check_mask(Bytes::from(file), &first, &wide).unwrap_err());
        assert_eq!(
            message,
            "Invalid image file or mode for mask, please check your image file."
        );
        // Not interlaced: converted row by row, no bound on the sides.
        let gray = png(
            width,
            height,
            ColorType::Grayscale,
            &vec![0; 50_000],
            None,
            Some(&[0, 0]),
        );
        assert!(check_mask(Bytes::from(gray), &first, &rules()).is_ok());
    }

    #[test]
    fn a_mask_that_is_not_a_png_or_is_broken() {
        let first = image(ImageFormat::Png, 4, 4);
        assert_eq!(
            parts(check_mask(Bytes::from(jpeg(4, 4)), &first, &rules()).unwrap_err()),
            (
                "invalid_request_error",
                Some("mask".to_string()),
                Some("unsupported_file_mimetype"),
                "Invalid file 'mask': unsupported mimetype ('image/jpeg'). Supported file \
                 formats are 'image/png'."
                    .to_string(),
            )
        );
        let unknown =
            parts(check_mask(Bytes::from_static(b"hello"), &first, &rules()).unwrap_err());
        assert!(unknown.3.contains("('application/octet-stream')"));

        let good = rgba_png(4, 4, &[]);
        let broken = Bytes::copy_from_slice(&good[..good.len() - 5]);
        assert_eq!(
            parts(check_mask(broken, &first, &rules()).unwrap_err()),
            (
                "image_generation_user_error",
                Some("mask".to_string()),
                Some("invalid_image_file"),
                "Invalid image file or mode for mask, please check your image file.".to_string(),
            )
        );
        // A framed, CRC-correct tRNS mask whose pixel data is cut: the decode fails.
        let trns = [0, 1, 0, 2, 0, 3];
        let full = png(
            64,
            64,
            ColorType::Rgb,
            &vec![7; 64 * 64 * 3],
            None,
            Some(&trns),
        );
        let cut = cut_idat(&full);
        let err = check_mask(Bytes::from(cut), &image(ImageFormat::Png, 64, 64), &rules());
        assert_eq!(parts(err.unwrap_err()).2, Some("invalid_image_file"));
    }

    /// `png` with its single IDAT replaced by the first half of its data (framing and CRC
    /// correct), so only a decode notices.
    fn cut_idat(png: &[u8]) -> Vec<u8> {
        let mut out = png[..8].to_vec();
        let mut pos = 8;
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let mut body = &png[pos + 8..pos + 8 + len];
            if kind == b"IDAT" {
                body = &body[..len / 2];
            }
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(body);
            let mut crc = crc32fast::Hasher::new();
            crc.update(kind);
            crc.update(body);
            out.extend_from_slice(&crc.finalize().to_be_bytes());
            pos += 12 + len;
        }
        out
    }

    // ---- markup -----------------------------------------------------------------------------

    const MARKUP_SIZE: &str = "Invalid markup image - markup size does not match image size";
    const MARKUP_OPAQUE: &str =
        "Invalid markup image - markup image must contain transparent pixels";

    fn markup_err(err: GatewayError, message: &str) {
        assert_eq!(
            parts(err),
            (
                "image_generation_user_error",
                Some("markup".to_string()),
                Some("invalid_markup_image_format"),
                message.to_string(),
            )
        );
    }

    #[test]
    fn markup_needs_a_transparent_pixel() {
        let first = image(ImageFormat::Png, 5, 5);
        markup_err(
            check_markup(&rgba_png(5, 5, &[]), &first, &rules()).unwrap_err(),
            MARKUP_OPAQUE,
        );
        markup_err(
            check_markup(&rgb_png(5, 5), &first, &rules()).unwrap_err(),
            MARKUP_OPAQUE,
        );
        assert_eq!(
            check_markup(&rgba_png(5, 5, &[(4, 4)]), &first, &rules()),
            Ok(())
        );
        assert_eq!(
            check_markup(&rgba_png(5, 5, &[(0, 0)]), &first, &rules()),
            Ok(())
        );
        // tRNS counts: a palette entry with alpha 0, and an RGB colour key.
        let palette = [0, 0, 0, 255, 255, 255];
        let indexed = png(
            5,
            1,
            ColorType::Indexed,
            &[1, 1, 1, 1, 0],
            Some(&palette),
            Some(&[0]),
        );
        assert_eq!(
            check_markup(&indexed, &image(ImageFormat::Png, 5, 1), &rules()),
            Ok(())
        );
        let unused_key = png(
            1,
            1,
            ColorType::Rgb,
            &[1, 1, 1],
            None,
            Some(&[0, 9, 0, 9, 0, 9]),
        );
        markup_err(
            check_markup(&unused_key, &image(ImageFormat::Png, 1, 1), &rules()).unwrap_err(),
            MARKUP_OPAQUE,
        );
    }

    #[test]
    fn markup_stops_at_the_first_transparent_row() {
        // Row 0 holds the transparent pixel, the data after it is cut: the answer comes from
        // the rows read, so the cut is not noticed. (An opaque first row would need the rest.)
        let width = 256;
        let mut data = vec![255u8; width * 256 * 4];
        data[3] = 0;
        let full = png(width as u32, 256, ColorType::Rgba, &data, None, None);
        let first = image(ImageFormat::Png, 256, 256);
        assert_eq!(check_markup(&full, &first, &rules()), Ok(()));
        let cut = cut_idat(&full);
        assert_eq!(check_markup(&cut, &first, &rules()), Ok(()));
        data[3] = 255;
        data[width * 4 * 255 + 7] = 0;
        let late = cut_idat(&png(width as u32, 256, ColorType::Rgba, &data, None, None));
        assert_eq!(
            parts(check_markup(&late, &first, &rules()).unwrap_err()).2,
            Some("invalid_image_file")
        );
    }

    #[test]
    fn markup_size_rules() {
        let markup = rgba_png(4, 3, &[(0, 0)]);
        for format in [ImageFormat::Png, ImageFormat::Webp] {
            markup_err(
                check_markup(&markup, &image(format, 3, 4), &rules()).unwrap_err(),
                MARKUP_SIZE,
            );
            assert_eq!(
                check_markup(&markup, &image(format, 4, 3), &rules()),
                Ok(())
            );
        }
        // A JPEG may be rotated by EXIF: its size is left to upstream.
        assert_eq!(
            check_markup(&markup, &image(ImageFormat::Jpeg, 3, 4), &rules()),
            Ok(())
        );
        // Size before transparency.
        markup_err(
            check_markup(
                &rgba_png(2, 2, &[]),
                &image(ImageFormat::Png, 3, 3),
                &rules(),
            )
            .unwrap_err(),
            MARKUP_SIZE,
        );
    }

    #[test]
    fn markup_must_be_a_sound_png() {
        let first = image(ImageFormat::Png, 4, 4);
        let (kind, param, code, message) =
            parts(check_markup(&webp_lossless(4, 4), &first, &rules()).unwrap_err());
        assert_eq!(
            (kind, param.as_deref(), code),
            (
                "invalid_request_error",
                Some("markup"),
                Some("unsupported_file_mimetype")
            )
        );
        assert_eq!(
            message,
            "Invalid file 'markup': unsupported mimetype ('image/webp'). Supported file formats \
             are 'image/png'."
        );
        let good = rgba_png(4, 4, &[(0, 0)]);
        for cut in 8..good.len() {
            let err = check_markup(&good[..cut], &first, &rules()).unwrap_err();
            assert_eq!(parts(err).2, Some("invalid_image_file"), "cut at {cut}");
        }
        let tiny = FileRules {
            max_pixels: 15,
            ..rules()
        };
        let err = check_markup(&good, &first, &tiny).unwrap_err();
        assert!(parts(err).3.contains("above the limit of 15 pixels"));
    }
}
