//! Writes the seed corpora `corpus/<target>/seed-*` from the test kit's image builders and a
//! few hand-written bodies. Run from `fuzz/`: `cargo run --example seeds`. Seeds stay small
//! (a few KB each); libFuzzer's own finds land beside them and are not committed.

use std::fs;
use std::path::Path;

use imagegate::testkit::{
    RawPng, gray_alpha_png, interlaced_rgba_png, jpeg, jpeg_progressive, jpeg_with, palette_png,
    rgb_png, rgba_png, rgba16_png, webp_chunk, webp_lossless, webp_vp8_body, webp_vp8x,
    webp_vp8x_with,
};

const BOUNDARY: &str = "fuzzXyZ";

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("create the corpus directory");
    assert!(
        bytes.len() <= 8 * 1024,
        "{target}/{name} is {} bytes",
        bytes.len()
    );
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

/// A multipart body: (name, file name, content type, data) per part.
fn multipart(parts: &[(&str, Option<&str>, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, file, ctype, data) in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match file {
            Some(f) => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
                    .as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
            ),
        }
        if let Some(t) = ctype {
            out.extend_from_slice(format!("Content-Type: {t}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

fn with_header(header: &str, body: &[u8]) -> Vec<u8> {
    let mut out = header.as_bytes().to_vec();
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

fn flagged(flags: u8, file: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(file);
    out
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn main() {
    let mp = format!("multipart/form-data; boundary={BOUNDARY}");
    let png = rgba_png(8, true);
    let opaque = rgba_png(8, false);
    let trns = RawPng::new(8, 3, 8, |x, y| vec![u16::from((x + y) % 2 == 0)])
        .plte(vec![0, 0, 0, 255, 255, 255])
        .trns(vec![0])
        .bytes()
        .to_vec();
    let trns_interlaced = RawPng::new(4, 2, 8, |x, _| vec![x as u16 * 60, 9, 9])
        .interlaced()
        .trns(vec![0, 0, 0, 9, 0, 9])
        .bytes()
        .to_vec();
    let jpg = jpeg(8, 8);
    let webp = webp_lossless(4, 4);

    // dall-e-2 multipart
    let dalle = |mask: bool| {
        let mut parts: Vec<(&str, Option<&str>, Option<&str>, &[u8])> = vec![
            ("prompt", None, None, b"a cat"),
            ("model", None, None, b"dall-e-2"),
            ("n", None, None, b"2"),
            ("size", None, None, b"256x256"),
            ("response_format", None, None, b"b64_json"),
            ("user", None, None, b"u1"),
            ("image", Some("i.png"), Some("image/png"), &png),
        ];
        if mask {
            parts.push(("mask", Some("m.png"), Some("image/png"), &png));
        }
        multipart(&parts)
    };
    write("multipart_dalle2", "full", &with_header(&mp, &dalle(false)));
    write("multipart_dalle2", "mask", &with_header(&mp, &dalle(true)));
    write(
        "multipart_dalle2",
        "minimal",
        &with_header(
            &mp,
            &multipart(&[
                ("prompt", None, None, b"x"),
                ("image", Some("a"), None, &opaque),
            ]),
        ),
    );

    // gpt-image multipart and JSON
    let gpt = multipart(&[
        ("model", None, None, b"gpt-image-2"),
        ("prompt", None, None, b"a cat"),
        ("image[]", Some("a.png"), Some("image/png"), &png),
        ("image[]", Some("b.jpg"), None, &jpg),
        ("image[]", Some("c.webp"), None, &webp),
        ("mask", Some("m.png"), None, &trns),
        ("n", None, None, b"1"),
        ("size", None, None, b"1024x1024"),
        ("quality", None, None, b"high"),
        ("background", None, None, b"transparent"),
        ("output_format", None, None, b"png"),
        ("user", None, None, b"u"),
    ]);
    write("multipart_gpt", "multipart", &with_header(&mp, &gpt));
    let gpt_misc = multipart(&[
        ("model", None, None, b"gpt-image-2.6-sunburst"),
        ("prompt", None, None, b"p"),
        ("image", Some("a.png"), None, &png),
        ("markup", Some("k.png"), None, &png),
        ("n", None, None, b"1"),
        ("output_format", None, None, b"svg"),
        ("svg[model]", None, None, b"m"),
        ("svg[reasoning][effort]", None, None, b"low"),
        ("complexity", None, None, b"low"),
        ("moderation", None, None, b"low"),
        ("safety_identifier", None, None, b"s"),
    ]);
    let gpt_gif = multipart(&[
        ("model", None, None, b"gpt-image-2.6-sunburst"),
        ("prompt", None, None, b"p"),
        ("image[]", Some("a.jpg"), None, &jpg),
        ("output_format", None, None, b"gif"),
        ("size", None, None, b"64x64"),
        ("frame_count", None, None, b"4"),
        ("frame_duration_ms", None, None, b"100"),
        ("stream", None, None, b"false"),
    ]);
    write("multipart_gpt", "gif", &with_header(&mp, &gpt_gif));
    let gpt_webp = multipart(&[
        ("model", None, None, b"gpt-image-2.5-flare"),
        ("prompt", None, None, b"p"),
        ("image", Some("a.webp"), None, &webp),
        ("quality", None, None, b"xhigh"),
        ("output_format", None, None, b"webp"),
        ("output_compression", None, None, b"50"),
        ("stream", None, None, b"true"),
        ("partial_images", None, None, b"2"),
    ]);
    write("multipart_gpt", "webp-stream", &with_header(&mp, &gpt_webp));
    write("multipart_gpt", "svg-markup", &with_header(&mp, &gpt_misc));
    write("multipart_gpt", "dalle2", &with_header(&mp, &dalle(true)));
    let json = format!(
        r#"{{"model":"gpt-image-2","prompt":"a cat","images":[{{"image_url":"{}"}},{{"file_id":"file-1"}},{{"image_url":"https://e.test/a.png"}}],"mask":{{"image_url":"{}"}},"n":1,"size":"auto","quality":"low","output_format":"webp","output_compression":80,"background":"opaque","moderation":"auto","stream":false,"user":"u"}}"#,
        data_url("image/png", &png),
        data_url("image/png", &trns),
    );
    write(
        "multipart_gpt",
        "json",
        &with_header("application/json", json.as_bytes()),
    );
    write("json_gpt", "full", json.as_bytes());
    let json2 = format!(
        r#"{{"model":"gpt-image-2.6-sunburst","prompt":"p","images":[{{"image_url":"{}"}}],"markup":{{"image_url":"{}"}},"output_format":"gif","frame_count":3,"frame_duration_ms":50,"complexity":"high","safety_identifier":"s","partial_images":0}}"#,
        data_url("image/jpeg", &jpg),
        data_url("image/png", &png),
    );
    write("json_gpt", "gif", json2.as_bytes());
    let json3 = format!(
        r#"{{"model":"gpt-image-2.6-sunburst","prompt":"p","images":[{{"image_url":"{}"}}],"output_format":"svg","svg":{{"model":"m","reasoning":{{"effort":"high"}}}},"n":1}}"#,
        data_url("image/webp", &webp),
    );
    write("json_gpt", "svg", json3.as_bytes());
    write(
        "json_gpt",
        "minimal",
        br#"{"prompt":"x","images":[{"file_id":"f"}]}"#,
    );

    // PNG checks (flag byte: bit 0 has mask, bit 1 compatible)
    for (name, file) in [
        ("rgba", &png),
        ("opaque", &opaque),
        ("trns", &trns),
        ("trns-interlaced", &trns_interlaced),
        ("interlaced", &interlaced_rgba_png(8)),
        ("rgb", &rgb_png(4)),
        ("gray-alpha", &gray_alpha_png(4)),
        ("rgba16", &rgba16_png(4)),
        ("palette", &palette_png(4)),
    ] {
        write("png_check", &format!("{name}-strict"), &flagged(0, file));
        write(
            "png_check",
            &format!("{name}-compatible-mask"),
            &flagged(3, file),
        );
        write("mask_markup", &format!("{name}-png"), &flagged(0, file));
        write("mask_markup", &format!("{name}-strict"), &flagged(4, file));
    }
    write("mask_markup", "rgba-jpeg-first", &flagged(1, &png));
    write("mask_markup", "trns-webp-first", &flagged(2, &trns));

    // JPEG and WebP walks
    write("jpeg_check", "baseline", &jpg);
    write("jpeg_check", "progressive", &jpeg_progressive(8, 8));
    write("jpeg_check", "restart", &jpeg_with(16, 8, false, Some(1)));
    write("webp_check", "lossless", &webp);
    write("webp_check", "vp8x", &webp_vp8x(4, 4));
    write(
        "webp_check",
        "vp8",
        &webp_vp8x_with(0, 16, 16, &[webp_chunk(b"VP8 ", &webp_vp8_body(16, 16))]),
    );
    write(
        "webp_check",
        "anim",
        &webp_vp8x_with(
            0x02,
            8,
            8,
            &[
                webp_chunk(b"ANIM", &[0; 6]),
                webp_chunk(
                    b"ANMF",
                    &[[0u8; 16].as_slice(), &webp_chunk(b"VP8L", &[0x2f; 5])].concat(),
                ),
            ],
        ),
    );

    // config
    write("config", "empty", b"");
    let example = fs::read_to_string("../config/imagegate.toml").expect("the example config");
    // The example config, one seed per group of top-level tables (each a few KB).
    let mut piece = String::new();
    let mut index = 0;
    for line in example.lines() {
        let top = line.starts_with('[') && !line.starts_with("[models.accepted");
        if top && piece.len() > 2048 {
            write("config", &format!("example-{index}"), piece.as_bytes());
            index += 1;
            piece.clear();
        }
        piece.push_str(line);
        piece.push('\n');
    }
    write("config", &format!("example-{index}"), piece.as_bytes());
}
