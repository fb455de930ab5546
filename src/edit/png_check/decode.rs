//! Steps 7 and 8: the complete decode, the alpha scan, and the rows behind the conversion.

use std::fmt;
use std::io::{Cursor, Write};

use super::convert::{convert_interlaced, convert_streaming};
use super::walk::corrupt;
use super::{Cancel, Header, PngRejection, PngRules};
use png::{BitDepth, ColorType, DecodeOptions, Decoder, DecodingError, Limits, Transformations};

// ---------------------------------------------------------------------------------------------
// Steps 7 and 8: the complete decode, the alpha scan and the conversion
// ---------------------------------------------------------------------------------------------

pub(super) struct DecodeOutcome {
    pub(super) has_transparent_pixel: bool,
    /// The re-encoded RGBA PNG when a conversion was requested.
    pub(super) converted: Option<CappedBuf>,
}

/// Collects encoder output up to `limit` bytes and only counts beyond that, so a conversion that
/// ends up too large never holds more than the limit in memory.
pub(super) struct CappedBuf {
    pub(super) buf: Vec<u8>,
    pub(super) total: usize,
    pub(super) limit: usize,
}

impl CappedBuf {
    pub(super) fn new(limit: usize) -> Self {
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

pub(super) fn decoding_error(err: DecodingError) -> PngRejection {
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

pub(super) fn encoding_error(err: impl fmt::Display) -> PngRejection {
    // Cannot happen for well-formed rows into an in-memory sink; reported rather than panicking.
    corrupt(format!("re-encoding to RGBA failed: {err}"))
}

/// How the decoder's rows (after `EXPAND`) are laid out.
#[derive(Clone, Copy)]
pub(super) struct RowLayout {
    pub(super) color: ColorType,
    /// Bytes per sample: 1 or 2 (EXPAND turns sub-byte depths into 8 bits).
    pub(super) bps: usize,
}

impl RowLayout {
    pub(super) fn channels(self) -> usize {
        self.color.samples()
    }

    pub(super) fn has_alpha(self) -> bool {
        matches!(self.color, ColorType::GrayscaleAlpha | ColorType::Rgba)
    }

    /// True when some pixel of `row` has alpha exactly 0; at 16 bits only the high byte counts
    /// (as in Pillow, a 16-bit alpha below 256 is transparent).
    pub(super) fn has_transparent_pixel(self, row: &[u8]) -> bool {
        if !self.has_alpha() {
            return false;
        }
        let pixel = self.channels() * self.bps;
        let alpha_high = (self.channels() - 1) * self.bps;
        row.chunks_exact(pixel).any(|px| px[alpha_high] == 0)
    }

    /// Writes `row` as RGBA with the same sample size into `out` (which has the right length).
    pub(super) fn to_rgba(self, row: &[u8], out: &mut [u8]) {
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
pub(super) fn decode(
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
pub(super) fn row_reader<'a>(
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
pub(super) fn next_row<'r>(
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
pub(super) fn bytes_per_sample(header: &Header) -> usize {
    if header.bit_depth == 16 { 2 } else { 1 }
}

/// The RGBA frame an interlaced conversion holds (width × height × 4 or 8 bytes) must fit
/// `max_conversion_bytes`; checked from the header, before anything is allocated or decoded.
pub(super) fn within_conversion_budget(
    header: &Header,
    rules: &PngRules,
) -> Result<(), PngRejection> {
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

pub(super) fn check_row_count(header: &Header, rows: u64) -> Result<(), PngRejection> {
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
pub(super) fn adam7_row_count(width: u32, height: u32) -> u64 {
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
