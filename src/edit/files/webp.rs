//! The WebP container walk (`gpt-image-models.md` §9 I3), in one pass, reading no pixel.
//!
//! - `RIFF` size + 8 must equal the file length exactly: the header states the length, so any
//!   difference is truncation or a wrong header.
//! - Every chunk is framed inside the RIFF payload; a chunk of odd size is followed by one pad
//!   byte (its value is not checked, as decoders ignore it). The pad of the very last chunk
//!   may be missing when the RIFF size does not count it: libwebp decodes such files.
//! - The first chunk decides the layout:
//!   - `VP8 ` (lossy): a key frame that is shown, version 0–3, the first partition inside the
//!     chunk, start code `9D 01 2A`, 14-bit width and height (the 2 scale bits are ignored);
//!   - `VP8L` (lossless): signature `0x2F`, 14-bit width − 1 and height − 1, version 0;
//!   - `VP8X` (extended, 10 bytes): 24-bit canvas width − 1 and height − 1; an animation
//!     (flag bit 1) needs an `ANMF` chunk, a still image its `VP8 `/`VP8L` chunk, whose header
//!     is checked as above and whose size must equal the canvas (as libwebp requires).
//! - Other chunks (`ALPH`, `ICCP`, `EXIF`, `XMP `, unknown ones) are framed, not read.

use super::{Broken, broken};

/// (width, height) of a WebP file whose container walked cleanly.
pub(super) fn walk(data: &[u8]) -> Result<(u32, u32), Broken> {
    if data.len() < 12 || &data[0..4] != b"RIFF" || &data[8..12] != b"WEBP" {
        return Err(broken("no RIFF/WEBP header"));
    }
    let riff_size = u64::from(le_u32(&data[4..8]));
    if riff_size + 8 != data.len() as u64 {
        return Err(broken("RIFF size does not match the file length"));
    }

    let mut pos = 12;
    let mut layout: Option<Layout> = None;
    let mut extended_image: Option<(u32, u32)> = None;
    let mut animation_frames = 0u32;
    while pos < data.len() {
        let Some(header) = data.get(pos..pos + 8) else {
            return Err(broken("truncated chunk header"));
        };
        let fourcc: [u8; 4] = [header[0], header[1], header[2], header[3]];
        let size = le_u32(&header[4..8]) as usize;
        let start = pos + 8;
        let Some(body) = data.get(start..start.saturating_add(size)) else {
            return Err(broken("chunk runs past the end of the file"));
        };
        // Skip the pad byte of an odd-sized chunk; only the last chunk may lack it.
        pos = (start + size + (size & 1)).min(data.len());

        match &mut layout {
            None => {
                layout = Some(match &fourcc {
                    b"VP8 " => Layout::Simple(vp8(body)?),
                    b"VP8L" => Layout::Simple(vp8l(body)?),
                    b"VP8X" => Layout::Extended(vp8x(body)?),
                    _ => return Err(broken("first chunk is not VP8, VP8L or VP8X")),
                });
            }
            Some(Layout::Simple(_)) => {}
            Some(Layout::Extended(canvas)) => match &fourcc {
                b"VP8X" => return Err(broken("a second VP8X chunk")),
                b"VP8 " | b"VP8L" if extended_image.is_none() && !canvas.animated => {
                    let dims = if &fourcc == b"VP8 " {
                        vp8(body)?
                    } else {
                        vp8l(body)?
                    };
                    if dims != (canvas.width, canvas.height) {
                        return Err(broken("image size differs from the VP8X canvas"));
                    }
                    extended_image = Some(dims);
                }
                b"ANMF" if canvas.animated => animation_frames += 1,
                _ => {}
            },
        }
    }

    match layout {
        None => Err(broken("no image chunk")),
        Some(Layout::Simple(dims)) => Ok(dims),
        Some(Layout::Extended(canvas)) => {
            if canvas.animated && animation_frames == 0 {
                return Err(broken("animated WebP without an ANMF frame"));
            }
            if !canvas.animated && extended_image.is_none() {
                return Err(broken("VP8X without a VP8 or VP8L image chunk"));
            }
            Ok((canvas.width, canvas.height))
        }
    }
}

enum Layout {
    Simple((u32, u32)),
    Extended(Canvas),
}

struct Canvas {
    width: u32,
    height: u32,
    animated: bool,
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u24(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], 0])
}

/// Lossy bitstream header (RFC 6386 §9.1, §19.1).
fn vp8(body: &[u8]) -> Result<(u32, u32), Broken> {
    if body.len() < 10 {
        return Err(broken("VP8 chunk shorter than its frame header"));
    }
    let tag = le_u24(&body[0..3]);
    if tag & 1 != 0 {
        return Err(broken("VP8 frame is not a key frame"));
    }
    if (tag >> 1) & 7 > 3 {
        return Err(broken("VP8 frame has an unknown version"));
    }
    if (tag >> 4) & 1 == 0 {
        return Err(broken("VP8 frame is not shown"));
    }
    let first_partition = (tag >> 5) as usize;
    if first_partition > body.len() - 10 {
        return Err(broken("VP8 first partition runs past the chunk"));
    }
    if body[3..6] != [0x9D, 0x01, 0x2A] {
        return Err(broken("VP8 start code missing"));
    }
    let width = u32::from(u16::from_le_bytes([body[6], body[7]]) & 0x3FFF);
    let height = u32::from(u16::from_le_bytes([body[8], body[9]]) & 0x3FFF);
    Ok((width, height))
}

/// Lossless bitstream header: signature, 14-bit width − 1, 14-bit height − 1, alpha hint,
/// 3-bit version (0).
fn vp8l(body: &[u8]) -> Result<(u32, u32), Broken> {
    if body.len() < 5 {
        return Err(broken("VP8L chunk shorter than its header"));
    }
    if body[0] != 0x2F {
        return Err(broken("VP8L signature missing"));
    }
    let bits = le_u32(&body[1..5]);
    if bits >> 29 != 0 {
        return Err(broken("VP8L has an unknown version"));
    }
    Ok(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
}

/// Extended header: flags, 3 reserved bytes, 24-bit canvas width − 1 and height − 1.
fn vp8x(body: &[u8]) -> Result<Canvas, Broken> {
    if body.len() != 10 {
        return Err(broken("VP8X chunk is not 10 bytes"));
    }
    Ok(Canvas {
        width: le_u24(&body[4..7]) + 1,
        height: le_u24(&body[7..10]) + 1,
        animated: body[0] & 0x02 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::{webp_lossless as lossless, webp_vp8x as extended};

    fn chunk(fourcc: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = fourcc.to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        if body.len() % 2 == 1 {
            out.push(0);
        }
        out
    }

    fn riff(chunks: &[Vec<u8>]) -> Vec<u8> {
        let payload: Vec<u8> = chunks.concat();
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend_from_slice(&payload);
        out
    }

    /// A lossy key-frame header and some partition bytes (not a decodable picture: the walk
    /// never reads beyond the header).
    fn vp8_body(width: u16, height: u16) -> Vec<u8> {
        let partition = 7u32;
        let tag = (partition << 5) | (1 << 4); // key frame, version 0, shown
        let mut body = tag.to_le_bytes()[..3].to_vec();
        body.extend_from_slice(&[0x9D, 0x01, 0x2A]);
        body.extend_from_slice(&width.to_le_bytes());
        body.extend_from_slice(&height.to_le_bytes());
        body.extend_from_slice(&[0x11; 9]);
        body
    }

    fn vp8x_body(flags: u8, width: u32, height: u32) -> Vec<u8> {
        let mut body = vec![flags, 0, 0, 0];
        body.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
        body.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
        body
    }

    #[test]
    fn lossless_files_walk_to_their_dimensions() {
        for (w, h) in [(1, 1), (3, 5), (64, 17), (300, 2)] {
            let webp = lossless(w, h);
            assert_eq!(&webp[12..16], b"VP8L");
            assert_eq!(walk(&webp), Ok((w, h)));
        }
    }

    #[test]
    fn the_fixture_decodes_with_a_real_decoder() {
        let webp = extended(9, 4);
        let decoder = image_webp::WebPDecoder::new(std::io::Cursor::new(&webp))
            .expect("a real decoder reads the fixture");
        assert_eq!(decoder.dimensions(), (9, 4));
        assert_eq!(walk(&webp), Ok((9, 4)));
    }

    #[test]
    fn extended_files_walk_to_the_canvas() {
        let webp = extended(9, 4);
        assert_eq!(&webp[12..16], b"VP8X");
        assert_eq!(walk(&webp), Ok((9, 4)));
        let lossy = riff(&[
            chunk(b"VP8X", &vp8x_body(0, 40, 30)),
            chunk(b"VP8 ", &vp8_body(40, 30)),
        ]);
        assert_eq!(walk(&lossy), Ok((40, 30)));
    }

    #[test]
    fn lossy_header_is_read() {
        let webp = riff(&[chunk(b"VP8 ", &vp8_body(640, 480))]);
        assert_eq!(walk(&webp), Ok((640, 480)));
        // The scale bits are not part of the size.
        let webp = riff(&[chunk(b"VP8 ", &vp8_body(0xC000 | 640, 0x4000 | 480))]);
        assert_eq!(walk(&webp), Ok((640, 480)));
        // Zero is reported; the caller refuses it.
        let webp = riff(&[chunk(b"VP8 ", &vp8_body(0, 480))]);
        assert_eq!(walk(&webp), Ok((0, 480)));

        let mut bad = vp8_body(8, 8);
        bad[3] = 0x9C;
        assert_eq!(
            walk(&riff(&[chunk(b"VP8 ", &bad)])),
            Err(broken("VP8 start code missing"))
        );
        let mut inter = vp8_body(8, 8);
        inter[0] |= 1;
        assert_eq!(
            walk(&riff(&[chunk(b"VP8 ", &inter)])),
            Err(broken("VP8 frame is not a key frame"))
        );
        let mut long_partition = vp8_body(8, 8);
        long_partition[2] = 0x10;
        assert_eq!(
            walk(&riff(&[chunk(b"VP8 ", &long_partition)])),
            Err(broken("VP8 first partition runs past the chunk"))
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let files = [
            lossless(20, 7),
            extended(5, 5),
            riff(&[chunk(b"VP8 ", &vp8_body(16, 16))]),
        ];
        for webp in files {
            for cut in 0..webp.len() {
                assert!(
                    walk(&webp[..cut]).is_err(),
                    "cut at {cut} of {}",
                    webp.len()
                );
            }
        }
    }

    #[test]
    fn wrong_riff_size_is_refused() {
        let webp = lossless(8, 8);
        for delta in [-2i64, -1, 1, 2, 1 << 20] {
            let mut bad = webp.clone();
            let size = (le_u32(&bad[4..8]) as i64 + delta) as u32;
            bad[4..8].copy_from_slice(&size.to_le_bytes());
            assert_eq!(
                walk(&bad),
                Err(broken("RIFF size does not match the file length")),
                "delta {delta}"
            );
        }
        let mut trailing = webp.clone();
        trailing.extend_from_slice(&[0, 0]);
        assert!(walk(&trailing).is_err());
    }

    #[test]
    fn odd_sized_chunks_and_their_padding() {
        let image = chunk(b"VP8 ", &vp8_body(4, 4));
        // An odd chunk with its pad in the middle and at the end.
        let padded = riff(&[image.clone(), chunk(b"ABCD", b"xyz"), chunk(b"EFGH", b"a")]);
        assert_eq!(walk(&padded), Ok((4, 4)));
        // The last pad missing, the RIFF size not counting it: accepted.
        let mut unpadded = padded[..padded.len() - 1].to_vec();
        let size = unpadded.len() as u32 - 8;
        unpadded[4..8].copy_from_slice(&size.to_le_bytes());
        assert_eq!(walk(&unpadded), Ok((4, 4)));
        // A missing pad in the middle shifts the next chunk header: refused.
        let mut inner = image.clone();
        inner.extend_from_slice(&chunk(b"ABCD", b"xyz")[..11]);
        inner.extend_from_slice(&chunk(b"EFGH", b"ab"));
        assert!(walk(&riff(&[inner])).is_err());
    }

    #[test]
    fn vp8x_rules() {
        // Huge canvas: 2^24 x 2^24, reported for the pixel cap.
        let huge = riff(&[
            chunk(b"VP8X", &vp8x_body(0, 1 << 24, 1 << 24)),
            chunk(b"VP8 ", &vp8_body(16, 16)),
        ]);
        assert_eq!(
            walk(&huge),
            Err(broken("image size differs from the VP8X canvas"))
        );
        let huge_animation = riff(&[
            chunk(b"VP8X", &vp8x_body(0x02, 1 << 24, 1 << 24)),
            chunk(b"ANIM", &[0; 6]),
            chunk(b"ANMF", &[0; 24]),
        ]);
        assert_eq!(walk(&huge_animation), Ok((1 << 24, 1 << 24)));
        // No image chunk.
        let empty = riff(&[chunk(b"VP8X", &vp8x_body(0, 4, 4)), chunk(b"EXIF", b"ab")]);
        assert_eq!(
            walk(&empty),
            Err(broken("VP8X without a VP8 or VP8L image chunk"))
        );
        let no_frames = riff(&[
            chunk(b"VP8X", &vp8x_body(0x02, 4, 4)),
            chunk(b"ANIM", &[0; 6]),
        ]);
        assert_eq!(
            walk(&no_frames),
            Err(broken("animated WebP without an ANMF frame"))
        );
        // Wrong VP8X length, a bad image header behind VP8X.
        let short = riff(&[chunk(b"VP8X", &[0; 9]), chunk(b"VP8 ", &vp8_body(4, 4))]);
        assert_eq!(walk(&short), Err(broken("VP8X chunk is not 10 bytes")));
        let mut bad_image = vp8_body(4, 4);
        bad_image[5] = 0;
        let bad = riff(&[
            chunk(b"VP8X", &vp8x_body(0, 4, 4)),
            chunk(b"VP8 ", &bad_image),
        ]);
        assert_eq!(walk(&bad), Err(broken("VP8 start code missing")));
    }

    #[test]
    fn lossless_header_rules() {
        let mut webp = lossless(8, 8);
        webp[20] = 0x2E;
        assert_eq!(walk(&webp), Err(broken("VP8L signature missing")));
        let mut webp = lossless(8, 8);
        webp[24] |= 0x20;
        assert_eq!(walk(&webp), Err(broken("VP8L has an unknown version")));
        // The largest lossless size, 16384 x 16384, from the 14-bit fields.
        let mut body = vec![0x2F];
        body.extend_from_slice(&(0x3FFFu32 | (0x3FFF << 14)).to_le_bytes());
        assert_eq!(walk(&riff(&[chunk(b"VP8L", &body)])), Ok((16384, 16384)));
        // Something else first.
        assert_eq!(
            walk(&riff(&[chunk(b"ALPH", b"ab")])),
            Err(broken("first chunk is not VP8, VP8L or VP8X"))
        );
        assert_eq!(walk(&riff(&[])), Err(broken("no image chunk")));
    }
}
