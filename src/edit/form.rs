//! The multipart form of an edit request, parsed once from the capped body, and its field rules.
//!
//! Order of checks (`../shared/spec/openai-behaviour.md`, "Order of checks"): content type →
//! multipart parse of the whole body → field names (unknown, arrays, duplicates) → required fields
//! → values (prompt, model, n, size, response_format, user) → declared part types. The image bytes
//! are kept as `Bytes` slices of multer's buffer and never copied again.

use bytes::Bytes;
use futures_util::stream;

use super::{FilePart, ImageEdit, ResponseFormat, Size};

mod error;

/// Why a form was refused: the facts `error` (beside this file) words OpenAI's 400 from (param and code
/// as OpenAI names them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormError {
    /// The content type is not `multipart/form-data` with a usable boundary (as sent; empty
    /// when absent).
    ContentType { sent: String },
    /// The body is not well-formed multipart.
    Multipart(MultipartFault),
    /// A known field sent as `name[]`, or twice: an array where one value is expected.
    Array { param: String, file: bool },
    /// A field this endpoint does not know (its name cut to 64 characters).
    Unknown { shown: String },
    /// A required field is absent.
    Missing { param: String },
    /// A text field whose bytes are not UTF-8.
    NotUtf8 { param: String },
    /// The prompt is empty.
    EmptyPrompt,
    /// A text field longer than its limit, in code points.
    TooLong {
        param: String,
        max: usize,
        got: usize,
    },
    /// A value outside the field's supported values.
    InvalidValue {
        param: String,
        value: String,
        supported: Vec<String>,
    },
    /// An integer field that is not an integer.
    NotAnInteger { param: String },
    /// An integer field below its minimum (`got` as sent, leading zeros dropped).
    BelowMin {
        param: String,
        min: i128,
        got: String,
    },
    /// An integer field above its maximum (`got` as sent, leading zeros dropped).
    AboveMax {
        param: String,
        max: i128,
        got: String,
    },
    /// A file part declared with a type other than PNG (or none, or octet-stream).
    Mimetype { param: String, declared: String },
}

/// What is wrong with the multipart framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultipartFault {
    /// A capped text part is larger than [`MAX_TEXT_PART_BYTES`].
    PartTooLarge {
        field: String,
    },
    /// More parts than the cap; `edit_fields` when the cap is the dall-e-2 form's.
    TooManyParts {
        max: usize,
        edit_fields: bool,
    },
    NoFieldName,
    NoParts,
    /// The body ended before the final boundary.
    Truncated,
    /// A part ended before its closing boundary.
    PartTruncated,
    HeadersIncomplete,
    HeadersUnreadable,
    NoBoundary,
    /// Another fault, in multer's words (without a final period).
    Other(String),
}

/// Limits the form rules need, taken from the validation config.
#[derive(Debug, Clone)]
pub struct FormRules {
    pub max_prompt_chars: usize,
    pub max_user_chars: usize,
    pub models: Vec<String>,
    pub max_parts: usize,
}

const TEXT_FIELDS: [&str; 6] = ["prompt", "model", "n", "size", "response_format", "user"];
const FILE_FIELDS: [&str; 2] = ["image", "mask"];
/// The enum-like text parts are small; a larger one is refused while parsing. `prompt` and
/// `user` are not capped here: the body is already buffered and capped, so a long value costs
/// nothing more, and it gets its field's own length error (`string_above_max_length`), the
/// same as a long value under 64 KiB.
pub const MAX_TEXT_PART_BYTES: u64 = 64 * 1024;
/// The text parts capped at [`MAX_TEXT_PART_BYTES`] while framing.
const CAPPED_TEXT_FIELDS: [&str; 4] = ["model", "n", "size", "response_format"];

/// The boundary of a `multipart/form-data` content type, or the OpenAI-shaped refusal.
pub fn boundary(content_type: Option<&http::HeaderValue>) -> Result<String, FormError> {
    let shown = content_type
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let refuse = || FormError::ContentType {
        sent: shown.clone(),
    };
    let value = content_type
        .and_then(|v| v.to_str().ok())
        .ok_or_else(refuse)?;
    let mime: mime::Mime = value.parse().map_err(|_| refuse())?;
    if mime.type_() != mime::MULTIPART || mime.subtype() != mime::FORM_DATA {
        return Err(refuse());
    }
    match mime.get_param(mime::BOUNDARY) {
        Some(b) if !b.as_str().is_empty() && b.as_str().len() <= 200 => Ok(b.as_str().to_owned()),
        _ => Err(refuse()),
    }
}

/// One multipart part as received.
#[derive(Debug, Clone)]
pub struct RawPart {
    pub name: String,
    /// `Some` for a file part (a `filename` in its `Content-Disposition`), even if empty.
    pub file_name: Option<String>,
    /// The declared type's essence, if any.
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// Parse the whole body into parts (framing only, no field rules). Any framing fault is
/// `invalid_multipart`; the dall-e-2 enum text fields are capped at 64 KiB here (`prompt` and
/// `user` get their length errors from the field rules, whatever their size).
pub async fn parse_parts(
    boundary: &str,
    body: Bytes,
    max_parts: usize,
) -> Result<Vec<RawPart>, FormError> {
    let limits = CAPPED_TEXT_FIELDS
        .iter()
        .fold(multer::SizeLimit::new(), |l, f| {
            l.for_field(*f, MAX_TEXT_PART_BYTES)
        });
    let constraints = multer::Constraints::new().size_limit(limits);
    read_parts(boundary, body, max_parts, constraints, true).await
}

/// Parse the whole body into parts with no per-part size limit (the body is already buffered
/// and capped, so every part is a slice of it): the GPT-image profile's framing.
pub async fn parse_parts_uncapped(
    boundary: &str,
    body: Bytes,
    max_parts: usize,
) -> Result<Vec<RawPart>, FormError> {
    read_parts(boundary, body, max_parts, multer::Constraints::new(), false).await
}

/// The 64 KiB cap [`parse_parts`] puts on the dall-e-2 text fields, with the same error, for
/// parts framed by [`parse_parts_uncapped`] (a dispatcher that frames once and then picks the
/// dall-e-2 rules by `model`).
pub fn check_text_part_sizes(parts: &[RawPart]) -> Result<(), FormError> {
    for p in parts {
        if CAPPED_TEXT_FIELDS.contains(&p.name.as_str())
            && p.data.len() as u64 > MAX_TEXT_PART_BYTES
        {
            return Err(FormError::Multipart(MultipartFault::PartTooLarge {
                field: p.name.clone(),
            }));
        }
    }
    Ok(())
}

async fn read_parts(
    boundary: &str,
    body: Bytes,
    max_parts: usize,
    constraints: multer::Constraints,
    edit_fields: bool,
) -> Result<Vec<RawPart>, FormError> {
    let input = stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut mp = multer::Multipart::with_constraints(input, boundary, constraints);
    let mut parts = Vec::new();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e)),
        };
        if parts.len() >= max_parts {
            return Err(FormError::Multipart(MultipartFault::TooManyParts {
                max: max_parts,
                edit_fields,
            }));
        }
        let name = match field.name() {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => {
                return Err(FormError::Multipart(MultipartFault::NoFieldName));
            }
        };
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.essence_str().to_owned());
        let data = field.bytes().await.map_err(multipart_error)?;
        parts.push(RawPart {
            name,
            file_name,
            content_type,
            data,
        });
    }
    if parts.is_empty() {
        return Err(FormError::Multipart(MultipartFault::NoParts));
    }
    Ok(parts)
}

fn multipart_error(e: multer::Error) -> FormError {
    FormError::Multipart(match e {
        multer::Error::FieldSizeExceeded { field_name, .. } => MultipartFault::PartTooLarge {
            field: field_name.unwrap_or_default(),
        },
        multer::Error::IncompleteStream => MultipartFault::Truncated,
        multer::Error::IncompleteFieldData { .. } => MultipartFault::PartTruncated,
        multer::Error::IncompleteHeaders => MultipartFault::HeadersIncomplete,
        multer::Error::ReadHeaderFailed(_) => MultipartFault::HeadersUnreadable,
        multer::Error::NoMultipart | multer::Error::NoBoundary => MultipartFault::NoBoundary,
        other => MultipartFault::Other(other.to_string().trim_end_matches('.').to_owned()),
    })
}

fn array_error(field: &str) -> FormError {
    FormError::Array {
        param: field.to_owned(),
        file: FILE_FIELDS.contains(&field),
    }
}

fn invalid_value(param: &str, value: &str, supported: &[&str]) -> FormError {
    FormError::InvalidValue {
        param: param.to_owned(),
        value: value.to_owned(),
        supported: supported.iter().map(|v| (*v).to_owned()).collect(),
    }
}

fn too_long(param: &str, max: usize, got: usize) -> FormError {
    FormError::TooLong {
        param: param.to_owned(),
        max,
        got,
    }
}

/// `n`: optional surrounding whitespace, an optional sign, ASCII digits.
pub fn parse_n(raw: &str) -> Result<u8, FormError> {
    parse_int("n", raw, 1, 10).map(|v| v as u8)
}

/// A multipart integer field with the `n` rules: optional surrounding whitespace, an optional
/// sign, ASCII digits; out of `min..=max` gets OpenAI's range wording with the value as sent
/// (leading zeros dropped).
pub fn parse_int(param: &str, raw: &str, min: i128, max: i128) -> Result<i128, FormError> {
    let invalid_type = || FormError::NotAnInteger {
        param: param.to_owned(),
    };
    let t = raw.trim();
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'+') => (false, &t[1..]),
        Some(b'-') => (true, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid_type());
    }
    let trimmed = digits.trim_start_matches('0');
    // Anything longer than 30 digits is certainly out of range; keep the shown value exact.
    let shown = if negative && !trimmed.is_empty() {
        format!("-{trimmed}")
    } else if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.to_owned()
    };
    let value: i128 = if trimmed.len() > 30 {
        if negative { i128::MIN } else { i128::MAX }
    } else {
        let v: i128 = if trimmed.is_empty() {
            0
        } else {
            trimmed.parse().map_err(|_| invalid_type())?
        };
        if negative { -v } else { v }
    };
    if value < min {
        return Err(FormError::BelowMin {
            param: param.to_owned(),
            min,
            got: shown,
        });
    }
    if value > max {
        return Err(FormError::AboveMax {
            param: param.to_owned(),
            max,
            got: shown,
        });
    }
    Ok(value)
}

fn text(part: &RawPart) -> Result<String, FormError> {
    String::from_utf8(part.data.to_vec()).map_err(|_| FormError::NotUtf8 {
        param: part.name.clone(),
    })
}

/// Content types accepted on a file part: the policy in openai-behaviour.md.
fn check_part_type(field: &'static str, part: &RawPart) -> Result<(), FormError> {
    match part.content_type.as_deref() {
        None | Some("image/png") | Some("application/octet-stream") => Ok(()),
        Some(other) => Err(FormError::Mimetype {
            param: field.to_owned(),
            declared: other.to_owned(),
        }),
    }
}

/// Parse and check the form. The returned edit has every default filled in.
pub async fn parse(boundary: &str, body: Bytes, rules: &FormRules) -> Result<ImageEdit, FormError> {
    check(parse_parts(boundary, body, rules.max_parts).await?, rules)
}

/// The first text part of that name, if it is UTF-8 (for records of refused requests).
pub fn text_field(parts: &[RawPart], name: &str) -> Option<String> {
    parts
        .iter()
        .find(|p| p.name == name)
        .and_then(|p| std::str::from_utf8(&p.data).ok())
        .map(str::to_owned)
}

/// Apply the field rules to parsed parts.
pub fn check(parts: Vec<RawPart>, rules: &FormRules) -> Result<ImageEdit, FormError> {
    // Field names: unknown, arrays and duplicates, in the order they were sent.
    let mut seen: Vec<&str> = Vec::with_capacity(parts.len());
    for p in &parts {
        let name = p.name.as_str();
        if let Some(base) = name.strip_suffix("[]")
            && (TEXT_FIELDS.contains(&base) || FILE_FIELDS.contains(&base))
        {
            return Err(array_error(base));
        }
        if !TEXT_FIELDS.contains(&name) && !FILE_FIELDS.contains(&name) {
            // Echo at most 64 characters of a name the caller chose.
            let shown: String = if name.chars().count() > 64 {
                name.chars().take(64).chain("…".chars()).collect()
            } else {
                name.to_owned()
            };
            return Err(FormError::Unknown { shown });
        }
        if seen.contains(&name) {
            return Err(array_error(name));
        }
        seen.push(name);
    }
    let get = |name: &str| parts.iter().find(|p| p.name == name);
    let missing = |name: &str| FormError::Missing {
        param: name.to_owned(),
    };
    let prompt_part = get("prompt").ok_or_else(|| missing("prompt"))?;
    let image_part = get("image").ok_or_else(|| missing("image"))?;

    let prompt = text(prompt_part)?;
    let prompt_len = prompt.chars().count();
    if prompt_len == 0 {
        return Err(FormError::EmptyPrompt);
    }
    if prompt_len > rules.max_prompt_chars {
        return Err(too_long("prompt", rules.max_prompt_chars, prompt_len));
    }

    let model = match get("model") {
        Some(p) => {
            let m = text(p)?;
            if !rules.models.contains(&m) {
                let supported: Vec<&str> = rules.models.iter().map(String::as_str).collect();
                return Err(invalid_value("model", &m, &supported));
            }
            m
        }
        None => rules.models[0].clone(),
    };
    let n = match get("n") {
        Some(p) => parse_n(&text(p)?)?,
        None => 1,
    };
    let size = match get("size") {
        Some(p) => {
            let s = text(p)?;
            Size::parse(&s)
                .ok_or_else(|| invalid_value("size", &s, &Size::ALL.map(Size::as_str)))?
        }
        None => Size::S1024,
    };
    let response_format = match get("response_format") {
        Some(p) => {
            let s = text(p)?;
            ResponseFormat::parse(&s)
                .ok_or_else(|| invalid_value("response_format", &s, &["url", "b64_json"]))?
        }
        None => ResponseFormat::Url,
    };
    let user = match get("user") {
        Some(p) => {
            let u = text(p)?;
            // Measured trimmed: the end-user id is trimmed before use (`limits::normalize_user`).
            let len = u.trim().chars().count();
            if len > rules.max_user_chars {
                return Err(too_long("user", rules.max_user_chars, len));
            }
            Some(u)
        }
        None => None,
    };

    check_part_type("image", image_part)?;
    let mask_part = get("mask");
    if let Some(m) = mask_part {
        check_part_type("mask", m)?;
    }
    let file = |p: &RawPart| FilePart {
        bytes: p.data.clone(),
        file_name: p.file_name.clone(),
        declared_type: p.content_type.clone(),
    };
    Ok(ImageEdit {
        prompt,
        model,
        n,
        size,
        response_format,
        user,
        image: file(image_part),
        mask: mask_part.map(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::GatewayError;

    /// (name, file name, content type, data)
    type TestPart<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

    fn rules() -> FormRules {
        FormRules {
            max_prompt_chars: 1000,
            max_user_chars: 256,
            models: vec!["dall-e-2".into()],
            max_parts: 16,
        }
    }

    fn body(parts: &[TestPart<'_>]) -> Bytes {
        let mut out = Vec::new();
        for (name, file, ct, data) in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            match file {
                Some(f) => out.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n"
                    )
                    .as_bytes(),
                ),
                None => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
                ),
            }
            if let Some(ct) = ct {
                out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        Bytes::from(out)
    }

    async fn run(parts: &[TestPart<'_>]) -> Result<ImageEdit, GatewayError> {
        parse("XyZ", body(parts), &rules())
            .await
            .map_err(GatewayError::from)
    }

    fn code(r: Result<ImageEdit, GatewayError>) -> (String, String) {
        match r.expect_err("should be rejected") {
            GatewayError::Field { param, code, .. } => (param, code.to_owned()),
            other => panic!("not a field error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn defaults_are_filled() {
        let e = run(&[
            ("prompt", None, None, b"a cat"),
            ("image", Some("a.png"), Some("image/png"), b"PNG"),
        ])
        .await
        .unwrap();
        assert_eq!(
            (e.model.as_str(), e.n, e.size, e.response_format),
            ("dall-e-2", 1, Size::S1024, ResponseFormat::Url)
        );
        assert!(e.user.is_none() && e.mask.is_none());
    }

    #[tokio::test]
    async fn name_rules() {
        let img: TestPart<'_> = ("image", Some("a.png"), None, b"x");
        assert_eq!(
            code(
                run(&[
                    ("prompt", None, None, b"p"),
                    img,
                    ("quality", None, None, b"hd")
                ])
                .await
            ),
            ("quality".into(), "unknown_parameter".into())
        );
        assert_eq!(
            code(
                run(&[
                    ("prompt", None, None, b"p"),
                    ("image[]", Some("a.png"), None, b"x")
                ])
                .await
            ),
            ("image".into(), "invalid_type".into())
        );
        assert_eq!(
            code(run(&[("prompt", None, None, b"p"), img, img]).await),
            ("image".into(), "invalid_type".into())
        );
        assert_eq!(
            code(run(&[img]).await),
            ("prompt".into(), "missing_required_parameter".into())
        );
        assert_eq!(
            code(run(&[("prompt", None, None, b"p")]).await),
            ("image".into(), "missing_required_parameter".into())
        );
    }

    #[tokio::test]
    async fn prompt_is_counted_in_code_points() {
        let img: TestPart<'_> = ("image", Some("a.png"), None, b"x");
        let ok = "é".repeat(1000);
        assert!(
            run(&[("prompt", None, None, ok.as_bytes()), img])
                .await
                .is_ok()
        );
        let long = "é".repeat(1001);
        let err = run(&[("prompt", None, None, long.as_bytes()), img])
            .await
            .unwrap_err();
        assert_eq!(
            err.parts().message,
            "Invalid 'prompt': string too long. Expected a string with maximum length 1000, but got a string with length 1001 instead."
        );
        assert_eq!(
            code(run(&[("prompt", None, None, b""), img]).await),
            ("prompt".into(), "empty_string".into())
        );
        assert!(run(&[("prompt", None, None, b"   "), img]).await.is_ok());
    }

    #[test]
    fn n_parsing() {
        for (raw, want) in [("1", 1), (" 10 ", 10), ("03", 3), ("+3", 3)] {
            assert_eq!(parse_n(raw).unwrap(), want, "{raw}");
        }
        let c = |raw: &str| match GatewayError::from(parse_n(raw).unwrap_err()) {
            GatewayError::Field { code, message, .. } => (code, message),
            _ => unreachable!(),
        };
        for raw in ["abc", "2.5", "", " ", "+", "1e1", "٣"] {
            assert_eq!(c(raw).0, "invalid_type", "{raw:?}");
        }
        assert_eq!(
            c("0").1,
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."
        );
        assert_eq!(c("-2").0, "integer_below_min_value");
        assert_eq!(
            c("11").1,
            "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead."
        );
        assert_eq!(
            c("99999999999999999999999999999999999999999").0,
            "integer_above_max_value"
        );
    }

    #[tokio::test]
    async fn enums_are_case_sensitive() {
        let img: TestPart<'_> = ("image", Some("a.png"), None, b"x");
        let err = run(&[
            ("prompt", None, None, b"p"),
            img,
            ("size", None, None, b"1024X1024"),
        ])
        .await
        .unwrap_err();
        assert_eq!(
            err.parts().message,
            "Invalid value: '1024X1024'. Supported values are: '256x256', '512x512', and '1024x1024'."
        );
        assert_eq!(
            code(
                run(&[
                    ("prompt", None, None, b"p"),
                    img,
                    ("response_format", None, None, b"URL")
                ])
                .await
            ),
            ("response_format".into(), "invalid_value".into())
        );
        assert_eq!(
            code(
                run(&[
                    ("prompt", None, None, b"p"),
                    img,
                    ("model", None, None, b"gpt-image-1")
                ])
                .await
            ),
            ("model".into(), "invalid_value".into())
        );
        let long_user = "u".repeat(257);
        assert_eq!(
            code(
                run(&[
                    ("prompt", None, None, b"p"),
                    img,
                    ("user", None, None, long_user.as_bytes())
                ])
                .await
            ),
            ("user".into(), "string_above_max_length".into())
        );
    }

    #[tokio::test]
    async fn part_types() {
        let bad = run(&[
            ("prompt", None, None, b"p"),
            ("image", Some("a.jpg"), Some("image/jpeg"), b"x"),
        ])
        .await
        .unwrap_err();
        assert_eq!(
            bad.parts().message,
            "Invalid file 'image': unsupported mimetype ('image/jpeg'). Supported file formats are 'image/png'."
        );
        assert!(
            run(&[
                ("prompt", None, None, b"p"),
                (
                    "image",
                    Some("upload"),
                    Some("application/octet-stream"),
                    b"x"
                )
            ])
            .await
            .is_ok()
        );
        assert!(
            run(&[("prompt", None, None, b"p"), ("image", None, None, b"x")])
                .await
                .is_ok()
        );
        assert_eq!(
            code(
                run(&[
                    ("prompt", None, None, b"p"),
                    ("image", None, None, b"x"),
                    ("mask", Some("m"), Some("text/plain"), b"x")
                ])
                .await
            ),
            ("mask".into(), "unsupported_file_mimetype".into())
        );
    }

    #[test]
    fn content_type_rules() {
        let hv = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(
            boundary(Some(&hv("multipart/form-data; boundary=abc"))).unwrap(),
            "abc"
        );
        assert_eq!(
            boundary(Some(&hv("Multipart/Form-Data; boundary=\"a b\""))).unwrap(),
            "a b"
        );
        for bad in [
            "text/plain",
            "multipart/form-data",
            "multipart/mixed; boundary=x",
            "application/json",
        ] {
            let err = boundary(Some(&hv(bad))).unwrap_err();
            assert!(matches!(err, FormError::ContentType { .. }), "{bad}");
        }
        assert!(boundary(None).is_err());
        assert!(GatewayError::from(boundary(Some(&hv("text/plain"))).unwrap_err()).parts().message.starts_with("Unsupported content type: 'text/plain'. This API method only accepts 'multipart/form-data' requests, but you specified the header 'Content-Type: text/plain'."));
    }

    #[tokio::test]
    async fn malformed_bodies_are_invalid_multipart() {
        let good = body(&[("prompt", None, None, b"p"), ("image", None, None, b"x")]);
        let truncated = good.slice(..good.len() - 12);
        for b in [
            Bytes::from_static(b""),
            Bytes::from_static(b"garbage"),
            truncated,
        ] {
            let err = parse("XyZ", b, &rules()).await.unwrap_err();
            assert!(matches!(err, FormError::Multipart(_)), "{err:?}");
        }
        let many: Vec<TestPart<'_>> = (0..1000)
            .map(|_| ("prompt", None, None, b"p" as &[u8]))
            .collect();
        assert!(matches!(
            run(&many).await.unwrap_err(),
            GatewayError::InvalidMultipart { .. }
        ));
    }

    /// The field-rule cases `tests/validation.rs` leaves to this file (it keeps one end-to-end
    /// case per param and code): each form's first refusal, as the envelope words it.
    #[tokio::test]
    async fn each_field_rule_case_gets_its_param_code_and_message() {
        let img: TestPart<'_> = ("image", Some("image.png"), Some("image/png"), b"PNG");
        let prompt: TestPart<'_> = ("prompt", None, None, b"p");
        let not_int = "Invalid type for 'n': expected an integer, but got a string value that could not be converted into an integer.";
        let long = |param: &str, max: usize, got: usize| {
            format!(
                "Invalid '{param}': string too long. Expected a string with maximum length {max}, but got a string with length {got} instead."
            )
        };
        let sizes = |v: &str| {
            format!(
                "Invalid value: '{v}'. Supported values are: '256x256', '512x512', and '1024x1024'."
            )
        };
        let array = |param: &str, what: &str| {
            format!("Invalid type for '{param}': expected {what}, but got an array instead.")
        };
        let otters = "🦦".repeat(1001);
        let accents = "é".repeat(1001);
        let huge = "123456789012345678901234567890123456789";
        let ascii_user = "u".repeat(257);
        let wide_user = "ü".repeat(257);
        let mut cases: Vec<(String, Vec<TestPart<'_>>, &str, &str, String)> = vec![
            (
                "prompt of 1001 two-byte code points".into(),
                vec![("prompt", None, None, accents.as_bytes()), img],
                "prompt",
                "string_above_max_length",
                long("prompt", 1000, 1001),
            ),
            (
                "image typed image/jpeg".into(),
                vec![prompt, ("image", Some("a.jpg"), Some("image/jpeg"), b"PNG")],
                "image",
                "unsupported_file_mimetype",
                "Invalid file 'image': unsupported mimetype ('image/jpeg'). Supported file formats are 'image/png'.".into(),
            ),
            (
                "prompt of 1001 four-byte code points".into(),
                vec![("prompt", None, None, otters.as_bytes()), img],
                "prompt",
                "string_above_max_length",
                long("prompt", 1000, 1001),
            ),
            (
                "n=-1".into(),
                vec![prompt, img, ("n", None, None, b"-1")],
                "n",
                "integer_below_min_value",
                "Invalid 'n': integer below minimum value. Expected a value >= 1, but got -1 instead.".into(),
            ),
            (
                "n=huge".into(),
                vec![prompt, img, ("n", None, None, huge.as_bytes())],
                "n",
                "integer_above_max_value",
                format!("Invalid 'n': integer above maximum value. Expected a value <= 10, but got {huge} instead."),
            ),
            (
                "response_format empty".into(),
                vec![prompt, img, ("response_format", None, None, b"")],
                "response_format",
                "invalid_value",
                "Invalid value: ''. Supported values are: 'url' and 'b64_json'.".into(),
            ),
            (
                "model=DALL-E-2".into(),
                vec![prompt, img, ("model", None, None, b"DALL-E-2")],
                "model",
                "invalid_value",
                "Invalid value: 'DALL-E-2'. Supported values are: 'dall-e-2'.".into(),
            ),
            (
                "user of 257 ASCII chars".into(),
                vec![prompt, img, ("user", None, None, ascii_user.as_bytes())],
                "user",
                "string_above_max_length",
                long("user", 256, 257),
            ),
            (
                "user of 257 two-byte chars".into(),
                vec![prompt, img, ("user", None, None, wide_user.as_bytes())],
                "user",
                "string_above_max_length",
                long("user", 256, 257),
            ),
            (
                "unknown file field".into(),
                vec![prompt, img, ("image2", Some("image2.png"), Some("image/png"), b"PNG")],
                "image2",
                "unknown_parameter",
                "Unknown parameter: 'image2'.".into(),
            ),
            (
                "field names are case-sensitive".into(),
                vec![prompt, img, ("Size", None, None, b"256x256")],
                "Size",
                "unknown_parameter",
                "Unknown parameter: 'Size'.".into(),
            ),
            (
                "n twice".into(),
                vec![prompt, img, ("n", None, None, b"1"), ("n", None, None, b"2")],
                "n",
                "invalid_type",
                array("n", "a string"),
            ),
            (
                "image[]".into(),
                vec![prompt, ("image[]", Some("image[].png"), Some("image/png"), b"PNG")],
                "image",
                "invalid_type",
                array("image", "a file"),
            ),
            (
                "prompt[]".into(),
                vec![("prompt[]", None, None, b"p"), img],
                "prompt",
                "invalid_type",
                array("prompt", "a string"),
            ),
            (
                "image typed image/webp".into(),
                vec![prompt, ("image", Some("a.webp"), Some("image/webp"), b"PNG")],
                "image",
                "unsupported_file_mimetype",
                "Invalid file 'image': unsupported mimetype ('image/webp'). Supported file formats are 'image/png'.".into(),
            ),
            // order of checks within the form
            (
                "unknown field before missing prompt".into(),
                vec![("quality", None, None, b"hd"), img],
                "quality",
                "unknown_parameter",
                "Unknown parameter: 'quality'.".into(),
            ),
            (
                "unknown field sent after the missing-prompt fault".into(),
                vec![img, ("quality", None, None, b"hd")],
                "quality",
                "unknown_parameter",
                "Unknown parameter: 'quality'.".into(),
            ),
            (
                "duplicate field before missing image".into(),
                vec![("prompt", None, None, b"a"), ("prompt", None, None, b"b")],
                "prompt",
                "invalid_type",
                array("prompt", "a string"),
            ),
            (
                "missing prompt before a bad n".into(),
                vec![("n", None, None, b"abc"), img],
                "prompt",
                "missing_required_parameter",
                "Missing required parameter: 'prompt'.".into(),
            ),
        ];
        for v in ["2.5", "", "1e1", "0x3", "+", "- 3", "٣"] {
            cases.push((
                format!("n={v:?}"),
                vec![prompt, img, ("n", None, None, v.as_bytes())],
                "n",
                "invalid_type",
                not_int.into(),
            ));
        }
        for v in ["256", "", "1024x1024 ", "2048x2048"] {
            cases.push((
                format!("size={v:?}"),
                vec![prompt, img, ("size", None, None, v.as_bytes())],
                "size",
                "invalid_value",
                sizes(v),
            ));
        }
        for (name, parts, param, code, message) in cases {
            let p = run(&parts).await.expect_err(&name).parts();
            assert_eq!(
                (p.status.as_u16(), p.kind, p.param.as_deref(), p.code),
                (400, "invalid_request_error", Some(param), Some(code)),
                "{name}"
            );
            assert_eq!(p.message, message, "{name}");
        }
    }

    /// The content-type cases `tests/validation.rs` leaves to this file.
    #[test]
    fn each_content_type_case_is_unsupported_with_the_header_as_sent() {
        let hv = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let unsupported = |ct: &str| {
            format!(
                "Unsupported content type: '{ct}'. This API method only accepts 'multipart/form-data' requests, but you specified the header 'Content-Type: {ct}'. Please try again with a supported content type."
            )
        };
        for ct in [
            Some("text/plain"),
            Some("application/json"),
            Some("multipart/form-data"),
            Some("multipart/form-data; boundary="),
            Some("multipart/mixed; boundary=abc"),
            None,
        ] {
            let header = ct.map(hv);
            let p = GatewayError::from(boundary(header.as_ref()).unwrap_err()).parts();
            assert_eq!(
                (p.status.as_u16(), p.kind, p.param, p.code),
                (
                    400,
                    "invalid_request_error",
                    None,
                    Some("unsupported_content_type")
                ),
                "{ct:?}"
            );
            assert_eq!(p.message, unsupported(ct.unwrap_or_default()), "{ct:?}");
        }
    }

    #[tokio::test]
    async fn uncapped_framing_plus_text_cap_matches_parse_parts() {
        for (field, len) in [
            ("prompt", 65_536usize),
            ("prompt", 65_537),
            ("size", 65_536),
            ("size", 65_537),
        ] {
            let value = vec![b'p'; len];
            let b = body(&[
                ("prompt", None, None, b"p"),
                (field, None, None, &value),
                ("image", None, None, b"x"),
            ]);
            let capped = parse_parts("XyZ", b.clone(), 16).await.map(|p| p.len());
            let split = match parse_parts_uncapped("XyZ", b, 16).await {
                Ok(parts) => check_text_part_sizes(&parts).map(|()| parts.len()),
                Err(e) => Err(e),
            };
            assert_eq!(capped, split, "{field} {len}");
            assert_eq!(
                capped.is_ok(),
                field == "prompt" || len == 65_536,
                "only the enum fields are capped: {field} {len}"
            );
        }
    }
}
