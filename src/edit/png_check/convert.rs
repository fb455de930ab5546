//! Step 8: the lossless re-encoding of tRNS transparency as RGBA.

use std::io::{Cursor, Write};

use super::decode::{CappedBuf, RowLayout, check_row_count, encoding_error, next_row};
use super::walk::corrupt;
use super::{Cancel, Header, PngRejection, PngRules};
use png::{BitDepth, ColorType};

pub(super) fn rgba_encoder<'a>(
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
pub(super) fn convert_streaming(
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
pub(super) fn convert_interlaced(
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
