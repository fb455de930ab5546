//! Token prices and cost accounting for the GPT image models (`gpt-image-models.md` §7, §9 B1–B7).
//!
//! Every amount is an integer number of micro-dollars (µ$). Rates are stored as µ$ per 1M tokens
//! (USD 5.00 per 1M → 5,000,000), converted once, with rounding, when the configuration is read.
//! Costs are computed with checked integer arithmetic and one ceiling division per request.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// One million: tokens per rate unit, and µ$ per USD.
const MILLION: u128 = 1_000_000;

/// Token prices of one model, in µ$ per 1M tokens.
///
/// Deserializes from USD per 1M tokens, as written in the configuration:
/// `{ text_in = 5.00, image_in = 8.00, image_out = 30.00, cached_text_in = 1.25, cached_image_in = 2.00 }`.
/// All five keys are required; negative, NaN, infinite or absurdly large (not representable in µ$
/// as a `u64`) values are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TokenPricesUsd")]
pub struct TokenPrices {
    pub text_in: u64,
    pub cached_text_in: u64,
    pub image_in: u64,
    pub cached_image_in: u64,
    pub image_out: u64,
}

/// The configuration's form of [`TokenPrices`]: USD per 1M tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct TokenPricesUsd {
    pub text_in: f64,
    pub cached_text_in: f64,
    pub image_in: f64,
    pub cached_image_in: f64,
    pub image_out: f64,
}

/// A price that cannot be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceError {
    pub field: &'static str,
    pub value: f64,
}

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is not a valid price (USD per 1M tokens: a finite, non-negative number)",
            self.field, self.value
        )
    }
}

impl std::error::Error for PriceError {}

/// USD per 1M tokens → µ$ per 1M tokens, rounded to the nearest µ$.
pub fn usd_per_million_to_micros(field: &'static str, usd: f64) -> Result<u64, PriceError> {
    let err = PriceError { field, value: usd };
    if !usd.is_finite() || usd < 0.0 {
        return Err(err);
    }
    let micros = (usd * 1_000_000.0).round();
    // 2^64 is exactly representable; anything at or above it does not fit.
    if micros >= 18_446_744_073_709_551_616.0 {
        return Err(err);
    }
    Ok(micros as u64)
}

impl TryFrom<TokenPricesUsd> for TokenPrices {
    type Error = PriceError;

    fn try_from(u: TokenPricesUsd) -> Result<Self, PriceError> {
        Ok(TokenPrices {
            text_in: usd_per_million_to_micros("text_in", u.text_in)?,
            cached_text_in: usd_per_million_to_micros("cached_text_in", u.cached_text_in)?,
            image_in: usd_per_million_to_micros("image_in", u.image_in)?,
            cached_image_in: usd_per_million_to_micros("cached_image_in", u.cached_image_in)?,
            image_out: usd_per_million_to_micros("image_out", u.image_out)?,
        })
    }
}

impl TokenPrices {
    /// `gpt-image-2` and its snapshot: 5.00 / 1.25 / 8.00 / 2.00 / 30.00 USD per 1M.
    pub const fn gpt_image_2() -> TokenPrices {
        TokenPrices {
            text_in: 5_000_000,
            cached_text_in: 1_250_000,
            image_in: 8_000_000,
            cached_image_in: 2_000_000,
            image_out: 30_000_000,
        }
    }

    /// `gpt-image-2.5-flare` / `-sunburst` (+ snapshots): as gpt-image-2 (the 3.00 cached-image
    /// outlier of one source is not used).
    pub const fn gpt_image_2_5() -> TokenPrices {
        TokenPrices::gpt_image_2()
    }

    /// `gpt-image-2.6-flare` / `-sunburst`: as gpt-image-2.
    pub const fn gpt_image_2_6() -> TokenPrices {
        TokenPrices::gpt_image_2()
    }

    /// `gpt-image-1` (back-billing): 5.00 / 1.25 / 10.00 / 2.50 / 40.00.
    pub const fn gpt_image_1() -> TokenPrices {
        TokenPrices {
            text_in: 5_000_000,
            cached_text_in: 1_250_000,
            image_in: 10_000_000,
            cached_image_in: 2_500_000,
            image_out: 40_000_000,
        }
    }

    /// `gpt-image-1-mini` (back-billing): 2.00 / 0.20 / 2.50 / 0.25 / 8.00.
    pub const fn gpt_image_1_mini() -> TokenPrices {
        TokenPrices {
            text_in: 2_000_000,
            cached_text_in: 200_000,
            image_in: 2_500_000,
            cached_image_in: 250_000,
            image_out: 8_000_000,
        }
    }

    /// The §7 list prices of a model id (the ids of §1 that have recorded prices).
    pub fn list_price(model: &str) -> Option<TokenPrices> {
        match model {
            "gpt-image-2" | "gpt-image-2-2026-04-21" => Some(TokenPrices::gpt_image_2()),
            "gpt-image-2.5-flare"
            | "gpt-image-2.5-flare-2026-09-08"
            | "gpt-image-2.5-sunburst"
            | "gpt-image-2.5-sunburst-2026-09-08" => Some(TokenPrices::gpt_image_2_5()),
            "gpt-image-2.6-flare" | "gpt-image-2.6-sunburst" => Some(TokenPrices::gpt_image_2_6()),
            "gpt-image-1" => Some(TokenPrices::gpt_image_1()),
            "gpt-image-1-mini" => Some(TokenPrices::gpt_image_1_mini()),
            _ => None,
        }
    }
}

/// The `usage` object of an answer (§4 JSON body, §5 `image_edit.completed` event), read leniently.
///
/// `input_tokens` and `output_tokens` are required (a usage without them cannot be billed: the
/// caller charges the reservation, B3); `input_tokens_details` and its two counts default to 0,
/// so un-itemised input is billed at the image-input rate. Numbers may be JSON integers or
/// integral non-negative floats. Every other key is kept only in [`Usage::raw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    /// `input_tokens_details.text_tokens` (T).
    pub input_text_tokens: u64,
    /// `input_tokens_details.image_tokens` (Ii).
    pub input_image_tokens: u64,
    pub output_tokens: u64,
    /// `total_tokens`, only cross-checked ([`Usage::total_matches`]).
    pub total_tokens: Option<u64>,
    /// The whole `usage` object as compact JSON, unknown keys included, for the ledger (B6).
    pub raw: String,
}

/// A `usage` value that cannot be billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// Not valid JSON (only from [`Usage::from_slice`]).
    Json(String),
    NotAnObject,
    /// A required count is absent or `null`.
    Missing(&'static str),
    /// A count that is not a non-negative integer.
    Invalid(&'static str),
    /// The raw value was larger than the scanner keeps (64 KiB in the JSON answer scanner).
    TooLarge,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::Json(e) => write!(f, "usage is not valid JSON: {e}"),
            UsageError::NotAnObject => f.write_str("usage is not a JSON object"),
            UsageError::Missing(k) => write!(f, "usage.{k} is missing"),
            UsageError::Invalid(k) => write!(f, "usage.{k} is not a non-negative integer"),
            UsageError::TooLarge => f.write_str("usage is too large to be read"),
        }
    }
}

impl std::error::Error for UsageError {}

/// A token count: a non-negative JSON integer, or a float with no fractional part.
fn count(v: Option<&Value>, name: &'static str) -> Result<Option<u64>, UsageError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    // Below 2^53 every integral float is exact.
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9_007_199_254_740_992.0 => {
                        Ok(Some(f as u64))
                    }
                    _ => Err(UsageError::Invalid(name)),
                }
            }
        }
        Some(_) => Err(UsageError::Invalid(name)),
    }
}

impl Usage {
    pub fn from_value(v: &Value) -> Result<Usage, UsageError> {
        let o = v.as_object().ok_or(UsageError::NotAnObject)?;
        let input_tokens = count(o.get("input_tokens"), "input_tokens")?
            .ok_or(UsageError::Missing("input_tokens"))?;
        let output_tokens = count(o.get("output_tokens"), "output_tokens")?
            .ok_or(UsageError::Missing("output_tokens"))?;
        let (text, image) = match o.get("input_tokens_details") {
            None | Some(Value::Null) => (0, 0),
            Some(Value::Object(d)) => (
                count(d.get("text_tokens"), "input_tokens_details.text_tokens")?.unwrap_or(0),
                count(d.get("image_tokens"), "input_tokens_details.image_tokens")?.unwrap_or(0),
            ),
            Some(_) => return Err(UsageError::Invalid("input_tokens_details")),
        };
        Ok(Usage {
            input_tokens,
            input_text_tokens: text,
            input_image_tokens: image,
            output_tokens,
            total_tokens: count(o.get("total_tokens"), "total_tokens")?,
            raw: v.to_string(),
        })
    }

    /// Parses the raw bytes of a `usage` value.
    pub fn from_slice(raw: &[u8]) -> Result<Usage, UsageError> {
        let v: Value = serde_json::from_slice(raw).map_err(|e| UsageError::Json(e.to_string()))?;
        Usage::from_value(&v)
    }

    /// R: input tokens not itemised as text or image, billed as image input.
    pub fn unitemized_input(&self) -> u64 {
        self.input_tokens.saturating_sub(
            self.input_text_tokens
                .saturating_add(self.input_image_tokens),
        )
    }

    /// `total_tokens == input_tokens + output_tokens`, when `total_tokens` was given.
    pub fn total_matches(&self) -> Option<bool> {
        self.total_tokens
            .map(|t| Some(t) == self.input_tokens.checked_add(self.output_tokens))
    }

    /// `T·r_text + (Ii + R)·r_image_in + O·r_image_out`, in µ$ × 1M (before the division).
    fn cost_numerator(&self, p: &TokenPrices) -> Option<u128> {
        let t = u128::from(self.input_text_tokens);
        let image_in =
            u128::from(self.input_image_tokens).checked_add(u128::from(self.unitemized_input()))?;
        let o = u128::from(self.output_tokens);
        t.checked_mul(u128::from(p.text_in))?
            .checked_add(image_in.checked_mul(u128::from(p.image_in))?)?
            .checked_add(o.checked_mul(u128::from(p.image_out))?)
    }
}

/// A cost too large for a `u64` of µ$.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostOverflow;

impl fmt::Display for CostOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the cost of this usage overflows")
    }
}

impl std::error::Error for CostOverflow {}

/// The §7 cost of one `usage`, in µ$:
/// `ceil((T·r_text + (Ii + R)·r_image_in + O·r_image_out) / 1,000,000)` with
/// `R = max(0, input_tokens − T − Ii)`; cached rates are never used (B6).
pub fn cost_micros(usage: &Usage, prices: &TokenPrices) -> Result<u64, CostOverflow> {
    cost_micros_sum(std::slice::from_ref(usage), prices)
}

/// The cost of several `usage`s of one request (B5: one `completed` event per image), rounded
/// once: the numerators are summed, then divided.
pub fn cost_micros_sum<'a>(
    usages: impl IntoIterator<Item = &'a Usage>,
    prices: &TokenPrices,
) -> Result<u64, CostOverflow> {
    let mut num: u128 = 0;
    for u in usages {
        num = u
            .cost_numerator(prices)
            .and_then(|n| num.checked_add(n))
            .ok_or(CostOverflow)?;
    }
    u64::try_from(num.div_ceil(MILLION)).map_err(|_| CostOverflow)
}

/// `quality` as counted by the reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    Low,
    Medium,
    High,
    XHigh,
    Max,
    /// Counts as `High`.
    Auto,
}

impl Quality {
    /// `low`, `medium`, `high`, `xhigh`, `max`, `auto` (exact spelling).
    pub fn parse(s: &str) -> Option<Quality> {
        Some(match s {
            "low" => Quality::Low,
            "medium" => Quality::Medium,
            "high" => Quality::High,
            "xhigh" => Quality::XHigh,
            "max" => Quality::Max,
            "auto" => Quality::Auto,
            _ => return None,
        })
    }

    /// `T_q`: output tokens per 1,048,576 pixels.
    pub const fn tokens_per_megapixel(self) -> u64 {
        match self {
            Quality::Low => 256,
            Quality::Medium => 2_048,
            Quality::High | Quality::Auto => 7_168,
            Quality::XHigh => 14_336,
            Quality::Max => 28_672,
        }
    }
}

/// What the §7 reservation depends on, resolved by the request check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationParams {
    /// `n` (1–10).
    pub n: u32,
    /// `(width, height)`; `None` for `size=auto` (counted as 1536x1024).
    pub size: Option<(u32, u32)>,
    pub quality: Quality,
    /// `Some(frame_count)` when `output_format=gif` (frame_count defaults to 9); `None` otherwise.
    pub gif_frames: Option<u32>,
    pub stream: bool,
    /// `partial_images` (counted only when `stream`).
    pub partial_images: u32,
    /// k: input images + mask + markup.
    pub input_files: u32,
    /// B: UTF-8 bytes of the prompt.
    pub prompt_bytes: u64,
}

/// Input image tokens assumed per input file (I).
pub const INPUT_TOKENS_PER_FILE: u64 = 8_192;
/// Output tokens per partial image.
pub const TOKENS_PER_PARTIAL_IMAGE: u64 = 100;
/// `size=auto` counts as this size.
pub const AUTO_SIZE: (u32, u32) = (1536, 1024);
const MEGAPIXEL: u128 = 1_048_576;

/// The §7 reservation, in µ$, with the configured rates in place of the list rates 30, 8, 5:
/// `ceil((r_image_out·n·(C + P) + r_image_in·k·I + r_text·(B + 64)) / 1,000,000)` where
/// `C = ceil(T_q · max(W·H, 1,048,576) / 1,048,576) · (frame_count if gif else 1)`,
/// `P = 100 · partial_images` if streaming else 0, `I = 8,192`. At the list prices the division
/// is exact and this is `30·n·(C + P) + 8·k·I + 5·(B + 64)`. Saturates at `u64::MAX`.
pub fn reservation_micros(p: &ReservationParams, prices: &TokenPrices) -> u64 {
    // Every factor is at most 2^64, so the products below fit comfortably; saturate anyway.
    let (w, h) = p.size.unwrap_or(AUTO_SIZE);
    let pixels = (u128::from(w) * u128::from(h)).max(MEGAPIXEL);
    let frames = u128::from(p.gif_frames.unwrap_or(1));
    let c = (u128::from(p.quality.tokens_per_megapixel()) * pixels)
        .div_ceil(MEGAPIXEL)
        .saturating_mul(frames);
    let partials = if p.stream {
        u128::from(TOKENS_PER_PARTIAL_IMAGE) * u128::from(p.partial_images)
    } else {
        0
    };
    let output = u128::from(p.n)
        .saturating_mul(c.saturating_add(partials))
        .saturating_mul(u128::from(prices.image_out));
    let input = u128::from(p.input_files)
        .saturating_mul(u128::from(INPUT_TOKENS_PER_FILE))
        .saturating_mul(u128::from(prices.image_in));
    let text = u128::from(p.prompt_bytes)
        .saturating_add(64)
        .saturating_mul(u128::from(prices.text_in));
    let num = output.saturating_add(input).saturating_add(text);
    u64::try_from(num.div_ceil(MILLION)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn usage(v: Value) -> Usage {
        Usage::from_value(&v).unwrap()
    }

    #[test]
    fn worked_example_costs_68300() {
        // §4 body: T = 60, Ii = 1000, R = 0, O = 2000 → 5·60 + 8·1000 + 30·2000 = 68,300 µ$.
        let u = usage(json!({
            "input_tokens": 1060,
            "input_tokens_details": { "text_tokens": 60, "image_tokens": 1000 },
            "output_tokens": 2000,
            "output_tokens_details": { "image_tokens": 2000, "text_tokens": 0 },
            "total_tokens": 3060
        }));
        assert_eq!(cost_micros(&u, &TokenPrices::gpt_image_2()), Ok(68_300));
        assert_eq!(u.total_matches(), Some(true));
        // gpt-image-1: 5·60 + 10·1000 + 40·2000 = 90,300.
        assert_eq!(cost_micros(&u, &TokenPrices::gpt_image_1()), Ok(90_300));
        // The raw record keeps the unknown key.
        assert!(u.raw.contains("output_tokens_details"), "{}", u.raw);
    }

    #[test]
    fn stream_example_costs() {
        // §5: T = 10, Ii = 40, O = 50 → 50 + 320 + 1500 = 1,870 µ$.
        let u = usage(
            json!({"total_tokens":100,"input_tokens":50,"output_tokens":50,
            "input_tokens_details":{"text_tokens":10,"image_tokens":40}}),
        );
        assert_eq!(cost_micros(&u, &TokenPrices::gpt_image_2()), Ok(1_870));
    }

    #[test]
    fn rounds_up_once() {
        // mini: 1 text token at 2.00/1M = 2 µ$; 1 output token at 8.00/1M = 8 µ$; exact.
        // 1 image-input token at 2.50/1M = 2.5 µ$ → 3.
        let p = TokenPrices::gpt_image_1_mini();
        let one_image_in = usage(json!({"input_tokens": 1, "output_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 1}}));
        assert_eq!(cost_micros(&one_image_in, &p), Ok(3));
        // Two such usages: 2.5 + 2.5 = 5 exactly, one rounding for the request (not 3 + 3).
        assert_eq!(cost_micros_sum([&one_image_in, &one_image_in], &p), Ok(5));
        // Zero usage costs nothing.
        let zero = usage(json!({"input_tokens": 0, "output_tokens": 0}));
        assert_eq!(cost_micros(&zero, &p), Ok(0));
        // A rate below 1 µ$ per token: 3 text tokens at 0.3 µ$ each → 0.9 → 1.
        let cheap = TokenPrices {
            text_in: 300_000,
            ..TokenPrices::gpt_image_2()
        };
        let three = usage(json!({"input_tokens": 3, "output_tokens": 0,
            "input_tokens_details": {"text_tokens": 3, "image_tokens": 0}}));
        assert_eq!(cost_micros(&three, &cheap), Ok(1));
    }

    #[test]
    fn unitemized_input_is_billed_as_image_input() {
        // input 1100 = 60 text + 1000 image + R 40 → 300 + 8·1040 + 30·2000 = 68,620.
        let u = usage(json!({"input_tokens": 1100, "output_tokens": 2000,
            "input_tokens_details": {"text_tokens": 60, "image_tokens": 1000},
            "total_tokens": 3000}));
        assert_eq!(u.unitemized_input(), 40);
        assert_eq!(u.total_matches(), Some(false));
        assert_eq!(cost_micros(&u, &TokenPrices::gpt_image_2()), Ok(68_620));
        // No details at all: every input token is R. 1060 · 8 + 2000 · 30 = 68,480.
        let u = usage(json!({"input_tokens": 1060, "output_tokens": 2000}));
        assert_eq!(u.unitemized_input(), 1060);
        assert_eq!(cost_micros(&u, &TokenPrices::gpt_image_2()), Ok(68_480));
        // Details above input_tokens: R = 0, the itemised counts are billed.
        let u = usage(json!({"input_tokens": 10, "output_tokens": 0,
            "input_tokens_details": {"text_tokens": 60, "image_tokens": 1000}}));
        assert_eq!(u.unitemized_input(), 0);
        assert_eq!(cost_micros(&u, &TokenPrices::gpt_image_2()), Ok(8_300));
    }

    #[test]
    fn overflow_is_an_error() {
        let huge = usage(json!({"input_tokens": 0, "output_tokens": u64::MAX}));
        assert_eq!(
            cost_micros(&huge, &TokenPrices::gpt_image_2()),
            Err(CostOverflow)
        );
        // Fits: u64::MAX output tokens at 1 µ$ per 1M tokens.
        let tiny = TokenPrices {
            image_out: 1,
            ..TokenPrices::gpt_image_2()
        };
        assert_eq!(cost_micros(&huge, &tiny), Ok(u64::MAX.div_ceil(1_000_000)));
        // Every count at u64::MAX with u64::MAX rates overflows u128 in the sum: still an error.
        let all = usage(json!({"input_tokens": u64::MAX, "output_tokens": u64::MAX,
            "input_tokens_details": {"text_tokens": u64::MAX, "image_tokens": u64::MAX}}));
        let max = TokenPrices {
            text_in: u64::MAX,
            cached_text_in: u64::MAX,
            image_in: u64::MAX,
            cached_image_in: u64::MAX,
            image_out: u64::MAX,
        };
        assert_eq!(cost_micros(&all, &max), Err(CostOverflow));
    }

    #[test]
    fn usage_parsing_is_lenient_but_not_blind() {
        let u = usage(
            json!({"input_tokens": 5.0, "output_tokens": 7, "total_tokens": null,
            "input_tokens_details": {"text_tokens": 5, "cached_tokens_details": {"x": 1}},
            "something_new": [1, 2]}),
        );
        assert_eq!(
            (u.input_tokens, u.input_text_tokens, u.input_image_tokens),
            (5, 5, 0)
        );
        assert_eq!(u.total_tokens, None);
        assert!(u.raw.contains("something_new"));
        assert_eq!(
            Usage::from_value(&json!({"output_tokens": 1})),
            Err(UsageError::Missing("input_tokens"))
        );
        assert_eq!(
            Usage::from_value(&json!({"input_tokens": 1, "output_tokens": null})),
            Err(UsageError::Missing("output_tokens"))
        );
        assert_eq!(
            Usage::from_value(&json!({"input_tokens": -1, "output_tokens": 1})),
            Err(UsageError::Invalid("input_tokens"))
        );
        assert_eq!(
            Usage::from_value(&json!({"input_tokens": 1.5, "output_tokens": 1})),
            Err(UsageError::Invalid("input_tokens"))
        );
        assert_eq!(
            Usage::from_value(&json!({"input_tokens": "1", "output_tokens": 1})),
            Err(UsageError::Invalid("input_tokens"))
        );
        assert_eq!(Usage::from_value(&json!([1])), Err(UsageError::NotAnObject));
        assert!(matches!(Usage::from_slice(b"{"), Err(UsageError::Json(_))));
        assert_eq!(
            Usage::from_slice(br#"{"input_tokens":1,"output_tokens":2}"#)
                .unwrap()
                .output_tokens,
            2
        );
    }

    #[test]
    fn prices_deserialize_from_usd() {
        let p: TokenPrices = toml::from_str(
            "text_in = 5.00\nimage_in = 8.00\nimage_out = 30.00\ncached_text_in = 1.25\ncached_image_in = 2.00\n",
        )
        .unwrap();
        assert_eq!(p, TokenPrices::gpt_image_2());
        // Rounded to the µ$: 0.0000004 USD per 1M → 0; 1.2345678 → 1,234,568.
        let p: TokenPrices = toml::from_str(
            "text_in = 1.2345678\nimage_in = 0.0000004\nimage_out = 0\ncached_text_in = 0\ncached_image_in = 0\n",
        )
        .unwrap();
        assert_eq!((p.text_in, p.image_in, p.image_out), (1_234_568, 0, 0));
        for bad in ["-1.0", "nan", "inf", "1e20"] {
            let e = toml::from_str::<TokenPrices>(&format!(
                "text_in = 5.0\nimage_in = {bad}\nimage_out = 30.0\ncached_text_in = 1.25\ncached_image_in = 2.0\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("image_in") && e.contains("not a valid price"),
                "{bad}: {e}"
            );
        }
        // A missing rate is an error, not a zero.
        assert!(toml::from_str::<TokenPrices>("text_in = 5.0\n").is_err());
    }

    #[test]
    fn list_prices_by_model() {
        assert_eq!(
            TokenPrices::list_price("gpt-image-2-2026-04-21"),
            Some(TokenPrices::gpt_image_2())
        );
        assert_eq!(
            TokenPrices::list_price("gpt-image-2.6-sunburst"),
            Some(TokenPrices::gpt_image_2())
        );
        assert_eq!(
            TokenPrices::list_price("gpt-image-1-mini").map(|p| p.image_out),
            Some(8_000_000)
        );
        assert_eq!(TokenPrices::list_price("dall-e-2"), None);
    }

    fn params() -> ReservationParams {
        ReservationParams {
            n: 1,
            size: Some((1024, 1024)),
            quality: Quality::Medium,
            gif_frames: None,
            stream: false,
            partial_images: 0,
            input_files: 1,
            prompt_bytes: 36,
        }
    }

    #[test]
    fn reservation_figures() {
        let p = TokenPrices::gpt_image_2();
        // 1024x1024 medium, n=1, one image, 36-byte prompt:
        // C = 2048; 30·2048 = 61,440; 8·1·8192 = 65,536; 5·(36+64) = 500 → 127,476.
        assert_eq!(reservation_micros(&params(), &p), 127_476);

        // size=auto (1536x1024 = 1,572,864 px), quality=auto (= high, 7168), n=2, stream with
        // 3 partials, 2 images + mask (k=3), 100-byte prompt:
        // C = ceil(7168 · 1,572,864 / 1,048,576) = 10,752; P = 300;
        // 30·2·(10,752 + 300) = 663,120; 8·3·8192 = 196,608; 5·164 = 820 → 860,548.
        let q = ReservationParams {
            n: 2,
            size: None,
            quality: Quality::Auto,
            stream: true,
            partial_images: 3,
            input_files: 3,
            prompt_bytes: 100,
            ..params()
        };
        assert_eq!(reservation_micros(&q, &p), 860_548);
        // Partials without stream are not counted: 663,120 − 30·2·300 = 645,120 → 842,548.
        let no_stream = ReservationParams { stream: false, ..q };
        assert_eq!(reservation_micros(&no_stream, &p), 842_548);

        // Small sizes count as one megapixel: 1024x640 low → C = 256; 30·256 = 7,680;
        // 65,536; 5·64 = 320 (empty prompt) → 73,536.
        let small = ReservationParams {
            size: Some((1024, 640)),
            quality: Quality::Low,
            prompt_bytes: 0,
            ..params()
        };
        assert_eq!(reservation_micros(&small, &p), 73_536);

        // GIF, 1040x1040 (1,081,600 px) max quality, 9 frames:
        // C = 28,672 · 1,081,600 / 1,048,576 (= 31,011,635,200 / 1,048,576 = 29,575 exactly) · 9
        //   = 266,175;
        // 30·266,175 = 7,985,250; + 65,536 + 500 → 8,051,286.
        let gif = ReservationParams {
            size: Some((1040, 1040)),
            quality: Quality::Max,
            gif_frames: Some(9),
            ..params()
        };
        assert_eq!(reservation_micros(&gif, &p), 8_051_286);

        // A non-integral C: 1025x1024 (1,049,600 px; not a valid size, the formula does not
        // care) low: 256 · 1,049,600 / 1,048,576 = 256.25 → 257.
        let odd = ReservationParams {
            size: Some((1025, 1024)),
            quality: Quality::Low,
            ..params()
        };
        // 30·257 = 7,710 + 65,536 + 500 = 73,746.
        assert_eq!(reservation_micros(&odd, &p), 73_746);

        // 3840x2160 max, n=10, 16 files, 32,000 four-byte characters:
        // C = ceil(28,672 · 8,294,400 / 1,048,576) = 226,800; 30·10·226,800 = 68,040,000;
        // 8·16·8192 = 1,048,576; 5·(128,000 + 64) = 640,320 → 69,728,896.
        let big = ReservationParams {
            n: 10,
            size: Some((3840, 2160)),
            quality: Quality::Max,
            input_files: 16,
            prompt_bytes: 128_000,
            ..params()
        };
        assert_eq!(reservation_micros(&big, &p), 69_728_896);
    }

    #[test]
    fn reservation_uses_configured_rates() {
        // gpt-image-1 rates 40/10/5: 40·2048 + 10·8192 + 5·100 = 81,920 + 81,920 + 500.
        assert_eq!(
            reservation_micros(&params(), &TokenPrices::gpt_image_1()),
            164_340
        );
        // Non-integral rates round up once: mini 8/2.5/2: 8·2048 + 2.5·8192 + 2·100
        // = 16,384 + 20,480 + 200 = 37,064; with image_in 2.500001 → +0.008192 → 37,065.
        let mut mini = TokenPrices::gpt_image_1_mini();
        assert_eq!(reservation_micros(&params(), &mini), 37_064);
        mini.image_in += 1;
        assert_eq!(reservation_micros(&params(), &mini), 37_065);
        // Absurd rates saturate instead of wrapping.
        let max = TokenPrices {
            text_in: u64::MAX,
            cached_text_in: 0,
            image_in: u64::MAX,
            cached_image_in: 0,
            image_out: u64::MAX,
        };
        let q = ReservationParams {
            n: u32::MAX,
            gif_frames: Some(u32::MAX),
            ..params()
        };
        assert_eq!(reservation_micros(&q, &max), u64::MAX);
    }

    #[test]
    fn quality_parse() {
        assert_eq!(Quality::parse("xhigh"), Some(Quality::XHigh));
        assert_eq!(Quality::parse("High"), None);
        assert_eq!(Quality::Auto.tokens_per_megapixel(), 7_168);
    }
}
