//! The rules both encodings share: per-family configuration, value checks (P8, P9, F3–F6,
//! U1–U3), file checks by bytes (P3, I1, I2, I4/I5's type rule) and the cross-field rules (P10).
//! Each encoding supplies its fields through [`Fields`]; the order of [`check_scalars`] is P1's.

use serde_json::Value;

use super::{
    Background, Complexity, Encoding, GptEdit, GptSize, ImageInput, InputFidelity, Moderation,
    OutputFormat, SvgSettings,
};
use crate::edit::form::{RawPart, parse_int, quoted_list};
use crate::edit::sniff::{ImageFormat, Sniffed, sniff};
use crate::error::GatewayError;

/// `size` limits of one family (§2.4, P9).
#[derive(Debug, Clone, PartialEq)]
pub struct SizeRules {
    /// Width and height must be multiples of this (G26).
    pub multiple: u32,
    pub max_edge: u32,
    /// Inclusive bounds on `width * height` (G27 and the maximum pixel budget).
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// Longest over shortest edge, inclusive (3.0 = between 1:3 and 3:1).
    pub max_ratio: f64,
}

impl Default for SizeRules {
    fn default() -> Self {
        SizeRules {
            multiple: 16,
            max_edge: 3840,
            min_pixels: 655_360,
            max_pixels: 8_294_400,
            max_ratio: 3.0,
        }
    }
}

/// Rules of one model family (§2.2), built from config; one per model id.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyRules {
    /// Allowed `quality` values in the order the G18 message lists them.
    pub quality: Vec<String>,
    /// `false`: any `input_fidelity` gets G32.
    pub input_fidelity: bool,
    /// F6: `output_format=gif` allowed (off by default).
    pub gif: bool,
    /// F6: `output_format=svg` allowed (off by default).
    pub svg: bool,
    pub size: SizeRules,
}

impl FamilyRules {
    fn with_quality(quality: &[&str]) -> Self {
        FamilyRules {
            quality: quality.iter().map(|q| (*q).to_owned()).collect(),
            input_fidelity: false,
            gif: false,
            svg: false,
            size: SizeRules::default(),
        }
    }

    /// `gpt-image-2` (+ snapshot): `low medium high auto`.
    pub fn gpt_image_2() -> Self {
        Self::with_quality(&["low", "medium", "high", "auto"])
    }

    /// `gpt-image-2.5-*`: adds `xhigh`, `max`.
    pub fn gpt_image_2_5() -> Self {
        Self::with_quality(&["low", "medium", "high", "xhigh", "max", "auto"])
    }

    /// `gpt-image-2.6-*`: as 2.5 (inferred).
    pub fn gpt_image_2_6() -> Self {
        Self::gpt_image_2_5()
    }
}

/// Request-wide limits (§2.3, P3, P4, U2).
#[derive(Debug, Clone, PartialEq)]
pub struct GptLimits {
    pub max_prompt_chars: usize,
    pub max_user_chars: usize,
    pub max_images: usize,
    /// Images and markup must be strictly smaller.
    pub max_image_bytes: usize,
    /// The mask must be strictly smaller.
    pub max_mask_bytes: usize,
    /// P4: text values longer than this are judged by length without being decoded.
    pub max_text_bytes: usize,
}

impl Default for GptLimits {
    fn default() -> Self {
        GptLimits {
            max_prompt_chars: 32_000,
            max_user_chars: 256,
            max_images: 16,
            max_image_bytes: 50 * 1024 * 1024,
            max_mask_bytes: 4 * 1024 * 1024,
            max_text_bytes: 1 << 20,
        }
    }
}

/// Model resolution, given by the caller: `None` → G2; an absent `model` takes
/// `default_model` (`None` → G1).
pub trait Models {
    fn family(&self, model: &str) -> Option<&FamilyRules>;
    fn default_model(&self) -> Option<&str>;
}

/// One field's value as sent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Raw<'a> {
    Part(&'a RawPart),
    Json(&'a Value),
}

/// The scalar fields of a request, by their JSON name (`svg` aside).
pub(crate) trait Fields {
    /// JSON `null` is returned as is; optional fields skip it through [`present`].
    fn get(&self, name: &str) -> Option<Raw<'_>>;
}

/// `None` for absent fields and JSON `null` (J1).
pub(crate) fn present(raw: Option<Raw<'_>>) -> Option<Raw<'_>> {
    raw.filter(|r| !matches!(r, Raw::Json(Value::Null)))
}

// ---- messages ----

fn ire(param: &str, code: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid_request(Some(param), Some(code), message)
}

fn igu(param: &str, code: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::image_user_error(Some(param), Some(code), message)
}

pub(crate) fn missing(param: &str) -> GatewayError {
    ire(
        param,
        "missing_required_parameter",
        format!("Missing required parameter: '{param}'."),
    )
}

pub(crate) fn unknown_parameter(param: &str) -> GatewayError {
    ire(
        param,
        "unknown_parameter",
        format!("Unknown parameter: '{param}'."),
    )
}

/// `Invalid type for 'x': expected {expected}, but got {got} instead.`
pub(crate) fn invalid_type(param: &str, expected: &str, got: &str) -> GatewayError {
    ire(
        param,
        "invalid_type",
        format!("Invalid type for '{param}': expected {expected}, but got {got} instead."),
    )
}

/// How OpenAI names the type of a JSON value in `invalid_type` messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn quoted_list_or(values: &[&str]) -> String {
    let q: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match q.len() {
        0 => String::new(),
        1 => q[0].clone(),
        2 => format!("{} or {}", q[0], q[1]),
        n => format!("{}, or {}", q[..n - 1].join(", "), q[n - 1]),
    }
}

pub(crate) fn too_long(param: &str, max: usize, got: usize) -> GatewayError {
    ire(
        param,
        "string_above_max_length",
        format!(
            "Invalid '{param}': string too long. Expected a string with maximum length {max}, but got a string with length {got} instead."
        ),
    )
}

/// `50 MB` (limit in MiB, no trailing zeros) or `N bytes` when not a round number of
/// hundredths of a MiB: the dall-e-2 wording of configured limits.
pub(crate) fn limit_words(limit: usize) -> String {
    let mib = limit as f64 / (1024.0 * 1024.0);
    let hundredths = mib * 100.0;
    if (hundredths - hundredths.round()).abs() < 1e-9 {
        format!("{mib} MB")
    } else {
        format!("{limit} bytes")
    }
}

/// P3.
pub(crate) fn file_too_large(param: &str, limit: usize) -> GatewayError {
    ire(
        param,
        "file_too_large",
        format!(
            "Invalid file '{param}': file too large. Files must be less than {}.",
            limit_words(limit)
        ),
    )
}

fn unsupported_mimetype(param: &str, mime: &str, supported: &str) -> GatewayError {
    ire(
        param,
        "unsupported_file_mimetype",
        format!(
            "Invalid file '{param}': unsupported mimetype ('{mime}'). Supported file formats are {supported}."
        ),
    )
}

/// G12, `index` 0-based.
pub(crate) fn invalid_image_file(param: &str, index: usize) -> GatewayError {
    igu(
        param,
        "invalid_image_file",
        format!(
            "Invalid image file or mode for image {}, please check your image file.",
            index + 1
        ),
    )
}

/// P6.
pub(crate) fn too_many_images(param: &str, max: usize, got: usize) -> GatewayError {
    ire(
        param,
        "array_above_max_length",
        format!(
            "Invalid '{param}': array too long. Expected an array with maximum length {max}, but got an array with length {got} instead."
        ),
    )
}

fn invalid_value(param: &str, value: &str, supported: &[&str]) -> GatewayError {
    ire(
        param,
        "invalid_value",
        format!(
            "Invalid value: '{value}'. Supported values are: {}.",
            quoted_list(supported)
        ),
    )
}

fn size_error(message: String) -> GatewayError {
    igu("size", "invalid_value", message)
}

fn cross(param: &str, message: &str) -> GatewayError {
    igu(param, "invalid_value", message)
}

// ---- value readers ----

/// A text part as UTF-8 (P4: a file part for a text field is read the same way).
pub(crate) fn part_text<'a>(part: &'a RawPart, param: &str) -> Result<&'a str, GatewayError> {
    std::str::from_utf8(&part.data)
        .map_err(|_| invalid_type(param, "a UTF-8 string", "bytes that are not valid UTF-8"))
}

/// Code points of UTF-8 bytes without validating them (P4 lengths of oversized values).
fn count_code_points(bytes: &[u8]) -> usize {
    bytes.iter().filter(|b| (**b & 0xC0) != 0x80).count()
}

/// Echo a value in a message; values beyond the P4 read limit are cut to 64 characters.
fn shown(value: &str, limits: &GptLimits) -> String {
    if value.len() > limits.max_text_bytes {
        value.chars().take(64).chain("…".chars()).collect()
    } else {
        value.to_owned()
    }
}

/// A string field.
pub(crate) fn string_field(raw: Raw<'_>, param: &str) -> Result<String, GatewayError> {
    match raw {
        Raw::Part(p) => part_text(p, param).map(str::to_owned),
        Raw::Json(Value::String(s)) => Ok(s.clone()),
        Raw::Json(v) => Err(invalid_type(param, "a string", json_kind(v))),
    }
}

/// A string field with a maximum length in code points (G9, U2), judged without decoding when
/// the part is longer than the P4 limit.
pub(crate) fn bounded_string(
    raw: Raw<'_>,
    param: &str,
    max_chars: usize,
    limits: &GptLimits,
) -> Result<String, GatewayError> {
    if let Raw::Part(p) = raw
        && p.data.len() > limits.max_text_bytes
    {
        let got = count_code_points(&p.data);
        if got > max_chars {
            return Err(too_long(param, max_chars, got));
        }
    }
    let s = string_field(raw, param)?;
    let got = s.chars().count();
    if got > max_chars {
        return Err(too_long(param, max_chars, got));
    }
    Ok(s)
}

/// An enum field: G19's wording for a JSON value of another type, G18's for a value not listed.
pub(crate) fn enum_field(
    raw: Raw<'_>,
    param: &str,
    allowed: &[&str],
    limits: &GptLimits,
) -> Result<String, GatewayError> {
    let value = match raw {
        Raw::Part(p) => part_text(p, param)?.to_owned(),
        Raw::Json(Value::String(s)) => s.clone(),
        Raw::Json(v) => {
            return Err(invalid_type(
                param,
                &format!("one of {}", quoted_list_or(allowed)),
                json_kind(v),
            ));
        }
    };
    if allowed.contains(&value.as_str()) {
        Ok(value)
    } else {
        Err(invalid_value(param, &shown(&value, limits), allowed))
    }
}

/// An integer field: multipart as `n` (G16, G17); JSON strictly an integer number.
pub(crate) fn int_field(
    raw: Raw<'_>,
    param: &str,
    min: i128,
    max: i128,
) -> Result<i128, GatewayError> {
    match raw {
        Raw::Part(p) => parse_int(
            param,
            std::str::from_utf8(&p.data).unwrap_or("\u{FFFD}"),
            min,
            max,
        ),
        Raw::Json(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            parse_int(param, &n.to_string(), min, max)
        }
        Raw::Json(v) => Err(invalid_type(param, "an integer", json_kind(v))),
    }
}

/// P8: multipart `true`/`false`, trimmed, ASCII case-insensitive; JSON strictly a boolean.
pub(crate) fn bool_field(raw: Raw<'_>, param: &str) -> Result<bool, GatewayError> {
    match raw {
        Raw::Part(p) => {
            let t = std::str::from_utf8(&p.data).unwrap_or("").trim();
            if t.eq_ignore_ascii_case("true") {
                Ok(true)
            } else if t.eq_ignore_ascii_case("false") {
                Ok(false)
            } else {
                Err(ire(
                    param,
                    "invalid_type",
                    format!(
                        "Invalid type for '{param}': expected a boolean, but got a string value that could not be converted into a boolean."
                    ),
                ))
            }
        }
        Raw::Json(Value::Bool(b)) => Ok(*b),
        Raw::Json(v) => Err(invalid_type(param, "a boolean", json_kind(v))),
    }
}

// ---- steps shared by both encodings ----

/// Model step (G1, G2; J1 for JSON `null`).
pub(crate) fn resolve_model<'m>(
    raw: Option<Raw<'_>>,
    models: &'m dyn Models,
) -> Result<(String, &'m FamilyRules), GatewayError> {
    let id = match raw {
        None => models
            .default_model()
            .map(str::to_owned)
            .ok_or_else(|| missing("model"))?,
        Some(raw) => string_field(raw, "model")?,
    };
    match models.family(&id) {
        Some(f) => Ok((id, f)),
        None => Err(igu(
            "model",
            "invalid_value",
            format!("The model '{id}' does not exist."),
        )),
    }
}

/// Prompt step (G7, G8, G9; U3: whitespace-only is accepted).
pub(crate) fn check_prompt(
    raw: Option<Raw<'_>>,
    limits: &GptLimits,
) -> Result<String, GatewayError> {
    let raw = raw.ok_or_else(|| missing("prompt"))?;
    let prompt = bounded_string(raw, "prompt", limits.max_prompt_chars, limits)?;
    if prompt.is_empty() {
        return Err(ire(
            "prompt",
            "empty_string",
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
        ));
    }
    Ok(prompt)
}

/// One input image's bytes: size (P3), then type by signature (I1, I2). `index` is 0-based.
pub(crate) fn check_image_bytes(
    param: &str,
    index: usize,
    bytes: &[u8],
    limits: &GptLimits,
) -> Result<ImageFormat, GatewayError> {
    if bytes.len() >= limits.max_image_bytes {
        return Err(file_too_large(param, limits.max_image_bytes));
    }
    match sniff(bytes) {
        Sniffed::Supported(f) => Ok(f),
        Sniffed::Other(mime) => Err(unsupported_mimetype(
            param,
            mime,
            "'image/jpeg', 'image/png', and 'image/webp'",
        )),
        Sniffed::Unknown => Err(invalid_image_file(param, index)),
    }
}

/// A mask or markup's bytes: size below `max` (P3), then PNG by signature (I4, I5).
pub(crate) fn check_png_bytes(param: &str, bytes: &[u8], max: usize) -> Result<(), GatewayError> {
    if bytes.len() >= max {
        return Err(file_too_large(param, max));
    }
    match sniff(bytes) {
        Sniffed::Supported(ImageFormat::Png) => Ok(()),
        Sniffed::Supported(f) => Err(unsupported_mimetype(param, f.mime(), "'image/png'")),
        Sniffed::Other(mime) => Err(unsupported_mimetype(param, mime, "'image/png'")),
        Sniffed::Unknown => Err(unsupported_mimetype(
            param,
            "application/octet-stream",
            "'image/png'",
        )),
    }
}

/// The G11 shape for a mask or markup that cannot be read at all (a broken data URL).
pub(crate) fn not_png(param: &str) -> GatewayError {
    unsupported_mimetype(param, "application/octet-stream", "'image/png'")
}

/// `^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$`
fn size_syntax(value: &str) -> Option<(u32, u32)> {
    let (w, h) = value.split_once('x')?;
    let side = |s: &str| -> Option<u32> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > 5 || !b.iter().all(u8::is_ascii_digit) || b[0] == b'0' {
            return None;
        }
        s.parse().ok()
    };
    Some((side(w)?, side(h)?))
}

/// P9, in order: syntax, multiple, edge, ratio, minimum and maximum pixels; GIF: syntax only.
pub(crate) fn check_size(
    value: &str,
    rules: &SizeRules,
    gif: bool,
) -> Result<GptSize, GatewayError> {
    if value == "auto" {
        return Ok(GptSize::Auto);
    }
    let Some((w, h)) = size_syntax(value) else {
        return Err(size_error(format!(
            "Invalid size '{value}'. Expected WIDTHxHEIGHT, for example '1824x1024'."
        )));
    };
    if gif {
        return Ok(GptSize::Dims(w, h));
    }
    let m = rules.multiple.max(1);
    if w % m != 0 || h % m != 0 {
        return Err(size_error(format!(
            "Invalid size '{value}'. Width and height must both be divisible by {m}."
        )));
    }
    if w > rules.max_edge || h > rules.max_edge {
        return Err(size_error(format!(
            "Invalid size '{value}'. Width and height must be at most {} pixels.",
            rules.max_edge
        )));
    }
    let (long, short) = (w.max(h) as f64, w.min(h) as f64);
    if long > rules.max_ratio * short {
        let r = rules.max_ratio;
        return Err(size_error(format!(
            "Invalid size '{value}'. The aspect ratio must be between 1:{r} and {r}:1."
        )));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels < rules.min_pixels {
        return Err(size_error(
            "Requested resolution is below the current minimum pixel budget.".into(),
        ));
    }
    if pixels > rules.max_pixels {
        return Err(size_error(
            "Requested resolution is above the current maximum pixel budget.".into(),
        ));
    }
    Ok(GptSize::Dims(w, h))
}

/// The checked scalar fields, from `n` to `safety_identifier`.
#[derive(Debug, Default)]
pub(crate) struct Scalars {
    pub n: Option<u8>,
    pub quality: Option<String>,
    pub output_compression: Option<u8>,
    pub size: Option<GptSize>,
    pub background: Option<Background>,
    pub output_format: Option<OutputFormat>,
    pub moderation: Option<Moderation>,
    pub stream: Option<bool>,
    pub partial_images: Option<u8>,
    pub complexity: Option<Complexity>,
    pub frame_count: Option<u8>,
    pub frame_duration_ms: Option<u32>,
    pub svg: Option<SvgSettings>,
    pub input_fidelity: Option<InputFidelity>,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
}

/// The steps from `n` to `safety_identifier` (P1), then U1. `svg` is read by the encoding.
pub(crate) fn check_scalars(
    src: &dyn Fields,
    svg: &dyn Fn() -> Result<Option<SvgSettings>, GatewayError>,
    model: &str,
    family: &FamilyRules,
    limits: &GptLimits,
) -> Result<Scalars, GatewayError> {
    let get = |name: &str| present(src.get(name));
    let mut s = Scalars::default();
    if let Some(r) = get("n") {
        s.n = Some(int_field(r, "n", 1, 10)? as u8);
    }
    if let Some(r) = get("quality") {
        let allowed: Vec<&str> = family.quality.iter().map(String::as_str).collect();
        s.quality = Some(enum_field(r, "quality", &allowed, limits)?);
    }
    if let Some(r) = get("output_compression") {
        s.output_compression = Some(int_field(r, "output_compression", 0, 100)? as u8);
    }
    if let Some(r) = get("size") {
        // GIF sizes are checked for syntax only; the format itself is judged at its own step.
        let gif = family.gif
            && match get("output_format") {
                Some(Raw::Part(p)) => &p.data[..] == b"gif",
                Some(Raw::Json(v)) => v.as_str() == Some("gif"),
                None => false,
            };
        let value = match r {
            Raw::Json(v) if !v.is_string() => {
                return Err(invalid_type("size", "a string", json_kind(v)));
            }
            _ => string_field(r, "size")?,
        };
        s.size = Some(check_size(&value, &family.size, gif)?);
    }
    if let Some(r) = get("background") {
        let v = enum_field(r, "background", Background::ALL, limits)?;
        s.background = Background::parse(&v);
    }
    if let Some(r) = get("output_format") {
        let allowed: Vec<&str> = OutputFormat::ALL
            .iter()
            .copied()
            .filter(|f| match *f {
                "gif" => family.gif,
                "svg" => family.svg,
                _ => true,
            })
            .collect();
        let v = enum_field(r, "output_format", &allowed, limits)?;
        s.output_format = OutputFormat::parse(&v);
    }
    if let Some(r) = get("moderation") {
        let v = enum_field(r, "moderation", Moderation::ALL, limits)?;
        s.moderation = Moderation::parse(&v);
    }
    if let Some(r) = get("stream") {
        s.stream = Some(bool_field(r, "stream")?);
    }
    if let Some(r) = get("partial_images") {
        s.partial_images = Some(int_field(r, "partial_images", 0, 3)? as u8);
    }
    if let Some(r) = get("complexity") {
        let v = enum_field(r, "complexity", Complexity::ALL, limits)?;
        s.complexity = Complexity::parse(&v);
    }
    if let Some(r) = get("frame_count") {
        s.frame_count = Some(int_field(r, "frame_count", 2, 16)? as u8);
    }
    if let Some(r) = get("frame_duration_ms") {
        s.frame_duration_ms =
            Some(int_field(r, "frame_duration_ms", 20, i128::from(u32::MAX))? as u32);
    }
    s.svg = svg()?;
    if let Some(r) = get("input_fidelity") {
        if !family.input_fidelity {
            return Err(igu(
                "input_fidelity",
                "invalid_input_fidelity_model",
                format!("The model '{model}' does not support the 'input_fidelity' parameter."),
            ));
        }
        let v = enum_field(r, "input_fidelity", InputFidelity::ALL, limits)?;
        s.input_fidelity = InputFidelity::parse(&v);
    }
    if let Some(r) = get("user") {
        s.user = Some(bounded_string(r, "user", limits.max_user_chars, limits)?);
    }
    if let Some(r) = get("safety_identifier") {
        s.safety_identifier = Some(bounded_string(
            r,
            "safety_identifier",
            limits.max_user_chars,
            limits,
        )?);
    }
    if let (Some(u), Some(sid)) = (&s.user, &s.safety_identifier)
        && !u.is_empty()
        && !sid.is_empty()
        && u != sid
    {
        return Err(ire(
            "safety_identifier",
            "invalid_value",
            "Invalid value for 'safety_identifier': it must equal 'user' when both are provided.",
        ));
    }
    Ok(s)
}

/// The svg effort value, shared by both encodings.
pub(crate) fn svg_effort(
    raw: Raw<'_>,
    limits: &GptLimits,
) -> Result<super::SvgEffort, GatewayError> {
    let v = enum_field(raw, "svg.reasoning.effort", super::SvgEffort::ALL, limits)?;
    Ok(super::SvgEffort::parse(&v).expect("enum_field returns a listed value"))
}

/// P10, in a fixed order (see the module doc of `gpt`).
pub(crate) fn cross_field(
    s: &Scalars,
    has_mask: bool,
    has_markup: bool,
) -> Result<(), GatewayError> {
    let format = s.output_format;
    if s.background == Some(Background::Transparent) && format == Some(OutputFormat::Jpeg) {
        return Err(cross(
            "background",
            "Transparent background is not supported for JPEG output format",
        ));
    }
    if matches!(format, None | Some(OutputFormat::Png))
        && s.output_compression.is_some_and(|c| c < 100)
    {
        return Err(igu(
            "output_compression",
            "invalid_png_output_compression",
            "Compression less than 100 is not supported for PNG output format",
        ));
    }
    for (f, name) in [(OutputFormat::Gif, "GIF"), (OutputFormat::Svg, "SVG")] {
        if format != Some(f) {
            continue;
        }
        if s.stream == Some(true) {
            return Err(cross(
                "stream",
                &format!("Streaming is not supported for {name} output format"),
            ));
        }
        if s.partial_images.is_some_and(|p| p > 0) {
            return Err(cross(
                "partial_images",
                &format!("Partial images are not supported for {name} output format"),
            ));
        }
        if f == OutputFormat::Gif && has_mask {
            return Err(cross(
                "mask",
                "Masks are not supported for GIF output format",
            ));
        }
        if s.output_compression.is_some_and(|c| c != 100) {
            return Err(cross(
                "output_compression",
                &format!("Compression is not supported for {name} output format"),
            ));
        }
        if f == OutputFormat::Svg && s.n.is_some_and(|n| n > 1) {
            return Err(cross(
                "n",
                "Only one image is supported for SVG output format",
            ));
        }
    }
    if format != Some(OutputFormat::Gif) {
        for (set, param) in [
            (s.frame_count.is_some(), "frame_count"),
            (s.frame_duration_ms.is_some(), "frame_duration_ms"),
        ] {
            if set {
                return Err(cross(param, "Frame settings require GIF output format"));
            }
        }
    }
    if format != Some(OutputFormat::Svg) && s.svg.is_some() {
        return Err(cross("svg", "SVG settings require SVG output format"));
    }
    if has_mask && has_markup {
        return Err(cross("markup", "Markup cannot be combined with a mask"));
    }
    Ok(())
}

/// Everything the encodings resolved, put together.
pub(crate) struct Parsed {
    pub encoding: Encoding,
    pub model: String,
    pub prompt: String,
    pub images: Vec<ImageInput>,
    pub images_as_array: bool,
    pub mask: Option<ImageInput>,
    pub markup: Option<ImageInput>,
}

impl Parsed {
    pub fn into_edit(self, s: Scalars) -> GptEdit {
        GptEdit {
            encoding: self.encoding,
            model: self.model,
            prompt: self.prompt,
            images: self.images,
            images_as_array: self.images_as_array,
            mask: self.mask,
            markup: self.markup,
            n: s.n,
            size: s.size,
            quality: s.quality,
            background: s.background,
            output_format: s.output_format,
            output_compression: s.output_compression,
            input_fidelity: s.input_fidelity,
            moderation: s.moderation,
            stream: s.stream,
            partial_images: s.partial_images,
            complexity: s.complexity,
            frame_count: s.frame_count,
            frame_duration_ms: s.frame_duration_ms,
            svg: s.svg,
            user: s.user,
            safety_identifier: s.safety_identifier,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::gpt::test_support::*;

    fn size(v: &str) -> Result<GptSize, GatewayError> {
        check_size(v, &SizeRules::default(), false)
    }

    #[track_caller]
    fn size_err(v: &str, message: &str) {
        let e = size(v).expect_err(v);
        assert_eq!(
            parts(&e),
            (
                message.to_owned(),
                IGU,
                Some("size".into()),
                Some("invalid_value")
            )
        );
    }

    #[test]
    fn size_bounds() {
        for ok in [
            "1024x640",
            "640x1024",
            "3840x2160",
            "2160x3840",
            "3840x1280",
            "1280x3840",
            "896x896",
            "1024x1024",
            "1536x1024",
        ] {
            assert!(size(ok).is_ok(), "{ok}");
        }
        assert_eq!(size("auto").unwrap(), GptSize::Auto);
        assert_eq!(size("1536x1024").unwrap(), GptSize::Dims(1536, 1024));
        for bad in [
            "bogus",
            "1024X1024",
            "01024x1024",
            "0x16",
            "123456x16",
            "1024x",
            "x1024",
            "1024*1024",
            " 1024x1024",
            "AUTO",
        ] {
            size_err(
                bad,
                &format!("Invalid size '{bad}'. Expected WIDTHxHEIGHT, for example '1824x1024'."),
            );
        }
        size_err(
            "1792x936",
            "Invalid size '1792x936'. Width and height must both be divisible by 16.",
        );
        size_err(
            "9x9",
            "Invalid size '9x9'. Width and height must both be divisible by 16.",
        );
        size_err(
            "4096x1024",
            "Invalid size '4096x1024'. Width and height must be at most 3840 pixels.",
        );
        size_err(
            "3856x2160",
            "Invalid size '3856x2160'. Width and height must be at most 3840 pixels.",
        );
        size_err(
            "2160x3856",
            "Invalid size '2160x3856'. Width and height must be at most 3840 pixels.",
        );
        size_err(
            "3840x1024",
            "Invalid size '3840x1024'. The aspect ratio must be between 1:3 and 3:1.",
        );
        size_err(
            "1024x3840",
            "Invalid size '1024x3840'. The aspect ratio must be between 1:3 and 3:1.",
        );
        size_err(
            "768x768",
            "Requested resolution is below the current minimum pixel budget.",
        );
        size_err(
            "512x512",
            "Requested resolution is below the current minimum pixel budget.",
        );
        size_err(
            "1024x624",
            "Requested resolution is below the current minimum pixel budget.",
        );
        size_err(
            "3840x2176",
            "Requested resolution is above the current maximum pixel budget.",
        );
        size_err(
            "3520x2560",
            "Requested resolution is above the current maximum pixel budget.",
        );
        // GIF: syntax only.
        assert_eq!(
            check_size("10x10", &SizeRules::default(), true).unwrap(),
            GptSize::Dims(10, 10)
        );
        assert!(check_size("10X10", &SizeRules::default(), true).is_err());
    }

    #[test]
    fn limit_wording() {
        assert_eq!(limit_words(50 * 1024 * 1024), "50 MB");
        assert_eq!(limit_words(4 * 1024 * 1024), "4 MB");
        assert_eq!(limit_words(2_621_440), "2.5 MB");
        assert_eq!(limit_words(1_000_001), "1000001 bytes");
    }

    #[test]
    fn file_checks() {
        let l = GptLimits {
            max_image_bytes: 20,
            ..GptLimits::default()
        };
        assert_eq!(
            check_image_bytes("image", 0, PNG, &l).unwrap(),
            ImageFormat::Png
        );
        assert_eq!(
            check_image_bytes("image", 0, JPEG, &l).unwrap(),
            ImageFormat::Jpeg
        );
        assert_eq!(
            check_image_bytes("image", 0, WEBP, &l).unwrap(),
            ImageFormat::Webp
        );
        let e = check_image_bytes("image[1]", 1, &[0u8; 20], &l).unwrap_err();
        assert_eq!(
            parts(&e),
            (
                "Invalid file 'image[1]': file too large. Files must be less than 20 bytes.".into(),
                IRE,
                Some("image[1]".into()),
                Some("file_too_large")
            )
        );
        assert!(
            check_image_bytes("image", 0, &[0u8; 19], &l)
                .is_err_and(|e| parts(&e).3 == Some("invalid_image_file"))
        );
        let e = check_png_bytes("mask", JPEG, 100).unwrap_err();
        assert_eq!(
            parts(&e),
            (
                "Invalid file 'mask': unsupported mimetype ('image/jpeg'). Supported file formats are 'image/png'.".into(),
                IRE,
                Some("mask".into()),
                Some("unsupported_file_mimetype")
            )
        );
        assert!(check_png_bytes("mask", PNG, 100).is_ok());
        let e = check_png_bytes("mask", PNG, PNG.len()).unwrap_err();
        assert_eq!(parts(&e).3, Some("file_too_large"));
    }

    #[test]
    fn list_wordings() {
        assert_eq!(quoted_list_or(&["a", "b"]), "'a' or 'b'");
        assert_eq!(quoted_list_or(&["a", "b", "c"]), "'a', 'b', or 'c'");
        assert_eq!(count_code_points("aé€😀".as_bytes()), 4);
    }
}
