//! Step 3: the chunk walk over the whole file, nothing decompressed.

use super::PngRejection;

// ---------------------------------------------------------------------------------------------
// Step 3: the chunk walk
// ---------------------------------------------------------------------------------------------

pub(super) const SIGNATURE: [u8; 8] = [137, 80, 78, 71, 13, 10, 26, 10];

/// What the chunk walk learned from IHDR and the chunks before IDAT.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(super) bit_depth: u8,
    pub(super) color_type: u8,
    pub(crate) interlaced: bool,
    pub(crate) has_trns: bool,
}

impl Header {
    /// Pillow's mode for the file as stored.
    pub(super) fn pillow_mode(&self) -> &'static str {
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
pub(super) enum IdatState {
    NotSeen,
    InSequence,
    Done,
}

pub(super) fn corrupt(detail: impl Into<String>) -> PngRejection {
    PngRejection::Corrupt(detail.into())
}

pub(super) fn chunk_name(ty: &[u8]) -> String {
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

pub(super) fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Walks every chunk without decompressing: lengths, CRCs, IHDR, PLTE/tRNS placement and
/// lengths, IDAT contiguity, the default image's fcTL, and IEND as the very last bytes.
pub(super) fn walk_chunks(data: &[u8]) -> Result<Header, PngRejection> {
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

pub(super) fn parse_ihdr(body: &[u8]) -> Result<Header, PngRejection> {
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
