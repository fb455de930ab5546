//! `[validation]`: the dall-e-2 profile's checks of a request (sizes, dimensions, fields).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransparencyPolicy {
    Strict,
    Compatible,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ValidationConfig {
    /// An image or mask must be strictly smaller than this many bytes.
    pub max_image_bytes: usize,
    /// Largest accepted width and height, read from IHDR before any decoding.
    pub max_dimension: u32,
    /// `strict`: an image without a mask needs a pixel with alpha 0; `compatible`: only the
    /// upstream's mode check.
    pub transparency: TransparencyPolicy,
    /// Cap on the whole request body; default: two images plus 1 MiB for fields and framing.
    pub max_body_bytes: Option<usize>,
    /// Longest prompt, in Unicode code points.
    pub max_prompt_chars: usize,
    /// Longest `user`, in Unicode code points.
    pub max_user_chars: usize,
    /// Model ids served with the dall-e-2 profile (OpenAI-compatible servers; dall-e-2 is
    /// retired at OpenAI). Without gpt-image models (`[models.accepted]` empty) the first is
    /// written into requests that omit `model`.
    pub models: Vec<String>,
    /// Most multipart parts accepted in one request.
    pub max_parts: usize,
    /// Memory the conversion of an interlaced tRNS PNG to RGBA may hold (its whole frame,
    /// width × height × 4 or 8 bytes); larger ones are refused 400. Also bounds gpt-image masks.
    pub max_conversion_bytes: usize,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_image_bytes: 4 * 1024 * 1024,
            max_dimension: 4096,
            transparency: TransparencyPolicy::Strict,
            max_body_bytes: None,
            max_prompt_chars: 1000,
            max_user_chars: 256,
            models: Vec::new(),
            max_parts: 16,
            max_conversion_bytes: DEFAULT_MAX_CONVERSION_BYTES,
        }
    }
}

impl ValidationConfig {
    pub fn body_cap(&self) -> usize {
        self.max_body_bytes
            .unwrap_or(2 * self.max_image_bytes + 1024 * 1024)
    }
}

impl ValidationConfig {
    /// Problems of `[validation]`.
    pub(super) fn problems(&self, p: &mut Vec<String>) {
        let v = self;
        if v.max_image_bytes < 64 {
            p.push("validation.max_image_bytes: must be at least 64".into());
        }
        if v.max_dimension == 0 || v.max_dimension > 8192 {
            p.push("validation.max_dimension: must be between 1 and 8192".into());
        }
        if v.body_cap() < v.max_image_bytes {
            p.push("validation.max_body_bytes: must be at least validation.max_image_bytes".into());
        }
        if v.max_prompt_chars == 0 {
            p.push("validation.max_prompt_chars: must be at least 1".into());
        }
        if v.max_user_chars == 0 {
            p.push("validation.max_user_chars: must be at least 1".into());
        }
        if v.max_parts < 2 {
            p.push("validation.max_parts: must be at least 2".into());
        }
        if v.max_conversion_bytes == 0 {
            p.push("validation.max_conversion_bytes: must be at least 1".into());
        }
    }
}

/// 64 MiB: an 8-bit RGBA frame of 4096 × 4096; the default of
/// `validation.max_conversion_bytes` (`edit::png_check::PngRules`).
pub const DEFAULT_MAX_CONVERSION_BYTES: usize = 64 * 1024 * 1024;

/// 89,478,485 pixels: Pillow's `MAX_IMAGE_PIXELS`, above which it warns of a decompression
/// bomb (and refuses at twice that). Every image a Pillow-based upstream opens quietly
/// passes, 48-megapixel phone photos included; a forged 65535 × 65535 header does not.
/// The default pixel cap of the file checks (`edit::files::FileRules`).
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// `size`: the three sizes dall-e-2 produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    S256,
    S512,
    S1024,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::S256, Size::S512, Size::S1024];

    pub fn parse(s: &str) -> Option<Size> {
        Size::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Size::S256 => "256x256",
            Size::S512 => "512x512",
            Size::S1024 => "1024x1024",
        }
    }
}
