//! Shared set-up of the fuzz targets: the gateway's default rules, a model table and a
//! current-thread runtime for the async multipart parsers.

use std::future::Future;
use std::sync::OnceLock;

use imagegate::config::ValidationConfig;
use imagegate::edit::files::FileRules;
use imagegate::edit::form::FormRules;
use imagegate::edit::gpt::{FamilyRules, GptLimits, Models};
use imagegate::edit::png_check::PngRules;

/// Runs an async parser to completion. The multipart framing reads an in-memory stream, so
/// no reactor or timer is needed; one runtime serves every input.
pub fn block_on<F: Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
    .block_on(f)
}

/// Splits `data` at its first `\n`: the first line (a header value or flags) and the rest.
pub fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[], data),
    }
}

/// The dall-e-2 form rules as `app.rs` builds them from the default `[validation]`.
pub fn form_rules() -> FormRules {
    let v = ValidationConfig::default();
    FormRules {
        max_prompt_chars: v.max_prompt_chars,
        max_user_chars: v.max_user_chars,
        models: vec!["dall-e-2".to_owned()],
        max_parts: v.max_parts,
    }
}

/// The dall-e-2 PNG rules as `app.rs` builds them from the default `[validation]`.
pub fn png_rules() -> PngRules {
    let v = ValidationConfig::default();
    PngRules {
        max_bytes: v.max_image_bytes,
        max_dimension: v.max_dimension,
        transparency: v.transparency.into(),
        max_conversion_bytes: v.max_conversion_bytes,
    }
}

/// The gpt-image file rules (defaults).
pub fn file_rules() -> FileRules {
    FileRules::default()
}

/// The documented model families, every option on somewhere, `gpt-image-2` the default.
pub struct FuzzModels(Vec<(&'static str, FamilyRules)>);

impl FuzzModels {
    pub fn new() -> Self {
        let mut gif_svg = FamilyRules::gpt_image_2_6();
        gif_svg.gif = true;
        gif_svg.svg = true;
        let mut fidelity = FamilyRules::gpt_image_2();
        fidelity.input_fidelity = true;
        FuzzModels(vec![
            ("gpt-image-2", FamilyRules::gpt_image_2()),
            ("gpt-image-2.5-flare", FamilyRules::gpt_image_2_5()),
            ("gpt-image-2.6-sunburst", gif_svg),
            ("fidelity", fidelity),
        ])
    }
}

impl Default for FuzzModels {
    fn default() -> Self {
        Self::new()
    }
}

impl Models for FuzzModels {
    fn family(&self, model: &str) -> Option<&FamilyRules> {
        self.0.iter().find(|(m, _)| *m == model).map(|(_, f)| f)
    }
    fn default_model(&self) -> Option<&str> {
        Some("gpt-image-2")
    }
}

/// Limits of the gpt-image profile (defaults).
pub fn gpt_limits() -> GptLimits {
    GptLimits::default()
}
