//! The JPEG marker walk (`gpt-image-models.md` §9 I3): from SOI through exactly one frame header
//! (SOFn) and at least one scan to EOI, in one pass, reading no pixel.
//!
//! - Every segment between markers is framed by its 2-byte length, which must stay inside the
//!   file. 0xFF fill bytes before a marker code are allowed (ITU T.81 B.1.1.2).
//! - SOFn is C0–CF except C4 (DHT), C8 (JPG, reserved) and CC (DAC); its length must match its
//!   component count. Width and height come from it. A second frame header is refused, as
//!   libjpeg does; so is a scan before the frame header.
//! - After SOS the entropy-coded data runs to the first 0xFF that is followed neither by 0x00
//!   (stuffing) nor by RST0–RST7 (D0–D7); the search uses `memchr`, so it stays linear.
//! - The walk ends at the first EOI, which must come after at least one scan. Bytes after EOI
//!   are NOT read: the Multi-Picture Format (camera previews, Apple HDR gain maps) and
//!   Motion Photos store further images or a video there, and decoders stop at EOI.
//! - A stray RSTn or SOI outside entropy-coded data, or a non-marker byte where a marker must
//!   be, breaks the walk.

use super::{Broken, broken};

/// (width, height) from the frame header of a JPEG that walked cleanly from SOI to EOI.
/// Height 0 (defined later by a DNL segment) is returned as is; the caller refuses it.
pub(super) fn walk(data: &[u8]) -> Result<(u32, u32), Broken> {
    if data.len() < 2 || data[0] != 0xFF || data[1] != SOI {
        return Err(broken("no SOI marker"));
    }
    let mut pos = 2;
    let mut frame: Option<(u32, u32)> = None;
    let mut scans = 0u32;
    loop {
        let marker = next_marker(data, &mut pos)?;
        match marker {
            EOI => {
                let Some(dims) = frame else {
                    return Err(broken("EOI before a frame header"));
                };
                if scans == 0 {
                    return Err(broken("EOI before any scan"));
                }
                return Ok(dims);
            }
            SOI => return Err(broken("a second SOI marker")),
            0xD0..=0xD7 => return Err(broken("RST marker outside entropy-coded data")),
            // TEM: standalone, no length.
            0x01 => {}
            _ => {
                let body = segment(data, &mut pos)?;
                if is_sof(marker) {
                    if frame.is_some() {
                        return Err(broken("a second frame header"));
                    }
                    frame = Some(parse_sof(body)?);
                } else if marker == SOS {
                    if frame.is_none() {
                        return Err(broken("scan before the frame header"));
                    }
                    check_sos(body)?;
                    scans += 1;
                    pos = skip_entropy_coded(data, pos)?;
                }
            }
        }
    }
}

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;

/// SOF0–SOF15 without DHT (C4), JPG (C8) and DAC (CC).
fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

/// Reads one marker at `pos` (after any 0xFF fill bytes) and returns its code; `pos` ends
/// after the code.
fn next_marker(data: &[u8], pos: &mut usize) -> Result<u8, Broken> {
    match data.get(*pos) {
        None => return Err(broken("truncated: no EOI marker")),
        Some(0xFF) => {}
        Some(_) => return Err(broken("a byte that is not a marker between segments")),
    }
    *pos += 1;
    loop {
        match data.get(*pos) {
            None => return Err(broken("truncated inside a marker")),
            Some(0xFF) => *pos += 1,
            Some(0x00) => return Err(broken("stuffed zero outside entropy-coded data")),
            Some(&code) => {
                *pos += 1;
                return Ok(code);
            }
        }
    }
}

/// The body of the length-framed segment starting at `pos`; `pos` ends after it.
fn segment<'a>(data: &'a [u8], pos: &mut usize) -> Result<&'a [u8], Broken> {
    let Some(len) = data.get(*pos..*pos + 2) else {
        return Err(broken("truncated segment length"));
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len < 2 {
        return Err(broken("segment length below 2"));
    }
    let Some(body) = data.get(*pos + 2..*pos + len) else {
        return Err(broken("segment runs past the end of the file"));
    };
    *pos += len;
    Ok(body)
}

/// Frame header: precision, height, width, component count, 3 bytes per component.
fn parse_sof(body: &[u8]) -> Result<(u32, u32), Broken> {
    if body.len() < 6 {
        return Err(broken("frame header too short"));
    }
    let height = u32::from(u16::from_be_bytes([body[1], body[2]]));
    let width = u32::from(u16::from_be_bytes([body[3], body[4]]));
    let components = usize::from(body[5]);
    if components == 0 {
        return Err(broken("frame header without components"));
    }
    if body.len() != 6 + 3 * components {
        return Err(broken(
            "frame header length does not match its component count",
        ));
    }
    Ok((width, height))
}

/// Scan header: component count 1–4, 2 bytes per component, then Ss, Se, Ah/Al.
fn check_sos(body: &[u8]) -> Result<(), Broken> {
    let Some(&components) = body.first() else {
        return Err(broken("empty scan header"));
    };
    if !(1..=4).contains(&components) {
        return Err(broken("scan header with an invalid component count"));
    }
    if body.len() != 4 + 2 * usize::from(components) {
        return Err(broken(
            "scan header length does not match its component count",
        ));
    }
    Ok(())
}

/// Skips entropy-coded data from `pos` and returns the position of the 0xFF that starts the
/// next marker. 0xFF 0x00 is a stuffed data byte, 0xFF D0–D7 a restart marker inside the data.
fn skip_entropy_coded(data: &[u8], mut pos: usize) -> Result<usize, Broken> {
    loop {
        let Some(offset) = memchr::memchr(0xFF, &data[pos..]) else {
            return Err(broken("truncated inside entropy-coded data"));
        };
        let ff = pos + offset;
        match data.get(ff + 1) {
            None => return Err(broken("truncated inside entropy-coded data")),
            Some(0x00 | 0xD0..=0xD7) => pos = ff + 2,
            // A marker (possibly after fill bytes): the data ends here.
            Some(_) => return Ok(ff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(width: u16, height: u16, progressive: bool, restart: Option<u16>) -> Vec<u8> {
        crate::testkit::jpeg_with(width, height, progressive, restart)
    }

    /// Offset of the first `FF code` byte pair (good enough for markers before the first scan
    /// of encoder output).
    fn find_marker(jpeg: &[u8], code: u8) -> usize {
        jpeg.windows(2)
            .position(|w| w == [0xFF, code])
            .expect("marker present")
    }

    #[test]
    fn baseline_progressive_and_restart_intervals_walk_to_their_dimensions() {
        for (w, h) in [(1, 1), (17, 9), (64, 48), (100, 33)] {
            assert_eq!(walk(&encode(w, h, false, None)), Ok((w.into(), h.into())));
            assert_eq!(walk(&encode(w, h, true, None)), Ok((w.into(), h.into())));
            assert_eq!(
                walk(&encode(w, h, false, Some(1))),
                Ok((w.into(), h.into()))
            );
        }
    }

    #[test]
    fn restart_markers_really_occur_in_the_scan_and_are_skipped() {
        let jpeg = encode(64, 64, false, Some(1));
        let sos = find_marker(&jpeg, SOS);
        let scan = &jpeg[sos..];
        assert!(
            scan.windows(2)
                .any(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1])),
            "fixture must contain RST markers"
        );
        assert_eq!(walk(&jpeg), Ok((64, 64)));
    }

    #[test]
    fn progressive_has_several_scans() {
        let jpeg = encode(32, 32, true, None);
        let scans = jpeg.windows(2).filter(|w| *w == [0xFF, SOS]).count();
        assert!(scans > 1, "progressive fixture has {scans} scan(s)");
        assert_eq!(walk(&jpeg), Ok((32, 32)));
    }

    #[test]
    fn every_truncation_is_refused() {
        for jpeg in [encode(40, 24, false, None), encode(40, 24, true, Some(2))] {
            for cut in 0..jpeg.len() {
                assert!(
                    walk(&jpeg[..cut]).is_err(),
                    "cut at {cut} of {} accepted",
                    jpeg.len()
                );
            }
        }
    }

    #[test]
    fn bytes_after_eoi_are_not_read() {
        let mut jpeg = encode(8, 8, false, None);
        jpeg.extend_from_slice(b"\x00\x01garbage\xFF\xD8 a second image or a video");
        assert_eq!(walk(&jpeg), Ok((8, 8)));
    }

    #[test]
    fn stuffed_ff_bytes_do_not_end_the_scan() {
        // A hand-made scan whose data holds FF 00 and a restart marker before EOI.
        let mut jpeg = vec![0xFF, SOI];
        jpeg.extend_from_slice(&[0xFF, 0xC0, 0, 11, 8, 0, 2, 0, 3, 1, 1, 0x11, 0]);
        jpeg.extend_from_slice(&[0xFF, SOS, 0, 8, 1, 1, 0, 0, 63, 0]);
        jpeg.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56, 0xFF, 0xFF, EOI]);
        assert_eq!(walk(&jpeg), Ok((3, 2)));
        // Without the EOI after the fill byte the file is truncated.
        assert!(walk(&jpeg[..jpeg.len() - 1]).is_err());
    }

    #[test]
    fn no_frame_header_is_refused() {
        let jpeg = encode(16, 16, false, None);
        let sof = find_marker(&jpeg, 0xC0);
        let len = usize::from(u16::from_be_bytes([jpeg[sof + 2], jpeg[sof + 3]]));
        // Re-label the SOF0 segment as an APP15 segment: same framing, no frame header.
        let mut relabelled = jpeg.clone();
        relabelled[sof + 1] = 0xEF;
        assert_eq!(
            walk(&relabelled),
            Err(broken("scan before the frame header"))
        );
        // Remove it entirely.
        let mut removed = jpeg[..sof].to_vec();
        removed.extend_from_slice(&jpeg[sof + 2 + len..]);
        assert_eq!(walk(&removed), Err(broken("scan before the frame header")));
        // SOI, EOI only.
        assert_eq!(
            walk(&[0xFF, SOI, 0xFF, EOI]),
            Err(broken("EOI before a frame header"))
        );
    }

    #[test]
    fn frame_without_scan_and_second_frame_are_refused() {
        let jpeg = [
            0xFF, SOI, 0xFF, 0xC0, 0, 11, 8, 0, 1, 0, 1, 1, 1, 0x11, 0, 0xFF, EOI,
        ];
        assert_eq!(walk(&jpeg), Err(broken("EOI before any scan")));

        let mut twice = encode(8, 8, false, None);
        let sof = find_marker(&twice, 0xC0);
        let seg = twice[sof..sof + 2 + 17].to_vec();
        twice.splice(sof..sof, seg);
        assert_eq!(walk(&twice), Err(broken("a second frame header")));
    }

    #[test]
    fn sof_variants_follow_the_marker_table() {
        let jpeg = encode(8, 8, false, None);
        let sof = find_marker(&jpeg, 0xC0);
        for code in 0xC0..=0xCFu8 {
            let mut variant = jpeg.clone();
            variant[sof + 1] = code;
            let walked = walk(&variant);
            if matches!(code, 0xC4 | 0xC8 | 0xCC) {
                assert!(
                    walked.is_err(),
                    "marker {code:02X} taken for a frame header"
                );
            } else {
                assert_eq!(walked, Ok((8, 8)), "marker {code:02X}");
            }
        }
    }

    #[test]
    fn huge_frame_dimensions_are_reported_without_decoding() {
        let mut jpeg = encode(8, 8, false, None);
        let sof = find_marker(&jpeg, 0xC0);
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(walk(&jpeg), Ok((65535, 65535)));
    }

    #[test]
    fn malformed_segments_are_refused() {
        let jpeg = encode(8, 8, false, None);
        // A segment length running past the end.
        let mut long = jpeg.clone();
        long[4..6].copy_from_slice(&[0xFF, 0xF0]);
        assert!(walk(&long).is_err());
        // A segment length below 2.
        let mut short = jpeg.clone();
        short[4..6].copy_from_slice(&[0, 1]);
        assert_eq!(walk(&short), Err(broken("segment length below 2")));
        // Garbage where a marker belongs.
        let mut garbage = jpeg[..2].to_vec();
        garbage.push(0x42);
        garbage.extend_from_slice(&jpeg[2..]);
        assert_eq!(
            walk(&garbage),
            Err(broken("a byte that is not a marker between segments"))
        );
        // A second SOI, a stray RST.
        let mut soi = jpeg[..2].to_vec();
        soi.extend_from_slice(&jpeg);
        assert_eq!(walk(&soi), Err(broken("a second SOI marker")));
        let mut rst = jpeg[..2].to_vec();
        rst.extend_from_slice(&[0xFF, 0xD0]);
        rst.extend_from_slice(&jpeg[2..]);
        assert!(walk(&rst).is_err());
        // Not a JPEG at all.
        assert_eq!(walk(b"\x89PNG"), Err(broken("no SOI marker")));
    }
}
