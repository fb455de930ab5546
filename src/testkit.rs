//! Image fixtures built in code (no binary blobs), shared by the unit tests (`cfg(test)`), the
//! integration tests and the benches (the `testkit` feature, which `[dev-dependencies]` turns
//! on through a dependency of the crate on itself). Not part of the gateway.
//!
//! - PNG through `png::Encoder` ([`png_with`], [`png_raw_rows`] and the ready-made images:
//!   [`rgba_png`], [`rgb_png`], [`gray_alpha_png`], [`rgba16_png`], [`interlaced_rgba_png`],
//!   [`rgba_png_noisy`], [`gray_png`], [`palette_png`], ...), broken on purpose ([`bomb_png`],
//!   [`header_only_png`], [`with_bad_crc`], [`truncated_idat`]), framed by hand ([`chunk`],
//!   [`ihdr`], [`assemble`]), and decoded for assertions ([`decode`]).
//! - PNG written entirely by hand: [`RawPng`] (any color type, bit depth, PLTE/tRNS, Adam7;
//!   stored deflate blocks), for the PNG checker's own tests.
//! - JPEG ([`jpeg`], [`jpeg_with`], [`jpeg_progressive`], [`jpeg_claiming`]) and WebP
//!   ([`webp_lossless`], [`webp_vp8x`], and the RIFF pieces to build odd files by hand).
//!
//! Non-interlaced images are written with `png::Encoder`. png 0.18 cannot write
//! Adam7-interlaced images, so interlaced files are assembled by hand here: filter-0
//! scanlines per Adam7 pass, compressed with `fdeflate` (zlib format), framed with
//! [`chunk`].
//!
//! Sample layout used by every builder: samples are big-endian (16-bit samples take two
//! bytes, high byte first) in PNG channel order (gray; gray, alpha; R, G, B; R, G, B, A;
//! palette index). Rows given to [`png_raw_rows`] are *packed, unfiltered* scanlines
//! without the filter-type byte: `ceil(width * bits_per_pixel / 8)` bytes each, sub-byte
//! samples packed most-significant bits first, as in the PNG spec.

/// The end user whose request makes the forwarding task panic once the upstream has answered
/// (only in builds with this module: tests and the `testkit` feature, never a release build).
/// Proves that a panicking forwarding task still completes its record and settles its quota.
pub const PANIC_AFTER_SEND_USER: &str = "imagegate-testkit-panic-after-send";

/// End users whose name starts with this hold their image check right after it said that the
/// body may go upstream while it runs (cut-through), until [`release_check`] is called with
/// their name or their caller leaves: a test sees the upload in flight before the check ends,
/// whatever the machine's speed. Only in builds with this module.
pub const HOLD_CHECK_PREFIX: &str = "imagegate-testkit-hold-check-";

static RELEASED_CHECKS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static RELEASE: std::sync::Condvar = std::sync::Condvar::new();

/// Let the held check of end user `user` (see [`HOLD_CHECK_PREFIX`]) go on.
pub fn release_check(user: &str) {
    let mut released = RELEASED_CHECKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    released.push(user.to_owned());
    RELEASE.notify_all();
}

/// Block this (blocking-pool) thread while `user` is held: until [`release_check`] or `cancel`.
pub(crate) fn hold_check(user: Option<&str>, cancel: &crate::edit::cancel::Cancel) {
    let Some(user) = user.filter(|u| u.starts_with(HOLD_CHECK_PREFIX)) else {
        return;
    };
    let mut released = RELEASED_CHECKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while !released.iter().any(|u| u == user) && !cancel.is_cancelled() {
        // Woken by a release; the timeout only lets a cancellation be seen.
        released = RELEASE
            .wait_timeout(released, std::time::Duration::from_millis(20))
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

use std::io::Cursor;

use bytes::Bytes;
use png::{BitDepth, ColorType};

/// The 8-byte PNG file signature.
pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

// ---------------------------------------------------------------------------------------
// CRC-32 (ISO-HDLC, as PNG uses it)
// ---------------------------------------------------------------------------------------

const CRC_TABLE: [u32; 256] = make_crc_table();

const fn make_crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

/// CRC-32 as used by PNG chunks (computed over chunk type + chunk data).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

// ---------------------------------------------------------------------------------------
// Chunk-level helpers
// ---------------------------------------------------------------------------------------

/// One framed chunk: 4-byte big-endian length, type, data, correct CRC.
pub fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc_input = Vec::with_capacity(data.len() + 4);
    crc_input.extend_from_slice(kind);
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    out
}

/// A complete IHDR chunk. Raw numbers, so invalid combinations can be produced on purpose
/// (`color_type`: 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA; `interlace`: 0 or 1).
pub fn ihdr(width: u32, height: u32, bit_depth: u8, color_type: u8, interlace: u8) -> Vec<u8> {
    let mut data = Vec::with_capacity(13);
    data.extend_from_slice(&width.to_be_bytes());
    data.extend_from_slice(&height.to_be_bytes());
    data.extend_from_slice(&[bit_depth, color_type, 0, 0, interlace]);
    chunk(b"IHDR", &data)
}

/// A chunk as found in a file by [`chunks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawChunk {
    /// Byte offset of the chunk's length field in the file.
    pub offset: usize,
    pub kind: [u8; 4],
    pub data: Vec<u8>,
    /// The CRC stored in the file (not recomputed).
    pub crc: u32,
}

impl RawChunk {
    /// Whether the stored CRC matches type + data.
    pub fn crc_ok(&self) -> bool {
        let mut v = self.kind.to_vec();
        v.extend_from_slice(&self.data);
        crc32(&v) == self.crc
    }

    /// Total framed length (12 + data).
    pub fn framed_len(&self) -> usize {
        self.data.len() + 12
    }
}

/// Splits a PNG file into its chunks (after the 8-byte signature). Stops silently at the
/// first chunk whose framing runs past the end of the input. Does not check CRCs.
pub fn chunks(png: &[u8]) -> Vec<RawChunk> {
    let mut out = Vec::new();
    let mut pos = PNG_SIGNATURE.len().min(png.len());
    while pos + 12 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let Some(end) = pos.checked_add(12).and_then(|v| v.checked_add(len)) else {
            break;
        };
        if end > png.len() {
            break;
        }
        let kind: [u8; 4] = png[pos + 4..pos + 8].try_into().unwrap();
        let data = png[pos + 8..pos + 8 + len].to_vec();
        let crc = u32::from_be_bytes(png[pos + 8 + len..end].try_into().unwrap());
        out.push(RawChunk {
            offset: pos,
            kind,
            data,
            crc,
        });
        pos = end;
    }
    out
}

/// Signature followed by the given already-framed chunks (e.g. from [`chunk`], [`ihdr`]).
pub fn assemble(framed_chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut out = PNG_SIGNATURE.to_vec();
    for c in framed_chunks {
        out.extend_from_slice(c);
    }
    out
}

/// zlib-compresses `data` (fdeflate; zlib header and Adler-32 included).
pub fn zlib(data: &[u8]) -> Vec<u8> {
    fdeflate::compress_to_vec(data)
}

// ---------------------------------------------------------------------------------------
// Generic builders
// ---------------------------------------------------------------------------------------

fn bits_per_pixel(color: ColorType, depth: BitDepth) -> usize {
    color.samples() * depth as usize
}

/// Packed row length in bytes (without the filter byte).
pub fn row_bytes(width: u32, color: ColorType, depth: BitDepth) -> usize {
    (width as usize * bits_per_pixel(color, depth)).div_ceil(8)
}

/// Appends values of `bits` bits (1, 2 or 4) MSB-first.
struct BitPacker {
    out: Vec<u8>,
    acc: u8,
    used: usize,
    bits: usize,
}

impl BitPacker {
    fn new(bits: usize) -> Self {
        BitPacker {
            out: Vec::new(),
            acc: 0,
            used: 0,
            bits,
        }
    }
    fn push(&mut self, value: u8) {
        let mask = ((1u16 << self.bits) - 1) as u8;
        self.acc |= (value & mask) << (8 - self.bits - self.used);
        self.used += self.bits;
        if self.used == 8 {
            self.out.push(self.acc);
            self.acc = 0;
            self.used = 0;
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.out.push(self.acc);
        }
        self.out
    }
}

/// Pixel `x` of a packed row: its bytes (>= 8 bpp) or its sub-byte value.
fn get_pixel(row: &[u8], x: usize, bpp: usize) -> PixelRef<'_> {
    if bpp >= 8 {
        let n = bpp / 8;
        PixelRef::Bytes(&row[x * n..x * n + n])
    } else {
        let bit = x * bpp;
        let byte = row[bit / 8];
        let shift = 8 - bpp - (bit % 8);
        PixelRef::Small((byte >> shift) & (((1u16 << bpp) - 1) as u8))
    }
}

enum PixelRef<'a> {
    Bytes(&'a [u8]),
    Small(u8),
}

/// Adam7 passes: (x0, y0, dx, dy).
const ADAM7: [(usize, usize, usize, usize); 7] = [
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
];

/// Filter-0 scanlines of all Adam7 passes (the uncompressed IDAT payload).
fn adam7_payload(width: usize, height: usize, bpp: usize, rows: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (x0, y0, dx, dy) in ADAM7 {
        if x0 >= width || y0 >= height {
            continue; // empty pass: no scanlines at all
        }
        for row in rows.iter().skip(y0).step_by(dy) {
            out.push(0);
            if bpp >= 8 {
                for x in (x0..width).step_by(dx) {
                    if let PixelRef::Bytes(b) = get_pixel(row, x, bpp) {
                        out.extend_from_slice(b);
                    }
                }
            } else {
                let mut p = BitPacker::new(bpp);
                for x in (x0..width).step_by(dx) {
                    if let PixelRef::Small(v) = get_pixel(row, x, bpp) {
                        p.push(v);
                    }
                }
                out.extend_from_slice(&p.finish());
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn encode_with_encoder(
    width: u32,
    height: u32,
    color: ColorType,
    depth: BitDepth,
    trns: Option<Vec<u8>>,
    palette: Option<Vec<u8>>,
    data: &[u8],
    filter: Option<png::Filter>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(Cursor::new(&mut out), width, height);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some(p) = palette {
            enc.set_palette(p);
        }
        if let Some(t) = trns {
            enc.set_trns(t);
        }
        if let Some(f) = filter {
            enc.set_filter(f);
        }
        let mut w = enc.write_header().expect("png header");
        w.write_image_data(data).expect("png image data");
        w.finish().expect("png finish");
    }
    out
}

/// Generic builder from whole packed, unfiltered rows (see the module docs for the layout).
/// `rows.len()` must equal `height` and each row must be exactly [`row_bytes`] long.
/// `palette` is written as PLTE (RGB triples), `trns` as tRNS, both verbatim.
/// Interlaced files are written by hand (Adam7, filter 0, fdeflate); others by `png::Encoder`.
#[allow(clippy::too_many_arguments)]
pub fn png_raw_rows(
    width: u32,
    height: u32,
    color: ColorType,
    depth: BitDepth,
    interlaced: bool,
    trns: Option<Vec<u8>>,
    palette: Option<Vec<u8>>,
    rows: Vec<Vec<u8>>,
) -> Vec<u8> {
    let rb = row_bytes(width, color, depth);
    assert_eq!(
        rows.len(),
        height as usize,
        "png_raw_rows: need one row per line"
    );
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(
            r.len(),
            rb,
            "png_raw_rows: row {i} has {} bytes, expected {rb}",
            r.len()
        );
    }
    if !interlaced {
        let data = rows.concat();
        return encode_with_encoder(width, height, color, depth, trns, palette, &data, None);
    }
    let bpp = bits_per_pixel(color, depth);
    let payload = adam7_payload(width as usize, height as usize, bpp, &rows);
    let mut framed = vec![ihdr(width, height, depth as u8, color as u8, 1)];
    if let Some(p) = palette {
        framed.push(chunk(b"PLTE", &p));
    }
    if let Some(t) = trns {
        framed.push(chunk(b"tRNS", &t));
    }
    framed.push(chunk(b"IDAT", &zlib(&payload)));
    framed.push(chunk(b"IEND", &[]));
    assemble(&framed)
}

/// Generic builder from a per-pixel function.
///
/// `pixel(x, y)` returns the raw sample bytes of one pixel:
/// - bit depth 8: one byte per sample (`ColorType::samples()` bytes);
/// - bit depth 16: two big-endian bytes per sample;
/// - bit depth 1, 2 or 4 (gray or palette only): exactly ONE byte holding the sample value
///   (gray level or palette index) in its low bits; the builder packs it MSB-first.
#[allow(clippy::too_many_arguments)]
pub fn png_with(
    width: u32,
    height: u32,
    color: ColorType,
    depth: BitDepth,
    interlaced: bool,
    trns: Option<Vec<u8>>,
    palette: Option<Vec<u8>>,
    pixel: impl Fn(u32, u32) -> Vec<u8>,
) -> Vec<u8> {
    let bpp = bits_per_pixel(color, depth);
    let mut rows = Vec::with_capacity(height as usize);
    for y in 0..height {
        if bpp >= 8 {
            let mut row = Vec::with_capacity(row_bytes(width, color, depth));
            for x in 0..width {
                let px = pixel(x, y);
                assert_eq!(
                    px.len(),
                    bpp / 8,
                    "png_with: pixel ({x},{y}) has wrong byte count"
                );
                row.extend_from_slice(&px);
            }
            rows.push(row);
        } else {
            let mut p = BitPacker::new(depth as usize);
            for x in 0..width {
                let px = pixel(x, y);
                assert_eq!(px.len(), 1, "png_with: sub-byte pixel must be one byte");
                p.push(px[0]);
            }
            rows.push(p.finish());
        }
    }
    png_raw_rows(width, height, color, depth, interlaced, trns, palette, rows)
}

// ---------------------------------------------------------------------------------------
// Ready-made images
// ---------------------------------------------------------------------------------------

fn hash(x: u32, y: u32) -> u32 {
    let mut h = x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^ (h >> 15)
}

/// The transparent block used by [`rgba_png`] and [`interlaced_rgba_png`]: pixel (0,0) plus
/// the square `[side/4, side/4 + max(1, side/8))` on both axes.
pub fn in_transparent_block(side: u32, x: u32, y: u32) -> bool {
    let start = side / 4;
    let end = start + (side / 8).max(1);
    (x == 0 && y == 0) || ((start..end).contains(&x) && (start..end).contains(&y))
}

/// The RGBA8 pixels of [`rgba_png`], row-major, 4 bytes per pixel.
pub fn rgba_pixels(side: u32, transparent: bool) -> Vec<u8> {
    let mut data = Vec::with_capacity(side as usize * side as usize * 4);
    let scale = side.max(1);
    for y in 0..side {
        for x in 0..side {
            let h = hash(x, y);
            let r = ((x * 255 / scale) as u8) ^ (h as u8 & 0x0F);
            let g = ((y * 255 / scale) as u8) ^ ((h >> 8) as u8 & 0x0F);
            let b = ((h >> 16) as u8) & 0x3F;
            let a = if transparent && in_transparent_block(side, x, y) {
                0
            } else {
                255
            };
            data.extend_from_slice(&[r, g, b, a]);
        }
    }
    data
}

/// RGBA8 square with a deterministic gradient + hash pattern. When `transparent`, pixel
/// (0,0) and a small block (see [`in_transparent_block`]) have alpha 0; every other pixel
/// has alpha 255.
pub fn rgba_png(side: u32, transparent: bool) -> Vec<u8> {
    let data = rgba_pixels(side, transparent);
    encode_with_encoder(
        side,
        side,
        ColorType::Rgba,
        BitDepth::Eight,
        None,
        None,
        &data,
        None,
    )
}

/// The same pixels as `rgba_png(side, true)`, written Adam7-interlaced (by hand).
pub fn interlaced_rgba_png(side: u32) -> Vec<u8> {
    let data = rgba_pixels(side, true);
    let rows = data.chunks(side as usize * 4).map(<[u8]>::to_vec).collect();
    png_raw_rows(
        side,
        side,
        ColorType::Rgba,
        BitDepth::Eight,
        true,
        None,
        None,
        rows,
    )
}

/// Side of the alpha-0 top-left corner block of [`rgba_png_noisy`]: `max(1, side / 16)`.
pub fn noisy_corner(side: u32) -> u32 {
    (side / 16).max(1)
}

/// RGBA8 square of xorshift noise in RGB (the top 3 bits of R and G and the top 2 bits of B
/// are random, the rest zero; no filter), about 1.57 MB (1,569,570 bytes) at 1024x1024;
/// alpha 0 in the top-left [`noisy_corner`] x [`noisy_corner`] block, 255 elsewhere.
/// Deterministic.
pub fn rgba_png_noisy(side: u32) -> Vec<u8> {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let corner = noisy_corner(side);
    let mut data = Vec::with_capacity(side as usize * side as usize * 4);
    for y in 0..side {
        for x in 0..side {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let r = (state as u8) & 0xE0;
            let g = ((state >> 8) as u8) & 0xE0;
            let b = ((state >> 16) as u8) & 0xC0;
            let a = if x < corner && y < corner { 0 } else { 255 };
            data.extend_from_slice(&[r, g, b, a]);
        }
    }
    encode_with_encoder(
        side,
        side,
        ColorType::Rgba,
        BitDepth::Eight,
        None,
        None,
        &data,
        Some(png::Filter::NoFilter),
    )
}

/// RGB8 square (no alpha, no tRNS), deterministic pattern.
pub fn rgb_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Rgb,
        BitDepth::Eight,
        false,
        None,
        None,
        |x, y| {
            let h = hash(x, y);
            vec![
                (x as u8) ^ (h as u8 & 0x0F),
                (y as u8) ^ ((h >> 8) as u8 & 0x0F),
                (h >> 16) as u8 & 0x3F,
            ]
        },
    )
}

/// Gray+alpha 8-bit square (Pillow mode LA); pixel (0,0) has alpha 0, the rest 255.
pub fn gray_alpha_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::GrayscaleAlpha,
        BitDepth::Eight,
        false,
        None,
        None,
        |x, y| {
            let a = if x == 0 && y == 0 { 0 } else { 255 };
            vec![(hash(x, y) as u8) & 0x7F, a]
        },
    )
}

/// RGBA 16-bit square; pixel (0,0) has alpha 0, the rest 0xFFFF.
pub fn rgba16_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Rgba,
        BitDepth::Sixteen,
        false,
        None,
        None,
        |x, y| {
            let h = hash(x, y);
            let a: u16 = if x == 0 && y == 0 { 0 } else { 0xFFFF };
            let mut v = Vec::with_capacity(8);
            v.extend_from_slice(&(h as u16).to_be_bytes());
            v.extend_from_slice(&((h >> 16) as u16).to_be_bytes());
            v.extend_from_slice(&((x * 64 + y) as u16).to_be_bytes());
            v.extend_from_slice(&a.to_be_bytes());
            v
        },
    )
}

/// A PNG that declares `side` x `side` RGBA8 but is only a few hundred bytes: signature,
/// IHDR, one IDAT holding a complete, valid zlib stream of the first
/// `1 + min(4 * side, 256)` filtered bytes (all zero: filter 0 + transparent black), IEND.
/// A full decode therefore runs out of data; a gateway must refuse it from the IHDR alone.
pub fn bomb_png(side: u32) -> Vec<u8> {
    let n = 1 + (side as usize).saturating_mul(4).min(256);
    assemble(&[
        ihdr(side, side, 8, ColorType::Rgba as u8, 0),
        chunk(b"IDAT", &zlib(&vec![0u8; n])),
        chunk(b"IEND", &[]),
    ])
}

/// Copy of `png` with the last byte of the first IDAT's CRC inverted (data and framing
/// untouched). Panics if there is no IDAT.
pub fn with_bad_crc(png: &[u8]) -> Vec<u8> {
    let idat = chunks(png)
        .into_iter()
        .find(|c| &c.kind == b"IDAT")
        .expect("with_bad_crc: no IDAT chunk");
    let crc_last = idat.offset + 8 + idat.data.len() + 3;
    let mut out = png.to_vec();
    out[crc_last] ^= 0xFF;
    out
}

/// Copy of `png` whose image data is cut short: all IDAT data is concatenated, its first
/// half (rounded down) is written as a single IDAT with a correct length and CRC where the
/// first IDAT was, further IDATs are dropped; all other chunks are kept byte for byte. The
/// file is well framed with valid CRCs, so only decoding (inflate / row count) fails.
pub fn truncated_idat(png: &[u8]) -> Vec<u8> {
    let all = chunks(png);
    let data: Vec<u8> = all
        .iter()
        .filter(|c| &c.kind == b"IDAT")
        .flat_map(|c| c.data.iter().copied())
        .collect();
    assert!(!data.is_empty(), "truncated_idat: no IDAT data");
    let mut out = PNG_SIGNATURE.to_vec();
    let mut wrote_idat = false;
    for c in &all {
        if &c.kind == b"IDAT" {
            if !wrote_idat {
                out.extend_from_slice(&chunk(b"IDAT", &data[..data.len() / 2]));
                wrote_idat = true;
            }
        } else {
            out.extend_from_slice(&png[c.offset..c.offset + c.framed_len()]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Decoding (for assertions)
// ---------------------------------------------------------------------------------------

/// A fully decoded image, without any transformation (raw samples as stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedPng {
    pub width: u32,
    pub height: u32,
    pub color_type: ColorType,
    pub bit_depth: BitDepth,
    pub interlaced: bool,
    pub palette: Option<Vec<u8>>,
    pub trns: Option<Vec<u8>>,
    /// Bytes per row in `data` (packed, like [`row_bytes`]).
    pub line_size: usize,
    /// De-interlaced, unfiltered rows, concatenated.
    pub data: Vec<u8>,
}

/// Decodes the first image with the png crate (identity transformations).
pub fn decode(png: &[u8]) -> Result<DecodedPng, String> {
    let mut dec = png::Decoder::new(Cursor::new(png));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| format!("read_info: {e}"))?;
    let size = reader
        .output_buffer_size()
        .ok_or("output buffer size overflow")?;
    let mut buf = vec![0u8; size];
    let out = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("next_frame: {e}"))?;
    buf.truncate(out.line_size * out.height as usize);
    let info = reader.info();
    Ok(DecodedPng {
        width: out.width,
        height: out.height,
        color_type: out.color_type,
        bit_depth: out.bit_depth,
        interlaced: info.interlaced,
        palette: info.palette.as_ref().map(|p| p.to_vec()),
        trns: info.trns.as_ref().map(|t| t.to_vec()),
        line_size: out.line_size,
        data: buf,
    })
}

// ---------------------------------------------------------------------------------------
// More ready-made PNGs (the gateway's field and image rules)
// ---------------------------------------------------------------------------------------

/// A valid, transparent 64x64 RGBA PNG of exactly `total` bytes: a private ancillary `prVt`
/// chunk right after IHDR pads it.
pub fn png_of_size(total: usize) -> Vec<u8> {
    let base = rgba_png(64, true);
    let parts = chunks(&base);
    let after_ihdr = parts[0].offset + parts[0].framed_len();
    assert_eq!(&parts[0].kind, b"IHDR");
    let pad = total - base.len() - 12;
    let mut out = base[..after_ihdr].to_vec();
    out.extend_from_slice(&chunk(b"prVt", &vec![0x5A; pad]));
    out.extend_from_slice(&base[after_ihdr..]);
    assert_eq!(out.len(), total);
    decode(&out).expect("the padded fixture is a valid PNG");
    out
}

/// The start of a JFIF file (SOI, an APP0 segment, filler, EOI): not a PNG, and not a
/// decodable JPEG either.
pub fn jfif_stub() -> Vec<u8> {
    let mut v = vec![
        0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00,
    ];
    v.extend(std::iter::repeat_n(0x42, 2000));
    v.extend_from_slice(&[0xFF, 0xD9]);
    v
}

/// 64x32 RGBA with a transparent pixel.
pub fn rgba_png_64x32() -> Vec<u8> {
    png_with(
        64,
        32,
        ColorType::Rgba,
        BitDepth::Eight,
        false,
        None,
        None,
        |x, y| vec![x as u8, y as u8, 7, if x == 0 && y == 0 { 0 } else { 255 }],
    )
}

/// 64x32 RGB, no transparency.
pub fn rgb_png_64x32() -> Vec<u8> {
    png_with(
        64,
        32,
        ColorType::Rgb,
        BitDepth::Eight,
        false,
        None,
        None,
        |x, y| vec![x as u8, y as u8, 9],
    )
}

/// Gray 8-bit without alpha or tRNS (Pillow mode L).
pub fn gray_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Grayscale,
        BitDepth::Eight,
        false,
        None,
        None,
        |x, y| vec![(x * 3 + y) as u8],
    )
}

/// Palette 8-bit without tRNS (Pillow mode P).
pub fn palette_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Indexed,
        BitDepth::Eight,
        false,
        None,
        Some(vec![255, 0, 0, 0, 255, 0]),
        |x, _| vec![u8::from(x > 3)],
    )
}

/// Gray 16-bit (Pillow mode `I;16`), opaque.
pub fn gray16_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Grayscale,
        BitDepth::Sixteen,
        false,
        None,
        None,
        |x, y| ((x * 1000 + y) as u16).to_be_bytes().to_vec(),
    )
}

/// Gray at bit depth 1, 2 or 4 (Pillow modes `1` at depth 1, `L` otherwise), no tRNS.
pub fn gray_low_depth_png(side: u32, depth: BitDepth) -> Vec<u8> {
    let max = (1u16 << depth as u8) - 1;
    png_with(
        side,
        side,
        ColorType::Grayscale,
        depth,
        false,
        None,
        None,
        |x, y| vec![((x + y) as u16 % (max + 1)) as u8],
    )
}

/// RGBA 16-bit: pixel (0, 0) has alpha `alpha`, every other pixel 0xFFFF.
pub fn rgba16_alpha(side: u32, alpha: u16) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Rgba,
        BitDepth::Sixteen,
        false,
        None,
        None,
        |x, y| {
            let a = if x == 0 && y == 0 { alpha } else { 0xFFFF };
            [1000u16, (x * 100) as u16, (y * 100) as u16, a]
                .iter()
                .flat_map(|v| v.to_be_bytes())
                .collect()
        },
    )
}

/// An APNG of two RGBA frames: the default image (IDAT) is the first frame, transparent in
/// places or not; the second (fdAT) has alpha `second_alpha` everywhere and must be ignored.
pub fn apng(side: u32, first_transparent: bool, second_alpha: u8) -> Vec<u8> {
    let base = rgba_png(side, first_transparent);
    let parts = chunks(&base);
    let fctl = |seq: u32| {
        let mut d = Vec::with_capacity(26);
        for v in [seq, side, side, 0, 0] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        d.extend_from_slice(&[0, 1, 0, 10, 0, 0]);
        chunk(b"fcTL", &d)
    };
    let mut actl = 2u32.to_be_bytes().to_vec();
    actl.extend_from_slice(&0u32.to_be_bytes());
    let rows: Vec<u8> = (0..side)
        .flat_map(|_| {
            std::iter::once(0u8).chain(std::iter::repeat_n(second_alpha, side as usize * 4))
        })
        .collect();
    let mut fdat = 2u32.to_be_bytes().to_vec();
    fdat.extend_from_slice(&zlib(&rows));
    let mut framed = Vec::new();
    for c in &parts {
        let raw = base[c.offset..c.offset + c.framed_len()].to_vec();
        match &c.kind {
            b"IDAT" if framed.iter().all(|f: &Vec<u8>| &f[4..8] != b"IDAT") => {
                framed.push(chunk(b"acTL", &actl));
                framed.push(fctl(0));
                framed.push(raw);
            }
            b"IEND" => {
                framed.push(fctl(1));
                framed.push(chunk(b"fdAT", &fdat));
                framed.push(raw);
            }
            _ => framed.push(raw),
        }
    }
    assemble(&framed)
}

/// A header-only RGBA PNG of `w` x `h` (IHDR, a tiny IDAT, IEND): refused from IHDR alone.
pub fn header_only_png(w: u32, h: u32) -> Vec<u8> {
    assemble(&[
        ihdr(w, h, 8, ColorType::Rgba as u8, 0),
        chunk(b"IDAT", &zlib(&[0u8; 257])),
        chunk(b"IEND", &[]),
    ])
}

// ---------------------------------------------------------------------------------------
// PNG written entirely by hand (stored deflate blocks)
// ---------------------------------------------------------------------------------------

/// The IEND chunk.
pub fn iend() -> Vec<u8> {
    chunk(b"IEND", &[])
}

/// Adler-32, as the zlib trailer uses it.
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A zlib stream of stored (uncompressed) deflate blocks.
pub fn zlib_stored(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if raw.is_empty() {
        vec![&[][..]]
    } else {
        raw.chunks(65535).collect()
    };
    let last = blocks.len() - 1;
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i == last));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(raw).to_be_bytes());
    out
}

/// Samples per pixel of a PNG color type (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA).
pub fn channels(color_type: u8) -> usize {
    match color_type {
        0 | 3 => 1,
        2 => 3,
        4 => 2,
        6 => 4,
        _ => panic!("bad color type"),
    }
}

/// A square test image written entirely by hand: samples are stored per pixel ([`channels`]
/// values each, in the PNG's depth), rows are filter 0, IDAT is ONE chunk of stored
/// (uncompressed) deflate blocks ([`zlib_stored`]), interlaced images are Adam7 by hand. Any
/// color type and bit depth, optional PLTE and tRNS written verbatim. Chunks: IHDR, PLTE?,
/// tRNS?, IDAT, IEND.
#[derive(Clone)]
pub struct RawPng {
    pub width: u32,
    pub height: u32,
    pub color_type: u8,
    pub depth: u8,
    pub interlaced: bool,
    pub samples: Vec<u16>,
    pub plte: Option<Vec<u8>>,
    pub trns: Option<Vec<u8>>,
}

impl RawPng {
    /// A `size` x `size` image; `pixel(x, y)` gives the samples of one pixel.
    pub fn new(
        size: u32,
        color_type: u8,
        depth: u8,
        mut pixel: impl FnMut(u32, u32) -> Vec<u16>,
    ) -> RawPng {
        let mut samples = Vec::new();
        for y in 0..size {
            for x in 0..size {
                let px = pixel(x, y);
                assert_eq!(px.len(), channels(color_type));
                samples.extend(px);
            }
        }
        RawPng {
            width: size,
            height: size,
            color_type,
            depth,
            interlaced: false,
            samples,
            plte: None,
            trns: None,
        }
    }

    /// Write it Adam7-interlaced.
    pub fn interlaced(mut self) -> RawPng {
        self.interlaced = true;
        self
    }

    /// Add a PLTE chunk (RGB triples).
    pub fn plte(mut self, plte: Vec<u8>) -> RawPng {
        self.plte = Some(plte);
        self
    }

    /// Add a tRNS chunk.
    pub fn trns(mut self, trns: Vec<u8>) -> RawPng {
        self.trns = Some(trns);
        self
    }

    /// The samples of pixel (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> &[u16] {
        let c = channels(self.color_type);
        let i = (y * self.width + x) as usize * c;
        &self.samples[i..i + c]
    }

    /// One filter-0 scanline of the pixels `xs` of row `y`.
    pub fn pack(&self, xs: &[u32], y: u32) -> Vec<u8> {
        let values: Vec<u16> = xs.iter().flat_map(|&x| self.pixel(x, y).to_vec()).collect();
        let mut out = vec![0u8]; // filter type None
        match self.depth {
            16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_be_bytes())),
            8 => values.iter().for_each(|&v| out.push(v as u8)),
            d => {
                let per_byte = 8 / usize::from(d);
                for group in values.chunks(per_byte) {
                    let mut byte = 0u8;
                    for (i, &v) in group.iter().enumerate() {
                        byte |= (v as u8) << (8 - usize::from(d) * (i + 1));
                    }
                    out.push(byte);
                }
            }
        }
        out
    }

    /// Filtered scanlines (filter 0), Adam7 passes when interlaced.
    pub fn raw(&self) -> Vec<u8> {
        let mut raw = Vec::new();
        if !self.interlaced {
            let xs: Vec<u32> = (0..self.width).collect();
            for y in 0..self.height {
                raw.extend(self.pack(&xs, y));
            }
            return raw;
        }
        for (x0, y0, dx, dy) in [
            (0, 0, 8, 8),
            (4, 0, 8, 8),
            (0, 4, 4, 8),
            (2, 0, 4, 4),
            (0, 2, 2, 4),
            (1, 0, 2, 2),
            (0, 1, 1, 2),
        ] {
            let xs: Vec<u32> = (x0..self.width).step_by(dx).collect();
            if xs.is_empty() {
                continue;
            }
            for y in (y0..self.height).step_by(dy) {
                raw.extend(self.pack(&xs, y));
            }
        }
        raw
    }

    /// IHDR, PLTE?, tRNS?, IDAT, IEND.
    pub fn chunks(&self) -> Vec<Vec<u8>> {
        let mut chunks = vec![ihdr(
            self.width,
            self.height,
            self.depth,
            self.color_type,
            u8::from(self.interlaced),
        )];
        if let Some(plte) = &self.plte {
            chunks.push(chunk(b"PLTE", plte));
        }
        if let Some(trns) = &self.trns {
            chunks.push(chunk(b"tRNS", trns));
        }
        chunks.push(chunk(b"IDAT", &zlib_stored(&self.raw())));
        chunks.push(iend());
        chunks
    }

    /// The whole file.
    pub fn bytes(&self) -> Bytes {
        Bytes::from(assemble(&self.chunks()))
    }
}

// ---------------------------------------------------------------------------------------
// PNG from raw 8-bit samples, any width and height
// ---------------------------------------------------------------------------------------

/// A PNG (`png::Encoder`) with raw samples `data` (PNG layout, 8 bits), optional PLTE and tRNS.
pub fn png_samples(
    width: u32,
    height: u32,
    color: ColorType,
    data: &[u8],
    palette: Option<&[u8]>,
    trns: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(BitDepth::Eight);
        if let Some(palette) = palette {
            encoder.set_palette(palette.to_vec());
        }
        if let Some(trns) = trns {
            encoder.set_trns(trns.to_vec());
        }
        let mut writer = encoder.write_header().expect("PNG header");
        writer.write_image_data(data).expect("PNG data");
        writer.finish().expect("PNG end");
    }
    out
}

/// `width` x `height` RGBA8 with alpha 255 everywhere except the pixels listed, which get alpha 0.
pub fn rgba_png_holes(width: u32, height: u32, transparent: &[(u32, u32)]) -> Vec<u8> {
    let mut data = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let alpha = if transparent.contains(&(x, y)) {
                0
            } else {
                255
            };
            data.extend_from_slice(&[x as u8, y as u8, (x ^ y) as u8, alpha]);
        }
    }
    png_samples(width, height, ColorType::Rgba, &data, None, None)
}

/// `width` x `height` RGB8 without tRNS (the pattern of [`jpeg`]).
pub fn rgb_png_wh(width: u32, height: u32) -> Vec<u8> {
    png_samples(
        width,
        height,
        ColorType::Rgb,
        &rgb_pattern(width, height),
        None,
        None,
    )
}

// ---------------------------------------------------------------------------------------
// JPEG and WebP (GPT-image inputs)
// ---------------------------------------------------------------------------------------

/// A deterministic RGB8 pattern, 3 bytes per pixel, row-major.
fn rgb_pattern(width: u32, height: u32) -> Vec<u8> {
    (0..width * height)
        .flat_map(|i| {
            let v = i.wrapping_mul(2_654_435_761) >> 24;
            [v as u8, (i % 251) as u8, (i / 7) as u8]
        })
        .collect()
}

/// A JPEG from `jpeg-encoder` (quality 85, JFIF APP0): baseline (SOF0) or progressive (SOF2),
/// optionally with restart markers every `restart` MCUs.
pub fn jpeg_with(width: u16, height: u16, progressive: bool, restart: Option<u16>) -> Vec<u8> {
    let pixels = rgb_pattern(width.into(), height.into());
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 85);
    encoder.set_progressive(progressive);
    if let Some(interval) = restart {
        encoder.set_restart_interval(interval);
    }
    encoder
        .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
        .expect("encoding an in-memory RGB image cannot fail");
    out
}

/// A baseline JPEG (`jpeg-encoder`, quality 85, JFIF APP0, SOF0).
pub fn jpeg(width: u16, height: u16) -> Vec<u8> {
    jpeg_with(width, height, false, None)
}

/// A progressive JPEG (SOF2, several scans).
pub fn jpeg_progressive(width: u16, height: u16) -> Vec<u8> {
    jpeg_with(width, height, true, None)
}

/// `jpeg` with the frame header's width and height overwritten (e.g. 65535 x 65535: a
/// decompression-bomb header on a few hundred bytes).
pub fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg(8, 8);
    let sof = out
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("jpeg-encoder writes SOF0");
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

/// A lossless WebP in the simple format: `RIFF`, `WEBP`, one `VP8L` chunk (`image-webp`).
pub fn webp_lossless(width: u32, height: u32) -> Vec<u8> {
    let pixels: Vec<u8> = (0..width * height)
        .flat_map(|i| [(i * 7) as u8, (i >> 3) as u8, 0x55, (i % 3 * 100) as u8])
        .collect();
    let mut out = Vec::new();
    image_webp::WebPEncoder::new(&mut out)
        .encode(&pixels, width, height, image_webp::ColorType::Rgba8)
        .expect("in-memory lossless encoding cannot fail");
    out
}

/// A lossless WebP in the extended format: `VP8X` (canvas `width` x `height`), `VP8L`, and an
/// odd-sized `EXIF` chunk with its pad byte (`image-webp`, which wraps when metadata is set).
pub fn webp_vp8x(width: u32, height: u32) -> Vec<u8> {
    let pixels = rgb_pattern(width, height);
    let mut out = Vec::new();
    let mut encoder = image_webp::WebPEncoder::new(&mut out);
    encoder.set_exif_metadata(b"Exif\0\0odd".to_vec());
    encoder
        .encode(&pixels, width, height, image_webp::ColorType::Rgb8)
        .expect("in-memory lossless encoding cannot fail");
    out
}

/// One RIFF chunk: FourCC, little-endian size, body, a pad byte when the size is odd.
pub fn webp_chunk(fourcc: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = fourcc.to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    if body.len() % 2 == 1 {
        out.push(0);
    }
    out
}

/// `RIFF`, the correct size, `WEBP`, then the given framed chunks (see [`webp_chunk`]).
pub fn webp_riff(chunks: &[Vec<u8>]) -> Vec<u8> {
    let payload = chunks.concat();
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&payload);
    out
}

/// The body of a `VP8X` chunk: `flags` (0x02 animation, 0x10 alpha, ...), 24-bit width - 1
/// and height - 1 (`width`, `height` from 1 to 2^24).
pub fn webp_vp8x_body(flags: u8, width: u32, height: u32) -> Vec<u8> {
    let mut body = vec![flags, 0, 0, 0];
    body.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    body.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    body
}

/// The body of a lossy `VP8 ` chunk: a key-frame header (shown, version 0, a 7-byte first
/// partition), start code, 14-bit width and height, then filler. The header is valid; the
/// picture is not decodable, so only structural checks accept it.
pub fn webp_vp8_body(width: u16, height: u16) -> Vec<u8> {
    let partition = 7u32;
    let tag = (partition << 5) | (1 << 4);
    let mut body = tag.to_le_bytes()[..3].to_vec();
    body.extend_from_slice(&[0x9D, 0x01, 0x2A]);
    body.extend_from_slice(&width.to_le_bytes());
    body.extend_from_slice(&height.to_le_bytes());
    body.extend_from_slice(&[0x11; 9]);
    body
}

/// A hand-built extended WebP: `VP8X` with the given canvas and flags, then `image` chunks
/// as given (e.g. `[webp_chunk(b"VP8 ", &webp_vp8_body(w, h))]`, or an `ANIM` and `ANMF` for
/// an animation).
pub fn webp_vp8x_with(flags: u8, width: u32, height: u32, image: &[Vec<u8>]) -> Vec<u8> {
    let mut chunks = vec![webp_chunk(b"VP8X", &webp_vp8x_body(flags, width, height))];
    chunks.extend_from_slice(image);
    webp_riff(&chunks)
}
