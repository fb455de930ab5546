//! The models a gateway accepts, each with its rule profile, its lifecycle and its prices
//! (`gpt-image-models.md` §1, §7, §9 L1–L4): the `[models]` section of the configuration,
//! re-exported as `crate::models`.
//!
//! - An id listed in `validation.models` is served with the **dall-e-2 profile**
//!   (`openai-behaviour.md`), for OpenAI-compatible servers that still serve it.
//! - An id under `[models.accepted]` is served with the **gpt-image profile** and the rules of
//!   its family (`gpt-image-2`, `gpt-image-2.5`, `gpt-image-2.6`).
//! - Any other id, and an accepted id from 00:00 UTC on its `shutdown` date, is answered
//!   locally as upstream answers a retired model (G2), without an upstream call.
//! - A configuration without gpt-image models (only `validation.models`) behaves exactly as the
//!   dall-e-2-only gateway did: the dall-e-2 rules judge every request, `model` included.

use std::collections::BTreeMap;

use jiff::civil::Date;
use serde::{Deserialize, Serialize};

/// The rule sets of the gpt-image profile.
pub const FAMILIES: [&str; 3] = ["gpt-image-2", "gpt-image-2.5", "gpt-image-2.6"];

/// USD per 1M tokens (the config's unit); converted once to integer micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPriceConfig {
    pub text_in: f64,
    #[serde(default)]
    pub cached_text_in: f64,
    pub image_in: f64,
    #[serde(default)]
    pub cached_image_in: f64,
    pub image_out: f64,
}

impl TokenPriceConfig {
    /// OpenAI's list prices of the live families (§7): 5.00 / 1.25 / 8.00 / 2.00 / 30.00.
    pub fn list_2026() -> Self {
        TokenPriceConfig {
            text_in: 5.0,
            cached_text_in: 1.25,
            image_in: 8.0,
            cached_image_in: 2.0,
            image_out: 30.0,
        }
    }

    fn problems(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [
            ("text_in", self.text_in),
            ("cached_text_in", self.cached_text_in),
            ("image_in", self.image_in),
            ("cached_image_in", self.cached_image_in),
            ("image_out", self.image_out),
        ] {
            if !v.is_finite() || !(0.0..=1_000_000.0).contains(&v) {
                p.push(format!(
                    "{at}.{name}: must be a number of USD per 1M tokens between 0 and 1000000"
                ));
            }
        }
        p
    }
}

/// One accepted gpt-image model id.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The rule set: one of [`FAMILIES`].
    pub family: String,
    /// From 00:00 UTC on this date the id is answered as retired, locally.
    #[serde(default)]
    pub shutdown: Option<Date>,
    /// USD per 1M tokens; default: the family's list prices.
    #[serde(default)]
    pub prices: Option<TokenPriceConfig>,
}

impl ModelEntry {
    fn live(family: &str) -> ModelEntry {
        ModelEntry {
            family: family.into(),
            shutdown: None,
            prices: None,
        }
    }

    /// The prices in force for this id.
    pub fn prices(&self) -> TokenPriceConfig {
        self.prices.unwrap_or_else(TokenPriceConfig::list_2026)
    }
}

/// Overrides of a family's rules (every key optional; the built-in values follow the contract).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyConfig {
    /// Accepted `quality` values.
    pub quality: Option<Vec<String>>,
    /// Accept `input_fidelity` (off: answered 400 as upstream does, G32).
    pub input_fidelity: Option<bool>,
    /// Accept `output_format=gif` (access-gated at OpenAI; off by default, F6).
    pub gif: Option<bool>,
    /// Accept `output_format=svg` (access-gated; off by default, F6).
    pub svg: Option<bool>,
    /// `WIDTHxHEIGHT` limits (§2.4).
    pub size_multiple: Option<u32>,
    pub max_edge: Option<u32>,
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    pub max_aspect_ratio: Option<f64>,
}

/// Limits of gpt-image requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GptLimitsConfig {
    /// An input image (and a markup) must be strictly smaller than this (50 MiB).
    pub max_image_bytes: usize,
    /// A mask must be strictly smaller than this (4 MiB).
    pub max_mask_bytes: usize,
    /// Most input images in one request (16).
    pub max_images: usize,
    /// Longest prompt in Unicode code points (32000).
    pub max_prompt_chars: usize,
    /// Longest `user` / `safety_identifier` in code points (256).
    pub max_user_chars: usize,
    /// Largest width × height read from an input image's header (no decode happens).
    pub max_input_pixels: u64,
    /// Cap on the whole body; default: 16 images + a markup + a mask + 1 MiB of fields.
    pub max_body_bytes: Option<usize>,
    /// Longest line of an upstream event stream (one base64 image per line), 64 MiB.
    pub max_event_bytes: usize,
}

impl Default for GptLimitsConfig {
    fn default() -> Self {
        GptLimitsConfig {
            max_image_bytes: 50 * 1024 * 1024,
            max_mask_bytes: 4 * 1024 * 1024,
            max_images: 16,
            max_prompt_chars: 32_000,
            max_user_chars: 256,
            max_input_pixels: super::DEFAULT_MAX_PIXELS,
            max_body_bytes: None,
            max_event_bytes: 64 * 1024 * 1024,
        }
    }
}

impl GptLimitsConfig {
    /// The body cap: what the contract allows in one request, unless configured.
    pub fn body_cap(&self) -> usize {
        self.max_body_bytes.unwrap_or(
            (self.max_images + 1) * self.max_image_bytes + self.max_mask_bytes + 1024 * 1024,
        )
    }
}

/// `[models]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Written into a request that omits `model` (L4). Empty: such a request is answered 400
    /// `missing_required_parameter`, as upstream does.
    pub default: String,
    /// Ask the upstream's `GET /v1/models` once at start which configured models are live.
    pub check_at_start: bool,
    /// Warn about a configured model that shuts down within this many days.
    pub warn_within_days: u32,
    /// The gpt-image ids accepted, each with its family, shutdown date and prices.
    pub accepted: BTreeMap<String, ModelEntry>,
    /// Overrides of the families' rules.
    pub families: BTreeMap<String, FamilyConfig>,
    /// Limits of gpt-image requests.
    pub limits: GptLimitsConfig,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        let mut accepted = BTreeMap::new();
        for (id, family) in [
            ("gpt-image-2", "gpt-image-2"),
            ("gpt-image-2-2026-04-21", "gpt-image-2"),
            ("gpt-image-2.5-flare", "gpt-image-2.5"),
            ("gpt-image-2.5-flare-2026-09-08", "gpt-image-2.5"),
            ("gpt-image-2.5-sunburst", "gpt-image-2.5"),
            ("gpt-image-2.5-sunburst-2026-09-08", "gpt-image-2.5"),
            ("gpt-image-2.6-flare", "gpt-image-2.6"),
            ("gpt-image-2.6-sunburst", "gpt-image-2.6"),
        ] {
            accepted.insert(id.to_owned(), ModelEntry::live(family));
        }
        ModelsConfig {
            default: "gpt-image-2".into(),
            check_at_start: true,
            warn_within_days: 30,
            accepted,
            families: BTreeMap::new(),
            limits: GptLimitsConfig::default(),
        }
    }
}

impl ModelsConfig {
    /// No gpt-image model: the dall-e-2-only gateway (for OpenAI-compatible servers).
    pub fn dall_e_2_only() -> Self {
        ModelsConfig {
            default: String::new(),
            check_at_start: false,
            accepted: BTreeMap::new(),
            ..ModelsConfig::default()
        }
    }

    /// Whether gpt-image requests are served at all.
    pub fn serves_gpt_image(&self) -> bool {
        !self.accepted.is_empty()
    }

    /// The accepted entry for `id`, if it is accepted and not shut down on `today`.
    pub fn live(&self, id: &str, today: Date) -> Option<&ModelEntry> {
        self.accepted
            .get(id)
            .filter(|e| e.shutdown.is_none_or(|d| today < d))
    }

    /// Problems with this section; `dall_e_2` are the ids of `validation.models`.
    pub fn problems(&self, dall_e_2: &[String]) -> Vec<String> {
        let mut p = Vec::new();
        if self.accepted.is_empty() && dall_e_2.is_empty() {
            p.push(
                "models.accepted: no model is accepted (list gpt-image models here, or dall-e-2 in validation.models)"
                    .into(),
            );
        }
        for (id, e) in &self.accepted {
            if !FAMILIES.contains(&e.family.as_str()) {
                p.push(format!(
                    "models.accepted.\"{id}\".family: unknown family '{}' (one of {})",
                    e.family,
                    FAMILIES.join(", ")
                ));
            }
            if dall_e_2.contains(id) {
                p.push(format!(
                    "models.accepted.\"{id}\": also listed in validation.models; an id has one profile"
                ));
            }
            if let Some(prices) = &e.prices {
                p.extend(prices.problems(&format!("models.accepted.\"{id}\".prices")));
            }
        }
        for name in self.families.keys() {
            if !FAMILIES.contains(&name.as_str()) {
                p.push(format!(
                    "models.families.\"{name}\": unknown family (one of {})",
                    FAMILIES.join(", ")
                ));
            }
        }
        if !self.default.is_empty()
            && !self.accepted.contains_key(&self.default)
            && !dall_e_2.contains(&self.default)
        {
            p.push(format!(
                "models.default: '{}' is not an accepted model",
                self.default
            ));
        }
        let l = &self.limits;
        if l.max_images == 0 || l.max_images > 16 {
            p.push("models.limits.max_images: must be between 1 and 16".into());
        }
        if l.max_prompt_chars == 0 || l.max_user_chars == 0 {
            p.push("models.limits: max_prompt_chars and max_user_chars must be at least 1".into());
        }
        if l.max_image_bytes == 0 || l.max_mask_bytes == 0 || l.max_input_pixels == 0 {
            p.push(
                "models.limits: max_image_bytes, max_mask_bytes and max_input_pixels must be at least 1"
                    .into(),
            );
        }
        if l.body_cap() < l.max_image_bytes {
            p.push("models.limits.max_body_bytes: must be at least max_image_bytes".into());
        }
        if l.max_event_bytes < 1024 {
            p.push("models.limits.max_event_bytes: must be at least 1024".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_accepts_the_live_models_only() {
        let m = ModelsConfig::default();
        let today = Date::constant(2026, 12, 1);
        assert!(m.live("gpt-image-2", today).is_some());
        assert!(m.live("gpt-image-2.6-sunburst", today).is_some());
        for retired in [
            "dall-e-2",
            "gpt-image-1",
            "gpt-image-1.5",
            "chatgpt-image-latest",
        ] {
            assert!(m.live(retired, today).is_none(), "{retired}");
        }
        assert!(m.problems(&[]).is_empty(), "{:?}", m.problems(&[]));
    }

    #[test]
    fn an_id_is_retired_from_its_shutdown_date() {
        let mut m = ModelsConfig::default();
        m.accepted.get_mut("gpt-image-2").unwrap().shutdown = Some(Date::constant(2027, 1, 5));
        assert!(m.live("gpt-image-2", Date::constant(2027, 1, 4)).is_some());
        assert!(m.live("gpt-image-2", Date::constant(2027, 1, 5)).is_none());
    }

    #[test]
    fn problems_are_named() {
        let mut m = ModelsConfig {
            default: "nope".into(),
            ..Default::default()
        };
        m.accepted.get_mut("gpt-image-2").unwrap().family = "gpt-image-9".into();
        let p = m.problems(&["gpt-image-2".into()]);
        assert!(p.iter().any(|s| s.contains("models.default")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("unknown family")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("one profile")), "{p:?}");
        assert!(!ModelsConfig::dall_e_2_only().problems(&[]).is_empty());
        assert!(
            ModelsConfig::dall_e_2_only()
                .problems(&["dall-e-2".into()])
                .is_empty()
        );
    }

    #[test]
    fn the_body_cap_fits_a_full_request() {
        let l = GptLimitsConfig::default();
        assert_eq!(
            l.body_cap(),
            17 * 50 * 1024 * 1024 + 4 * 1024 * 1024 + 1024 * 1024
        );
    }
}
