//! PNG validation for the `image` and `mask` parts of `POST /v1/images/edits` (dall-e-2 contract).
//!
//! The checks run in a fixed order, which decides which rejection wins when a file has several
//! faults (imagegate spec `openai-behaviour.md`, sections "Image rules" and "Decisions where the
//! record is silent"):
//!
//! 1. size in bytes (strictly below `max_bytes`),
//! 2. PNG signature,
//! 3. a cheap linear walk over every chunk without decompressing anything (lengths, CRCs, IHDR
//!    fields, chunk order, IEND last with nothing after it),
//! 4. the dimension limit, taken from IHDR before any decoding (a 30000x30000 header is refused
//!    without allocating a frame),
//! 5. square,
//! 6. the upstream's mode check (image without mask) or the alpha-channel requirement (mask),
//! 7. the complete row-by-row decode, scanning alpha for a fully transparent pixel,
//! 8. lossless conversion of tRNS transparency to RGBA,
//! 9. (mask only) the mask dimensions against the image.
//!
//! Everything here is synchronous and CPU bound; callers run it on a blocking pool.
//!
//! Here: the rules, the public checks and steps 1-5; `walk` is the chunk walk (step 3),
//! `decode` the complete decode and alpha scan (step 7), `convert` the tRNS conversion (step 8),
//! `crate::error::png` the refusals and their OpenAI messages.

use bytes::Bytes;
use png::BitDepth;

use crate::config::TransparencyPolicy;
use crate::edit::cancel::Cancel;

mod convert;
mod decode;
mod walk;

pub use crate::error::PngRejection;
use decode::{DecodeOutcome, RowLayout, check_row_count, decode, next_row, row_reader};
pub(crate) use walk::{Header, Trailing, walk};
use walk::{SIGNATURE, walk_chunks};

/// The transparency policy for an image sent without a mask (and for masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transparency {
    /// At least one pixel must have alpha exactly 0 (tRNS counts).
    Strict,
    /// Only the upstream's mode check applies.
    Compatible,
}

impl From<TransparencyPolicy> for Transparency {
    fn from(p: TransparencyPolicy) -> Self {
        match p {
            TransparencyPolicy::Strict => Transparency::Strict,
            TransparencyPolicy::Compatible => Transparency::Compatible,
        }
    }
}

/// Limits and policy for the checks.
#[derive(Debug, Clone)]
pub struct PngRules {
    /// A file must be strictly smaller than this many bytes (also applies to a converted file).
    pub max_bytes: usize,
    /// Neither width nor height may exceed this.
    pub max_dimension: u32,
    pub transparency: Transparency,
    /// Memory the conversion of an *interlaced* tRNS file may hold (its whole RGBA frame,
    /// width × height × 4 or 8 bytes); a larger one is refused before decoding.
    pub max_conversion_bytes: usize,
}

impl PngRules {
    /// 64 MiB: an 8-bit RGBA frame of 4096 × 4096 ([`crate::config::DEFAULT_MAX_CONVERSION_BYTES`]).
    pub const DEFAULT_MAX_CONVERSION_BYTES: usize = crate::config::DEFAULT_MAX_CONVERSION_BYTES;
}

/// A PNG that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedPng {
    /// The original `Bytes` (a cheap clone, never a copy) unless converted.
    pub bytes: Bytes,
    /// True when the file was re-encoded to RGBA because its transparency came from tRNS.
    pub converted: bool,
    pub width: u32,
    pub height: u32,
    /// Pillow mode of the ORIGINAL file: "RGBA", "LA", "L", "1", "I;16", "RGB" or "P".
    pub mode: &'static str,
}

/// Validates the `image` part. With `has_mask` only the structure, the limits, the square shape
/// and a complete decode are checked; without a mask also the mode, the transparency policy and
/// the tRNS conversion apply.
pub fn check_image(
    bytes: Bytes,
    has_mask: bool,
    rules: &PngRules,
) -> Result<CheckedPng, PngRejection> {
    check_image_with(bytes, has_mask, rules, &Cancel::never())
}

/// [`check_image`] that stops at the next row with [`PngRejection::Cancelled`] once `cancel`
/// is cancelled.
pub fn check_image_with(
    bytes: Bytes,
    has_mask: bool,
    rules: &PngRules,
    cancel: &Cancel,
) -> Result<CheckedPng, PngRejection> {
    let header = check_structure(&bytes, rules)?;
    let mode = header.pillow_mode();
    if has_mask {
        decode(&bytes, &header, rules, false, false, cancel)?;
        return Ok(unconverted(bytes, &header, mode));
    }
    let convert = header.needs_conversion();
    if !convert && !matches!(mode, "RGBA" | "LA" | "L") {
        return Err(PngRejection::Mode { mode });
    }
    let strict = rules.transparency == Transparency::Strict;
    let outcome = decode(&bytes, &header, rules, strict, convert, cancel)?;
    if strict && !outcome.has_transparent_pixel {
        return Err(PngRejection::NotTransparent);
    }
    finish(bytes, &header, mode, outcome, rules)
}

/// Whether the checks may re-encode this file (a type without an alpha channel whose
/// transparency comes from tRNS, see [`Header::needs_conversion`]), told from IHDR and the chunk
/// headers before the image data: no CRC, no decoding. `true` when it cannot tell (a malformed
/// file: only its check decides). An image sent with a mask is never converted, whatever this
/// says.
pub fn may_convert(bytes: &[u8]) -> bool {
    const COLOR_TYPE: usize = 8 + 8 + 9;
    if bytes.len() <= COLOR_TYPE || bytes[..8] != SIGNATURE || &bytes[12..16] != b"IHDR" {
        return true;
    }
    if matches!(bytes[COLOR_TYPE], 4 | 6) {
        return false;
    }
    let mut at = SIGNATURE.len();
    while at + 8 <= bytes.len() {
        match &bytes[at + 4..at + 8] {
            b"tRNS" => return true,
            b"IDAT" | b"IEND" => return false,
            _ => {}
        }
        let Some(next) = (walk::be_u32(&bytes[at..]) as usize)
            .checked_add(12)
            .and_then(|n| n.checked_add(at))
        else {
            return true;
        };
        at = next;
    }
    true
}

/// Validates the `mask` part against the already checked image's dimensions.
pub fn check_mask(
    bytes: Bytes,
    image_dims: (u32, u32),
    rules: &PngRules,
) -> Result<CheckedPng, PngRejection> {
    check_mask_with(bytes, image_dims, rules, &Cancel::never())
}

/// [`check_mask`] that stops at the next row with [`PngRejection::Cancelled`] once `cancel` is
/// cancelled.
pub fn check_mask_with(
    bytes: Bytes,
    image_dims: (u32, u32),
    rules: &PngRules,
    cancel: &Cancel,
) -> Result<CheckedPng, PngRejection> {
    let header = check_structure(&bytes, rules)?;
    if !header.has_alpha_channel() && !header.has_trns {
        return Err(PngRejection::MaskMissingAlpha);
    }
    let checked = decode_mask(bytes, &header, rules, cancel)?;
    mask_fits((checked.width, checked.height), image_dims)?;
    Ok(checked)
}

/// The one rule of [`check_mask`] that depends on the request rather than the mask alone: its
/// size must be the image's (also applied to a mask known valid from the validated cache).
pub fn mask_fits(mask_dims: (u32, u32), image_dims: (u32, u32)) -> Result<(), PngRejection> {
    if mask_dims != image_dims {
        return Err(PngRejection::MaskSizeMismatch {
            image: image_dims,
            mask: mask_dims,
        });
    }
    Ok(())
}

/// The decode half of [`check_mask`] (steps 7 and 8) for callers that applied their own header
/// rules (`edit::files`: GPT-image masks of any shape). Decodes every row; with the strict policy
/// requires a pixel with alpha 0; re-encodes as RGBA when the transparency comes from tRNS.
pub(crate) fn decode_mask(
    bytes: Bytes,
    header: &Header,
    rules: &PngRules,
    cancel: &Cancel,
) -> Result<CheckedPng, PngRejection> {
    let mode = header.pillow_mode();
    let convert = header.needs_conversion();
    let strict = rules.transparency == Transparency::Strict;
    let outcome = decode(&bytes, header, rules, strict, convert, cancel)?;
    if strict && !outcome.has_transparent_pixel {
        return Err(PngRejection::NotTransparent);
    }
    finish(bytes, header, mode, outcome, rules)
}

/// Decodes row by row (tRNS expanded to alpha) and stops at the first row holding a pixel with
/// alpha 0: `Ok(true)`. `Ok(false)` means every row decoded and none has one. The header must
/// come from [`walk`] over the same bytes. Only the rows needed are decoded; nothing after the
/// answer is checked.
pub(crate) fn has_transparent_pixel(
    data: &[u8],
    header: &Header,
    rules: &PngRules,
    cancel: &Cancel,
) -> Result<bool, PngRejection> {
    if !header.has_alpha_channel() && !header.has_trns {
        return Ok(false);
    }
    let mut reader = row_reader(data, rules)?;
    let (color, depth) = reader.output_color_type();
    let layout = RowLayout {
        color,
        bps: if depth == BitDepth::Sixteen { 2 } else { 1 },
    };
    let mut rows = 0u64;
    while let Some(row) = next_row(&mut reader, cancel)? {
        if layout.has_transparent_pixel(row.data()) {
            return Ok(true);
        }
        rows += 1;
    }
    check_row_count(header, rows)?;
    Ok(false)
}

/// Steps 1-5: size, signature, chunk walk, dimension limit, square.
fn check_structure(bytes: &[u8], rules: &PngRules) -> Result<Header, PngRejection> {
    if bytes.len() >= rules.max_bytes {
        return Err(PngRejection::TooLarge {
            limit: rules.max_bytes,
            actual: bytes.len(),
        });
    }
    if bytes.len() < SIGNATURE.len() || bytes[..SIGNATURE.len()] != SIGNATURE {
        return Err(PngRejection::NotPng);
    }
    let header = walk_chunks(bytes)?;
    if header.width > rules.max_dimension || header.height > rules.max_dimension {
        return Err(PngRejection::DimensionsTooLarge {
            width: header.width,
            height: header.height,
            max: rules.max_dimension,
        });
    }
    if header.width != header.height {
        return Err(PngRejection::NotSquare {
            width: header.width,
            height: header.height,
        });
    }
    Ok(header)
}

fn unconverted(bytes: Bytes, header: &Header, mode: &'static str) -> CheckedPng {
    CheckedPng {
        bytes,
        converted: false,
        width: header.width,
        height: header.height,
        mode,
    }
}

fn finish(
    bytes: Bytes,
    header: &Header,
    mode: &'static str,
    outcome: DecodeOutcome,
    rules: &PngRules,
) -> Result<CheckedPng, PngRejection> {
    match outcome.converted {
        None => Ok(unconverted(bytes, header, mode)),
        Some(out) if out.total >= rules.max_bytes => Err(PngRejection::ConvertedTooLarge {
            limit: rules.max_bytes,
            actual: out.total,
        }),
        Some(out) => Ok(CheckedPng {
            bytes: Bytes::from(out.buf),
            converted: true,
            width: header.width,
            height: header.height,
            mode,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::walk::be_u32;
    use super::*;
    use crate::error::png::mib;
    use crate::testkit::{RawPng as Img, assemble, chunk, iend, ihdr, zlib_stored};
    use png::ColorType;
    use std::io::Cursor;

    // -----------------------------------------------------------------------------------------
    // Fixture helpers
    // -----------------------------------------------------------------------------------------

    const MIB: usize = 1024 * 1024;

    fn rules(transparency: Transparency) -> PngRules {
        PngRules {
            max_bytes: 4 * MIB,
            max_dimension: 1024,
            transparency,
            max_conversion_bytes: PngRules::DEFAULT_MAX_CONVERSION_BYTES,
        }
    }

    fn strict() -> PngRules {
        rules(Transparency::Strict)
    }

    fn compatible() -> PngRules {
        rules(Transparency::Compatible)
    }

    fn file(chunks: &[Vec<u8>]) -> Bytes {
        Bytes::from(assemble(chunks))
    }

    /// Decodes a PNG without transformations: (color type, bit depth, pixels).
    fn decode_plain(bytes: &[u8]) -> (ColorType, BitDepth, Vec<u8>) {
        let decoder = png::Decoder::new(Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("decodable");
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).expect("frame");
        buf.truncate(info.buffer_size());
        (info.color_type, info.bit_depth, buf)
    }

    /// RGBA8 pixels from (r, g, b, a) per pixel.
    fn rgba8(pixels: impl IntoIterator<Item = [u8; 4]>) -> Vec<u8> {
        pixels.into_iter().flatten().collect()
    }

    fn rgba16(pixels: impl IntoIterator<Item = [u16; 4]>) -> Vec<u8> {
        pixels
            .into_iter()
            .flatten()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }

    fn coords(size: u32) -> impl Iterator<Item = (u32, u32)> {
        (0..size).flat_map(move |y| (0..size).map(move |x| (x, y)))
    }

    fn assert_same_allocation(out: &CheckedPng, input: &Bytes) {
        assert!(!out.converted);
        assert_eq!(out.bytes.as_ptr(), input.as_ptr());
        assert_eq!(out.bytes.len(), input.len());
    }

    fn corrupt_detail(result: Result<CheckedPng, PngRejection>) -> String {
        match result {
            Err(PngRejection::Corrupt(detail)) => detail,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// RGBA8, 8x8, pixel (0,0) fully transparent.
    fn rgba8_transparent() -> Img {
        Img::new(8, 6, 8, |x, y| {
            let a = if (x, y) == (0, 0) { 0 } else { 255 };
            vec![x as u16 * 30, y as u16 * 30, 7, a]
        })
    }

    fn rgba8_opaque(size: u32) -> Img {
        Img::new(size, 6, 8, |x, y| vec![x as u16, y as u16, 1, 255])
    }

    fn rgb8(size: u32) -> Img {
        Img::new(size, 2, 8, |x, y| vec![x as u16, y as u16, 9])
    }

    /// Replaces the IDAT chunk of `img` with `data` (valid CRC).
    fn with_idat_data(img: &Img, data: &[u8]) -> Bytes {
        let chunks: Vec<Vec<u8>> = img
            .chunks()
            .into_iter()
            .map(|c| {
                if &c[4..8] == b"IDAT" {
                    chunk(b"IDAT", data)
                } else {
                    c
                }
            })
            .collect();
        file(&chunks)
    }

    // -----------------------------------------------------------------------------------------
    // Color types and bit depths, image without mask
    // -----------------------------------------------------------------------------------------

    #[test]
    fn rgba8_with_transparent_pixel_is_accepted_unconverted() {
        let input = rgba8_transparent().bytes();
        for r in [strict(), compatible()] {
            let out = check_image(input.clone(), false, &r).unwrap();
            assert_same_allocation(&out, &input);
            assert_eq!((out.width, out.height, out.mode), (8, 8, "RGBA"));
        }
    }

    #[test]
    fn rgba8_opaque_is_not_transparent_under_strict_only() {
        let input = rgba8_opaque(8).bytes();
        assert_eq!(
            check_image(input.clone(), false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        let out = check_image(input.clone(), false, &compatible()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "RGBA");
    }

    #[test]
    fn rgba16_alpha_00ff_counts_as_transparent() {
        let input = Img::new(4, 6, 16, |x, y| {
            let a = if (x, y) == (3, 2) { 0x00FF } else { 0xFFFF };
            vec![0x1234, 0x5678, 0x9ABC, a]
        })
        .bytes();
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "RGBA");
    }

    #[test]
    fn rgba16_alpha_0100_is_not_transparent() {
        let input = Img::new(4, 6, 16, |x, y| {
            let a = if (x, y) == (3, 2) { 0x0100 } else { 0xFFFF };
            vec![0, 0, 0, a]
        })
        .bytes();
        assert_eq!(
            check_image(input.clone(), false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        assert!(check_image(input, false, &compatible()).is_ok());
    }

    #[test]
    fn la8_is_mode_la() {
        let input = Img::new(5, 4, 8, |x, _| {
            vec![x as u16 * 40, if x == 4 { 0 } else { 200 }]
        })
        .bytes();
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "LA");

        let opaque = Img::new(5, 4, 8, |_, _| vec![10, 1]).bytes();
        assert_eq!(
            check_image(opaque.clone(), false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        assert_eq!(
            check_image(opaque, false, &compatible()).unwrap().mode,
            "LA"
        );
    }

    #[test]
    fn la16_is_mode_rgba_and_high_byte_alpha_counts() {
        let input = Img::new(3, 4, 16, |x, y| {
            vec![0xABCD, if (x, y) == (1, 1) { 0x00FF } else { 0xFFFF }]
        })
        .bytes();
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "RGBA");

        let opaque = Img::new(3, 4, 16, |_, _| vec![0, 0x0100]).bytes();
        assert_eq!(
            check_image(opaque, false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
    }

    #[test]
    fn l8_without_trns_has_no_alpha() {
        let input = Img::new(6, 0, 8, |x, y| vec![(x + y) as u16]).bytes();
        assert_eq!(
            check_image(input.clone(), false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        let out = check_image(input.clone(), false, &compatible()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "L");
    }

    #[test]
    fn l1_is_mode_1_and_rejected() {
        let input = Img::new(9, 0, 1, |x, _| vec![(x % 2) as u16]).bytes();
        for r in [strict(), compatible()] {
            assert_eq!(
                check_image(input.clone(), false, &r).unwrap_err(),
                PngRejection::Mode { mode: "1" }
            );
        }
    }

    #[test]
    fn l2_and_l4_are_mode_l() {
        for depth in [2u8, 4] {
            let max = (1u16 << depth) - 1;
            let input = Img::new(7, 0, depth, |x, _| vec![x as u16 % (max + 1)]).bytes();
            let out = check_image(input.clone(), false, &compatible()).unwrap();
            assert_same_allocation(&out, &input);
            assert_eq!(out.mode, "L");
            assert_eq!(
                check_image(input, false, &strict()).unwrap_err(),
                PngRejection::NotTransparent
            );
        }
    }

    #[test]
    fn l16_is_mode_i16_and_rejected() {
        let input = Img::new(4, 0, 16, |x, _| vec![x as u16 * 1000]).bytes();
        for r in [strict(), compatible()] {
            assert_eq!(
                check_image(input.clone(), false, &r).unwrap_err(),
                PngRejection::Mode { mode: "I;16" }
            );
        }
    }

    #[test]
    fn rgb8_and_rgb16_are_mode_rgb_and_rejected() {
        let rgb16 = Img::new(4, 2, 16, |x, _| vec![x as u16, 2, 3]).bytes();
        for input in [rgb8(4).bytes(), rgb16] {
            for r in [strict(), compatible()] {
                assert_eq!(
                    check_image(input.clone(), false, &r).unwrap_err(),
                    PngRejection::Mode { mode: "RGB" }
                );
            }
        }
    }

    #[test]
    fn palette_without_trns_is_mode_p_and_rejected() {
        let input = Img::new(4, 3, 8, |x, _| vec![x as u16 % 2])
            .plte(vec![1, 2, 3, 4, 5, 6])
            .bytes();
        for r in [strict(), compatible()] {
            assert_eq!(
                check_image(input.clone(), false, &r).unwrap_err(),
                PngRejection::Mode { mode: "P" }
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // tRNS conversions
    // -----------------------------------------------------------------------------------------

    #[test]
    fn palette8_with_trns_is_converted_to_rgba8() {
        let img = Img::new(4, 3, 8, |x, y| vec![((x + y) % 3) as u16])
            .plte(vec![10, 20, 30, 40, 50, 60, 70, 80, 90])
            .trns(vec![0, 128]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!((out.mode, out.width, out.height), ("P", 4, 4));
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
        let palette = [[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]];
        let expected = rgba8(coords(4).map(|(x, y)| palette[((x + y) % 3) as usize]));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn palette4_with_trns_is_converted_to_rgba8() {
        let img = Img::new(5, 3, 4, |x, _| vec![(x % 2) as u16])
            .plte(vec![1, 2, 3, 4, 5, 6])
            .trns(vec![255, 0]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
        let palette = [[1, 2, 3, 255], [4, 5, 6, 0]];
        assert_eq!(
            pixels,
            rgba8(coords(5).map(|(x, _)| palette[(x % 2) as usize]))
        );
    }

    #[test]
    fn rgb8_with_trns_is_converted_to_rgba8() {
        let img =
            Img::new(3, 2, 8, |x, y| vec![x as u16, y as u16, 7]).trns(vec![0, 1, 0, 2, 0, 7]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "RGB");
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
        let expected = rgba8(coords(3).map(|(x, y)| {
            let a = if (x, y) == (1, 2) { 0 } else { 255 };
            [x as u8, y as u8, 7, a]
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn rgb16_with_trns_is_converted_to_rgba16() {
        let img = Img::new(3, 2, 16, |x, y| {
            vec![x as u16 * 0x0101, y as u16 * 0x1000, 0xFFFE]
        })
        .trns(vec![0x02, 0x02, 0x10, 0x00, 0xFF, 0xFE]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "RGB");
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Sixteen));
        let expected = rgba16(coords(3).map(|(x, y)| {
            let a = if (x, y) == (2, 1) { 0 } else { 0xFFFF };
            [x as u16 * 0x0101, y as u16 * 0x1000, 0xFFFE, a]
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn gray8_with_trns_is_converted_to_rgba8() {
        let img = Img::new(4, 0, 8, |x, y| vec![(x * 10 + y) as u16]).trns(vec![0, 21]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "L");
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
        let expected = rgba8(coords(4).map(|(x, y)| {
            let g = (x * 10 + y) as u8;
            [g, g, g, if g == 21 { 0 } else { 255 }]
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn gray2_with_trns_is_converted_to_scaled_rgba8() {
        let img = Img::new(5, 0, 2, |x, _| vec![(x % 4) as u16]).trns(vec![0, 2]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "L");
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
        let expected = rgba8(coords(5).map(|(x, _)| {
            let g = (x % 4) as u8 * 0x55;
            [g, g, g, if x % 4 == 2 { 0 } else { 255 }]
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn gray1_with_trns_is_converted_even_though_mode_1() {
        let img = Img::new(3, 0, 1, |x, _| vec![(x % 2) as u16]).trns(vec![0, 1]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "1");
        let (_, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!(depth, BitDepth::Eight);
        let expected = rgba8(coords(3).map(|(x, _)| {
            if x % 2 == 1 {
                [255, 255, 255, 0]
            } else {
                [0, 0, 0, 255]
            }
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn gray16_with_trns_is_converted_to_rgba16() {
        let img =
            Img::new(3, 0, 16, |x, y| vec![(x * 3 + y) as u16 * 0x1111]).trns(vec![0x44, 0x44]);
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "I;16");
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Sixteen));
        let expected = rgba16(coords(3).map(|(x, y)| {
            let g = (x * 3 + y) as u16 * 0x1111;
            [g, g, g, if g == 0x4444 { 0 } else { 0xFFFF }]
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn trns_without_matching_pixel_is_not_transparent_under_strict() {
        let img = Img::new(4, 2, 8, |_, _| vec![1, 2, 3]).trns(vec![0, 9, 0, 9, 0, 9]);
        assert_eq!(
            check_image(img.bytes(), false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        let out = check_image(img.bytes(), false, &compatible()).unwrap();
        assert!(out.converted);
        let (_, _, pixels) = decode_plain(&out.bytes);
        assert_eq!(pixels, rgba8(coords(4).map(|_| [1, 2, 3, 255])));
    }

    #[test]
    fn converted_too_large() {
        // Noisy palette indices: the RGBA re-encoding is much bigger than the stored input.
        let mut seed = 0x2545_F491u32;
        let img = Img::new(32, 3, 8, |_, _| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            vec![(seed % 256) as u16]
        })
        .plte(
            (0..=255u8)
                .flat_map(|i| [i, i.wrapping_mul(7), i.wrapping_mul(13)])
                .collect(),
        )
        .trns((0..=255u8).collect());
        let input = img.bytes();
        let small = PngRules {
            max_bytes: input.len() + 1,
            ..strict()
        };
        match check_image(input.clone(), false, &small) {
            Err(PngRejection::ConvertedTooLarge { limit, actual }) => {
                assert_eq!(limit, input.len() + 1);
                assert!(actual >= limit);
                let full = check_image(input.clone(), false, &strict()).unwrap();
                assert_eq!(full.bytes.len(), actual);
            }
            other => panic!("expected ConvertedTooLarge, got {other:?}"),
        }
        // The same limit suffices when no conversion is needed (image with a mask).
        assert!(check_image(input, true, &small).is_ok());
    }

    // -----------------------------------------------------------------------------------------
    // Cancellation and the conversion budget
    // -----------------------------------------------------------------------------------------

    #[test]
    fn a_cancelled_decode_stops_at_the_next_row() {
        use std::sync::atomic::Ordering;
        // 512 rows: without cancellation every row decodes (the image is opaque, so the strict
        // scan reads them all) and the answer is NotTransparent.
        let opaque = rgba8_opaque(512).bytes();
        assert_eq!(
            check_image(opaque.clone(), false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        // Cancelled from the 10th poll on: the decode stops there, long before the last row.
        let (cancel, polls) = Cancel::after_polls(10);
        assert_eq!(
            check_image_with(opaque.clone(), false, &strict(), &cancel).unwrap_err(),
            PngRejection::Cancelled
        );
        assert_eq!(polls.load(Ordering::Relaxed), 10);
        // A token cancelled before the start: no row at all.
        let token = tokio_util::sync::CancellationToken::new();
        token.cancel();
        let cancelled = Cancel::new(token);
        assert_eq!(
            check_image_with(opaque.clone(), true, &strict(), &cancelled).unwrap_err(),
            PngRejection::Cancelled
        );
        // Every decoding path polls: streaming and interlaced conversion, the mask, the scan.
        let trns = Img::new(256, 3, 8, |x, _| vec![(x % 2) as u16])
            .plte(vec![1, 2, 3, 4, 5, 6])
            .trns(vec![0]);
        for img in [trns.bytes(), trns.clone().interlaced().bytes()] {
            let (cancel, polls) = Cancel::after_polls(3);
            assert_eq!(
                check_image_with(img.clone(), false, &strict(), &cancel).unwrap_err(),
                PngRejection::Cancelled
            );
            assert_eq!(polls.load(Ordering::Relaxed), 3);
            let (cancel, _) = Cancel::after_polls(3);
            assert_eq!(
                check_mask_with(img.clone(), (256, 256), &strict(), &cancel).unwrap_err(),
                PngRejection::Cancelled
            );
        }
        let header = walk(&opaque, Trailing::Ignore).unwrap();
        let (cancel, polls) = Cancel::after_polls(5);
        assert_eq!(
            has_transparent_pixel(&opaque, &header, &strict(), &cancel).unwrap_err(),
            PngRejection::Cancelled
        );
        assert_eq!(polls.load(Ordering::Relaxed), 5);
        // A handle never cancelled changes nothing.
        assert_eq!(
            check_image_with(opaque, false, &strict(), &Cancel::never()).unwrap_err(),
            PngRejection::NotTransparent
        );
    }

    #[test]
    fn interlaced_conversion_runs_under_the_byte_budget() {
        let palette = |size| {
            Img::new(size, 3, 8, |x, y| vec![((x + y) % 2) as u16])
                .plte(vec![1, 2, 3, 4, 5, 6])
                .trns(vec![0])
        };
        let img = palette(64).interlaced().bytes();
        let exact = PngRules {
            max_conversion_bytes: 64 * 64 * 4,
            ..strict()
        };
        assert!(check_image(img.clone(), false, &exact).unwrap().converted);
        let tight = PngRules {
            max_conversion_bytes: 64 * 64 * 4 - 1,
            ..strict()
        };
        let err = check_image(img.clone(), false, &tight).unwrap_err();
        assert_eq!(
            err,
            PngRejection::ConversionTooLarge {
                width: 64,
                height: 64,
                needed: 16384,
                limit: 16383
            }
        );
        assert_eq!(err.code(), "invalid_image_format");
        assert_eq!(
            err.message("image"),
            "Invalid input image - converting the transparency of an interlaced 64x64 image to \
             RGBA needs 16384 bytes of memory, more than the limit of 16383 bytes. Send it \
             non-interlaced or as RGBA."
        );
        // The mask too.
        assert_eq!(check_mask(img.clone(), (64, 64), &tight).unwrap_err(), err);
        // Refused from the header: a broken IDAT is never reached.
        let broken = with_idat_data(&palette(64).interlaced(), b"not zlib");
        assert_eq!(check_image(broken, false, &tight).unwrap_err(), err);
        // 16-bit files need 8 bytes per pixel.
        let rgb16 = Img::new(16, 2, 16, |x, _| vec![x as u16, 0, 0])
            .trns(vec![0, 0, 0, 0, 0, 0])
            .interlaced()
            .bytes();
        let rules = PngRules {
            max_conversion_bytes: 16 * 16 * 8 - 1,
            ..strict()
        };
        assert!(matches!(
            check_image(rgb16, false, &rules),
            Err(PngRejection::ConversionTooLarge { needed: 2048, .. })
        ));
        // Non-interlaced conversion streams row by row: the budget does not apply; nor does it
        // to an interlaced image that needs no conversion, or is sent with a mask.
        assert!(
            check_image(palette(64).bytes(), false, &tight)
                .unwrap()
                .converted
        );
        assert!(check_image(rgba8_transparent().interlaced().bytes(), false, &tight).is_ok());
        assert!(check_image(img, true, &tight).is_ok());
    }

    // -----------------------------------------------------------------------------------------
    // Image with a mask
    // -----------------------------------------------------------------------------------------

    #[test]
    fn image_with_mask_accepts_any_type_without_conversion() {
        let palette_trns = Img::new(4, 3, 8, |x, _| vec![x as u16 % 2])
            .plte(vec![1, 2, 3, 4, 5, 6])
            .trns(vec![0]);
        let l16 = Img::new(4, 0, 16, |x, _| vec![x as u16]);
        let l1 = Img::new(4, 0, 1, |x, _| vec![x as u16 % 2]);
        for (img, mode) in [
            (rgb8(4), "RGB"),
            (palette_trns, "P"),
            (l16, "I;16"),
            (l1, "1"),
            (rgba8_opaque(4), "RGBA"),
        ] {
            let input = img.bytes();
            let out = check_image(input.clone(), true, &strict()).unwrap();
            assert_same_allocation(&out, &input);
            assert_eq!(out.mode, mode);
        }
    }

    #[test]
    fn image_with_mask_still_needs_a_complete_decode() {
        let img = rgb8(4);
        let raw = img.raw();
        let input = with_idat_data(&img, &zlib_stored(&raw[..raw.len() - 2]));
        corrupt_detail(check_image(input, true, &strict()));
    }

    #[test]
    fn image_with_mask_still_checks_size_and_square() {
        let input = Img {
            width: 6,
            height: 5,
            samples: vec![0; 90],
            ..rgb8(1)
        }
        .bytes();
        assert_eq!(
            check_image(input, true, &strict()).unwrap_err(),
            PngRejection::NotSquare {
                width: 6,
                height: 5
            }
        );
    }

    // -----------------------------------------------------------------------------------------
    // Interlaced files
    // -----------------------------------------------------------------------------------------

    #[test]
    fn interlaced_rgba8_transparency_found_in_last_pass() {
        // (3, 1) lives in pass 7.
        let img = Img::new(9, 6, 8, |x, y| {
            vec![
                x as u16,
                y as u16,
                0,
                if (x, y) == (3, 1) { 0 } else { 255 },
            ]
        })
        .interlaced();
        let input = img.bytes();
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "RGBA");

        let opaque = rgba8_opaque(9).interlaced().bytes();
        assert_eq!(
            check_image(opaque, false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
    }

    #[test]
    fn interlaced_palette_with_trns_is_converted() {
        for size in [1u32, 2, 3, 9, 17] {
            let img = Img::new(size, 3, 2, |x, y| vec![((x + 2 * y) % 3) as u16])
                .plte(vec![9, 8, 7, 6, 5, 4, 3, 2, 1])
                .trns(vec![0, 77])
                .interlaced();
            let out = check_image(img.bytes(), false, &compatible()).unwrap();
            assert!(out.converted);
            let (ct, depth, pixels) = decode_plain(&out.bytes);
            assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
            let palette = [[9, 8, 7, 0], [6, 5, 4, 77], [3, 2, 1, 255]];
            let expected = rgba8(coords(size).map(|(x, y)| palette[((x + 2 * y) % 3) as usize]));
            assert_eq!(pixels, expected, "size {size}");
        }
    }

    #[test]
    fn interlaced_rgb16_with_trns_is_converted_to_rgba16() {
        let img = Img::new(10, 2, 16, |x, y| vec![x as u16 * 0x0102, y as u16, 0x8000])
            .trns(vec![0x04, 0x08, 0x00, 0x05, 0x80, 0x00])
            .interlaced();
        let out = check_image(img.bytes(), false, &strict()).unwrap();
        assert!(out.converted);
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Sixteen));
        let expected = rgba16(coords(10).map(|(x, y)| {
            let a = if (x, y) == (4, 5) { 0 } else { 0xFFFF };
            [x as u16 * 0x0102, y as u16, 0x8000, a]
        }));
        assert_eq!(pixels, expected);
    }

    #[test]
    fn interlaced_low_depth_gray_validates() {
        let input = Img::new(11, 0, 4, |x, y| vec![((x + y) % 16) as u16])
            .interlaced()
            .bytes();
        let out = check_image(input.clone(), false, &compatible()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "L");
    }

    #[test]
    fn interlaced_truncated_is_corrupt() {
        let img = rgba8_transparent().interlaced();
        let raw = img.raw();
        let input = with_idat_data(&img, &zlib_stored(&raw[..raw.len() - 5]));
        assert_eq!(
            corrupt_detail(check_image(input, false, &strict())),
            "truncated image data"
        );
    }

    // -----------------------------------------------------------------------------------------
    // APNG
    // -----------------------------------------------------------------------------------------

    fn actl(frames: u32) -> Vec<u8> {
        let mut data = frames.to_be_bytes().to_vec();
        data.extend_from_slice(&0u32.to_be_bytes());
        chunk(b"acTL", &data)
    }

    fn fctl(seq: u32, width: u32, height: u32, x: u32, y: u32) -> Vec<u8> {
        let mut data = Vec::new();
        for v in [seq, width, height, x, y] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        data.extend_from_slice(&[0, 1, 0, 10, 0, 0]);
        chunk(b"fcTL", &data)
    }

    fn fdat(seq: u32, zlib: &[u8]) -> Vec<u8> {
        let mut data = seq.to_be_bytes().to_vec();
        data.extend_from_slice(zlib);
        chunk(b"fdAT", &data)
    }

    /// An APNG whose default image (IDAT, not part of the animation) is `default`, followed by
    /// one animation frame made of `frame`.
    fn apng(default: &Img, frame: &Img) -> Bytes {
        let size = default.width;
        file(&[
            ihdr(size, size, 8, 6, 0),
            actl(1),
            chunk(b"IDAT", &zlib_stored(&default.raw())),
            fctl(0, size, size, 0, 0),
            fdat(1, &zlib_stored(&frame.raw())),
            iend(),
        ])
    }

    #[test]
    fn apng_default_image_is_the_image() {
        let input = apng(&rgba8_transparent(), &rgba8_opaque(8));
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);

        // Transparency only in a later frame does not count.
        let input = apng(&rgba8_opaque(8), &rgba8_transparent());
        assert_eq!(
            check_image(input, false, &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
    }

    #[test]
    fn apng_with_default_image_as_first_frame() {
        let img = rgba8_transparent();
        let input = file(&[
            ihdr(8, 8, 8, 6, 0),
            actl(2),
            fctl(0, 8, 8, 0, 0),
            chunk(b"IDAT", &zlib_stored(&img.raw())),
            fctl(1, 4, 4, 2, 2),
            fdat(2, &zlib_stored(&rgba8_opaque(4).raw())),
            iend(),
        ]);
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);

        // The default image's fcTL must cover the canvas.
        let input = file(&[
            ihdr(8, 8, 8, 6, 0),
            actl(1),
            fctl(0, 4, 4, 0, 0),
            chunk(b"IDAT", &zlib_stored(&rgba8_opaque(4).raw())),
            iend(),
        ]);
        corrupt_detail(check_image(input, false, &strict()));
    }

    // -----------------------------------------------------------------------------------------
    // Corruption and structure
    // -----------------------------------------------------------------------------------------

    #[test]
    fn bad_crc_is_corrupt() {
        let mut chunks = rgba8_transparent().chunks();
        let idat = chunks.iter_mut().find(|c| &c[4..8] == b"IDAT").unwrap();
        let last = idat.len() - 1;
        idat[last] ^= 0x01;
        assert_eq!(
            corrupt_detail(check_image(file(&chunks), false, &strict())),
            "CRC mismatch in chunk 'IDAT'"
        );
    }

    #[test]
    fn bad_crc_in_ancillary_chunk_is_corrupt() {
        let mut chunks = rgba8_transparent().chunks();
        let mut text = chunk(b"tEXt", b"Comment\0hello");
        text[10] ^= 0xFF;
        chunks.insert(1, text);
        assert_eq!(
            corrupt_detail(check_image(file(&chunks), false, &strict())),
            "CRC mismatch in chunk 'tEXt'"
        );
    }

    /// A real, compressed RGBA8 PNG written by `png::Encoder`.
    fn encoded_rgba8(size: u32, transparent: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, size, size);
        encoder.set_color(ColorType::Rgba);
        encoder.set_depth(BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        let pixels: Vec<u8> = coords(size)
            .flat_map(|(x, y)| {
                let a = if transparent && x == y { 0 } else { 255 };
                [(x * 7) as u8, (y * 3) as u8, (x ^ y) as u8, a]
            })
            .collect();
        writer.write_image_data(&pixels).unwrap();
        writer.finish().unwrap();
        out
    }

    /// Splits a PNG into its chunks (as written, with length and CRC).
    fn split_chunks(png: &[u8]) -> Vec<Vec<u8>> {
        let mut pos = 8;
        let mut chunks = Vec::new();
        while pos < png.len() {
            let len = be_u32(&png[pos..]) as usize;
            chunks.push(png[pos..pos + 12 + len].to_vec());
            pos += 12 + len;
        }
        chunks
    }

    #[test]
    fn truncated_idat_stream_is_corrupt() {
        let png = encoded_rgba8(64, true);
        assert!(check_image(Bytes::from(png.clone()), false, &strict()).is_ok());
        let idat: Vec<u8> = split_chunks(&png)
            .iter()
            .filter(|c| &c[4..8] == b"IDAT")
            .flat_map(|c| c[8..c.len() - 4].to_vec())
            .collect();
        let input = file(&[
            ihdr(64, 64, 8, 6, 0),
            chunk(b"IDAT", &idat[..idat.len() / 2]),
            iend(),
        ]);
        corrupt_detail(check_image(input, false, &strict()));
    }

    #[test]
    fn file_cut_inside_idat_is_corrupt() {
        let input = rgba8_transparent().bytes();
        let cut = input.slice(..input.len() - 30);
        assert_eq!(
            corrupt_detail(check_image(cut, false, &strict())),
            "truncated chunk 'IDAT'"
        );
    }

    #[test]
    fn truncated_last_row_is_corrupt() {
        // A complete, well-formed zlib stream that holds one byte less than the image needs.
        let img = rgba8_transparent();
        let raw = img.raw();
        let input = with_idat_data(&img, &zlib_stored(&raw[..raw.len() - 1]));
        assert_eq!(
            corrupt_detail(check_image(input, false, &strict())),
            "truncated image data"
        );
    }

    #[test]
    fn corruption_wins_over_missing_transparency() {
        let img = rgba8_opaque(8);
        let raw = img.raw();
        let input = with_idat_data(&img, &zlib_stored(&raw[..raw.len() - 3]));
        corrupt_detail(check_image(input, false, &strict()));
    }

    #[test]
    fn bad_adler32_is_corrupt() {
        let img = rgba8_transparent();
        let mut zlib = zlib_stored(&img.raw());
        let last = zlib.len() - 1;
        zlib[last] ^= 0x01;
        assert_eq!(
            corrupt_detail(check_image(with_idat_data(&img, &zlib), false, &strict())),
            "corrupt compressed image data (WrongChecksum)"
        );
    }

    #[test]
    fn corrupt_deflate_data_is_corrupt() {
        let img = rgba8_transparent();
        // BTYPE 11 is reserved: invalid deflate block.
        corrupt_detail(check_image(
            with_idat_data(&img, &[0x78, 0x01, 0x07, 0, 0, 0, 0]),
            false,
            &strict(),
        ));
    }

    #[test]
    fn trailing_garbage_after_iend_is_corrupt() {
        let mut input = rgba8_transparent().bytes().to_vec();
        input.extend_from_slice(b"garbage");
        assert_eq!(
            corrupt_detail(check_image(Bytes::from(input), false, &strict())),
            "7 bytes of trailing data after the IEND chunk"
        );
        let mut chunks = rgba8_transparent().chunks();
        chunks.push(iend());
        corrupt_detail(check_image(file(&chunks), false, &strict()));
    }

    #[test]
    fn missing_iend_is_corrupt() {
        let mut chunks = rgba8_transparent().chunks();
        chunks.pop();
        assert_eq!(
            corrupt_detail(check_image(file(&chunks), false, &strict())),
            "missing IEND chunk"
        );
    }

    #[test]
    fn bad_signature_is_not_png() {
        let mut input = rgba8_transparent().bytes().to_vec();
        input[1] = b'Q';
        assert_eq!(
            check_image(Bytes::from(input), false, &strict()).unwrap_err(),
            PngRejection::NotPng
        );
        for junk in [&b""[..], b"\x89PNG", b"\xFF\xD8\xFF\xE0\x00\x10JFIF\x00"] {
            assert_eq!(
                check_image(Bytes::copy_from_slice(junk), false, &strict()).unwrap_err(),
                PngRejection::NotPng
            );
        }
    }

    #[test]
    fn zero_dimension_is_corrupt() {
        for (w, h) in [(0, 8), (8, 0), (0, 0)] {
            let input = file(&[
                ihdr(w, h, 8, 6, 0),
                chunk(b"IDAT", &zlib_stored(&[])),
                iend(),
            ]);
            corrupt_detail(check_image(input, false, &strict()));
        }
    }

    #[test]
    fn huge_ihdr_is_refused_from_the_header() {
        let input = file(&[
            ihdr(30000, 30000, 8, 6, 0),
            chunk(b"IDAT", &zlib_stored(&[0, 0, 0, 0, 0])),
            iend(),
        ]);
        assert_eq!(
            check_image(input.clone(), false, &strict()).unwrap_err(),
            PngRejection::DimensionsTooLarge {
                width: 30000,
                height: 30000,
                max: 1024
            }
        );
        assert_eq!(
            check_mask(input, (30000, 30000), &strict()).unwrap_err(),
            PngRejection::DimensionsTooLarge {
                width: 30000,
                height: 30000,
                max: 1024
            }
        );
        let wide = file(&[
            ihdr(1025, 16, 8, 2, 0),
            chunk(b"IDAT", &zlib_stored(&[0])),
            iend(),
        ]);
        assert_eq!(
            check_image(wide, true, &strict()).unwrap_err(),
            PngRejection::DimensionsTooLarge {
                width: 1025,
                height: 16,
                max: 1024
            }
        );
    }

    #[test]
    fn not_square_is_refused_before_decoding() {
        let input = file(&[
            ihdr(800, 600, 8, 6, 0),
            chunk(b"IDAT", &zlib_stored(&[0])),
            iend(),
        ]);
        let err = check_image(input, false, &strict()).unwrap_err();
        assert_eq!(
            err,
            PngRejection::NotSquare {
                width: 800,
                height: 600
            }
        );
        assert_eq!(
            err.message("image"),
            "Invalid input image - expected an image with equal width and height, got 800x600 \
             instead."
        );
    }

    #[test]
    fn mode_check_comes_before_decoding() {
        let img = rgb8(8);
        let input = with_idat_data(&img, &zlib_stored(&[0, 1, 2]));
        assert_eq!(
            check_image(input, false, &strict()).unwrap_err(),
            PngRejection::Mode { mode: "RGB" }
        );
    }

    #[test]
    fn size_limit_is_strictly_below() {
        let input = rgba8_transparent().bytes();
        let at = PngRules {
            max_bytes: input.len(),
            ..strict()
        };
        assert_eq!(
            check_image(input.clone(), false, &at).unwrap_err(),
            PngRejection::TooLarge {
                limit: input.len(),
                actual: input.len()
            }
        );
        let above = PngRules {
            max_bytes: input.len() + 1,
            ..strict()
        };
        let out = check_image(input.clone(), false, &above).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(
            check_mask(input.clone(), (8, 8), &at).unwrap_err(),
            PngRejection::TooLarge {
                limit: input.len(),
                actual: input.len()
            }
        );
    }

    #[test]
    fn size_is_checked_before_signature() {
        let junk = Bytes::from(vec![0u8; 100]);
        let r = PngRules {
            max_bytes: 100,
            ..strict()
        };
        assert_eq!(
            check_image(junk, false, &r).unwrap_err(),
            PngRejection::TooLarge {
                limit: 100,
                actual: 100
            }
        );
    }

    #[test]
    fn structural_faults_are_corrupt() {
        let img = rgba8_transparent();
        let base = img.chunks();
        let idat = base[1].clone();
        let text = chunk(b"tEXt", b"a\0b");
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            (
                "IHDR not first",
                vec![text.clone(), base[0].clone(), idat.clone(), iend()],
            ),
            (
                "duplicate IHDR",
                vec![base[0].clone(), base[0].clone(), idat.clone(), iend()],
            ),
            ("no IDAT", vec![base[0].clone(), iend()]),
            (
                "IDAT not contiguous",
                vec![
                    base[0].clone(),
                    idat.clone(),
                    text.clone(),
                    idat.clone(),
                    iend(),
                ],
            ),
            ("bad depth", vec![ihdr(8, 8, 4, 6, 0), idat.clone(), iend()]),
            (
                "bad color type",
                vec![ihdr(8, 8, 8, 5, 0), idat.clone(), iend()],
            ),
            (
                "bad interlace",
                vec![ihdr(8, 8, 8, 6, 2), idat.clone(), iend()],
            ),
            (
                "palette without PLTE",
                vec![ihdr(8, 8, 8, 3, 0), idat.clone(), iend()],
            ),
            (
                "tRNS with alpha",
                vec![
                    base[0].clone(),
                    chunk(b"tRNS", &[0, 0]),
                    idat.clone(),
                    iend(),
                ],
            ),
            (
                "IEND not empty",
                vec![base[0].clone(), idat.clone(), chunk(b"IEND", &[1])],
            ),
            (
                "invalid chunk type",
                vec![base[0].clone(), chunk(b"ID1T", &[]), idat.clone(), iend()],
            ),
        ];
        for (name, chunks) in cases {
            match check_image(file(&chunks), false, &strict()) {
                Err(PngRejection::Corrupt(_)) => {}
                other => panic!("{name}: expected Corrupt, got {other:?}"),
            }
        }

        let ihdr_short = chunk(b"IHDR", &base[0][8..20]);
        assert_eq!(
            corrupt_detail(check_image(
                file(&[ihdr_short, idat.clone(), iend()]),
                false,
                &strict(),
            )),
            "IHDR length 12 (expected 13)"
        );

        // A length that runs past the end of the file.
        let mut huge = idat.clone();
        huge[0..4].copy_from_slice(&0x7FFF_FFF0u32.to_be_bytes());
        corrupt_detail(check_image(
            file(&[base[0].clone(), huge, iend()]),
            false,
            &strict(),
        ));
        let mut invalid = idat;
        invalid[0..4].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        corrupt_detail(check_image(
            file(&[base[0].clone(), invalid, iend()]),
            false,
            &strict(),
        ));
    }

    #[test]
    fn trns_structure_faults_are_corrupt() {
        let gray = Img::new(4, 0, 8, |_, _| vec![0]);
        let bad_len = gray.clone().trns(vec![0, 0, 0]);
        corrupt_detail(check_image(bad_len.bytes(), false, &strict()));

        let palette = Img::new(4, 3, 8, |_, _| vec![0]).plte(vec![1, 2, 3]);
        let too_many = palette.clone().trns(vec![0, 0]);
        corrupt_detail(check_image(too_many.bytes(), false, &strict()));

        // tRNS before PLTE.
        let raw = palette.raw();
        let input = file(&[
            ihdr(4, 4, 8, 3, 0),
            chunk(b"tRNS", &[0]),
            chunk(b"PLTE", &[1, 2, 3]),
            chunk(b"IDAT", &zlib_stored(&raw)),
            iend(),
        ]);
        corrupt_detail(check_image(input, false, &strict()));

        // tRNS after IDAT.
        let input = file(&[
            ihdr(4, 4, 8, 0, 0),
            chunk(b"IDAT", &zlib_stored(&gray.raw())),
            chunk(b"tRNS", &[0, 0]),
            iend(),
        ]);
        corrupt_detail(check_image(input, false, &strict()));
    }

    #[test]
    fn ancillary_chunks_are_tolerated() {
        let mut chunks = rgba8_transparent().chunks();
        chunks.insert(1, chunk(b"tEXt", b"Comment\0hi"));
        chunks.insert(1, chunk(b"gAMA", &45455u32.to_be_bytes()));
        chunks.insert(1, chunk(b"prVt", b"anything"));
        let n = chunks.len();
        chunks.insert(n - 1, chunk(b"tEXt", b"After\0idat"));
        let input = file(&chunks);
        let out = check_image(input.clone(), false, &strict()).unwrap();
        assert_same_allocation(&out, &input);
    }

    #[test]
    fn idat_split_over_several_chunks() {
        let img = rgba8_transparent();
        let zlib = zlib_stored(&img.raw());
        let (a, b) = zlib.split_at(zlib.len() / 3);
        let input = file(&[
            ihdr(8, 8, 8, 6, 0),
            chunk(b"IDAT", a),
            chunk(b"IDAT", &[]),
            chunk(b"IDAT", b),
            iend(),
        ]);
        assert!(check_image(input, false, &strict()).is_ok());
    }

    #[test]
    fn larger_compressed_image_decodes() {
        let png = encoded_rgba8(512, true);
        let r = PngRules {
            max_bytes: 4 * MIB,
            max_dimension: 512,
            transparency: Transparency::Strict,
            max_conversion_bytes: PngRules::DEFAULT_MAX_CONVERSION_BYTES,
        };
        let input = Bytes::from(png);
        let out = check_image(input.clone(), false, &r).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(
            check_image(Bytes::from(encoded_rgba8(512, false)), false, &r).unwrap_err(),
            PngRejection::NotTransparent
        );
    }

    // -----------------------------------------------------------------------------------------
    // Masks
    // -----------------------------------------------------------------------------------------

    #[test]
    fn mask_rgba_with_transparency_is_accepted() {
        let input = rgba8_transparent().bytes();
        let out = check_mask(input.clone(), (8, 8), &strict()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "RGBA");
    }

    #[test]
    fn mask_missing_alpha_wins_over_size_mismatch() {
        let input = rgb8(4).bytes();
        assert_eq!(
            check_mask(input.clone(), (8, 8), &strict()).unwrap_err(),
            PngRejection::MaskMissingAlpha
        );
        assert_eq!(
            check_mask(input, (4, 4), &compatible()).unwrap_err(),
            PngRejection::MaskMissingAlpha
        );
        let gray = Img::new(4, 0, 8, |_, _| vec![0]).bytes();
        assert_eq!(
            check_mask(gray, (4, 4), &compatible()).unwrap_err(),
            PngRejection::MaskMissingAlpha
        );
        let palette = Img::new(4, 3, 8, |_, _| vec![0])
            .plte(vec![0, 0, 0])
            .bytes();
        assert_eq!(
            check_mask(palette, (4, 4), &compatible()).unwrap_err(),
            PngRejection::MaskMissingAlpha
        );
    }

    #[test]
    fn mask_size_mismatch() {
        let input = rgba8_transparent().bytes();
        let err = check_mask(input, (16, 16), &strict()).unwrap_err();
        assert_eq!(
            err,
            PngRejection::MaskSizeMismatch {
                image: (16, 16),
                mask: (8, 8)
            }
        );
        assert_eq!(
            err.message("mask"),
            "Invalid mask image format - mask size does not match image size (image 16x16, \
             mask 8x8)."
        );
    }

    #[test]
    fn mask_strict_vs_compatible() {
        let opaque = rgba8_opaque(8).bytes();
        assert_eq!(
            check_mask(opaque.clone(), (8, 8), &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        // Under strict the transparency check comes before the size comparison.
        assert_eq!(
            check_mask(opaque.clone(), (4, 4), &strict()).unwrap_err(),
            PngRejection::NotTransparent
        );
        let out = check_mask(opaque.clone(), (8, 8), &compatible()).unwrap();
        assert_same_allocation(&out, &opaque);
        assert_eq!(
            check_mask(opaque, (4, 4), &compatible()).unwrap_err(),
            PngRejection::MaskSizeMismatch {
                image: (4, 4),
                mask: (8, 8)
            }
        );
    }

    #[test]
    fn mask_la_is_accepted_and_not_converted() {
        let input = Img::new(4, 4, 8, |x, _| vec![0, if x == 0 { 0 } else { 255 }]).bytes();
        let out = check_mask(input.clone(), (4, 4), &strict()).unwrap();
        assert_same_allocation(&out, &input);
        assert_eq!(out.mode, "LA");
    }

    #[test]
    fn mask_with_trns_is_converted() {
        let img = Img::new(4, 3, 1, |x, _| vec![(x % 2) as u16])
            .plte(vec![1, 1, 1, 2, 2, 2])
            .trns(vec![0]);
        let out = check_mask(img.bytes(), (4, 4), &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "P");
        let (ct, depth, pixels) = decode_plain(&out.bytes);
        assert_eq!((ct, depth), (ColorType::Rgba, BitDepth::Eight));
        let expected = rgba8(coords(4).map(|(x, _)| {
            if x % 2 == 0 {
                [1, 1, 1, 0]
            } else {
                [2, 2, 2, 255]
            }
        }));
        assert_eq!(pixels, expected);

        let gray = Img::new(4, 0, 8, |x, _| vec![x as u16]).trns(vec![0, 3]);
        let out = check_mask(gray.bytes(), (4, 4), &strict()).unwrap();
        assert!(out.converted);
        assert_eq!(out.mode, "L");

        // The converted mask is still compared with the image size.
        assert_eq!(
            check_mask(img.bytes(), (5, 5), &strict()).unwrap_err(),
            PngRejection::MaskSizeMismatch {
                image: (5, 5),
                mask: (4, 4)
            }
        );
    }

    #[test]
    fn mask_corrupt_is_corrupt() {
        let img = rgba8_transparent();
        let raw = img.raw();
        let input = with_idat_data(&img, &zlib_stored(&raw[..raw.len() - 1]));
        corrupt_detail(check_mask(input, (8, 8), &compatible()));
    }

    #[test]
    fn mask_not_square() {
        let input = Img {
            width: 6,
            height: 5,
            samples: vec![0; 120],
            ..rgba8_opaque(1)
        }
        .bytes();
        let err = check_mask(input, (6, 5), &compatible()).unwrap_err();
        assert_eq!(
            err,
            PngRejection::NotSquare {
                width: 6,
                height: 5
            }
        );
        assert_eq!(
            err.message("mask"),
            "Invalid input mask - expected an image with equal width and height, got 6x5 instead."
        );
    }

    // -----------------------------------------------------------------------------------------
    // Codes and messages
    // -----------------------------------------------------------------------------------------

    #[test]
    fn codes() {
        let cases = [
            (
                PngRejection::TooLarge {
                    limit: 1,
                    actual: 2,
                },
                "invalid_image_format",
            ),
            (PngRejection::NotPng, "invalid_image_format"),
            (PngRejection::Corrupt("x".into()), "invalid_image_format"),
            (
                PngRejection::ConvertedTooLarge {
                    limit: 1,
                    actual: 2,
                },
                "invalid_image_format",
            ),
            (
                PngRejection::DimensionsTooLarge {
                    width: 1,
                    height: 1,
                    max: 1,
                },
                "invalid_image_dimensions",
            ),
            (
                PngRejection::NotSquare {
                    width: 1,
                    height: 2,
                },
                "invalid_image_dimensions",
            ),
            (
                PngRejection::MaskSizeMismatch {
                    image: (1, 1),
                    mask: (2, 2),
                },
                "invalid_image_dimensions",
            ),
            (PngRejection::Mode { mode: "RGB" }, "invalid_image_mode"),
            (PngRejection::MaskMissingAlpha, "invalid_image_mode"),
            (PngRejection::NotTransparent, "image_not_transparent"),
        ];
        for (rejection, code) in cases {
            assert_eq!(rejection.code(), code, "{rejection:?}");
            assert!(!rejection.to_string().is_empty());
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            PngRejection::TooLarge {
                limit: 4_194_304,
                actual: 5_000_000
            }
            .message("image"),
            "Uploaded image must be a PNG and less than 4 MB."
        );
        assert_eq!(
            PngRejection::TooLarge {
                limit: 2_621_440,
                actual: 5_000_000
            }
            .message("mask"),
            "Uploaded mask must be a PNG and less than 2.5 MB."
        );
        assert_eq!(
            PngRejection::NotPng.message("image"),
            "Uploaded image must be a PNG and less than 4 MB."
        );
        assert_eq!(
            PngRejection::NotPng.message_with_limit("mask", 2_621_440),
            "Uploaded mask must be a PNG and less than 2.5 MB."
        );
        assert_eq!(
            PngRejection::Corrupt("truncated image data".into()).message("image"),
            "Uploaded image must be a PNG and less than 4 MB. The file could not be decoded: \
             truncated image data."
        );
        assert_eq!(
            PngRejection::Corrupt("Corrupt deflate stream.".into()).message("image"),
            "Uploaded image must be a PNG and less than 4 MB. The file could not be decoded: \
             Corrupt deflate stream."
        );
        assert_eq!(
            PngRejection::ConvertedTooLarge {
                limit: 100,
                actual: 150
            }
            .message("mask"),
            "Invalid input mask - converting its transparency to RGBA makes it 150 bytes, \
             which is not less than the limit of 100 bytes."
        );
        assert_eq!(
            PngRejection::DimensionsTooLarge {
                width: 30000,
                height: 30000,
                max: 4096
            }
            .message("image"),
            "Invalid input image - dimensions 30000x30000 exceed the maximum of 4096x4096."
        );
        assert_eq!(
            PngRejection::Mode { mode: "RGB" }.message("image"),
            "Invalid input image - format must be in ['RGBA', 'LA', 'L'], got RGB."
        );
        assert_eq!(
            PngRejection::MaskMissingAlpha.message("mask"),
            "Invalid mask image format - mask image missing alpha channel"
        );
        assert_eq!(
            PngRejection::NotTransparent.message("image"),
            "Invalid input image - the image has no fully transparent pixels (alpha 0), so \
             there is nothing to edit. Make the area to edit transparent or send a mask."
        );
        assert_eq!(
            PngRejection::NotTransparent.message("mask"),
            "Invalid mask image format - the mask has no fully transparent pixels (alpha 0), \
             so there is nothing to edit."
        );
    }

    #[test]
    fn mib_formatting() {
        assert_eq!(mib(4_194_304), "4");
        assert_eq!(mib(2_621_440), "2.5");
        assert_eq!(mib(1_048_576 / 4), "0.25");
        assert_eq!(mib(50 * MIB), "50");
    }

    // -----------------------------------------------------------------------------------------
    // The request-level cases of tests/validation.rs
    // -----------------------------------------------------------------------------------------

    /// The PNG-rule cases `tests/validation.rs` leaves to this file (it keeps one end-to-end
    /// case per param and code). Each request's files are checked as the edits pipeline checks
    /// them (`edits::check_images`: the image, then the mask against the image's size) under the
    /// gateway's default rules, and the first refusal is rendered as the envelope words it.
    mod request_cases {
        use bytes::Bytes;
        use png::{BitDepth, ColorType};

        use super::super::*;
        use crate::error::{ErrorParts, GatewayError};
        use crate::testkit as kit;

        const BAD_FORMAT: &str = "Uploaded image must be a PNG and less than 4 MB.";
        const BAD_MASK_FORMAT: &str = "Uploaded mask must be a PNG and less than 4 MB.";
        const FOUR_MIB: usize = 4 * 1024 * 1024;

        enum Want {
            Exact(String),
            Prefix(String),
            Contains(String),
        }
        use Want::*;

        fn exact(s: impl Into<String>) -> Want {
            Exact(s.into())
        }
        fn prefix(s: impl Into<String>) -> Want {
            Prefix(s.into())
        }
        fn contains(s: impl Into<String>) -> Want {
            Contains(s.into())
        }

        /// `[validation]` as configured by default, with this transparency policy.
        fn gateway(transparency: Transparency) -> PngRules {
            PngRules {
                max_bytes: FOUR_MIB,
                max_dimension: 4096,
                transparency,
                max_conversion_bytes: PngRules::DEFAULT_MAX_CONVERSION_BYTES,
            }
        }

        /// The refusal of a request with this image (and mask).
        fn refusal(image: &[u8], mask: Option<&[u8]>, rules: &PngRules) -> ErrorParts {
            let (part, rejection) =
                match check_image(Bytes::copy_from_slice(image), mask.is_some(), rules) {
                    Err(r) => ("image", r),
                    Ok(checked) => {
                        let mask = mask.expect("the image alone was accepted");
                        let dims = (checked.width, checked.height);
                        let r = check_mask(Bytes::copy_from_slice(mask), dims, rules)
                            .expect_err("the mask was accepted");
                        ("mask", r)
                    }
                };
            GatewayError::Png {
                part,
                rejection,
                max_bytes: rules.max_bytes,
            }
            .parts()
        }

        struct Case {
            name: &'static str,
            image: Vec<u8>,
            mask: Option<Vec<u8>>,
            rules: PngRules,
            param: &'static str,
            code: &'static str,
            want: Want,
        }

        fn case(
            name: &'static str,
            image: Vec<u8>,
            mask: Option<Vec<u8>>,
            param: &'static str,
            code: &'static str,
            want: Want,
        ) -> Case {
            Case {
                name,
                image,
                mask,
                rules: gateway(Transparency::Strict),
                param,
                code,
                want,
            }
        }

        fn under(rules: PngRules, c: Case) -> Case {
            Case { rules, ..c }
        }

        #[test]
        fn each_png_rule_case_gets_its_param_code_and_message() {
            let good = kit::rgba_png(64, true);
            let img32 = kit::rgba_png(32, true);
            let rgb = kit::rgb_png(64);
            let mode = |m: &str| {
                format!("Invalid input image - format must be in ['RGBA', 'LA', 'L'], got {m}.")
            };
            let mismatch = "Invalid mask image format - mask size does not match image size";
            let no_alpha = "Invalid mask image format - mask image missing alpha channel";
            let not_square = |part: &str| {
                format!(
                    "Invalid input {part} - expected an image with equal width and height, got 64x32 instead."
                )
            };
            let compatible = gateway(Transparency::Compatible);
            let limited = PngRules {
                max_bytes: 3 * 512 * 1024,
                ..gateway(Transparency::Strict)
            };
            let at_limited = "Uploaded image must be a PNG and less than 1.5 MB.";
            // A 64x64 palette image of 16 colours in noise, one of them transparent: small as
            // palette indices, several times larger as RGBA.
            let mut state = 0x9E37_79B9u32;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 16) as u8
            };
            let noise: Vec<u8> = (0..64 * 64).map(|_| next()).collect();
            let palette: Vec<u8> = (0..16u8)
                .flat_map(|i| [i * 16, 255 - i * 16, i * 7])
                .collect();
            let noisy_palette = kit::png_with(
                64,
                64,
                ColorType::Indexed,
                BitDepth::Eight,
                false,
                Some(vec![0]),
                Some(palette),
                |x, y| vec![noise[(y * 64 + x) as usize]],
            );
            let conversion_limit = noisy_palette.len() + 1;
            let rgb_trns_unused = kit::png_with(
                16,
                16,
                ColorType::Rgb,
                BitDepth::Eight,
                false,
                Some(vec![0, 9, 0, 9, 0, 9]),
                None,
                |_, _| vec![1, 2, 3],
            );
            let cases = vec![
                // declared part types: the bytes decide
                case(
                    "octet-stream that is not a PNG",
                    kit::jfif_stub(),
                    None,
                    "image",
                    "invalid_image_format",
                    exact(BAD_FORMAT),
                ),
                case(
                    "octet-stream mask that is not a PNG",
                    img32.clone(),
                    Some(kit::jfif_stub()),
                    "mask",
                    "invalid_image_format",
                    exact(BAD_MASK_FORMAT),
                ),
                // image bytes: size, signature, structure, dimensions
                case(
                    "JPEG bytes declared image/png",
                    kit::jfif_stub(),
                    None,
                    "image",
                    "invalid_image_format",
                    exact(BAD_FORMAT),
                ),
                case(
                    "empty file",
                    Vec::new(),
                    None,
                    "image",
                    "invalid_image_format",
                    exact(BAD_FORMAT),
                ),
                case(
                    "only the signature",
                    kit::PNG_SIGNATURE.to_vec(),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "exactly 4 MiB",
                    kit::png_of_size(FOUR_MIB),
                    None,
                    "image",
                    "invalid_image_format",
                    exact(BAD_FORMAT),
                ),
                case(
                    "4 MiB + 1",
                    kit::png_of_size(FOUR_MIB + 1),
                    None,
                    "image",
                    "invalid_image_format",
                    exact(BAD_FORMAT),
                ),
                case(
                    "bad CRC",
                    kit::with_bad_crc(&good),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "truncated IDAT",
                    kit::truncated_idat(&good),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "file cut in the middle",
                    good[..good.len() / 2].to_vec(),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "5000x5000 header",
                    kit::bomb_png(5000),
                    None,
                    "image",
                    "invalid_image_dimensions",
                    contains("5000x5000"),
                ),
                case(
                    "4097x4097 header (one over the default limit)",
                    kit::header_only_png(4097, 4097),
                    None,
                    "image",
                    "invalid_image_dimensions",
                    contains("4097x4097"),
                ),
                // mode and transparency
                case(
                    "palette without tRNS",
                    kit::palette_png(16),
                    None,
                    "image",
                    "invalid_image_mode",
                    exact(mode("P")),
                ),
                case(
                    "gray 8-bit without alpha",
                    kit::gray_png(32),
                    None,
                    "image",
                    "image_not_transparent",
                    prefix("Invalid input image"),
                ),
                under(
                    compatible.clone(),
                    case(
                        "compatible: RGB without mask",
                        kit::rgb_png(64),
                        None,
                        "image",
                        "invalid_image_mode",
                        exact(mode("RGB")),
                    ),
                ),
                under(
                    compatible.clone(),
                    case(
                        "compatible: palette without tRNS",
                        kit::palette_png(16),
                        None,
                        "image",
                        "invalid_image_mode",
                        exact(mode("P")),
                    ),
                ),
                case(
                    "gray 16-bit is I;16",
                    kit::gray16_png(32),
                    None,
                    "image",
                    "invalid_image_mode",
                    exact(mode("I;16")),
                ),
                case(
                    "gray 1-bit is mode 1",
                    kit::gray_low_depth_png(32, BitDepth::One),
                    None,
                    "image",
                    "invalid_image_mode",
                    exact(mode("1")),
                ),
                case(
                    "gray 4-bit is L: passes the mode check, nothing transparent under strict",
                    kit::gray_low_depth_png(32, BitDepth::Four),
                    None,
                    "image",
                    "image_not_transparent",
                    prefix("Invalid input image"),
                ),
                case(
                    "RGB with a tRNS colour no pixel uses",
                    rgb_trns_unused,
                    None,
                    "image",
                    "image_not_transparent",
                    prefix("Invalid input image"),
                ),
                case(
                    "16-bit alpha 0x0100 is not transparent (high byte 1)",
                    kit::rgba16_alpha(16, 0x0100),
                    None,
                    "image",
                    "image_not_transparent",
                    prefix("Invalid input image"),
                ),
                case(
                    "APNG: an opaque default image is not made transparent by a later frame",
                    kit::apng(16, false, 0),
                    None,
                    "image",
                    "image_not_transparent",
                    prefix("Invalid input image"),
                ),
                // the configured byte limit
                under(
                    limited.clone(),
                    case(
                        "exactly the configured limit",
                        kit::png_of_size(3 * 512 * 1024),
                        None,
                        "image",
                        "invalid_image_format",
                        exact(at_limited),
                    ),
                ),
                under(
                    limited.clone(),
                    case(
                        "corrupt under the configured limit",
                        kit::with_bad_crc(&good),
                        None,
                        "image",
                        "invalid_image_format",
                        prefix(at_limited),
                    ),
                ),
                under(
                    PngRules {
                        max_bytes: conversion_limit.max(64),
                        ..gateway(Transparency::Strict)
                    },
                    case(
                        "palette + tRNS whose RGBA form is over the limit",
                        noisy_palette,
                        None,
                        "image",
                        "invalid_image_format",
                        contains(format!("limit of {conversion_limit} bytes")),
                    ),
                ),
                // mask
                case(
                    "mask 128x128 for a 64x64 image",
                    rgb.clone(),
                    Some(kit::rgba_png(128, true)),
                    "mask",
                    "invalid_image_dimensions",
                    prefix(mismatch),
                ),
                case(
                    "gray mask without alpha",
                    rgb.clone(),
                    Some(kit::gray_png(64)),
                    "mask",
                    "invalid_image_mode",
                    prefix(no_alpha),
                ),
                case(
                    "mask with a bad CRC",
                    rgb.clone(),
                    Some(kit::with_bad_crc(&good)),
                    "mask",
                    "invalid_image_format",
                    prefix(BAD_MASK_FORMAT),
                ),
                case(
                    "mask with a truncated IDAT",
                    rgb.clone(),
                    Some(kit::truncated_idat(&good)),
                    "mask",
                    "invalid_image_format",
                    prefix(BAD_MASK_FORMAT),
                ),
                case(
                    "JPEG mask",
                    rgb.clone(),
                    Some(kit::jfif_stub()),
                    "mask",
                    "invalid_image_format",
                    exact(BAD_MASK_FORMAT),
                ),
                case(
                    "non-square mask",
                    good.clone(),
                    Some(kit::rgba_png_64x32()),
                    "mask",
                    "invalid_image_dimensions",
                    exact(not_square("mask")),
                ),
                // order of checks
                case(
                    "chunk CRCs before the square check",
                    kit::with_bad_crc(&kit::rgba_png_64x32()),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "dimension limit before the square check",
                    kit::header_only_png(5000, 4000),
                    None,
                    "image",
                    "invalid_image_dimensions",
                    contains("5000x4000"),
                ),
                case(
                    "square before the mode check",
                    kit::rgb_png_64x32(),
                    None,
                    "image",
                    "invalid_image_dimensions",
                    exact(not_square("image")),
                ),
                case(
                    "mode check before the full decode: RGB with a truncated IDAT",
                    kit::truncated_idat(&rgb),
                    None,
                    "image",
                    "invalid_image_mode",
                    exact(mode("RGB")),
                ),
                case(
                    "full decode before the transparency verdict: opaque RGBA, truncated IDAT",
                    kit::truncated_idat(&kit::rgba_png(64, false)),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "acceptance needs the complete decode: transparent first row, truncated IDAT",
                    kit::truncated_idat(&good),
                    None,
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "with a mask the image is still decoded completely",
                    kit::truncated_idat(&rgb),
                    Some(good.clone()),
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "image before mask",
                    kit::with_bad_crc(&good),
                    Some(kit::with_bad_crc(&good)),
                    "image",
                    "invalid_image_format",
                    prefix(BAD_FORMAT),
                ),
                case(
                    "mask alpha channel before mask dimensions",
                    good.clone(),
                    Some(kit::rgb_png(32)),
                    "mask",
                    "invalid_image_mode",
                    prefix(no_alpha),
                ),
                case(
                    "mask decode before mask dimensions",
                    good.clone(),
                    Some(kit::truncated_idat(&kit::rgba_png(32, true))),
                    "mask",
                    "invalid_image_format",
                    prefix(BAD_MASK_FORMAT),
                ),
                under(
                    compatible,
                    case(
                        "compatible: RGB with a truncated IDAT gets the mode message",
                        kit::truncated_idat(&rgb),
                        None,
                        "image",
                        "invalid_image_mode",
                        exact(mode("RGB")),
                    ),
                ),
            ];
            for c in cases {
                let p = refusal(&c.image, c.mask.as_deref(), &c.rules);
                assert_eq!(
                    (p.status.as_u16(), p.kind, p.param.as_deref(), p.code),
                    (400, "invalid_request_error", Some(c.param), Some(c.code)),
                    "{}: {}",
                    c.name,
                    p.message
                );
                let ok = match &c.want {
                    Exact(m) => p.message == *m,
                    Prefix(m) => p.message.starts_with(m.as_str()),
                    Contains(m) => p.message.contains(m.as_str()),
                };
                assert!(ok, "{}: message {:?}", c.name, p.message);
            }
        }
    }

    #[test]
    fn may_convert_says_yes_whenever_the_check_converts() {
        let palette_trns = Img::new(4, 3, 8, |x, y| vec![((x + y) % 3) as u16])
            .plte(vec![10, 20, 30, 40, 50, 60, 70, 80, 90])
            .trns(vec![0, 128])
            .bytes();
        let gray_trns = Img::new(4, 0, 8, |x, y| vec![(x * 10 + y) as u16])
            .trns(vec![0, 21])
            .bytes();
        let gray = Img::new(4, 0, 8, |x, y| vec![(x * 10 + y) as u16]).bytes();
        assert!(
            gray.len() > 41 && &gray[37..41] == b"IDAT",
            "IDAT right after IHDR"
        );
        let rgba = Bytes::from(crate::testkit::rgba_png(16, true));
        let cases: [(&str, Bytes, bool); 8] = [
            ("palette with tRNS", palette_trns, true),
            ("gray with tRNS", gray_trns, true),
            ("gray without tRNS", gray.clone(), false),
            ("RGBA", rgba.clone(), false),
            (
                "not a PNG",
                Bytes::from_static(b"GIF89a......................"),
                true,
            ),
            ("cut inside IHDR", rgba.slice(..20), true),
            ("gray cut before its IDAT", gray.slice(..40), true),
            ("RGBA cut before its IDAT", rgba.slice(..40), false),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(may_convert(&bytes), want, "{name}");
            for rules in [strict(), compatible()] {
                if let Ok(out) = check_image(bytes.clone(), false, &rules) {
                    assert!(want || !out.converted, "{name}: converted unannounced");
                }
            }
        }
    }
}
