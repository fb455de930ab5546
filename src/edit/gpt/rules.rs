//! Per-family configuration, request limits, the scalar field steps from `n` to
//! `safety_identifier` in P1's order (F3–F6, P8, P9, U1, U2), and the cross-field rules (P10).
//! Each encoding supplies its fields through `checks::Fields`.

use super::checks::{
    Fields, Raw, bool_field, bounded_string, bounded_trimmed_string, cross, enum_field, igu,
    int_field, ire, present, shown, size_error, string_field,
};
use super::{
    Background, Complexity, Encoding, GptEdit, GptSize, ImageInput, InputFidelity, Moderation,
    OutputFormat, SvgSettings,
};
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
        let value = shown(&string_field(r, "size")?, limits);
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
        // Measured trimmed: the end-user id is trimmed before use (`limits::normalize_user`).
        s.user = Some(bounded_trimmed_string(
            r,
            "user",
            limits.max_user_chars,
            limits,
        )?);
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
}
