//! The multipart encoding (§2): framing with multer from the buffered body, then the field
//! rules in P1's order. `image` and `image[]` parts form one list in body order (P5); declared
//! part types are ignored and files re-typed by their bytes (I1).

use bytes::Bytes;

use super::checks::{
    self, Fields, Raw, check_image_bytes, check_png_bytes, invalid_type, missing, string_field,
    too_many_images, unknown_parameter,
};
use super::rules::{self, GptLimits, Models, Parsed};
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
    Ok(form::parse_parts_uncapped(boundary, body, max_parts).await?)
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
    let (model, family) = checks::resolve_model(first(&parts, "model").map(Raw::Part), models)?;
    check_names(&parts)?;
    let prompt = checks::check_prompt(first(&parts, "prompt").map(Raw::Part), limits)?;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::gpt::test_support::*;
    use crate::edit::gpt::{Background, GptSize, OutputFormat, SvgEffort};

    /// A text part or a file part (declared `application/octet-stream`, as SDK raw uploads).
    #[derive(Clone, Copy)]
    enum P<'a> {
        T(&'a str, &'a str),
        F(&'a str, &'a [u8]),
    }
    use P::{F, T};

    fn body(parts: &[P<'_>]) -> Bytes {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            match p {
                T(name, value) => {
                    out.extend_from_slice(
                        format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                            .as_bytes(),
                    );
                    out.extend_from_slice(value.as_bytes());
                }
                F(name, data) => {
                    out.extend_from_slice(
                        format!(
                            "Content-Disposition: form-data; name=\"{name}\"; filename=\"upload\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                    out.extend_from_slice(data);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        Bytes::from(out)
    }

    async fn run_with(
        parts: &[P<'_>],
        models: &dyn Models,
        limits: &GptLimits,
    ) -> Result<GptEdit, GatewayError> {
        parse_multipart("XyZ", body(parts), models, limits).await
    }

    async fn run(parts: &[P<'_>]) -> Result<GptEdit, GatewayError> {
        run_with(parts, &models(), &limits()).await
    }

    const BASE: [P<'static>; 3] = [
        T("model", "gpt-image-2"),
        T("prompt", "a cat"),
        F("image", PNG),
    ];

    /// BASE plus more parts.
    async fn with(extra: &[P<'_>]) -> Result<GptEdit, GatewayError> {
        let mut all = BASE.to_vec();
        all.extend_from_slice(extra);
        run(&all).await
    }

    /// BASE on another model plus more parts.
    async fn on(model: &str, extra: &[P<'_>]) -> Result<GptEdit, GatewayError> {
        let mut all = vec![T("model", model), BASE[1], BASE[2]];
        all.extend_from_slice(extra);
        run(&all).await
    }

    #[tokio::test]
    async fn minimal_request_sends_no_defaults() {
        let e = run(&BASE).await.unwrap();
        assert_eq!(e.encoding, Encoding::Multipart);
        assert_eq!(
            (e.model.as_str(), e.prompt.as_str()),
            ("gpt-image-2", "a cat")
        );
        assert_eq!(e.images.len(), 1);
        assert!(!e.images_as_array);
        assert_eq!(e.images[0].format(), Some(ImageFormat::Png));
        assert!(e.n.is_none() && e.size.is_none() && e.quality.is_none());
        assert!(e.background.is_none() && e.output_format.is_none() && e.stream.is_none());
        assert!(e.mask.is_none() && e.markup.is_none() && e.svg.is_none());
        assert!(e.user.is_none() && e.safety_identifier.is_none() && e.end_user().is_none());
    }

    #[tokio::test]
    async fn model_rules() {
        // Absent: the configured default (L4), or G1.
        let e = run(&[T("prompt", "p"), F("image", PNG)]).await.unwrap();
        assert_eq!(e.model, "gpt-image-2");
        let mut no_default = models();
        no_default.default = None;
        assert_err(
            run_with(&[T("prompt", "p"), F("image", PNG)], &no_default, &limits()).await,
            "Missing required parameter: 'model'.",
            IRE,
            Some("model"),
            Some("missing_required_parameter"),
        );
        // G2 with the id as sent; it hides a bad prompt and an unknown key.
        assert_err(
            run(&[
                T("model", "dall-e-2"),
                T("prompt", ""),
                T("style", "x"),
                F("image", PNG),
            ])
            .await,
            "The model 'dall-e-2' does not exist.",
            IGU,
            Some("model"),
            Some("invalid_value"),
        );
    }

    #[tokio::test]
    async fn name_rules() {
        // G4, any value, never stripped.
        for name in ["response_format", "response_format[]"] {
            assert_err(
                with(&[T(name, "b64_json")]).await,
                "Unknown parameter: 'response_format'.",
                IRE,
                Some("response_format"),
                Some("unknown_parameter"),
            );
        }
        // G6, the key as sent.
        assert_err(
            with(&[F("images", PNG)]).await,
            "Unknown parameter: 'images'. For multipart/form-data use 'image' or 'image[]'.",
            IRE,
            Some("images"),
            Some("invalid_value"),
        );
        assert_err(
            with(&[F("images[0]", PNG)]).await,
            "Unknown parameter: 'images[0]'. For multipart/form-data use 'image' or 'image[]'.",
            IRE,
            Some("images[0]"),
            Some("invalid_value"),
        );
        // G3.
        assert_err(
            with(&[T("style", "vivid")]).await,
            "Unknown parameter: 'style'.",
            IRE,
            Some("style"),
            Some("unknown_parameter"),
        );
        // P5: a text part for a file field; a repeated scalar.
        assert_err(
            run(&[T("prompt", "p"), T("image", "data")]).await,
            "Invalid type for 'image': expected a file, but got a string instead.",
            IRE,
            Some("image"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[T("mask", "data")]).await,
            "Invalid type for 'mask': expected a file, but got a string instead.",
            IRE,
            Some("mask"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[T("n", "1"), T("n", "2")]).await,
            "Invalid type for 'n': expected an integer, but got an array instead.",
            IRE,
            Some("n"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[T("stream[]", "true")]).await,
            "Invalid type for 'stream': expected a boolean, but got an array instead.",
            IRE,
            Some("stream"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[T("prompt", "again")]).await,
            "Invalid type for 'prompt': expected a string, but got an array instead.",
            IRE,
            Some("prompt"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[F("mask", PNG), F("mask", PNG)]).await,
            "Invalid type for 'mask': expected a file, but got an array instead.",
            IRE,
            Some("mask"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[T("svg", "{}")]).await,
            "Invalid type for 'svg': expected an object, but got a string instead.",
            IRE,
            Some("svg"),
            Some("invalid_type"),
        );
        // Unknown keys come before the prompt: an unknown key hides a missing prompt.
        assert_err(
            run(&[T("style", "x"), F("image", PNG)]).await,
            "Unknown parameter: 'style'.",
            IRE,
            Some("style"),
            Some("unknown_parameter"),
        );
    }

    #[tokio::test]
    async fn prompt_rules() {
        assert_err(
            run(&[T("model", "gpt-image-2"), F("image", PNG)]).await,
            "Missing required parameter: 'prompt'.",
            IRE,
            Some("prompt"),
            Some("missing_required_parameter"),
        );
        assert_err(
            run(&[T("prompt", ""), F("image", PNG)]).await,
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
            IRE,
            Some("prompt"),
            Some("empty_string"),
        );
        let long = "a".repeat(32_001);
        assert_err(
            run(&[T("prompt", &long), F("image", PNG)]).await,
            "Invalid 'prompt': string too long. Expected a string with maximum length 32000, but got a string with length 32001 instead.",
            IRE,
            Some("prompt"),
            Some("string_above_max_length"),
        );
        // Code points, not bytes; whitespace-only is accepted (U3).
        let wide = "€".repeat(32_000);
        assert_eq!(
            run(&[T("prompt", &wide), F("image", PNG)])
                .await
                .unwrap()
                .prompt,
            wide
        );
        assert_eq!(
            run(&[T("prompt", "  \n "), F("image", PNG)])
                .await
                .unwrap()
                .prompt,
            "  \n "
        );
        // P4: a text part over 1 MiB gets the length error, not invalid_multipart.
        let huge = "é".repeat(600_000);
        assert_err(
            run(&[T("prompt", &huge), F("image", PNG)]).await,
            "Invalid 'prompt': string too long. Expected a string with maximum length 32000, but got a string with length 600000 instead.",
            IRE,
            Some("prompt"),
            Some("string_above_max_length"),
        );
        // A prompt sent as a file part is read as text (P4).
        assert_eq!(
            run(&[F("prompt", b"as file"), F("image", PNG)])
                .await
                .unwrap()
                .prompt,
            "as file"
        );
        // The prompt comes before the images.
        assert_err(
            run(&[T("prompt", ""), F("image", GIF)]).await,
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
            IRE,
            Some("prompt"),
            Some("empty_string"),
        );
    }

    #[tokio::test]
    async fn image_list_rules() {
        assert_err(
            run(&[T("prompt", "p")]).await,
            "Missing required parameter: 'image'.",
            IRE,
            Some("image"),
            Some("missing_required_parameter"),
        );
        // `image` and `image[]` form one list in body order.
        let e = run(&[
            F("image[]", JPEG),
            T("prompt", "p"),
            F("image", WEBP),
            F("image[]", PNG),
        ])
        .await
        .unwrap();
        assert!(e.images_as_array);
        let formats: Vec<_> = e.images.iter().map(|i| i.format().unwrap()).collect();
        assert_eq!(
            formats,
            [ImageFormat::Jpeg, ImageFormat::Webp, ImageFormat::Png]
        );
        // One part sent as `image[]` stays an array (P5: forwarded as sent).
        assert!(
            run(&[T("prompt", "p"), F("image[]", PNG)])
                .await
                .unwrap()
                .images_as_array
        );
        let mut sixteen = vec![T("prompt", "p")];
        sixteen.extend(std::iter::repeat_n(F("image[]", PNG), 16));
        assert_eq!(run(&sixteen).await.unwrap().input_image_count(), 16);
        sixteen.push(F("image[]", PNG));
        assert_err(
            run(&sixteen).await,
            "Invalid 'image': array too long. Expected an array with maximum length 16, but got an array with length 17 instead.",
            IRE,
            Some("image"),
            Some("array_above_max_length"),
        );
    }

    #[tokio::test]
    async fn image_file_rules() {
        let small = GptLimits {
            max_image_bytes: 20,
            ..limits()
        };
        let big_png = [PNG, &[0u8; 20][..]].concat();
        // P3: size first, with the index of the part.
        assert_err(
            run_with(
                &[T("prompt", "p"), F("image[]", PNG), F("image[]", &big_png)],
                &models(),
                &small,
            )
            .await,
            "Invalid file 'image[1]': file too large. Files must be less than 20 bytes.",
            IRE,
            Some("image[1]"),
            Some("file_too_large"),
        );
        let fifty = GptLimits {
            max_image_bytes: 64,
            ..limits()
        };
        let e = run_with(
            &[T("prompt", "p"), F("image", &[7u8; 64])],
            &models(),
            &fifty,
        )
        .await
        .unwrap_err();
        assert_eq!(
            parts(&e).0,
            "Invalid file 'image': file too large. Files must be less than 64 bytes."
        );
        // Size before type: an oversized unknown file is too large, not undecodable.
        let e = run_with(
            &[T("prompt", "p"), F("image", &[0u8; 30])],
            &models(),
            &small,
        )
        .await
        .unwrap_err();
        assert_eq!(parts(&e).3, Some("file_too_large"));
        // I2: another image format → G11 naming the sniffed type.
        assert_err(
            run(&[T("prompt", "p"), F("image", GIF)]).await,
            "Invalid file 'image': unsupported mimetype ('image/gif'). Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'.",
            IRE,
            Some("image"),
            Some("unsupported_file_mimetype"),
        );
        assert_err(
            run(&[T("prompt", "p"), F("image[]", PNG), F("image[]", GIF)]).await,
            "Invalid file 'image[1]': unsupported mimetype ('image/gif'). Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'.",
            IRE,
            Some("image[1]"),
            Some("unsupported_file_mimetype"),
        );
        // No known signature → G12, 1-based in the message.
        assert_err(
            run(&[T("prompt", "p"), F("image", b"hello")]).await,
            "Invalid image file or mode for image 1, please check your image file.",
            IGU,
            Some("image"),
            Some("invalid_image_file"),
        );
        assert_err(
            run(&[T("prompt", "p"), F("image[]", PNG), F("image[]", b"")]).await,
            "Invalid image file or mode for image 2, please check your image file.",
            IGU,
            Some("image[1]"),
            Some("invalid_image_file"),
        );
        // The first bad file wins, whatever is wrong with later ones.
        let e = run_with(
            &[T("prompt", "p"), F("image[]", GIF), F("image[]", &big_png)],
            &models(),
            &small,
        )
        .await
        .unwrap_err();
        assert_eq!(parts(&e).2.as_deref(), Some("image[0]"));
    }

    #[tokio::test]
    async fn declared_part_type_is_ignored() {
        let mut raw = Vec::new();
        raw.extend_from_slice(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\np\r\n",
        );
        raw.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.txt\"\r\nContent-Type: text/plain\r\n\r\n");
        raw.extend_from_slice(JPEG);
        raw.extend_from_slice(b"\r\n--XyZ--\r\n");
        let body = Bytes::from(raw);
        let e = parse_multipart("XyZ", body.clone(), &models(), &limits())
            .await
            .unwrap();
        let ImageInput::Upload { bytes, format } = &e.images[0] else {
            panic!("an upload")
        };
        assert_eq!(*format, ImageFormat::Jpeg);
        assert_eq!(&bytes[..], JPEG);
    }

    #[tokio::test]
    async fn n_and_quality() {
        assert_eq!(with(&[T("n", " 10 ")]).await.unwrap().n, Some(10));
        assert_err(
            with(&[T("n", "11")]).await,
            "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.",
            IRE,
            Some("n"),
            Some("integer_above_max_value"),
        );
        assert_err(
            with(&[T("n", "0")]).await,
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            IRE,
            Some("n"),
            Some("integer_below_min_value"),
        );
        for bad in ["abc", "2.5"] {
            assert_err(
                with(&[T("n", bad)]).await,
                "Invalid type for 'n': expected an integer, but got a string value that could not be converted into an integer.",
                IRE,
                Some("n"),
                Some("invalid_type"),
            );
        }
        assert_err(
            with(&[T("quality", "ultra")]).await,
            "Invalid value: 'ultra'. Supported values are: 'low', 'medium', 'high', and 'auto'.",
            IRE,
            Some("quality"),
            Some("invalid_value"),
        );
        for q in ["xhigh", "max", "standard", "hd"] {
            assert_eq!(
                parts(&with(&[T("quality", q)]).await.unwrap_err()).3,
                Some("invalid_value")
            );
        }
        assert_eq!(
            on("gpt-image-2.5-flare", &[T("quality", "xhigh")])
                .await
                .unwrap()
                .quality
                .as_deref(),
            Some("xhigh")
        );
        assert_err(
            on("gpt-image-2.6-sunburst", &[T("quality", "ultra")]).await,
            "Invalid value: 'ultra'. Supported values are: 'low', 'medium', 'high', 'xhigh', 'max', and 'auto'.",
            IRE,
            Some("quality"),
            Some("invalid_value"),
        );
        // n before quality.
        assert_eq!(
            parts(&with(&[T("quality", "x"), T("n", "0")]).await.unwrap_err())
                .2
                .as_deref(),
            Some("n")
        );
    }

    #[tokio::test]
    async fn compression_and_size() {
        assert_err(
            with(&[T("output_compression", "101")]).await,
            "Invalid 'output_compression': integer above maximum value. Expected a value <= 100, but got 101 instead.",
            IRE,
            Some("output_compression"),
            Some("integer_above_max_value"),
        );
        assert_err(
            with(&[T("output_compression", "-1")]).await,
            "Invalid 'output_compression': integer below minimum value. Expected a value >= 0, but got -1 instead.",
            IRE,
            Some("output_compression"),
            Some("integer_below_min_value"),
        );
        assert_err(
            with(&[T("output_compression", "x")]).await,
            "Invalid type for 'output_compression': expected an integer, but got a string value that could not be converted into an integer.",
            IRE,
            Some("output_compression"),
            Some("invalid_type"),
        );
        // quality before output_compression before size.
        let e = with(&[
            T("size", "bogus"),
            T("output_compression", "101"),
            T("quality", "x"),
        ])
        .await
        .unwrap_err();
        assert_eq!(parts(&e).2.as_deref(), Some("quality"));
        let e = with(&[T("size", "bogus"), T("output_compression", "101")])
            .await
            .unwrap_err();
        assert_eq!(parts(&e).2.as_deref(), Some("output_compression"));
        assert_err(
            with(&[T("size", "bogus")]).await,
            "Invalid size 'bogus'. Expected WIDTHxHEIGHT, for example '1824x1024'.",
            IGU,
            Some("size"),
            Some("invalid_value"),
        );
        assert_err(
            with(&[T("size", "768x768")]).await,
            "Requested resolution is below the current minimum pixel budget.",
            IGU,
            Some("size"),
            Some("invalid_value"),
        );
        for (v, s) in [
            ("auto", GptSize::Auto),
            ("1024x640", GptSize::Dims(1024, 640)),
            ("3840x2160", GptSize::Dims(3840, 2160)),
            ("2160x3840", GptSize::Dims(2160, 3840)),
            ("3840x1280", GptSize::Dims(3840, 1280)),
        ] {
            let e = with(&[T("size", v)]).await.unwrap();
            assert_eq!((e.size, e.size_str().as_deref()), (Some(s), Some(v)));
        }
        // GIF: syntax only, when the family enables GIF.
        assert_eq!(
            on("gifsvg", &[T("size", "100x100"), T("output_format", "gif")])
                .await
                .unwrap()
                .size,
            Some(GptSize::Dims(100, 100))
        );
        assert_eq!(
            parts(
                &on("gifsvg", &[T("size", "100X100"), T("output_format", "gif")])
                    .await
                    .unwrap_err()
            )
            .0,
            "Invalid size '100X100'. Expected WIDTHxHEIGHT, for example '1824x1024'."
        );
        // Without GIF enabled, the size rules apply and come before G20.
        assert_eq!(
            parts(
                &with(&[T("size", "100x100"), T("output_format", "gif")])
                    .await
                    .unwrap_err()
            )
            .2
            .as_deref(),
            Some("size")
        );
    }

    #[tokio::test]
    async fn enums_and_booleans() {
        assert_err(
            with(&[T("background", "x")]).await,
            "Invalid value: 'x'. Supported values are: 'transparent', 'opaque', and 'auto'.",
            IRE,
            Some("background"),
            Some("invalid_value"),
        );
        assert_eq!(
            with(&[T("background", "transparent")])
                .await
                .unwrap()
                .background,
            Some(Background::Transparent)
        );
        for f in ["gif", "svg", "jpg"] {
            assert_err(
                with(&[T("output_format", f)]).await,
                &format!("Invalid value: '{f}'. Supported values are: 'png', 'webp', and 'jpeg'."),
                IRE,
                Some("output_format"),
                Some("invalid_value"),
            );
        }
        assert_eq!(
            on("gifsvg", &[T("output_format", "svg")])
                .await
                .unwrap()
                .output_format,
            Some(OutputFormat::Svg)
        );
        assert_eq!(
            parts(
                &on("gifsvg", &[T("output_format", "bmp")])
                    .await
                    .unwrap_err()
            )
            .0,
            "Invalid value: 'bmp'. Supported values are: 'png', 'webp', 'jpeg', 'gif', and 'svg'."
        );
        assert_err(
            with(&[T("moderation", "x")]).await,
            "Invalid value: 'x'. Supported values are: 'auto' and 'low'.",
            IRE,
            Some("moderation"),
            Some("invalid_value"),
        );
        assert_eq!(
            with(&[T("stream", " TRUE ")]).await.unwrap().stream,
            Some(true)
        );
        assert_eq!(
            with(&[T("stream", "False")]).await.unwrap().stream,
            Some(false)
        );
        assert_err(
            with(&[T("stream", "yes")]).await,
            "Invalid type for 'stream': expected a boolean, but got a string value that could not be converted into a boolean.",
            IRE,
            Some("stream"),
            Some("invalid_type"),
        );
        assert_err(
            with(&[T("partial_images", "4")]).await,
            "Invalid 'partial_images': integer above maximum value. Expected a value <= 3, but got 4 instead.",
            IRE,
            Some("partial_images"),
            Some("integer_above_max_value"),
        );
        // partial_images without stream is forwarded.
        assert_eq!(
            with(&[T("partial_images", "2")])
                .await
                .unwrap()
                .partial_images,
            Some(2)
        );
        assert_err(
            with(&[T("complexity", "extreme")]).await,
            "Invalid value: 'extreme'. Supported values are: 'low', 'medium', and 'high'.",
            IRE,
            Some("complexity"),
            Some("invalid_value"),
        );
        assert_err(
            with(&[T("frame_count", "1")]).await,
            "Invalid 'frame_count': integer below minimum value. Expected a value >= 2, but got 1 instead.",
            IRE,
            Some("frame_count"),
            Some("integer_below_min_value"),
        );
        assert_err(
            with(&[T("frame_count", "17")]).await,
            "Invalid 'frame_count': integer above maximum value. Expected a value <= 16, but got 17 instead.",
            IRE,
            Some("frame_count"),
            Some("integer_above_max_value"),
        );
        assert_err(
            with(&[T("frame_duration_ms", "19")]).await,
            "Invalid 'frame_duration_ms': integer below minimum value. Expected a value >= 20, but got 19 instead.",
            IRE,
            Some("frame_duration_ms"),
            Some("integer_below_min_value"),
        );
        // P1 order across the enums: background before output_format before moderation.
        let e = with(&[
            T("moderation", "x"),
            T("output_format", "x"),
            T("background", "x"),
        ])
        .await
        .unwrap_err();
        assert_eq!(parts(&e).2.as_deref(), Some("background"));
    }

    #[tokio::test]
    async fn svg_and_input_fidelity() {
        let e = on(
            "gifsvg",
            &[
                T("output_format", "svg"),
                T("svg[model]", "svg-1"),
                T("svg[reasoning][effort]", "minimal"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            e.svg,
            Some(SvgSettings {
                model: "svg-1".into(),
                effort: Some(SvgEffort::Minimal)
            })
        );
        assert_err(
            on(
                "gifsvg",
                &[
                    T("output_format", "svg"),
                    T("svg[reasoning][effort]", "low"),
                ],
            )
            .await,
            "Missing required parameter: 'svg.model'.",
            IRE,
            Some("svg.model"),
            Some("missing_required_parameter"),
        );
        assert_err(
            on(
                "gifsvg",
                &[
                    T("output_format", "svg"),
                    T("svg[model]", "m"),
                    T("svg[reasoning][effort]", "huge"),
                ],
            )
            .await,
            "Invalid value: 'huge'. Supported values are: 'none', 'minimal', 'low', 'medium', 'high', 'xhigh', and 'max'.",
            IRE,
            Some("svg.reasoning.effort"),
            Some("invalid_value"),
        );
        assert_err(
            on("gpt-image-2-2026-04-21", &[]).await,
            "The model 'gpt-image-2-2026-04-21' does not exist.",
            IGU,
            Some("model"),
            Some("invalid_value"),
        );
        assert_err(
            with(&[T("input_fidelity", "high")]).await,
            "The model 'gpt-image-2' does not support the 'input_fidelity' parameter.",
            IGU,
            Some("input_fidelity"),
            Some("invalid_input_fidelity_model"),
        );
        assert_err(
            on("gpt-image-2.6-sunburst", &[T("input_fidelity", "low")]).await,
            "The model 'gpt-image-2.6-sunburst' does not support the 'input_fidelity' parameter.",
            IGU,
            Some("input_fidelity"),
            Some("invalid_input_fidelity_model"),
        );
        assert_eq!(
            on("fidelity", &[T("input_fidelity", "high")])
                .await
                .unwrap()
                .input_fidelity,
            Some(crate::edit::gpt::InputFidelity::High)
        );
    }

    #[tokio::test]
    async fn user_rules() {
        let padded = format!("  {}\t ", "u".repeat(256));
        assert_eq!(
            with(&[T("user", &padded)])
                .await
                .unwrap()
                .end_user()
                .map(|u| u.trim().len()),
            Some(256),
            "the length is measured after trimming"
        );
        let long = "u".repeat(257);
        assert_err(
            with(&[T("user", &long)]).await,
            "Invalid 'user': string too long. Expected a string with maximum length 256, but got a string with length 257 instead.",
            IRE,
            Some("user"),
            Some("string_above_max_length"),
        );
        assert_err(
            with(&[T("safety_identifier", &long)]).await,
            "Invalid 'safety_identifier': string too long. Expected a string with maximum length 256, but got a string with length 257 instead.",
            IRE,
            Some("safety_identifier"),
            Some("string_above_max_length"),
        );
        assert_err(
            with(&[T("user", "a"), T("safety_identifier", "b")]).await,
            "Invalid value for 'safety_identifier': it must equal 'user' when both are provided.",
            IRE,
            Some("safety_identifier"),
            Some("invalid_value"),
        );
        let e = with(&[T("user", "a"), T("safety_identifier", "a")])
            .await
            .unwrap();
        assert_eq!(e.end_user(), Some("a"));
        let e = with(&[T("user", "u"), T("safety_identifier", "")])
            .await
            .unwrap();
        assert_eq!(
            (e.end_user(), e.safety_identifier.as_deref()),
            (Some("u"), Some(""))
        );
        let e = with(&[T("user", ""), T("safety_identifier", "s")])
            .await
            .unwrap();
        assert_eq!(e.end_user(), Some("s"));
        assert_eq!(with(&[T("user", "")]).await.unwrap().end_user(), None);
    }

    #[tokio::test]
    async fn cross_field_rules() {
        #[track_caller]
        fn check(r: Result<GptEdit, GatewayError>, param: &str, message: &str) {
            assert_err(r, message, IGU, Some(param), Some("invalid_value"));
        }
        check(
            with(&[T("background", "transparent"), T("output_format", "jpeg")]).await,
            "background",
            "Transparent background is not supported for JPEG output format",
        );
        for fmt in [None, Some("png")] {
            let mut extra = vec![T("output_compression", "80")];
            extra.extend(fmt.map(|f| T("output_format", f)));
            assert_err(
                with(&extra).await,
                "Compression less than 100 is not supported for PNG output format",
                IGU,
                Some("output_compression"),
                Some("invalid_png_output_compression"),
            );
        }
        assert_eq!(
            with(&[T("output_compression", "80"), T("output_format", "webp")])
                .await
                .unwrap()
                .output_compression,
            Some(80)
        );
        assert!(with(&[T("output_compression", "100")]).await.is_ok());
        let gif = T("output_format", "gif");
        check(
            on("gifsvg", &[gif, T("stream", "true")]).await,
            "stream",
            "Streaming is not supported for GIF output format",
        );
        check(
            on("gifsvg", &[gif, T("partial_images", "1")]).await,
            "partial_images",
            "Partial images are not supported for GIF output format",
        );
        check(
            on("gifsvg", &[gif, F("mask", PNG)]).await,
            "mask",
            "Masks are not supported for GIF output format",
        );
        check(
            on("gifsvg", &[gif, T("output_compression", "50")]).await,
            "output_compression",
            "Compression is not supported for GIF output format",
        );
        assert!(
            on(
                "gifsvg",
                &[
                    gif,
                    T("stream", "false"),
                    T("partial_images", "0"),
                    T("frame_count", "4"),
                    T("frame_duration_ms", "50")
                ]
            )
            .await
            .is_ok()
        );
        let svg = T("output_format", "svg");
        check(
            on("gifsvg", &[svg, T("stream", "true")]).await,
            "stream",
            "Streaming is not supported for SVG output format",
        );
        check(
            on("gifsvg", &[svg, T("partial_images", "2")]).await,
            "partial_images",
            "Partial images are not supported for SVG output format",
        );
        check(
            on("gifsvg", &[svg, T("output_compression", "0")]).await,
            "output_compression",
            "Compression is not supported for SVG output format",
        );
        check(
            on("gifsvg", &[svg, T("n", "2")]).await,
            "n",
            "Only one image is supported for SVG output format",
        );
        assert!(on("gifsvg", &[svg, F("mask", PNG)]).await.is_ok());
        check(
            with(&[T("frame_count", "4")]).await,
            "frame_count",
            "Frame settings require GIF output format",
        );
        check(
            with(&[T("frame_duration_ms", "40")]).await,
            "frame_duration_ms",
            "Frame settings require GIF output format",
        );
        check(
            with(&[T("svg[model]", "m")]).await,
            "svg",
            "SVG settings require SVG output format",
        );
        check(
            with(&[F("mask", PNG), F("markup", PNG)]).await,
            "markup",
            "Markup cannot be combined with a mask",
        );
    }

    #[tokio::test]
    async fn mask_and_markup() {
        let e = with(&[F("mask", PNG)]).await.unwrap();
        assert_eq!(
            e.mask,
            Some(ImageInput::Upload {
                bytes: Bytes::from_static(PNG),
                format: ImageFormat::Png
            })
        );
        assert_eq!(e.reference_count(), 2);
        assert_err(
            with(&[F("mask", JPEG)]).await,
            "Invalid file 'mask': unsupported mimetype ('image/jpeg'). Supported file formats are 'image/png'.",
            IRE,
            Some("mask"),
            Some("unsupported_file_mimetype"),
        );
        assert_err(
            with(&[F("mask", b"nothing")]).await,
            "Invalid file 'mask': unsupported mimetype ('application/octet-stream'). Supported file formats are 'image/png'.",
            IRE,
            Some("mask"),
            Some("unsupported_file_mimetype"),
        );
        let big_mask = [PNG, &vec![0u8; 4 * 1024 * 1024][..]].concat();
        assert_err(
            with(&[F("mask", &big_mask)]).await,
            "Invalid file 'mask': file too large. Files must be less than 4 MB.",
            IRE,
            Some("mask"),
            Some("file_too_large"),
        );
        assert!(with(&[F("markup", PNG)]).await.unwrap().markup.is_some());
        assert_err(
            with(&[F("markup", WEBP)]).await,
            "Invalid file 'markup': unsupported mimetype ('image/webp'). Supported file formats are 'image/png'.",
            IRE,
            Some("markup"),
            Some("unsupported_file_mimetype"),
        );
        // A bad mask does not hide a bad size: the size error comes first.
        assert_eq!(
            parts(
                &with(&[F("mask", JPEG), T("size", "1000x1000")])
                    .await
                    .unwrap_err()
            )
            .2
            .as_deref(),
            Some("size")
        );
        // Cross-field before the mask's own checks.
        assert_eq!(
            parts(
                &with(&[F("mask", JPEG), F("markup", JPEG)])
                    .await
                    .unwrap_err()
            )
            .2
            .as_deref(),
            Some("markup")
        );
    }

    #[tokio::test]
    async fn framing_faults_are_invalid_multipart() {
        let good = body(&BASE);
        let truncated = good.slice(..good.len() - 12);
        for b in [
            Bytes::from_static(b""),
            Bytes::from_static(b"garbage"),
            truncated,
        ] {
            let err = parse_multipart("XyZ", b, &models(), &limits())
                .await
                .unwrap_err();
            assert!(
                matches!(err, GatewayError::InvalidMultipart { .. }),
                "{err:?}"
            );
        }
        let many: Vec<P<'_>> =
            std::iter::repeat_n(T("user", "u"), max_parts(&limits()) + 1).collect();
        assert!(matches!(
            run(&many).await.unwrap_err(),
            GatewayError::InvalidMultipart { .. }
        ));
    }

    #[tokio::test]
    async fn utf8_and_oversized_values() {
        assert_err(
            run(&[F("prompt", b"\xff\xfe"), F("image", PNG)]).await,
            "Invalid type for 'prompt': expected a UTF-8 string, but got bytes that are not valid UTF-8.",
            IRE,
            Some("prompt"),
            Some("invalid_type"),
        );
        // Values beyond the P4 read limit are echoed cut to 64 characters.
        let tiny = GptLimits {
            max_text_bytes: 100,
            ..limits()
        };
        let long = "q".repeat(101);
        let cut = format!("{}…", "q".repeat(64));
        let mut parts = BASE.to_vec();
        parts.push(T("quality", &long));
        assert_eq!(
            parts_of(run_with(&parts, &models(), &tiny).await),
            format!(
                "Invalid value: '{cut}'. Supported values are: 'low', 'medium', 'high', and 'auto'."
            )
        );
        let mut parts = BASE.to_vec();
        parts.push(T("size", &long));
        assert_eq!(
            parts_of(run_with(&parts, &models(), &tiny).await),
            format!("Invalid size '{cut}'. Expected WIDTHxHEIGHT, for example '1824x1024'.")
        );
        // ...but within it they are echoed whole.
        let mut parts = BASE.to_vec();
        parts.push(T("quality", &long));
        assert!(parts_of(run(&parts).await).contains(&long));
    }

    fn parts_of(r: Result<GptEdit, GatewayError>) -> String {
        parts(&r.unwrap_err()).0
    }
}
