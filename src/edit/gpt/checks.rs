//! Readers and messages both encodings share: the value types of a field (P8 booleans, `n`-style
//! integers, strict JSON types), OpenAI's wordings, and the steps before the scalar fields:
//! model (G1, G2), prompt (G7–G9, U3), file bytes (P3, I1, I2, the PNG rule of I4/I5).

use serde_json::Value;

use super::rules::{FamilyRules, GptLimits, Models};
use crate::edit::form::{RawPart, parse_int};
use crate::edit::sniff::{ImageFormat, Sniffed, sniff};
use crate::error::{GatewayError, quoted_list};

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

pub(crate) fn ire(param: &str, code: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid_request(Some(param), Some(code), message)
}

pub(crate) fn igu(param: &str, code: &'static str, message: impl Into<String>) -> GatewayError {
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

pub(crate) fn invalid_value(param: &str, value: &str, supported: &[&str]) -> GatewayError {
    ire(
        param,
        "invalid_value",
        format!(
            "Invalid value: '{value}'. Supported values are: {}.",
            quoted_list(supported)
        ),
    )
}

pub(crate) fn size_error(message: String) -> GatewayError {
    igu("size", "invalid_value", message)
}

pub(crate) fn cross(param: &str, message: &str) -> GatewayError {
    igu(param, "invalid_value", message)
}

// ---- value readers ----

/// A text part as UTF-8 (P4: a file part for a text field is read the same way).
pub(crate) fn part_text<'a>(part: &'a RawPart, param: &str) -> Result<&'a str, GatewayError> {
    std::str::from_utf8(&part.data).map_err(|_| {
        ire(
            param,
            "invalid_type",
            format!(
                "Invalid type for '{param}': expected a UTF-8 string, but got bytes that are not valid UTF-8."
            ),
        )
    })
}

/// Code points of UTF-8 bytes without validating them (P4 lengths of oversized values).
fn count_code_points(bytes: &[u8]) -> usize {
    bytes.iter().filter(|b| (**b & 0xC0) != 0x80).count()
}

/// Echo a value in a message; values beyond the P4 read limit are cut to 64 characters.
pub(crate) fn shown(value: &str, limits: &GptLimits) -> String {
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
    bounded(raw, param, max_chars, limits, false)
}

/// [`bounded_string`] measured after trimming the surrounding whitespace (the `user` id, which
/// is trimmed before use); the value is returned as sent.
pub(crate) fn bounded_trimmed_string(
    raw: Raw<'_>,
    param: &str,
    max_chars: usize,
    limits: &GptLimits,
) -> Result<String, GatewayError> {
    bounded(raw, param, max_chars, limits, true)
}

fn bounded(
    raw: Raw<'_>,
    param: &str,
    max_chars: usize,
    limits: &GptLimits,
    trimmed: bool,
) -> Result<String, GatewayError> {
    if let Raw::Part(p) = raw
        && p.data.len() > limits.max_text_bytes
    {
        let data = if trimmed {
            p.data.trim_ascii()
        } else {
            &p.data[..]
        };
        let got = count_code_points(data);
        if got > max_chars {
            return Err(too_long(param, max_chars, got));
        }
    }
    let s = string_field(raw, param)?;
    let got = if trimmed { s.trim() } else { s.as_str() }.chars().count();
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
        Raw::Part(p) => Ok(parse_int(
            param,
            std::str::from_utf8(&p.data).unwrap_or("\u{FFFD}"),
            min,
            max,
        )?),
        Raw::Json(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            Ok(parse_int(param, &n.to_string(), min, max)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::gpt::test_support::*;

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
