//! The GPT-image profile of `POST /v1/images/edits` (`shared/spec/gpt-image-models.md`): the
//! field rules for both encodings (multipart, JSON) and the canonical bodies. Pure functions, no
//! tower or hyper types; the caller chooses this profile by the `model` it reads first.
//!
//! Check order (§9 P1): model → unknown and duplicate keys → prompt → images (count; per file
//! size, then type by bytes) → n → quality → output_compression → size → background →
//! output_format → moderation → stream → partial_images → complexity → frame_count →
//! frame_duration_ms → svg → input_fidelity → user → safety_identifier → cross-field (P10) →
//! mask → markup. Byte-level structure checks (I3, I4 conversion, I5 pixels) are not here: the
//! caller runs them on the typed inputs afterwards.
//!
//! Layout: `rules` (family rules, limits, the scalar steps, P10), `checks` (value readers,
//! OpenAI's wordings, model/prompt/file steps), `multipart` and `json` (each encoding's names,
//! images, mask and markup), `canonical` (what goes upstream). A dispatcher frames a multipart
//! body once with [`multipart::parse_parts`], reads `model` (`form::text_field`), then runs
//! [`multipart::check_multipart`] or the dall-e-2 `form::check` (after
//! `form::check_text_part_sizes`, which restores that profile's 64 KiB text cap).
//!
//! Choices where the contract leaves something open (all in one place):
//! - Types not recorded: G5, G6 → `invalid_request_error` with the key as param; G29, G30 and
//!   every P10 rule → `image_generation_user_error`; G12 → IGU with param `image`/`image[i]`
//!   (`images[i]` in JSON).
//! - Image params: `image` when the one image part was sent as `image`, else `image[i]`
//!   (0-based) for every `image`/`image[]` part; JSON `images[i]`. G12's message is 1-based.
//! - A text part (no `filename`) for `image`, `image[]`, `mask` or `markup` gets P5 with the
//!   name as sent; a repeated `mask`/`markup` or a scalar sent twice or as `name[]` gets the
//!   "got an array instead" wording; a part named `svg` gets "expected an object, but got a
//!   string instead"; `response_format` and `response_format[…]` get G4; `images`/`images[…]`
//!   get G6. Unknown names are echoed up to 64 characters, as the dall-e-2 form does.
//! - P4: the body is already buffered, so text parts are slices of it; a value longer than
//!   `max_text_bytes` is never UTF-8 decoded for the prompt/user/safety_identifier length
//!   errors (code points counted on the bytes), and enum values over it are echoed cut to 64
//!   characters.
//! - JSON: duplicate keys keep the last value (as Python's `json` upstream does); a body that is
//!   not one object is G40. Wrong JSON types read `expected an integer, but got a string
//!   instead.` (`a decimal`, `a boolean`, `an array`, `an object`, `null`); enums use G19's
//!   wording. Unknown keys inside `images[i]`, `mask`, `markup` and `svg` are reported at their
//!   own step, as `images[0].detail`, `svg.foo`, `svg.reasoning.foo`.
//! - A `data:` URL that is not `;base64` or whose base64 does not decode is G12 (images) or the
//!   G11 shape (mask, markup). A mask or markup that is not PNG by bytes names the sniffed type
//!   in G11's shape, or `application/octet-stream` when no signature matches.
//! - `size`: kept as `Auto` or `Dims(w, h)`; a GIF size passes the syntax only, and the syntax
//!   (no leading zeros) makes `Dims` print back exactly as sent.
//! - P10: PNG means `output_format` `png` or absent (upstream's default); `transparent` with
//!   `jpeg` only when `jpeg` was sent. Order: G30, G29, GIF rules (stream, partial_images, mask,
//!   compression), SVG rules (stream, partial_images, compression, n), frame settings, svg
//!   settings, mask+markup.
//! - `svg`: `model` required when `svg` is sent (`Missing required parameter: 'svg.model'.`);
//!   `reasoning.effort` one of `none minimal low medium high xhigh max`; its content is
//!   otherwise forwarded (F4). An empty `reasoning` object is dropped.
//! - `input_fidelity`, when a family allows it: `high` or `low` (G18's wording).
//! - `frame_duration_ms`: at most `u32::MAX` (upstream caps it at 655,350 itself).

pub mod canonical;
mod checks;
pub mod json;
pub mod multipart;
pub mod rules;

use bytes::Bytes;

pub use rules::{FamilyRules, GptLimits, Models, SizeRules};

use super::sniff::ImageFormat;

/// How the request came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Multipart,
    Json,
}

/// One input image, mask or markup.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageInput {
    /// A multipart file part, re-typed by its bytes (I1).
    Upload { bytes: Bytes, format: ImageFormat },
    /// A JSON `image_url` holding a `data:` URL: forwarded as sent, decoded for the checks.
    DataUrl {
        url: String,
        bytes: Bytes,
        format: ImageFormat,
    },
    /// A remote `image_url`, forwarded as sent, never fetched.
    Url(String),
    /// A Files API id, forwarded as sent.
    FileId(String),
}

impl ImageInput {
    /// The bytes the gateway holds (uploads and data URLs).
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            ImageInput::Upload { bytes, .. } | ImageInput::DataUrl { bytes, .. } => Some(bytes),
            ImageInput::Url(_) | ImageInput::FileId(_) => None,
        }
    }

    /// The sniffed format of the bytes the gateway holds.
    pub fn format(&self) -> Option<ImageFormat> {
        match self {
            ImageInput::Upload { format, .. } | ImageInput::DataUrl { format, .. } => Some(*format),
            ImageInput::Url(_) | ImageInput::FileId(_) => None,
        }
    }
}

/// `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptSize {
    Auto,
    Dims(u32, u32),
}

impl GptSize {
    pub fn as_string(&self) -> String {
        match self {
            GptSize::Auto => "auto".into(),
            GptSize::Dims(w, h) => format!("{w}x{h}"),
        }
    }
}

/// Generates a closed string enum with `parse`, `as_str` and `ALL`.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in the order OpenAI lists them in its messages.
            pub const ALL: &'static [&'static str] = &[$($text),+];

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
    };
}

string_enum!(
    /// `background` (G21).
    Background { Transparent = "transparent", Opaque = "opaque", Auto = "auto" }
);
string_enum!(
    /// `output_format` (G20; `gif`/`svg` only where the family enables them, F6).
    OutputFormat { Png = "png", Webp = "webp", Jpeg = "jpeg", Gif = "gif", Svg = "svg" }
);
string_enum!(
    /// `moderation` (G22).
    Moderation { Auto = "auto", Low = "low" }
);
string_enum!(
    /// `complexity`.
    Complexity { Low = "low", Medium = "medium", High = "high" }
);
string_enum!(
    /// `input_fidelity`, for families that allow it.
    InputFidelity { High = "high", Low = "low" }
);
string_enum!(
    /// `svg.reasoning.effort`.
    SvgEffort {
        None = "none",
        Minimal = "minimal",
        Low = "low",
        Medium = "medium",
        High = "high",
        Xhigh = "xhigh",
        Max = "max",
    }
);

/// `svg` (multipart `svg[model]`, `svg[reasoning][effort]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvgSettings {
    pub model: String,
    pub effort: Option<SvgEffort>,
}

/// A request that passed the GPT-image field rules. `None` = the caller did not send it; only
/// `model` is filled in when absent (L4).
#[derive(Debug, Clone, PartialEq)]
pub struct GptEdit {
    pub encoding: Encoding,
    pub model: String,
    pub prompt: String,
    pub images: Vec<ImageInput>,
    /// Multipart only: forward the images as `image[]` (several, or one sent as `image[]`).
    pub images_as_array: bool,
    /// The caller may replace the bytes after a lossless conversion before building the body.
    pub mask: Option<ImageInput>,
    pub markup: Option<ImageInput>,
    pub n: Option<u8>,
    pub size: Option<GptSize>,
    /// One of the family's configured values.
    pub quality: Option<String>,
    pub background: Option<Background>,
    pub output_format: Option<OutputFormat>,
    pub output_compression: Option<u8>,
    pub input_fidelity: Option<InputFidelity>,
    pub moderation: Option<Moderation>,
    pub stream: Option<bool>,
    pub partial_images: Option<u8>,
    pub complexity: Option<Complexity>,
    pub frame_count: Option<u8>,
    pub frame_duration_ms: Option<u32>,
    pub svg: Option<SvgSettings>,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
}

impl GptEdit {
    /// U1: `safety_identifier` if non-empty, else `user` if non-empty.
    pub fn end_user(&self) -> Option<&str> {
        self.safety_identifier
            .as_deref()
            .filter(|s| !s.is_empty())
            .or_else(|| self.user.as_deref().filter(|s| !s.is_empty()))
    }

    /// Input images (not counting mask or markup).
    pub fn input_image_count(&self) -> usize {
        self.images.len()
    }

    /// Images, mask and markup: `k` of the reservation formula (§7).
    pub fn reference_count(&self) -> usize {
        self.images.len() + usize::from(self.mask.is_some()) + usize::from(self.markup.is_some())
    }

    /// `size` as sent (`auto`, `WxH`), if sent.
    pub fn size_str(&self) -> Option<String> {
        self.size.as_ref().map(GptSize::as_string)
    }

    pub fn quality_str(&self) -> Option<&str> {
        self.quality.as_deref()
    }

    pub fn output_format_str(&self) -> Option<&'static str> {
        self.output_format.map(OutputFormat::as_str)
    }

    /// `n` as upstream resolves it (default 1).
    pub fn n_or_default(&self) -> u8 {
        self.n.unwrap_or(1)
    }

    /// Whether the response will be a server-sent event stream.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared fixtures for the profile's tests.
    use super::*;
    use crate::error::{ErrorParts, GatewayError};

    pub const PNG: &[u8] = b"\x89PNG\r\n\x1a\nrest-of-png";
    pub const JPEG: &[u8] = b"\xFF\xD8\xFF\xE0jpeg";
    pub const WEBP: &[u8] = b"RIFF\x10\0\0\0WEBPVP8 ";
    pub const GIF: &[u8] = b"GIF89a....";

    pub struct TestModels {
        pub families: Vec<(String, FamilyRules)>,
        pub default: Option<String>,
    }

    impl Models for TestModels {
        fn family(&self, model: &str) -> Option<&FamilyRules> {
            self.families
                .iter()
                .find(|(m, _)| m == model)
                .map(|(_, f)| f)
        }
        fn default_model(&self) -> Option<&str> {
            self.default.as_deref()
        }
    }

    pub fn models() -> TestModels {
        let mut gif_svg = FamilyRules::gpt_image_2_6();
        gif_svg.gif = true;
        gif_svg.svg = true;
        let mut fidelity = FamilyRules::gpt_image_2();
        fidelity.input_fidelity = true;
        TestModels {
            families: vec![
                ("gpt-image-2".into(), FamilyRules::gpt_image_2()),
                ("gpt-image-2.5-flare".into(), FamilyRules::gpt_image_2_5()),
                (
                    "gpt-image-2.6-sunburst".into(),
                    FamilyRules::gpt_image_2_6(),
                ),
                ("gifsvg".into(), gif_svg),
                ("fidelity".into(), fidelity),
            ],
            default: Some("gpt-image-2".into()),
        }
    }

    pub fn limits() -> GptLimits {
        GptLimits::default()
    }

    /// (message, type, param, code)
    pub fn parts(e: &GatewayError) -> (String, &'static str, Option<String>, Option<&'static str>) {
        let ErrorParts {
            message,
            kind,
            param,
            code,
            ..
        } = e.parts();
        (message, kind, param, code)
    }

    pub const IRE: &str = "invalid_request_error";
    pub const IGU: &str = "image_generation_user_error";

    #[track_caller]
    pub fn assert_err(
        r: Result<GptEdit, GatewayError>,
        message: &str,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) {
        let e = r.expect_err("should be rejected");
        let (m, k, p, c) = parts(&e);
        assert_eq!(
            (m.as_str(), k, p.as_deref(), c),
            (message, kind, param, code)
        );
    }
}
