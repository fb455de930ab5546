//! The JSON encoding (§3, J1, J2): strict types, `null` as omitted (except `response_format`,
//! `model`, `prompt`, `images`), `images` as references. Remote URLs and file ids are forwarded
//! as sent; `data:` URLs are decoded and their bytes checked like uploads.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::checks::{
    self, Fields, Raw, check_image_bytes, check_png_bytes, invalid_image_file, invalid_type,
    json_kind, missing, not_png, present, string_field, too_long, too_many_images,
    unknown_parameter,
};
use super::rules::{self, GptLimits, Models, Parsed};
use super::{Encoding, GptEdit, ImageInput, SvgSettings};
use crate::edit::sniff::ImageFormat;
use crate::error::GatewayError;

/// Top-level keys the profile knows.
const KNOWN: [&str; 21] = [
    "model",
    "prompt",
    "images",
    "mask",
    "markup",
    "n",
    "size",
    "quality",
    "background",
    "output_format",
    "output_compression",
    "input_fidelity",
    "moderation",
    "stream",
    "partial_images",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
    "user",
    "safety_identifier",
];

/// `image_url`'s `maxLength` (§3).
pub const MAX_IMAGE_URL_CHARS: usize = 20_971_520;

const G40: &str = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)";

/// G40 (IRE, param and code null).
pub fn invalid_json() -> GatewayError {
    GatewayError::invalid_request(None, None, G40)
}

/// A JSON object with its keys in the order sent.
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

struct JsonFields<'a>(&'a Map<String, Value>);

impl Fields for JsonFields<'_> {
    fn get(&self, name: &str) -> Option<Raw<'_>> {
        self.0.get(name).map(Raw::Json)
    }
}

/// Which checks a reference's bytes get.
#[derive(Clone, Copy)]
enum RefKind {
    /// An input image, 0-based index (G11, G12).
    Image(usize),
    /// Mask or markup: PNG below this many bytes.
    Png(usize),
}

/// `data:[<type>];base64,<payload>` decoded, or `None` if it is not a base64 data URL.
fn decode_data_url(url: &str) -> Option<Vec<u8>> {
    let rest = url.get(5..)?;
    let (meta, payload) = rest.split_once(',')?;
    if !meta.to_ascii_lowercase().ends_with(";base64") {
        return None;
    }
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    engine.decode(payload).ok()
}

fn is_data_url(url: &str) -> bool {
    url.get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("data:"))
}

/// One `{image_url}` / `{file_id}` reference (J2).
fn reference(
    param: &str,
    value: &Value,
    kind: RefKind,
    limits: &GptLimits,
) -> Result<ImageInput, GatewayError> {
    let Value::Object(obj) = value else {
        return Err(invalid_type(param, "an object", json_kind(value)));
    };
    if let Some(key) = obj.keys().find(|k| *k != "image_url" && *k != "file_id") {
        return Err(unknown_parameter(&format!("{param}.{key}")));
    }
    let url = obj.get("image_url").filter(|v| !v.is_null());
    let file_id = obj.get("file_id").filter(|v| !v.is_null());
    match (url, file_id) {
        (Some(url), None) => {
            let url_param = format!("{param}.image_url");
            let Value::String(url) = url else {
                return Err(invalid_type(&url_param, "a string", json_kind(url)));
            };
            if url.len() > MAX_IMAGE_URL_CHARS {
                let chars = url.chars().count();
                if chars > MAX_IMAGE_URL_CHARS {
                    return Err(too_long(&url_param, MAX_IMAGE_URL_CHARS, chars));
                }
            }
            if !is_data_url(url) {
                return Ok(ImageInput::Url(url.clone()));
            }
            let decoded = decode_data_url(url);
            let (bytes, format) = match kind {
                RefKind::Image(i) => {
                    let bytes = decoded.ok_or_else(|| invalid_image_file(param, i))?;
                    let format = check_image_bytes(param, i, &bytes, limits)?;
                    (bytes, format)
                }
                RefKind::Png(max) => {
                    let bytes = decoded.ok_or_else(|| not_png(param))?;
                    check_png_bytes(param, &bytes, max)?;
                    (bytes, ImageFormat::Png)
                }
            };
            Ok(ImageInput::DataUrl {
                url: url.clone(),
                bytes: Bytes::from(bytes),
                format,
            })
        }
        (None, Some(id)) => match id {
            Value::String(id) => Ok(ImageInput::FileId(id.clone())),
            other => Err(invalid_type(
                &format!("{param}.file_id"),
                "a string",
                json_kind(other),
            )),
        },
        _ => Err(GatewayError::invalid_request(
            Some(param),
            Some("invalid_value"),
            format!(
                "Invalid '{param}': expected an object with exactly one of 'image_url' or 'file_id'."
            ),
        )),
    }
}

/// Top-level keys in the order sent (P1's second step; F1, P7).
fn check_keys(keys: &[String]) -> Result<(), GatewayError> {
    for key in keys {
        match key.as_str() {
            "response_format" => return Err(unknown_parameter("response_format")),
            "image" | "image[]" => {
                return Err(GatewayError::invalid_request(
                    Some(key),
                    Some("invalid_value"),
                    format!(
                        "Unknown parameter: '{key}'. For application/json on /v1/images/edits, use 'images' (array)."
                    ),
                ));
            }
            k if KNOWN.contains(&k) => {}
            k => {
                let shown: String = if k.chars().count() > 64 {
                    k.chars().take(64).chain("…".chars()).collect()
                } else {
                    k.to_owned()
                };
                return Err(unknown_parameter(&shown));
            }
        }
    }
    Ok(())
}

/// `svg` as a JSON object.
fn svg(value: Option<&Value>, limits: &GptLimits) -> Result<Option<SvgSettings>, GatewayError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Value::Object(obj) = value else {
        return Err(invalid_type("svg", "an object", json_kind(value)));
    };
    if let Some(key) = obj.keys().find(|k| *k != "model" && *k != "reasoning") {
        return Err(unknown_parameter(&format!("svg.{key}")));
    }
    let model = match present(obj.get("model").map(Raw::Json)) {
        Some(raw) => string_field(raw, "svg.model")?,
        None => return Err(missing("svg.model")),
    };
    let effort = match obj.get("reasoning").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::Object(r)) => {
            if let Some(key) = r.keys().find(|k| *k != "effort") {
                return Err(unknown_parameter(&format!("svg.reasoning.{key}")));
            }
            present(r.get("effort").map(Raw::Json))
                .map(|raw| rules::svg_effort(raw, limits))
                .transpose()?
        }
        Some(other) => {
            return Err(invalid_type("svg.reasoning", "an object", json_kind(other)));
        }
    };
    Ok(Some(SvgSettings { model, effort }))
}

/// Parse and check a JSON body.
pub fn parse_json(
    body: &[u8],
    models: &dyn Models,
    limits: &GptLimits,
) -> Result<GptEdit, GatewayError> {
    let Ordered(entries) = serde_json::from_slice(body).map_err(|_| invalid_json())?;
    let mut keys: Vec<String> = Vec::with_capacity(entries.len());
    let mut map = Map::new();
    for (k, v) in entries {
        if !map.contains_key(&k) {
            keys.push(k.clone());
        }
        // Duplicate keys: the last one wins, as upstream's parser does.
        map.insert(k, v);
    }

    let (model, family) = checks::resolve_model(map.get("model").map(Raw::Json), models)?;
    check_keys(&keys)?;
    let prompt = checks::check_prompt(map.get("prompt").map(Raw::Json), limits)?;

    let items = match map.get("images") {
        None => return Err(missing("images")),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(invalid_type("images", "an array", json_kind(other))),
    };
    if items.is_empty() {
        return Err(GatewayError::invalid_request(
            Some("images"),
            Some("empty_array"),
            "Invalid 'images': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ));
    }
    if items.len() > limits.max_images {
        return Err(too_many_images("images", limits.max_images, items.len()));
    }
    let mut images = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        images.push(reference(
            &format!("images[{i}]"),
            item,
            RefKind::Image(i),
            limits,
        )?);
    }

    let fields = JsonFields(&map);
    let svg_fn = || svg(map.get("svg"), limits);
    let scalars = rules::check_scalars(&fields, &svg_fn, &model, family, limits)?;
    let mask_value = map.get("mask").filter(|v| !v.is_null());
    let markup_value = map.get("markup").filter(|v| !v.is_null());
    rules::cross_field(&scalars, mask_value.is_some(), markup_value.is_some())?;
    let mask = mask_value
        .map(|v| reference("mask", v, RefKind::Png(limits.max_mask_bytes), limits))
        .transpose()?;
    let markup = markup_value
        .map(|v| reference("markup", v, RefKind::Png(limits.max_image_bytes), limits))
        .transpose()?;
    Ok(Parsed {
        encoding: Encoding::Json,
        model,
        prompt,
        images,
        images_as_array: true,
        mask,
        markup,
    }
    .into_edit(scalars))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::gpt::test_support::*;
    use crate::edit::gpt::{GptSize, SvgEffort};
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn run_value(v: &Value) -> Result<GptEdit, GatewayError> {
        parse_json(&serde_json::to_vec(v).unwrap(), &models(), &limits())
    }

    /// A minimal valid body with these keys added or replaced.
    fn with(extra: Value) -> Result<GptEdit, GatewayError> {
        let mut base = json!({
            "model": "gpt-image-2",
            "prompt": "a cat",
            "images": [{"image_url": "https://example.com/cat.png"}],
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        run_value(&base)
    }

    #[test]
    fn minimal_request() {
        let e = with(json!({})).unwrap();
        assert_eq!(e.encoding, Encoding::Json);
        assert_eq!(
            e.images,
            [ImageInput::Url("https://example.com/cat.png".into())]
        );
        assert!(e.n.is_none() && e.size.is_none() && e.mask.is_none() && e.stream.is_none());
    }

    #[test]
    fn invalid_json_is_g40() {
        for body in [&b""[..], b"{", b"[1]", b"\"x\"", b"{\"model\":1}x", b"null"] {
            let e = parse_json(body, &models(), &limits()).unwrap_err();
            let (m, k, p, c) = parts(&e);
            assert!(
                m.starts_with("We could not parse the JSON body of your request. (HINT:"),
                "{m}"
            );
            assert_eq!((k, p, c), (IRE, None, None));
        }
    }

    #[test]
    fn model_rules() {
        assert_err(
            with(json!({"model": null})),
            "Invalid type for 'model': expected a string, but got null instead.",
            IRE,
            Some("model"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"model": "chatgpt-image-latest", "prompt": ""})),
            "The model 'chatgpt-image-latest' does not exist.",
            IGU,
            Some("model"),
            Some("invalid_value"),
        );
        let e = run_value(&json!({"prompt": "p", "images": [{"file_id": "file-1"}]})).unwrap();
        assert_eq!(e.model, "gpt-image-2");
    }

    #[test]
    fn key_rules() {
        for v in [json!("url"), Value::Null] {
            assert_err(
                with(json!({"response_format": v})),
                "Unknown parameter: 'response_format'.",
                IRE,
                Some("response_format"),
                Some("unknown_parameter"),
            );
        }
        for key in ["image", "image[]"] {
            assert_err(
                with(json!({key: "x"})),
                &format!(
                    "Unknown parameter: '{key}'. For application/json on /v1/images/edits, use 'images' (array)."
                ),
                IRE,
                Some(key),
                Some("invalid_value"),
            );
        }
        assert_err(
            with(json!({"style": "vivid", "prompt": ""})),
            "Unknown parameter: 'style'.",
            IRE,
            Some("style"),
            Some("unknown_parameter"),
        );
        // The first unknown key as sent, not alphabetically.
        let e = parse_json(
            br#"{"prompt":"p","zeta":1,"alpha":2,"images":[{"file_id":"f"}]}"#,
            &models(),
            &limits(),
        )
        .unwrap_err();
        assert_eq!(parts(&e).2.as_deref(), Some("zeta"));
        // Duplicate keys: the last wins.
        let e = parse_json(
            br#"{"prompt":"first","prompt":"second","images":[{"file_id":"f"}]}"#,
            &models(),
            &limits(),
        )
        .unwrap();
        assert_eq!(e.prompt, "second");
    }

    #[test]
    fn prompt_rules() {
        assert_err(
            with(json!({"prompt": null})),
            "Invalid type for 'prompt': expected a string, but got null instead.",
            IRE,
            Some("prompt"),
            Some("invalid_type"),
        );
        assert_err(
            run_value(&json!({"images": [{"file_id": "f"}]})),
            "Missing required parameter: 'prompt'.",
            IRE,
            Some("prompt"),
            Some("missing_required_parameter"),
        );
        assert_err(
            with(json!({"prompt": ""})),
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
            IRE,
            Some("prompt"),
            Some("empty_string"),
        );
        assert_err(
            with(json!({"prompt": "é".repeat(32_001)})),
            "Invalid 'prompt': string too long. Expected a string with maximum length 32000, but got a string with length 32001 instead.",
            IRE,
            Some("prompt"),
            Some("string_above_max_length"),
        );
        assert_err(
            with(json!({"prompt": 5})),
            "Invalid type for 'prompt': expected a string, but got an integer instead.",
            IRE,
            Some("prompt"),
            Some("invalid_type"),
        );
    }

    #[test]
    fn images_rules() {
        assert_err(
            with(json!({"images": null})),
            "Invalid type for 'images': expected an array, but got null instead.",
            IRE,
            Some("images"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"images": []})),
            "Invalid 'images': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            IRE,
            Some("images"),
            Some("empty_array"),
        );
        assert_err(
            run_value(&json!({"prompt": "p"})),
            "Missing required parameter: 'images'.",
            IRE,
            Some("images"),
            Some("missing_required_parameter"),
        );
        let sixteen: Vec<Value> = (0..16)
            .map(|i| json!({"file_id": format!("file-{i}")}))
            .collect();
        let e = with(json!({"images": sixteen})).unwrap();
        assert_eq!(e.images[15], ImageInput::FileId("file-15".into()));
        let mut seventeen = sixteen.clone();
        seventeen.push(json!({"file_id": "x"}));
        assert_err(
            with(json!({"images": seventeen})),
            "Invalid 'images': array too long. Expected an array with maximum length 16, but got an array with length 17 instead.",
            IRE,
            Some("images"),
            Some("array_above_max_length"),
        );
        for item in [
            json!({}),
            json!({"image_url": "u", "file_id": "f"}),
            json!({"image_url": null}),
        ] {
            assert_err(
                with(json!({"images": [{"file_id": "ok"}, item]})),
                "Invalid 'images[1]': expected an object with exactly one of 'image_url' or 'file_id'.",
                IRE,
                Some("images[1]"),
                Some("invalid_value"),
            );
        }
        assert_err(
            with(json!({"images": [{"image_url": "u", "detail": "high"}]})),
            "Unknown parameter: 'images[0].detail'.",
            IRE,
            Some("images[0].detail"),
            Some("unknown_parameter"),
        );
        assert_err(
            with(json!({"images": ["https://x"]})),
            "Invalid type for 'images[0]': expected an object, but got a string instead.",
            IRE,
            Some("images[0]"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"images": [{"image_url": 3}]})),
            "Invalid type for 'images[0].image_url': expected a string, but got an integer instead.",
            IRE,
            Some("images[0].image_url"),
            Some("invalid_type"),
        );
        let long = format!("https://x/{}", "a".repeat(MAX_IMAGE_URL_CHARS));
        assert_err(
            with(json!({"images": [{"image_url": long}]})),
            &format!(
                "Invalid 'images[0].image_url': string too long. Expected a string with maximum length 20971520, but got a string with length {} instead.",
                MAX_IMAGE_URL_CHARS + 10
            ),
            IRE,
            Some("images[0].image_url"),
            Some("string_above_max_length"),
        );
    }

    #[test]
    fn data_urls_are_checked_like_uploads() {
        let png_url = format!("data:image/png;base64,{}", b64(PNG));
        // The declared type of a data URL is ignored (I1): a JPEG sent as image/png.
        let jpeg_url = format!("data:image/png;base64,{}", b64(JPEG));
        let e = with(json!({"images": [{"image_url": png_url}, {"image_url": jpeg_url}, {"file_id": "file-abc"}]})).unwrap();
        assert_eq!(
            e.images[0],
            ImageInput::DataUrl {
                url: png_url.clone(),
                bytes: Bytes::from_static(PNG),
                format: ImageFormat::Png
            }
        );
        assert_eq!(e.images[1].format(), Some(ImageFormat::Jpeg));
        assert_eq!(e.images[2], ImageInput::FileId("file-abc".into()));
        assert_err(
            with(
                json!({"images": [{"image_url": png_url}, {"image_url": format!("data:image/gif;base64,{}", b64(GIF))}]}),
            ),
            "Invalid file 'images[1]': unsupported mimetype ('image/gif'). Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'.",
            IRE,
            Some("images[1]"),
            Some("unsupported_file_mimetype"),
        );
        for bad in [
            "data:image/png;base64,!!!",
            "data:image/png,rawbytes",
            format!("data:;base64,{}", b64(b"text")).as_str(),
        ] {
            assert_err(
                with(json!({"images": [{"image_url": bad}]})),
                "Invalid image file or mode for image 1, please check your image file.",
                IGU,
                Some("images[0]"),
                Some("invalid_image_file"),
            );
        }
        // Unpadded base64 is read too.
        let unpadded = format!("data:image/png;base64,{}", b64(PNG).trim_end_matches('='));
        assert!(with(json!({"images": [{"image_url": unpadded}]})).is_ok());
        let small = GptLimits {
            max_image_bytes: 8,
            ..limits()
        };
        let e = parse_json(
            &serde_json::to_vec(&json!({"prompt": "p", "images": [{"image_url": png_url}]}))
                .unwrap(),
            &models(),
            &small,
        )
        .unwrap_err();
        assert_eq!(
            parts(&e),
            (
                "Invalid file 'images[0]': file too large. Files must be less than 8 bytes.".into(),
                IRE,
                Some("images[0]".into()),
                Some("file_too_large")
            )
        );
    }

    #[test]
    fn strict_types() {
        assert_err(
            with(json!({"n": "2"})),
            "Invalid type for 'n': expected an integer, but got a string instead.",
            IRE,
            Some("n"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"n": 2.0})),
            "Invalid type for 'n': expected an integer, but got a decimal instead.",
            IRE,
            Some("n"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"n": 11})),
            "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.",
            IRE,
            Some("n"),
            Some("integer_above_max_value"),
        );
        assert_err(
            with(json!({"n": -3})),
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got -3 instead.",
            IRE,
            Some("n"),
            Some("integer_below_min_value"),
        );
        assert_err(
            with(json!({"quality": 1})),
            "Invalid type for 'quality': expected one of 'low', 'medium', 'high', or 'auto', but got an integer instead.",
            IRE,
            Some("quality"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"quality": "ultra"})),
            "Invalid value: 'ultra'. Supported values are: 'low', 'medium', 'high', and 'auto'.",
            IRE,
            Some("quality"),
            Some("invalid_value"),
        );
        assert_err(
            with(json!({"stream": "true"})),
            "Invalid type for 'stream': expected a boolean, but got a string instead.",
            IRE,
            Some("stream"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"output_compression": 101})),
            "Invalid 'output_compression': integer above maximum value. Expected a value <= 100, but got 101 instead.",
            IRE,
            Some("output_compression"),
            Some("integer_above_max_value"),
        );
        assert_err(
            with(json!({"size": 1024})),
            "Invalid type for 'size': expected a string, but got an integer instead.",
            IRE,
            Some("size"),
            Some("invalid_type"),
        );
        assert_err(
            with(json!({"user": ["a"]})),
            "Invalid type for 'user': expected a string, but got an array instead.",
            IRE,
            Some("user"),
            Some("invalid_type"),
        );
        // null is omitted for every optional field.
        let e = with(json!({
            "n": null, "output_compression": null, "partial_images": null, "quality": null,
            "size": null, "stream": null, "mask": null, "markup": null, "svg": null,
            "user": null, "safety_identifier": null, "input_fidelity": null, "background": null,
        }))
        .unwrap();
        assert!(
            e.n.is_none() && e.quality.is_none() && e.mask.is_none() && e.input_fidelity.is_none()
        );
        let e = with(json!({"n": 3, "size": "1536x1024", "stream": true, "moderation": "low", "quality": "high"})).unwrap();
        assert_eq!(
            (e.n, e.size, e.stream),
            (Some(3), Some(GptSize::Dims(1536, 1024)), Some(true))
        );
        assert_err(
            with(json!({"moderation": "strict"})),
            "Invalid value: 'strict'. Supported values are: 'auto' and 'low'.",
            IRE,
            Some("moderation"),
            Some("invalid_value"),
        );
    }

    #[test]
    fn svg_object() {
        let on_svg =
            |svg: Value| with(json!({"model": "gifsvg", "output_format": "svg", "svg": svg}));
        let e = on_svg(json!({"model": "m", "reasoning": {"effort": "high"}})).unwrap();
        assert_eq!(
            e.svg,
            Some(SvgSettings {
                model: "m".into(),
                effort: Some(SvgEffort::High)
            })
        );
        assert_eq!(
            on_svg(json!({"model": "m", "reasoning": {}}))
                .unwrap()
                .svg
                .unwrap()
                .effort,
            None
        );
        assert_err(
            on_svg(json!({"model": "m", "style": 1})),
            "Unknown parameter: 'svg.style'.",
            IRE,
            Some("svg.style"),
            Some("unknown_parameter"),
        );
        assert_err(
            on_svg(json!({"reasoning": {"effort": "low"}})),
            "Missing required parameter: 'svg.model'.",
            IRE,
            Some("svg.model"),
            Some("missing_required_parameter"),
        );
        assert_err(
            on_svg(json!("m")),
            "Invalid type for 'svg': expected an object, but got a string instead.",
            IRE,
            Some("svg"),
            Some("invalid_type"),
        );
        assert_err(
            on_svg(json!({"model": "m", "reasoning": {"effort": "low", "budget": 3}})),
            "Unknown parameter: 'svg.reasoning.budget'.",
            IRE,
            Some("svg.reasoning.budget"),
            Some("unknown_parameter"),
        );
        assert_err(
            with(json!({"svg": {"model": "m"}})),
            "SVG settings require SVG output format",
            IGU,
            Some("svg"),
            Some("invalid_value"),
        );
    }

    #[test]
    fn field_rules_shared_with_multipart() {
        assert_err(
            with(json!({"input_fidelity": "high"})),
            "The model 'gpt-image-2' does not support the 'input_fidelity' parameter.",
            IGU,
            Some("input_fidelity"),
            Some("invalid_input_fidelity_model"),
        );
        assert_err(
            with(json!({"user": "a", "safety_identifier": "b"})),
            "Invalid value for 'safety_identifier': it must equal 'user' when both are provided.",
            IRE,
            Some("safety_identifier"),
            Some("invalid_value"),
        );
        assert_err(
            with(json!({"background": "transparent", "output_format": "jpeg"})),
            "Transparent background is not supported for JPEG output format",
            IGU,
            Some("background"),
            Some("invalid_value"),
        );
        assert_err(
            with(json!({"output_compression": 50})),
            "Compression less than 100 is not supported for PNG output format",
            IGU,
            Some("output_compression"),
            Some("invalid_png_output_compression"),
        );
        assert_err(
            with(json!({"size": "3840x1024"})),
            "Invalid size '3840x1024'. The aspect ratio must be between 1:3 and 3:1.",
            IGU,
            Some("size"),
            Some("invalid_value"),
        );
    }

    #[test]
    fn mask_and_markup_references() {
        let png_url = format!("data:image/png;base64,{}", b64(PNG));
        let e = with(json!({"mask": {"image_url": png_url}})).unwrap();
        assert_eq!(
            e.mask.as_ref().and_then(|m| m.format()),
            Some(ImageFormat::Png)
        );
        let e = with(json!({"mask": {"file_id": "file-m"}, "size": "auto"})).unwrap();
        assert_eq!(e.mask, Some(ImageInput::FileId("file-m".into())));
        assert_err(
            with(json!({"mask": {"image_url": format!("data:image/png;base64,{}", b64(JPEG))}})),
            "Invalid file 'mask': unsupported mimetype ('image/jpeg'). Supported file formats are 'image/png'.",
            IRE,
            Some("mask"),
            Some("unsupported_file_mimetype"),
        );
        assert_err(
            with(json!({"mask": {"image_url": "data:image/png;base64,***"}})),
            "Invalid file 'mask': unsupported mimetype ('application/octet-stream'). Supported file formats are 'image/png'.",
            IRE,
            Some("mask"),
            Some("unsupported_file_mimetype"),
        );
        assert_err(
            with(json!({"mask": {"image_url": "u", "file_id": "f"}})),
            "Invalid 'mask': expected an object with exactly one of 'image_url' or 'file_id'.",
            IRE,
            Some("mask"),
            Some("invalid_value"),
        );
        assert_eq!(
            with(json!({"markup": {"image_url": "https://x/m.png"}}))
                .unwrap()
                .markup,
            Some(ImageInput::Url("https://x/m.png".into()))
        );
        assert_err(
            with(json!({"markup": {"image_url": format!("data:image/webp;base64,{}", b64(WEBP))}})),
            "Invalid file 'markup': unsupported mimetype ('image/webp'). Supported file formats are 'image/png'.",
            IRE,
            Some("markup"),
            Some("unsupported_file_mimetype"),
        );
        assert_err(
            with(json!({"mask": {"file_id": "a"}, "markup": {"file_id": "b"}})),
            "Markup cannot be combined with a mask",
            IGU,
            Some("markup"),
            Some("invalid_value"),
        );
        // A bad mask does not hide a bad size.
        let bad_mask = json!({"image_url": format!("data:image/jpeg;base64,{}", b64(JPEG))});
        assert_eq!(
            parts(&with(json!({"mask": bad_mask, "size": "bogus"})).unwrap_err())
                .2
                .as_deref(),
            Some("size")
        );
    }
}
