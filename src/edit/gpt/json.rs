//! The JSON encoding (§3, J1, J2): strict types, `null` as omitted (except `response_format`,
//! `model`, `prompt`, `images`), `images` as references. Remote URLs and file ids are forwarded
//! as sent; `data:` URLs are decoded and their bytes checked like uploads.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::rules::{
    self, Fields, GptLimits, Models, Parsed, Raw, check_image_bytes, check_png_bytes,
    invalid_image_file, invalid_type, json_kind, missing, not_png, present, string_field, too_long,
    too_many_images, unknown_parameter,
};
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

    let (model, family) = rules::resolve_model(map.get("model").map(Raw::Json), models)?;
    check_keys(&keys)?;
    let prompt = rules::check_prompt(map.get("prompt").map(Raw::Json), limits)?;

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
