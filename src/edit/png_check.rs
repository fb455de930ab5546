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

use std::fmt;
use std::io::{Cursor, Write};

use bytes::Bytes;
use png::{BitDepth, ColorType, DecodeOptions, Decoder, DecodingError, Limits, Transformations};

use crate::edit::cancel::Cancel;

/// The transparency policy for an image sent without a mask (and for masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transparency {
    /// At least one pixel must have alpha exactly 0 (tRNS counts).
    Strict,
    /// Only the upstream's mode check applies.
    Compatible,
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
    /// 64 MiB: an 8-bit RGBA frame of 4096 × 4096.
    pub const DEFAULT_MAX_CONVERSION_BYTES: usize = 64 * 1024 * 1024;
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

/// Why a PNG was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PngRejection {
    TooLarge {
        limit: usize,
        actual: usize,
    },
    NotPng,
    /// Human-readable detail, e.g. "CRC mismatch in chunk 'IDAT'", "truncated image data".
    Corrupt(String),
    DimensionsTooLarge {
        width: u32,
        height: u32,
        max: u32,
    },
    NotSquare {
        width: u32,
        height: u32,
    },
    /// Image without mask whose (effective) mode is not RGBA/LA/L.
    Mode {
        mode: &'static str,
    },
    MaskMissingAlpha,
    /// Strict policy: no pixel with alpha exactly 0.
    NotTransparent,
    ConvertedTooLarge {
        limit: usize,
        actual: usize,
    },
    MaskSizeMismatch {
        image: (u32, u32),
        mask: (u32, u32),
    },
    /// An interlaced tRNS file whose RGBA frame (width × height × bytes per pixel) would exceed
    /// `max_conversion_bytes`; refused before decoding.
    ConversionTooLarge {
        width: u32,
        height: u32,
        needed: u64,
        limit: usize,
    },
    /// The caller left: the decode stopped at a row boundary. Nobody sees this answer.
    Cancelled,
}

impl PngRejection {
    /// The `code` of the error envelope.
    pub fn code(&self) -> &'static str {
        match self {
            PngRejection::TooLarge { .. }
            | PngRejection::NotPng
            | PngRejection::Corrupt(_)
            | PngRejection::ConvertedTooLarge { .. }
            | PngRejection::ConversionTooLarge { .. } => "invalid_image_format",
            PngRejection::DimensionsTooLarge { .. }
            | PngRejection::NotSquare { .. }
            | PngRejection::MaskSizeMismatch { .. } => "invalid_image_dimensions",
            PngRejection::Mode { .. } | PngRejection::MaskMissingAlpha => "invalid_image_mode",
            PngRejection::NotTransparent => "image_not_transparent",
            PngRejection::Cancelled => "request_cancelled",
        }
    }

    /// The `message` of the error envelope; `part` is "image" or "mask".
    ///
    /// The size limit in the format message comes from the variant where it carries one;
    /// `NotPng` and `Corrupt` do not carry it, so the caller's limit is passed through
    /// [`PngRejection::message_with_limit`]. `message` uses the default limit of 4 MiB for them.
    pub fn message(&self, part: &str) -> String {
        self.message_with_limit(part, DEFAULT_MAX_BYTES)
    }

    /// Like [`PngRejection::message`], with the configured `max_bytes` for the variants that do
    /// not carry the limit themselves (`NotPng`, `Corrupt`).
    pub fn message_with_limit(&self, part: &str, max_bytes: usize) -> String {
        match self {
            PngRejection::TooLarge { limit, .. } => format_message(part, *limit),
            PngRejection::NotPng => format_message(part, max_bytes),
            PngRejection::Corrupt(detail) => format!(
                "{} The file could not be decoded: {}.",
                format_message(part, max_bytes),
                detail.trim().trim_end_matches('.')
            ),
            PngRejection::ConvertedTooLarge { limit, actual } => format!(
                "Invalid input {part} - converting its transparency to RGBA makes it {actual} \
                 bytes, which is not less than the limit of {limit} bytes."
            ),
            PngRejection::ConversionTooLarge {
                width,
                height,
                needed,
                limit,
            } => format!(
                "Invalid input {part} - converting the transparency of an interlaced \
                 {width}x{height} image to RGBA needs {needed} bytes of memory, more than the \
                 limit of {limit} bytes. Send it non-interlaced or as RGBA."
            ),
            PngRejection::Cancelled => "The request was cancelled.".to_string(),
            PngRejection::DimensionsTooLarge { width, height, max } => format!(
                "Invalid input {part} - dimensions {width}x{height} exceed the maximum of \
                 {max}x{max}."
            ),
            PngRejection::NotSquare { width, height } => format!(
                "Invalid input {part} - expected an image with equal width and height, got \
                 {width}x{height} instead."
            ),
            PngRejection::Mode { mode } => {
                format!("Invalid input {part} - format must be in ['RGBA', 'LA', 'L'], got {mode}.")
            }
            PngRejection::MaskMissingAlpha => {
                "Invalid mask image format - mask image missing alpha channel".to_string()
            }
            PngRejection::NotTransparent => {
                if part == "mask" {
                    "Invalid mask image format - the mask has no fully transparent pixels \
                     (alpha 0), so there is nothing to edit."
                        .to_string()
                } else {
                    format!(
                        "Invalid input {part} - the image has no fully transparent pixels \
                         (alpha 0), so there is nothing to edit. Make the area to edit \
                         transparent or send a mask."
                    )
                }
            }
            PngRejection::MaskSizeMismatch { image, mask } => format!(
                "Invalid mask image format - mask size does not match image size (image {}x{}, \
                 mask {}x{}).",
                image.0, image.1, mask.0, mask.1
            ),
        }
    }
}

impl fmt::Display for PngRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PngRejection::TooLarge { limit, actual } => {
                write!(f, "file is {actual} bytes, must be below {limit}")
            }
            PngRejection::NotPng => f.write_str("not a PNG (bad signature)"),
            PngRejection::Corrupt(detail) => write!(f, "corrupt PNG: {detail}"),
            PngRejection::DimensionsTooLarge { width, height, max } => {
                write!(f, "dimensions {width}x{height} exceed {max}x{max}")
            }
            PngRejection::NotSquare { width, height } => {
                write!(f, "not square: {width}x{height}")
            }
            PngRejection::Mode { mode } => write!(f, "mode {mode} not in RGBA/LA/L"),
            PngRejection::MaskMissingAlpha => f.write_str("mask has no alpha channel"),
            PngRejection::NotTransparent => f.write_str("no pixel with alpha 0"),
            PngRejection::ConvertedTooLarge { limit, actual } => {
                write!(f, "converted RGBA is {actual} bytes, must be below {limit}")
            }
            PngRejection::ConversionTooLarge {
                width,
                height,
                needed,
                limit,
            } => write!(
                f,
                "interlaced {width}x{height} conversion needs {needed} bytes, limit {limit}"
            ),
            PngRejection::Cancelled => f.write_str("cancelled: the caller left"),
            PngRejection::MaskSizeMismatch { image, mask } => write!(
                f,
                "mask {}x{} does not match image {}x{}",
                mask.0, mask.1, image.0, image.1
            ),
        }
    }
}

impl std::error::Error for PngRejection {}

/// 4 MiB, the documented default limit.
const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;

/// `Uploaded {part} must be a PNG and less than {N} MB.` with N = limit in MiB, no trailing zeros;
/// a limit that is not a round number of hundredths of a MiB is stated in bytes instead.
fn format_message(part: &str, limit: usize) -> String {
    let hundredths = limit as f64 / (1024.0 * 1024.0) * 100.0;
    if (hundredths - hundredths.round()).abs() < 1e-9 {
        format!(
            "Uploaded {part} must be a PNG and less than {} MB.",
            mib(limit)
        )
    } else {
        format!("Uploaded {part} must be a PNG and less than {limit} bytes.")
    }
}

/// `limit` in MiB without trailing zeros: 4194304 -> "4", 2621440 -> "2.5". The value is printed
/// exactly (shortest round-trip form of the f64), so it never overstates the limit.
fn mib(limit: usize) -> String {
    let value = limit as f64 / (1024.0 * 1024.0);
    format!("{value}")
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
        let Some(next) = (be_u32(&bytes[at..]) as usize)
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

// ---------------------------------------------------------------------------------------------
// Step 3: the chunk walk
// ---------------------------------------------------------------------------------------------

const SIGNATURE: [u8; 8] = [137, 80, 78, 71, 13, 10, 26, 10];

/// What the chunk walk learned from IHDR and the chunks before IDAT.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) width: u32,
    pub(crate) height: u32,
    bit_depth: u8,
    color_type: u8,
    pub(crate) interlaced: bool,
    pub(crate) has_trns: bool,
}

impl Header {
    /// Pillow's mode for the file as stored.
    fn pillow_mode(&self) -> &'static str {
        match (self.color_type, self.bit_depth) {
            (6, _) => "RGBA",
            (4, 8) => "LA",
            (4, _) => "RGBA",
            (0, 1) => "1",
            (0, 16) => "I;16",
            (0, _) => "L",
            (2, _) => "RGB",
            _ => "P",
        }
    }

    pub(crate) fn has_alpha_channel(&self) -> bool {
        matches!(self.color_type, 4 | 6)
    }

    /// A non-alpha type whose transparency comes from tRNS is re-encoded as RGBA.
    pub(crate) fn needs_conversion(&self) -> bool {
        self.has_trns && !self.has_alpha_channel()
    }
}

#[derive(PartialEq, Eq)]
enum IdatState {
    NotSeen,
    InSequence,
    Done,
}

fn corrupt(detail: impl Into<String>) -> PngRejection {
    PngRejection::Corrupt(detail.into())
}

fn chunk_name(ty: &[u8]) -> String {
    ty.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Walks every chunk without decompressing: lengths, CRCs, IHDR, PLTE/tRNS placement and
/// lengths, IDAT contiguity, the default image's fcTL, and IEND as the very last bytes.
fn walk_chunks(data: &[u8]) -> Result<Header, PngRejection> {
    walk(data, Trailing::Reject)
}

/// What may follow the IEND chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trailing {
    /// Nothing (the dall-e-2 checks).
    Reject,
    /// Anything; it is not read. Decoders ignore it, and some producers leave bytes there.
    Ignore,
}

/// The chunk walk of [`walk_chunks`], with a choice about bytes after IEND. Checks the
/// signature too, so callers can pass any bytes.
pub(crate) fn walk(data: &[u8], trailing: Trailing) -> Result<Header, PngRejection> {
    if data.len() < SIGNATURE.len() || data[..SIGNATURE.len()] != SIGNATURE {
        return Err(PngRejection::NotPng);
    }
    let mut pos = SIGNATURE.len();
    let mut header: Option<Header> = None;
    let mut palette_entries: Option<usize> = None;
    let mut idat = IdatState::NotSeen;
    let mut seen_iend = false;
    let mut seen_trns = false;

    while pos < data.len() {
        if seen_iend {
            if trailing == Trailing::Ignore {
                break;
            }
            return Err(corrupt(format!(
                "{} bytes of trailing data after the IEND chunk",
                data.len() - pos
            )));
        }
        let rest = &data[pos..];
        if rest.len() < 12 {
            return Err(corrupt("truncated chunk header"));
        }
        let length = be_u32(&rest[..4]);
        let ty = &rest[4..8];
        let name = chunk_name(ty);
        if !ty.iter().all(u8::is_ascii_alphabetic) {
            return Err(corrupt(format!("invalid chunk type '{name}'")));
        }
        if length > 0x7FFF_FFFF {
            return Err(corrupt(format!(
                "chunk '{name}' declares an invalid length"
            )));
        }
        let length = length as usize;
        if rest.len() - 12 < length {
            return Err(corrupt(format!("truncated chunk '{name}'")));
        }
        let body = &rest[8..8 + length];
        let stored_crc = be_u32(&rest[8 + length..12 + length]);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(ty);
        hasher.update(body);
        if hasher.finalize() != stored_crc {
            return Err(corrupt(format!("CRC mismatch in chunk '{name}'")));
        }
        pos += 12 + length;

        let Some(hdr) = header.as_mut() else {
            if ty != b"IHDR" {
                return Err(corrupt(format!("first chunk is '{name}', not 'IHDR'")));
            }
            header = Some(parse_ihdr(body)?);
            continue;
        };

        if ty == b"IDAT" {
            match idat {
                IdatState::Done => return Err(corrupt("IDAT chunks are not contiguous")),
                IdatState::NotSeen => {
                    if hdr.color_type == 3 && palette_entries.is_none() {
                        return Err(corrupt("indexed-color image without a PLTE chunk"));
                    }
                    idat = IdatState::InSequence;
                }
                IdatState::InSequence => {}
            }
            continue;
        }
        if idat == IdatState::InSequence {
            idat = IdatState::Done;
        }
        let before_idat = idat == IdatState::NotSeen;

        match ty {
            b"IHDR" => return Err(corrupt("duplicate IHDR chunk")),
            b"IEND" => {
                if length != 0 {
                    return Err(corrupt("IEND chunk is not empty"));
                }
                seen_iend = true;
            }
            b"PLTE" => {
                if !before_idat {
                    return Err(corrupt("PLTE chunk after IDAT"));
                }
                if palette_entries.is_some() {
                    return Err(corrupt("duplicate PLTE chunk"));
                }
                if length == 0 || length % 3 != 0 || length > 3 * 256 {
                    return Err(corrupt(format!("invalid PLTE length {length}")));
                }
                palette_entries = Some(length / 3);
            }
            b"tRNS" => {
                if !before_idat {
                    return Err(corrupt("tRNS chunk after IDAT"));
                }
                if seen_trns {
                    return Err(corrupt("duplicate tRNS chunk"));
                }
                seen_trns = true;
                match hdr.color_type {
                    0 if length != 2 => {
                        return Err(corrupt(format!(
                            "tRNS length {length} for a grayscale image (expected 2)"
                        )));
                    }
                    2 if length != 6 => {
                        return Err(corrupt(format!(
                            "tRNS length {length} for an RGB image (expected 6)"
                        )));
                    }
                    3 => match palette_entries {
                        None => return Err(corrupt("tRNS chunk before PLTE")),
                        Some(entries) if length > entries => {
                            return Err(corrupt(format!(
                                "tRNS has {length} entries for a palette of {entries}"
                            )));
                        }
                        Some(_) => {}
                    },
                    4 | 6 => {
                        return Err(corrupt("tRNS chunk in an image with an alpha channel"));
                    }
                    _ => {}
                }
                hdr.has_trns = true;
            }
            b"fcTL" if before_idat => {
                // An fcTL before IDAT makes the default image the first animation frame; it
                // must then cover the whole canvas, so the IDAT rows are the full image.
                if length != 26 {
                    return Err(corrupt("invalid fcTL length"));
                }
                let (w, h) = (be_u32(&body[4..8]), be_u32(&body[8..12]));
                let (x, y) = (be_u32(&body[12..16]), be_u32(&body[16..20]));
                if (w, h, x, y) != (hdr.width, hdr.height, 0, 0) {
                    return Err(corrupt(
                        "the fcTL of the default image does not cover the whole image",
                    ));
                }
            }
            b"fdAT" if before_idat => return Err(corrupt("fdAT chunk before IDAT")),
            _ => {}
        }
    }

    let Some(header) = header else {
        return Err(corrupt("no IHDR chunk"));
    };
    if idat == IdatState::NotSeen {
        return Err(corrupt("no IDAT chunk"));
    }
    if !seen_iend {
        return Err(corrupt("missing IEND chunk"));
    }
    Ok(header)
}

fn parse_ihdr(body: &[u8]) -> Result<Header, PngRejection> {
    if body.len() != 13 {
        return Err(corrupt(format!("IHDR length {} (expected 13)", body.len())));
    }
    let width = be_u32(&body[0..4]);
    let height = be_u32(&body[4..8]);
    let (bit_depth, color_type) = (body[8], body[9]);
    let (compression, filter, interlace) = (body[10], body[11], body[12]);
    if width == 0 || height == 0 {
        return Err(corrupt(format!("zero image dimension {width}x{height}")));
    }
    if width > 0x7FFF_FFFF || height > 0x7FFF_FFFF {
        return Err(corrupt(format!("invalid image dimension {width}x{height}")));
    }
    let depth_ok = match color_type {
        0 => matches!(bit_depth, 1 | 2 | 4 | 8 | 16),
        3 => matches!(bit_depth, 1 | 2 | 4 | 8),
        2 | 4 | 6 => matches!(bit_depth, 8 | 16),
        _ => return Err(corrupt(format!("invalid color type {color_type}"))),
    };
    if !depth_ok {
        return Err(corrupt(format!(
            "invalid bit depth {bit_depth} for color type {color_type}"
        )));
    }
    if compression != 0 {
        return Err(corrupt(format!("invalid compression method {compression}")));
    }
    if filter != 0 {
        return Err(corrupt(format!("invalid filter method {filter}")));
    }
    if interlace > 1 {
        return Err(corrupt(format!("invalid interlace method {interlace}")));
    }
    Ok(Header {
        width,
        height,
        bit_depth,
        color_type,
        interlaced: interlace == 1,
        has_trns: false,
    })
}

// ---------------------------------------------------------------------------------------------
// Steps 7 and 8: the complete decode, the alpha scan and the conversion
// ---------------------------------------------------------------------------------------------

struct DecodeOutcome {
    has_transparent_pixel: bool,
    /// The re-encoded RGBA PNG when a conversion was requested.
    converted: Option<CappedBuf>,
}

/// Collects encoder output up to `limit` bytes and only counts beyond that, so a conversion that
/// ends up too large never holds more than the limit in memory.
struct CappedBuf {
    buf: Vec<u8>,
    total: usize,
    limit: usize,
}

impl CappedBuf {
    fn new(limit: usize) -> Self {
        CappedBuf {
            buf: Vec::new(),
            total: 0,
            limit,
        }
    }
}

impl Write for CappedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.total = self.total.saturating_add(data.len());
        if self.total < self.limit {
            self.buf.extend_from_slice(data);
        } else if !self.buf.is_empty() {
            self.buf = Vec::new();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn decoding_error(err: DecodingError) -> PngRejection {
    let detail = match &err {
        DecodingError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "truncated image data".to_string()
        }
        DecodingError::LimitsExceeded => "the decoder's memory limit was exceeded".to_string(),
        other => {
            let text = other.to_string();
            if text.contains("not have enough data") || text.contains("InsufficientInput") {
                "truncated image data".to_string()
            } else if let Some(kind) = text.strip_prefix("Corrupt deflate stream. ") {
                format!("corrupt compressed image data ({kind})")
            } else {
                text
            }
        }
    };
    corrupt(detail)
}

fn encoding_error(err: impl fmt::Display) -> PngRejection {
    // Cannot happen for well-formed rows into an in-memory sink; reported rather than panicking.
    corrupt(format!("re-encoding to RGBA failed: {err}"))
}

/// How the decoder's rows (after `EXPAND`) are laid out.
#[derive(Clone, Copy)]
struct RowLayout {
    color: ColorType,
    /// Bytes per sample: 1 or 2 (EXPAND turns sub-byte depths into 8 bits).
    bps: usize,
}

impl RowLayout {
    fn channels(self) -> usize {
        self.color.samples()
    }

    fn has_alpha(self) -> bool {
        matches!(self.color, ColorType::GrayscaleAlpha | ColorType::Rgba)
    }

    /// True when some pixel of `row` has alpha exactly 0; at 16 bits only the high byte counts
    /// (as in Pillow, a 16-bit alpha below 256 is transparent).
    fn has_transparent_pixel(self, row: &[u8]) -> bool {
        if !self.has_alpha() {
            return false;
        }
        let pixel = self.channels() * self.bps;
        let alpha_high = (self.channels() - 1) * self.bps;
        row.chunks_exact(pixel).any(|px| px[alpha_high] == 0)
    }

    /// Writes `row` as RGBA with the same sample size into `out` (which has the right length).
    fn to_rgba(self, row: &[u8], out: &mut [u8]) {
        let bps = self.bps;
        let pixel_in = self.channels() * bps;
        for (src, dst) in row
            .chunks_exact(pixel_in)
            .zip(out.chunks_exact_mut(4 * bps))
        {
            let (color, alpha) = dst.split_at_mut(3 * bps);
            match self.color {
                ColorType::Rgba => {
                    color.copy_from_slice(&src[..3 * bps]);
                    alpha.copy_from_slice(&src[3 * bps..]);
                }
                ColorType::Rgb => {
                    color.copy_from_slice(src);
                    alpha.fill(0xFF);
                }
                ColorType::GrayscaleAlpha => {
                    for channel in color.chunks_exact_mut(bps) {
                        channel.copy_from_slice(&src[..bps]);
                    }
                    alpha.copy_from_slice(&src[bps..]);
                }
                // `EXPAND` never outputs indexed rows; treat them like gray, never reached.
                ColorType::Grayscale | ColorType::Indexed => {
                    for channel in color.chunks_exact_mut(bps) {
                        channel.copy_from_slice(&src[..bps]);
                    }
                    alpha.fill(0xFF);
                }
            }
        }
    }
}

/// Decodes the default image completely, row by row, and optionally re-encodes it as RGBA.
///
/// `scan` asks for the alpha scan; `convert` asks for the RGBA re-encoding (only requested for
/// files whose transparency comes from tRNS). The first decoding fault stops everything; a
/// success means every row decoded and the rest of the file up to IEND was read cleanly.
fn decode(
    data: &[u8],
    header: &Header,
    rules: &PngRules,
    scan: bool,
    convert: bool,
    cancel: &Cancel,
) -> Result<DecodeOutcome, PngRejection> {
    if convert && header.interlaced {
        within_conversion_budget(header, rules)?;
    }
    let mut reader = row_reader(data, rules)?;

    let (color, depth) = reader.output_color_type();
    let layout = RowLayout {
        color,
        bps: if depth == BitDepth::Sixteen { 2 } else { 1 },
    };
    let mut found = false;
    let mut note = |row: &[u8]| {
        if scan && !found {
            found = layout.has_transparent_pixel(row);
        }
    };

    let converted = if !convert {
        let mut rows = 0u64;
        while let Some(row) = next_row(&mut reader, cancel)? {
            note(row.data());
            rows += 1;
        }
        check_row_count(header, rows)?;
        None
    } else if !header.interlaced {
        Some(convert_streaming(
            &mut reader,
            header,
            layout,
            rules,
            &mut note,
            cancel,
        )?)
    } else {
        Some(convert_interlaced(
            &mut reader,
            header,
            layout,
            rules,
            &mut note,
            cancel,
        )?)
    };
    reader.finish().map_err(decoding_error)?;

    Ok(DecodeOutcome {
        has_transparent_pixel: found,
        converted,
    })
}

/// A row-by-row reader with `EXPAND` (palette and tRNS become samples and alpha) and memory
/// limits derived from `rules`.
fn row_reader<'a>(
    data: &'a [u8],
    rules: &PngRules,
) -> Result<png::Reader<Cursor<&'a [u8]>>, PngRejection> {
    let mut options = DecodeOptions::default();
    // Check the zlib checksum when the stream reaches it, like zlib in Pillow does.
    options.set_ignore_adler32(false);
    // Text and ICC data do not matter here; skipping them avoids inflating zTXt/iCCP payloads.
    options.set_ignore_text_chunk(true);
    options.set_ignore_iccp_chunk(true);
    let mut decoder = Decoder::new_with_options(Cursor::new(data), options);
    // Row buffers are at most max_dimension * 8 bytes (16-bit RGBA); chunk payloads the decoder
    // keeps are smaller than the file, itself below max_bytes.
    let line = (rules.max_dimension as usize)
        .saturating_mul(8)
        .saturating_add(1);
    decoder.set_limits(Limits {
        bytes: line
            .saturating_mul(8)
            .saturating_add(rules.max_bytes)
            .saturating_add(1 << 20),
    });
    decoder.set_transformations(Transformations::EXPAND);
    decoder.read_info().map_err(decoding_error)
}

/// The next row, or [`PngRejection::Cancelled`] once `cancel` is cancelled (checked before
/// every row, so a decode whose caller left stops within one row).
fn next_row<'r>(
    reader: &'r mut png::Reader<Cursor<&[u8]>>,
    cancel: &Cancel,
) -> Result<Option<png::InterlacedRow<'r>>, PngRejection> {
    if cancel.is_cancelled() {
        return Err(PngRejection::Cancelled);
    }
    // `Reader::next_row` is this without the interlace info (its `Row` type is not exported).
    reader.next_interlaced_row().map_err(decoding_error)
}

/// Bytes per sample of the expanded rows: 2 for 16-bit files, else 1.
fn bytes_per_sample(header: &Header) -> usize {
    if header.bit_depth == 16 { 2 } else { 1 }
}

/// The RGBA frame an interlaced conversion holds (width × height × 4 or 8 bytes) must fit
/// `max_conversion_bytes`; checked from the header, before anything is allocated or decoded.
fn within_conversion_budget(header: &Header, rules: &PngRules) -> Result<(), PngRejection> {
    let needed =
        u64::from(header.width) * u64::from(header.height) * (4 * bytes_per_sample(header)) as u64;
    if needed > rules.max_conversion_bytes as u64 {
        return Err(PngRejection::ConversionTooLarge {
            width: header.width,
            height: header.height,
            needed,
            limit: rules.max_conversion_bytes,
        });
    }
    Ok(())
}

fn check_row_count(header: &Header, rows: u64) -> Result<(), PngRejection> {
    let expected = if header.interlaced {
        adam7_row_count(header.width, header.height)
    } else {
        u64::from(header.height)
    };
    if rows != expected {
        return Err(corrupt(format!("decoded {rows} rows, expected {expected}")));
    }
    Ok(())
}

/// Number of non-empty pass rows of an Adam7-interlaced image.
fn adam7_row_count(width: u32, height: u32) -> u64 {
    const PASSES: [(u32, u32, u32, u32); 7] = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ];
    let count = |size: u32, start: u32, step: u32| {
        if size > start {
            u64::from((size - start).div_ceil(step))
        } else {
            0
        }
    };
    PASSES
        .iter()
        .map(|&(x0, y0, dx, dy)| {
            if count(width, x0, dx) == 0 {
                0
            } else {
                count(height, y0, dy)
            }
        })
        .sum()
}

fn rgba_encoder<'a>(
    sink: &'a mut CappedBuf,
    header: &Header,
    layout: RowLayout,
) -> png::Encoder<'static, &'a mut CappedBuf> {
    let mut encoder = png::Encoder::new(sink, header.width, header.height);
    encoder.set_color(ColorType::Rgba);
    encoder.set_depth(if layout.bps == 2 {
        BitDepth::Sixteen
    } else {
        BitDepth::Eight
    });
    encoder
}

/// Non-interlaced conversion: decode a row, convert it, hand it to the streaming encoder. Only a
/// few rows are ever held in memory.
fn convert_streaming(
    reader: &mut png::Reader<Cursor<&[u8]>>,
    header: &Header,
    layout: RowLayout,
    rules: &PngRules,
    note: &mut impl FnMut(&[u8]),
    cancel: &Cancel,
) -> Result<CappedBuf, PngRejection> {
    let mut sink = CappedBuf::new(rules.max_bytes);
    let row_len = header.width as usize * 4 * layout.bps;
    let mut rgba = vec![0u8; row_len];
    {
        let mut writer = rgba_encoder(&mut sink, header, layout)
            .write_header()
            .map_err(encoding_error)?;
        let mut stream = writer.stream_writer().map_err(encoding_error)?;
        let mut rows = 0u64;
        while let Some(row) = next_row(reader, cancel)? {
            let row = row.data();
            note(row);
            if rows < u64::from(header.height) {
                layout.to_rgba(row, &mut rgba);
                stream.write_all(&rgba).map_err(encoding_error)?;
            }
            rows += 1;
        }
        check_row_count(header, rows)?;
        stream.finish().map_err(encoding_error)?;
        writer.finish().map_err(encoding_error)?;
    }
    Ok(sink)
}

/// Interlaced conversion. The Adam7 passes arrive in pass order, so the output rows are only
/// complete after the last pass: this path decodes the whole frame (as RGBA) into one buffer
/// before encoding it non-interlaced. The buffer is bounded by `max_conversion_bytes` (checked
/// from the header by [`decode`] before this runs) and by the dimension limit; validation
/// itself still runs row by row.
fn convert_interlaced(
    reader: &mut png::Reader<Cursor<&[u8]>>,
    header: &Header,
    layout: RowLayout,
    rules: &PngRules,
    note: &mut impl FnMut(&[u8]),
    cancel: &Cancel,
) -> Result<CappedBuf, PngRejection> {
    let pixel = 4 * layout.bps;
    let stride = header.width as usize * pixel;
    let mut image = vec![0u8; stride * header.height as usize];
    let mut rgba = vec![0u8; stride];
    let bits_per_pixel = u8::try_from(pixel * 8).unwrap_or(u8::MAX);
    let mut rows = 0u64;
    while let Some(row) = next_row(reader, cancel)? {
        let data = row.data();
        note(data);
        let pass_pixels = data.len() / (layout.channels() * layout.bps);
        let out = &mut rgba[..pass_pixels * pixel];
        layout.to_rgba(data, out);
        match row.interlace() {
            png::InterlaceInfo::Adam7(info) => {
                png::expand_interlaced_row(&mut image, stride, out, info, bits_per_pixel)
            }
            png::InterlaceInfo::Null(_) => {
                return Err(corrupt("interlaced image delivered a non-interlaced row"));
            }
        }
        rows += 1;
    }
    check_row_count(header, rows)?;

    let mut sink = CappedBuf::new(rules.max_bytes);
    {
        let mut writer = rgba_encoder(&mut sink, header, layout)
            .write_header()
            .map_err(encoding_error)?;
        writer.write_image_data(&image).map_err(encoding_error)?;
        writer.finish().map_err(encoding_error)?;
    }
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{RawPng as Img, assemble, chunk, iend, ihdr, zlib_stored};

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
