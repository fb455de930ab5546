//! The multipart encoding (§2): framing with multer from the buffered body, then the field
//! rules in P1's order. `image` and `image[]` parts form one list in body order (P5); declared
//! part types are ignored and files re-typed by their bytes (I1).

use bytes::Bytes;

use super::rules::{
    self, Fields, GptLimits, Models, Parsed, Raw, check_image_bytes, check_png_bytes, invalid_type,
    missing, string_field, too_many_images, unknown_parameter,
};
use super::{Encoding, GptEdit, ImageInput, SvgSettings};
use crate::edit::form::{self, RawPart};
use crate::edit::sniff::ImageFormat;
use crate::error::GatewayError;

/// Text fields the profile knows, with the type named by the "got an array" wording.
const TEXT_FIELDS: [(&str, &str); 19] = [
    ("model", "a string"),
    ("prompt", "a string"),
    ("n", "an integer"),
    ("size", "a string"),
    ("quality", "a string"),
    ("background", "a string"),
    ("output_format", "a string"),
    ("output_compression", "an integer"),
    ("input_fidelity", "a string"),
    ("moderation", "a string"),
    ("stream", "a boolean"),
    ("partial_images", "an integer"),
    ("complexity", "a string"),
    ("frame_count", "an integer"),
    ("frame_duration_ms", "an integer"),
    ("user", "a string"),
    ("safety_identifier", "a string"),
    ("svg[model]", "a string"),
    ("svg[reasoning][effort]", "a string"),
];

/// Framing only: every part of the buffered body, no per-part cap (P4: text parts are slices
/// of the body and judged by their fields' length rules, never `invalid_multipart`). More than
/// `max_parts` parts, or any framing fault, is `invalid_multipart`.
pub async fn parse_parts(
    boundary: &str,
    body: Bytes,
    max_parts: usize,
) -> Result<Vec<RawPart>, GatewayError> {
    form::parse_parts_uncapped(boundary, body, max_parts).await
}

/// The part count [`parse_multipart`] allows: room for twice the image limit and every field,
/// so that too many images get P6 rather than `invalid_multipart`.
pub fn max_parts(limits: &GptLimits) -> usize {
    2 * limits.max_images + 32
}

/// Parse and check a multipart body.
pub async fn parse_multipart(
    boundary: &str,
    body: Bytes,
    models: &dyn Models,
    limits: &GptLimits,
) -> Result<GptEdit, GatewayError> {
    let parts = parse_parts(boundary, body, max_parts(limits)).await?;
    check_multipart(parts, models, limits)
}

/// The first part of that name.
fn first<'a>(parts: &'a [RawPart], name: &str) -> Option<&'a RawPart> {
    parts.iter().find(|p| p.name == name)
}

struct PartFields<'a>(&'a [RawPart]);

impl Fields for PartFields<'_> {
    fn get(&self, name: &str) -> Option<Raw<'_>> {
        first(self.0, name).map(Raw::Part)
    }
}

fn array_error(field: &str, expected: &str) -> GatewayError {
    invalid_type(field, expected, "an array")
}

fn file_expected(name: &str) -> GatewayError {
    invalid_type(name, "a file", "a string")
}

/// Names: unknown, `response_format`, `images`, text parts for files, repeated scalars (P1's
/// second step, P5, P7).
fn check_names(parts: &[RawPart]) -> Result<(), GatewayError> {
    let mut seen: Vec<&str> = Vec::new();
    for p in parts {
        let name = p.name.as_str();
        if name == "response_format" || name.starts_with("response_format[") {
            return Err(unknown_parameter("response_format"));
        }
        if name == "images" || name.starts_with("images[") {
            return Err(GatewayError::invalid_request(
                Some(name),
                Some("invalid_value"),
                format!(
                    "Unknown parameter: '{name}'. For multipart/form-data use 'image' or 'image[]'."
                ),
            ));
        }
        match name {
            "image" | "image[]" => {
                if p.file_name.is_none() {
                    return Err(file_expected(name));
                }
                continue;
            }
            "mask" | "markup" => {
                if seen.contains(&name) {
                    return Err(array_error(name, "a file"));
                }
                if p.file_name.is_none() {
                    return Err(file_expected(name));
                }
                seen.push(name);
                continue;
            }
            "mask[]" | "markup[]" => return Err(array_error(&name[..name.len() - 2], "a file")),
            "svg" => return Err(invalid_type("svg", "an object", "a string")),
            _ => {}
        }
        if let Some((field, expected)) = TEXT_FIELDS.iter().find(|(f, _)| *f == name) {
            if seen.contains(field) {
                return Err(array_error(field, expected));
            }
            seen.push(field);
            continue;
        }
        if let Some(base) = name.strip_suffix("[]")
            && let Some((field, expected)) = TEXT_FIELDS.iter().find(|(f, _)| *f == base)
        {
            return Err(array_error(field, expected));
        }
        // Echo at most 64 characters of a name the caller chose.
        let shown: String = if name.chars().count() > 64 {
            name.chars().take(64).chain("…".chars()).collect()
        } else {
            name.to_owned()
        };
        return Err(unknown_parameter(&shown));
    }
    Ok(())
}

/// Apply the profile's rules to parsed parts, in P1's order.
pub fn check_multipart(
    parts: Vec<RawPart>,
    models: &dyn Models,
    limits: &GptLimits,
) -> Result<GptEdit, GatewayError> {
    let (model, family) = rules::resolve_model(first(&parts, "model").map(Raw::Part), models)?;
    check_names(&parts)?;
    let prompt = rules::check_prompt(first(&parts, "prompt").map(Raw::Part), limits)?;

    let image_parts: Vec<&RawPart> = parts
        .iter()
        .filter(|p| p.name == "image" || p.name == "image[]")
        .collect();
    if image_parts.is_empty() {
        return Err(missing("image"));
    }
    if image_parts.len() > limits.max_images {
        return Err(too_many_images(
            "image",
            limits.max_images,
            image_parts.len(),
        ));
    }
    let images_as_array = image_parts.len() > 1 || image_parts[0].name == "image[]";
    let mut images = Vec::with_capacity(image_parts.len());
    for (i, p) in image_parts.iter().enumerate() {
        let param = if images_as_array {
            format!("image[{i}]")
        } else {
            "image".to_owned()
        };
        let format = check_image_bytes(&param, i, &p.data, limits)?;
        images.push(ImageInput::Upload {
            bytes: p.data.clone(),
            format,
        });
    }

    let fields = PartFields(&parts);
    let svg = || -> Result<Option<SvgSettings>, GatewayError> {
        let model = first(&parts, "svg[model]");
        let effort = first(&parts, "svg[reasoning][effort]");
        if model.is_none() && effort.is_none() {
            return Ok(None);
        }
        let model = string_field(
            Raw::Part(model.ok_or_else(|| missing("svg.model"))?),
            "svg.model",
        )?;
        let effort = effort
            .map(|e| rules::svg_effort(Raw::Part(e), limits))
            .transpose()?;
        Ok(Some(SvgSettings { model, effort }))
    };
    let scalars = rules::check_scalars(&fields, &svg, &model, family, limits)?;
    let mask_part = first(&parts, "mask");
    let markup_part = first(&parts, "markup");
    rules::cross_field(&scalars, mask_part.is_some(), markup_part.is_some())?;

    let png = |p: &RawPart| ImageInput::Upload {
        bytes: p.data.clone(),
        format: ImageFormat::Png,
    };
    let mask = match mask_part {
        Some(p) => {
            check_png_bytes("mask", &p.data, limits.max_mask_bytes)?;
            Some(png(p))
        }
        None => None,
    };
    let markup = match markup_part {
        Some(p) => {
            check_png_bytes("markup", &p.data, limits.max_image_bytes)?;
            Some(png(p))
        }
        None => None,
    };
    Ok(Parsed {
        encoding: Encoding::Multipart,
        model,
        prompt,
        images,
        images_as_array,
        mask,
        markup,
    }
    .into_edit(scalars))
}
