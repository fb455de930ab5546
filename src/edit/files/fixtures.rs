//! Files built in code for the unit tests of `edit::files` (no binary blobs).

use png::{BitDepth, ColorType};

/// A deterministic RGB pattern, 3 bytes per pixel.
fn rgb_pattern(width: u32, height: u32) -> Vec<u8> {
    (0..width * height)
        .flat_map(|i| {
            let v = i.wrapping_mul(2_654_435_761) >> 24;
            [v as u8, (i % 251) as u8, (i / 7) as u8]
        })
        .collect()
}

/// A JPEG from `jpeg-encoder`: baseline or progressive, optionally with restart markers.
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

/// A baseline JPEG.
pub fn jpeg(width: u16, height: u16) -> Vec<u8> {
    jpeg_with(width, height, false, None)
}

/// A lossless WebP (simple format: one `VP8L` chunk).
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

/// A lossless WebP wrapped in `VP8X` by the encoder, with an odd-sized `EXIF` chunk after the
/// image chunk.
pub fn webp_extended(width: u32, height: u32) -> Vec<u8> {
    let pixels = rgb_pattern(width, height);
    let mut out = Vec::new();
    let mut encoder = image_webp::WebPEncoder::new(&mut out);
    encoder.set_exif_metadata(b"Exif\0\0odd".to_vec());
    encoder
        .encode(&pixels, width, height, image_webp::ColorType::Rgb8)
        .expect("in-memory lossless encoding cannot fail");
    out
}

/// A PNG with raw samples `data` (PNG layout, 8 bits), optional PLTE and tRNS.
pub fn png(
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

/// RGBA8 with alpha 255 everywhere except the pixels listed, which get alpha 0.
pub fn rgba_png(width: u32, height: u32, transparent: &[(u32, u32)]) -> Vec<u8> {
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
    png(width, height, ColorType::Rgba, &data, None, None)
}

/// RGB8 without tRNS.
pub fn rgb_png(width: u32, height: u32) -> Vec<u8> {
    png(
        width,
        height,
        ColorType::Rgb,
        &rgb_pattern(width, height),
        None,
        None,
    )
}
