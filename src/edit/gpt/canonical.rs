//! What goes upstream for a GPT-image edit: only the fields the caller sent, plus `model`
//! (L4), in a fixed order.
//!
//! Multipart: text parts first, in this order: `model`, `prompt`, `n`, `size`, `quality`,
//! `background`, `output_format`, `output_compression`, `input_fidelity`, `moderation`,
//! `stream`, `partial_images`, `complexity`, `frame_count`, `frame_duration_ms`, `svg[model]`,
//! `svg[reasoning][effort]`, `user`, `safety_identifier`; then the images as `image` (one sent
//! as `image`) or `image[]` (several, or one sent as `image[]`, P5), then `mask`, then `markup`.
//! File parts carry the sniffed MIME type (I1) and a safe name (`image-1.png`, `mask.png`,
//! `markup.png`); their bytes are the checked `Bytes`, not copied. Booleans are written
//! lower-case (P8). References that hold no bytes (remote URLs, file ids) cannot be written as
//! parts and are skipped: they only occur in JSON requests, which go upstream as JSON.
//!
//! JSON: the same keys in the same order, `images`/`mask`/`markup` after `prompt`, references
//! as sent (`{"image_url": …}` or `{"file_id": …}`; an upload becomes a base64 data URL).
//!
//! The caller may replace `edit.mask` (e.g. after a lossless RGBA conversion) before building.

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;

use super::{GptEdit, ImageInput};
use crate::body::ChunkedBody;
use crate::edit::canonical::CanonicalBody;

/// The text fields, in canonical order, that the caller sent.
fn text_fields<'a>(edit: &'a GptEdit) -> Vec<(&'static str, Cow<'a, str>)> {
    let mut t: Vec<(&'static str, Cow<'a, str>)> = vec![
        ("model", Cow::Borrowed(edit.model.as_str())),
        ("prompt", Cow::Borrowed(edit.prompt.as_str())),
    ];
    let mut push = |name, v: Option<Cow<'a, str>>| {
        if let Some(v) = v {
            t.push((name, v));
        }
    };
    let owned = |v: String| -> Cow<'a, str> { Cow::Owned(v) };
    push("n", edit.n.map(|v| owned(v.to_string())));
    push("size", edit.size.map(|s| owned(s.as_string())));
    push("quality", edit.quality.as_deref().map(Cow::Borrowed));
    push(
        "background",
        edit.background.map(|v| Cow::Borrowed(v.as_str())),
    );
    push(
        "output_format",
        edit.output_format.map(|v| Cow::Borrowed(v.as_str())),
    );
    push(
        "output_compression",
        edit.output_compression.map(|v| owned(v.to_string())),
    );
    push(
        "input_fidelity",
        edit.input_fidelity.map(|v| Cow::Borrowed(v.as_str())),
    );
    push(
        "moderation",
        edit.moderation.map(|v| Cow::Borrowed(v.as_str())),
    );
    push("stream", edit.stream.map(|v| owned(v.to_string())));
    push(
        "partial_images",
        edit.partial_images.map(|v| owned(v.to_string())),
    );
    push(
        "complexity",
        edit.complexity.map(|v| Cow::Borrowed(v.as_str())),
    );
    push(
        "frame_count",
        edit.frame_count.map(|v| owned(v.to_string())),
    );
    push(
        "frame_duration_ms",
        edit.frame_duration_ms.map(|v| owned(v.to_string())),
    );
    if let Some(svg) = &edit.svg {
        push("svg[model]", Some(Cow::Borrowed(svg.model.as_str())));
        push(
            "svg[reasoning][effort]",
            svg.effort.map(|e| Cow::Borrowed(e.as_str())),
        );
    }
    push("user", edit.user.as_deref().map(Cow::Borrowed));
    push(
        "safety_identifier",
        edit.safety_identifier.as_deref().map(Cow::Borrowed),
    );
    t
}

/// (part name, file name, MIME type, bytes) of an input that holds bytes.
fn file_part(name: &'static str, file_name: String, input: &ImageInput) -> Option<FilePartOut> {
    Some(FilePartOut {
        name,
        mime: input.format()?.mime(),
        file_name,
        data: input.bytes()?.clone(),
    })
}

struct FilePartOut {
    name: &'static str,
    file_name: String,
    mime: &'static str,
    data: Bytes,
}

/// The canonical multipart body.
pub fn multipart(edit: &GptEdit) -> CanonicalBody {
    let texts = text_fields(edit);
    let image_name = if edit.images_as_array {
        "image[]"
    } else {
        "image"
    };
    let mut files: Vec<FilePartOut> = Vec::with_capacity(edit.images.len() + 2);
    for (i, img) in edit.images.iter().enumerate() {
        let ext = img.format().map(|f| f.extension()).unwrap_or("png");
        files.extend(file_part(image_name, format!("image-{}.{ext}", i + 1), img));
    }
    if let Some(mask) = &edit.mask {
        files.extend(file_part("mask", "mask.png".into(), mask));
    }
    if let Some(markup) = &edit.markup {
        files.extend(file_part("markup", "markup.png".into(), markup));
    }
    // A random 128-bit boundary practically never occurs in the content; check anyway, because
    // a collision would silently corrupt the forwarded request.
    let boundary = loop {
        let b = format!("imagegate-{}", uuid::Uuid::new_v4().simple());
        let needle = format!("--{b}");
        let collides = texts.iter().any(|(_, v)| v.contains(&needle))
            || files
                .iter()
                .any(|f| memchr::memmem::find(&f.data, needle.as_bytes()).is_some());
        if !collides {
            break b;
        }
    };
    let mut chunks = Vec::with_capacity(2 * files.len() + 1);
    let mut head = String::new();
    for (name, value) in &texts {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    for f in files {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: {}\r\n\r\n",
            f.name, f.file_name, f.mime
        ));
        chunks.push(Bytes::from(std::mem::take(&mut head)));
        chunks.push(f.data);
        head.push_str("\r\n");
    }
    head.push_str(&format!("--{boundary}--\r\n"));
    chunks.push(Bytes::from(head));
    CanonicalBody {
        boundary,
        body: ChunkedBody::new(chunks),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RefOut<'a> {
    ImageUrl(Cow<'a, str>),
    FileId(&'a str),
}

impl<'a> RefOut<'a> {
    fn of(input: &'a ImageInput) -> Self {
        match input {
            ImageInput::Url(u) => RefOut::ImageUrl(Cow::Borrowed(u)),
            ImageInput::DataUrl { url, .. } => RefOut::ImageUrl(Cow::Borrowed(url)),
            ImageInput::FileId(id) => RefOut::FileId(id),
            ImageInput::Upload { bytes, format } => RefOut::ImageUrl(Cow::Owned(format!(
                "data:{};base64,{}",
                format.mime(),
                base64::engine::general_purpose::STANDARD.encode(bytes)
            ))),
        }
    }
}

#[derive(Serialize)]
struct ReasoningOut<'a> {
    effort: &'a str,
}

#[derive(Serialize)]
struct SvgOut<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<ReasoningOut<'a>>,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    model: &'a str,
    prompt: &'a str,
    images: Vec<RefOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<RefOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    markup: Option<RefOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    background: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_format: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_compression: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_fidelity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    moderation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial_images: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    complexity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame_count: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame_duration_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    svg: Option<SvgOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    safety_identifier: Option<&'a str>,
}

/// The canonical JSON body.
pub fn json(edit: &GptEdit) -> Bytes {
    let out = JsonOut {
        model: &edit.model,
        prompt: &edit.prompt,
        images: edit.images.iter().map(RefOut::of).collect(),
        mask: edit.mask.as_ref().map(RefOut::of),
        markup: edit.markup.as_ref().map(RefOut::of),
        n: edit.n,
        size: edit.size_str(),
        quality: edit.quality.as_deref(),
        background: edit.background.map(|v| v.as_str()),
        output_format: edit.output_format_str(),
        output_compression: edit.output_compression,
        input_fidelity: edit.input_fidelity.map(|v| v.as_str()),
        moderation: edit.moderation.map(|v| v.as_str()),
        stream: edit.stream,
        partial_images: edit.partial_images,
        complexity: edit.complexity.map(|v| v.as_str()),
        frame_count: edit.frame_count,
        frame_duration_ms: edit.frame_duration_ms,
        svg: edit.svg.as_ref().map(|s| SvgOut {
            model: &s.model,
            reasoning: s.effort.map(|e| ReasoningOut { effort: e.as_str() }),
        }),
        user: edit.user.as_deref(),
        safety_identifier: edit.safety_identifier.as_deref(),
    };
    Bytes::from(serde_json::to_vec(&out).expect("plain structs always serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::gpt::test_support::*;
    use crate::edit::gpt::{
        Background, Complexity, Encoding, GptSize, Moderation, OutputFormat, SvgEffort,
        SvgSettings, json as gpt_json, multipart as gpt_multipart,
    };
    use crate::edit::sniff::ImageFormat;

    fn upload(bytes: &'static [u8], format: ImageFormat) -> ImageInput {
        ImageInput::Upload {
            bytes: Bytes::from_static(bytes),
            format,
        }
    }

    fn minimal() -> GptEdit {
        GptEdit {
            encoding: Encoding::Multipart,
            model: "gpt-image-2".into(),
            prompt: "a \"quoted\" otter".into(),
            images: vec![upload(PNG, ImageFormat::Png)],
            images_as_array: false,
            mask: None,
            markup: None,
            n: None,
            size: None,
            quality: None,
            background: None,
            output_format: None,
            output_compression: None,
            input_fidelity: None,
            moderation: None,
            stream: None,
            partial_images: None,
            complexity: None,
            frame_count: None,
            frame_duration_ms: None,
            svg: None,
            user: None,
            safety_identifier: None,
        }
    }

    fn full() -> GptEdit {
        GptEdit {
            model: "gifsvg".into(),
            images: vec![
                upload(JPEG, ImageFormat::Jpeg),
                upload(WEBP, ImageFormat::Webp),
            ],
            images_as_array: true,
            mask: Some(upload(PNG, ImageFormat::Png)),
            n: Some(1),
            size: Some(GptSize::Dims(1536, 1024)),
            quality: Some("xhigh".into()),
            background: Some(Background::Opaque),
            output_format: Some(OutputFormat::Svg),
            output_compression: Some(100),
            moderation: Some(Moderation::Low),
            stream: Some(false),
            partial_images: Some(0),
            complexity: Some(Complexity::Medium),
            svg: Some(SvgSettings {
                model: "svg-1".into(),
                effort: Some(SvgEffort::Low),
            }),
            user: Some("u-1".into()),
            safety_identifier: Some("u-1".into()),
            ..minimal()
        }
    }

    fn text_part(b: &str, name: &str, value: &str) -> String {
        format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
    }

    fn file_part(b: &str, name: &str, file: &str, mime: &str, data: &[u8]) -> String {
        format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: {mime}\r\n\r\n{}\r\n",
            String::from_utf8_lossy(data)
        )
    }

    #[test]
    fn minimal_multipart_writes_model_and_no_default() {
        let c = multipart(&minimal());
        let b = c.boundary.clone();
        let text = String::from_utf8_lossy(&c.body.to_vec()).into_owned();
        let expected = [
            text_part(&b, "model", "gpt-image-2"),
            text_part(&b, "prompt", "a \"quoted\" otter"),
            file_part(&b, "image", "image-1.png", "image/png", PNG),
            format!("--{b}--\r\n"),
        ]
        .concat();
        assert_eq!(text, expected);
        assert_eq!(
            c.content_type(),
            format!("multipart/form-data; boundary={b}")
        );
    }

    #[test]
    fn full_multipart_in_fixed_order() {
        let c = multipart(&full());
        let b = c.boundary.clone();
        let text = String::from_utf8_lossy(&c.body.to_vec()).into_owned();
        let expected = [
            text_part(&b, "model", "gifsvg"),
            text_part(&b, "prompt", "a \"quoted\" otter"),
            text_part(&b, "n", "1"),
            text_part(&b, "size", "1536x1024"),
            text_part(&b, "quality", "xhigh"),
            text_part(&b, "background", "opaque"),
            text_part(&b, "output_format", "svg"),
            text_part(&b, "output_compression", "100"),
            text_part(&b, "moderation", "low"),
            text_part(&b, "stream", "false"),
            text_part(&b, "partial_images", "0"),
            text_part(&b, "complexity", "medium"),
            text_part(&b, "svg[model]", "svg-1"),
            text_part(&b, "svg[reasoning][effort]", "low"),
            text_part(&b, "user", "u-1"),
            text_part(&b, "safety_identifier", "u-1"),
            file_part(&b, "image[]", "image-1.jpg", "image/jpeg", JPEG),
            file_part(&b, "image[]", "image-2.webp", "image/webp", WEBP),
            file_part(&b, "mask", "mask.png", "image/png", PNG),
            format!("--{b}--\r\n"),
        ]
        .concat();
        assert_eq!(text, expected);
        assert_eq!(c.body.len() as usize, c.body.to_vec().len());
    }

    #[test]
    fn image_and_mask_bytes_are_not_copied() {
        let image = Bytes::from(vec![7u8; 1000]);
        let converted_mask = Bytes::from(vec![9u8; 500]);
        let mut edit = minimal();
        edit.images = vec![ImageInput::Upload {
            bytes: image.clone(),
            format: ImageFormat::Png,
        }];
        // The caller replaces the mask after a lossless conversion.
        edit.mask = Some(ImageInput::Upload {
            bytes: converted_mask.clone(),
            format: ImageFormat::Png,
        });
        let mut body = multipart(&edit).body;
        let mut found = (false, false);
        use http_body::Body as _;
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        while let std::task::Poll::Ready(Some(Ok(frame))) =
            std::pin::Pin::new(&mut body).poll_frame(&mut cx)
        {
            if let Ok(data) = frame.into_data() {
                found.0 |= data.as_ptr() == image.as_ptr() && data.len() == image.len();
                found.1 |= data.as_ptr() == converted_mask.as_ptr();
            }
        }
        assert_eq!(
            found,
            (true, true),
            "image and mask chunks must be the caller's allocations"
        );
    }

    #[tokio::test]
    async fn multipart_round_trips() {
        for edit in [minimal(), full()] {
            let c = multipart(&edit);
            let again = gpt_multipart::parse_multipart(
                &c.boundary,
                Bytes::from(c.body.to_vec()),
                &models(),
                &limits(),
            )
            .await
            .unwrap();
            assert_eq!(again, edit);
        }
    }

    #[test]
    fn json_in_fixed_order_with_references_as_sent() {
        let url = "data:image/png;base64,iVBORw0KGgo=".to_owned();
        let mut edit = full();
        edit.encoding = Encoding::Json;
        edit.images = vec![
            ImageInput::Url("https://example.com/cat.png".into()),
            ImageInput::FileId("file-abc".into()),
            ImageInput::DataUrl {
                url: url.clone(),
                bytes: Bytes::from_static(PNG),
                format: ImageFormat::Png,
            },
        ];
        edit.mask = Some(ImageInput::FileId("file-mask".into()));
        let text = String::from_utf8(json(&edit).to_vec()).unwrap();
        assert_eq!(
            text,
            format!(
                concat!(
                    r#"{{"model":"gifsvg","prompt":"a \"quoted\" otter","images":[{{"image_url":"https://example.com/cat.png"}},{{"file_id":"file-abc"}},{{"image_url":"{}"}}],"#,
                    r#""mask":{{"file_id":"file-mask"}},"n":1,"size":"1536x1024","quality":"xhigh","background":"opaque","output_format":"svg","#,
                    r#""output_compression":100,"moderation":"low","stream":false,"partial_images":0,"complexity":"medium","#,
                    r#""svg":{{"model":"svg-1","reasoning":{{"effort":"low"}}}},"user":"u-1","safety_identifier":"u-1"}}"#
                ),
                url
            )
        );
        let mut min = minimal();
        min.encoding = Encoding::Json;
        min.images = vec![ImageInput::FileId("f".into())];
        assert_eq!(
            &json(&min)[..],
            br#"{"model":"gpt-image-2","prompt":"a \"quoted\" otter","images":[{"file_id":"f"}]}"#
        );
        // An upload becomes a data URL.
        let up = json(&minimal());
        let v: serde_json::Value = serde_json::from_slice(&up).unwrap();
        assert!(
            v["images"][0]["image_url"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,iVBORw0KGg")
        );
    }

    #[test]
    fn json_round_trips() {
        let mut edit = full();
        edit.encoding = Encoding::Json;
        edit.images = vec![
            ImageInput::Url("https://example.com/cat.png".into()),
            ImageInput::FileId("file-abc".into()),
        ];
        edit.mask = Some(ImageInput::FileId("file-mask".into()));
        let again = gpt_json::parse_json(&json(&edit), &models(), &limits()).unwrap();
        assert_eq!(again, edit);
    }
}
