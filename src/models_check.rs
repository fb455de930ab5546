//! The live-model check: which configured models the upstream still lists (`GET /v1/models`,
//! `gpt-image-models.md` §1), and which shut down soon.
//!
//! - [`parse_listing`] reads the upstream's answer leniently: an object with a `data` array;
//!   items without a string `id` are skipped; `shutdown_date` is `"YYYY-MM-DD"`, `null` or
//!   absent (anything else counts as absent).
//! - [`report`] is pure: (config, what the check found, today) → one [`ModelStatus`] per
//!   configured model (the gpt-image ids of `models.accepted`, then the dall-e-2 ids of
//!   `validation.models`), each judged live, gone (not listed) or unknown (the check failed).
//! - A shutdown date learned from the upstream only adds knowledge for reporting and warnings
//!   (the earlier of the configured and the listed date wins, §9 L2/L3: a poll may add a date,
//!   never re-enable an id). It does **not** change what the gateway accepts: only the
//!   configured `shutdown` date retires an id.
//! - [`at_start`] runs the check once in the background when `serve` starts
//!   (`models.check_at_start` and an upstream key), logs what it found and sets the
//!   `imagegate_model_shutdown_days` / `imagegate_model_live` gauges.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use jiff::civil::Date;
use serde::Serialize;

use crate::clock::Clock;
use crate::config::Config;
use crate::models::TokenPriceConfig;
use crate::upstream::Upstream;

/// The whole `GET /models` exchange (connect, answer, body) must end within this.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest listing read; a longer body fails the check.
pub const MAX_LISTING_BYTES: usize = 4 * 1024 * 1024;

/// The rule profile an id is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Profile {
    #[serde(rename = "gpt-image")]
    GptImage,
    #[serde(rename = "dall-e-2")]
    DallE2,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::GptImage => "gpt-image",
            Profile::DallE2 => "dall-e-2",
        }
    }
}

/// What the upstream's `GET /models` listed: each id with its shutdown date, if announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub models: BTreeMap<String, Option<Date>>,
}

/// The upstream's listing: `GET /models` within [`CHECK_TIMEOUT`], its body bounded by
/// [`MAX_LISTING_BYTES`], read by [`parse_listing`]. Errors are one line for the operator.
pub async fn fetch_listing(upstream: &Upstream) -> Result<Listing, String> {
    let body = upstream
        .list_models(CHECK_TIMEOUT, MAX_LISTING_BYTES)
        .await?;
    parse_listing(&body)
}

/// Parse a `GET /models` answer leniently (see the module doc). Err when the body is not JSON
/// or has no `data` array.
pub fn parse_listing(body: &[u8]) -> Result<Listing, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the model listing is not JSON: {e}"))?;
    let data = value
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or_else(|| "the model listing has no \"data\" array".to_string())?;
    let mut models = BTreeMap::new();
    for item in data {
        let Some(id) = item.get("id").and_then(|v| v.as_str()) else {
            continue;
        };
        let shutdown = item
            .get("shutdown_date")
            .and_then(|v| v.as_str())
            .and_then(|s| s.trim().parse::<Date>().ok());
        models.insert(id.to_owned(), shutdown);
    }
    Ok(Listing { models })
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not asked (`models` without `--check`, or the check is off).
    NotRun,
    /// The upstream could not be asked or gave no usable listing.
    Failed(String),
    Listed(Listing),
}

/// The upstream's verdict on one configured id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Verdict {
    /// Listed, with the shutdown date the listing announced.
    Live { shutdown_date: Option<Date> },
    /// Not listed.
    Gone,
    /// The check failed.
    Unknown,
}

/// The configured prices of an id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ModelPrices {
    /// gpt-image profile: USD per 1M tokens.
    #[serde(rename = "usd_per_1m_tokens")]
    Tokens(TokenPriceConfig),
    /// dall-e-2 profile: USD per image, by size (`[prices.<model>]`).
    #[serde(rename = "usd_per_image")]
    PerImage(BTreeMap<String, f64>),
}

/// One configured model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub profile: Profile,
    /// The gpt-image family; none for the dall-e-2 profile.
    pub family: Option<String>,
    /// `models.default` names it.
    pub default: bool,
    /// The configured `shutdown` date (gpt-image ids only).
    pub shutdown: Option<Date>,
    /// The gateway serves it today (its configured shutdown date has not come).
    pub served: bool,
    pub prices: ModelPrices,
    /// The upstream's verdict; none when the check did not run.
    pub upstream: Option<Verdict>,
    /// The earlier of the configured and the upstream's shutdown date.
    pub effective_shutdown: Option<Date>,
    /// Days from today to `effective_shutdown` (negative once passed).
    pub days_left: Option<i64>,
    /// An operator should look: served and gone upstream, or shutting down within
    /// `models.warn_within_days` days.
    pub warning: bool,
}

impl ModelStatus {
    /// The upstream's verdict in words: `live`, `gone`, `unknown`, `shuts down D in N days`.
    pub fn upstream_text(&self, today: Date) -> String {
        match &self.upstream {
            None => "-".into(),
            Some(Verdict::Gone) => "gone".into(),
            Some(Verdict::Unknown) => "unknown".into(),
            Some(Verdict::Live {
                shutdown_date: None,
            }) => "live".into(),
            Some(Verdict::Live {
                shutdown_date: Some(d),
            }) => shutdown_text(*d, days_between(today, *d)),
        }
    }

    /// The configured shutdown date in words.
    pub fn shutdown_text(&self, today: Date) -> String {
        match self.shutdown {
            None => "-".into(),
            Some(d) => shutdown_text(d, days_between(today, d)),
        }
    }

    /// The prices in one line.
    pub fn prices_text(&self) -> String {
        match &self.prices {
            ModelPrices::Tokens(p) => format!(
                "USD/1M tokens: text in {:.2}, image in {:.2}, image out {:.2}",
                p.text_in, p.image_in, p.image_out
            ),
            ModelPrices::PerImage(sizes) if sizes.is_empty() => "no prices".into(),
            ModelPrices::PerImage(sizes) => {
                let mut sizes: Vec<(&String, &f64)> = sizes.iter().collect();
                // By pixel count, not by text: 256x256 before 1024x1024.
                sizes.sort_by_key(|(s, _)| pixels(s));
                let each: Vec<String> = sizes
                    .iter()
                    .map(|(size, usd)| format!("{size} {usd:.3}"))
                    .collect();
                format!("USD/image: {}", each.join(", "))
            }
        }
    }
}

fn pixels(size: &str) -> u64 {
    size.split_once('x')
        .and_then(|(w, h)| Some(w.parse::<u64>().ok()? * h.parse::<u64>().ok()?))
        .unwrap_or(u64::MAX)
}

fn shutdown_text(d: Date, days: i64) -> String {
    match days {
        n if n < 0 => format!("shut down {d} ({} days ago)", -n),
        // A shutdown takes effect at 00:00 UTC on its date.
        0 => format!("shut down {d} (today)"),
        1 => format!("shuts down {d} in 1 day"),
        n => format!("shuts down {d} in {n} days"),
    }
}

/// Whole days from `from` to `to` (negative when `to` is earlier).
pub fn days_between(from: Date, to: Date) -> i64 {
    from.until(to).map(|s| i64::from(s.get_days())).unwrap_or(0)
}

/// Today's date in UTC (shutdown dates take effect at 00:00 UTC).
pub fn today_utc(clock: &Clock) -> Date {
    clock
        .now_wall()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date()
}

/// The configured models and what the check found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub today: Date,
    pub warn_within_days: u32,
    /// The check ran (successfully or not).
    pub checked: bool,
    /// Why the check failed.
    pub check_error: Option<String>,
    pub models: Vec<ModelStatus>,
}

impl Report {
    /// `models --check` fails (exit 1) when the check failed, or when a model the gateway still
    /// serves is gone upstream. A model shutting down soon is a warning, not a failure; a model
    /// retired by its configured date may be gone.
    pub fn check_failed(&self) -> bool {
        self.check_error.is_some()
            || self
                .models
                .iter()
                .any(|m| m.served && m.upstream == Some(Verdict::Gone))
    }
}

/// Build the report: one entry per configured model, judged against `check` on `today`.
pub fn report(config: &Config, check: &Check, today: Date) -> Report {
    let models_cfg = &config.models;
    let warn_within = i64::from(models_cfg.warn_within_days);
    let verdict = |id: &str| -> Option<Verdict> {
        match check {
            Check::NotRun => None,
            Check::Failed(_) => Some(Verdict::Unknown),
            Check::Listed(l) => Some(match l.models.get(id) {
                Some(d) => Verdict::Live { shutdown_date: *d },
                None => Verdict::Gone,
            }),
        }
    };
    let mut models = Vec::new();
    let mut push = |id: &str,
                    profile: Profile,
                    family: Option<String>,
                    shutdown: Option<Date>,
                    prices: ModelPrices| {
        let upstream = verdict(id);
        let listed = match &upstream {
            Some(Verdict::Live { shutdown_date }) => *shutdown_date,
            _ => None,
        };
        let effective_shutdown = match (shutdown, listed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let days_left = effective_shutdown.map(|d| days_between(today, d));
        let served = shutdown.is_none_or(|d| today < d);
        let gone = upstream == Some(Verdict::Gone);
        let soon = days_left.is_some_and(|n| n <= warn_within);
        models.push(ModelStatus {
            id: id.to_owned(),
            profile,
            family,
            default: models_cfg.default == id,
            shutdown,
            served,
            prices,
            upstream,
            effective_shutdown,
            days_left,
            warning: served && (gone || soon),
        });
    };
    for (id, entry) in &models_cfg.accepted {
        push(
            id,
            Profile::GptImage,
            Some(entry.family.clone()),
            entry.shutdown,
            ModelPrices::Tokens(entry.prices()),
        );
    }
    for id in &config.validation.models {
        push(
            id,
            Profile::DallE2,
            None,
            None,
            ModelPrices::PerImage(config.prices.get(id).cloned().unwrap_or_default()),
        );
    }
    Report {
        today,
        warn_within_days: models_cfg.warn_within_days,
        checked: !matches!(check, Check::NotRun),
        check_error: match check {
            Check::Failed(e) => Some(e.clone()),
            _ => None,
        },
        models,
    }
}

/// The report as an aligned table (`imagegate models`).
pub fn render_table(r: &Report) -> String {
    let mut header = vec!["MODEL", "PROFILE", "FAMILY", "SHUTDOWN", "PRICES"];
    if r.checked {
        header.push("UPSTREAM");
    }
    let rows: Vec<Vec<String>> = r
        .models
        .iter()
        .map(|m| {
            let mut row = vec![
                if m.default {
                    format!("{} (default)", m.id)
                } else {
                    m.id.clone()
                },
                m.profile.as_str().to_owned(),
                m.family.clone().unwrap_or_else(|| "-".into()),
                m.shutdown_text(r.today),
                m.prices_text(),
            ];
            if r.checked {
                row.push(m.upstream_text(r.today));
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
    if let Some(e) = &r.check_error {
        let _ = writeln!(out, "upstream check failed: {e}");
    }
    for m in r.models.iter().filter(|m| m.warning) {
        let why = match (&m.upstream, m.effective_shutdown, m.days_left) {
            (Some(Verdict::Gone), _, _) => "not listed by the upstream".to_owned(),
            (_, Some(d), Some(n)) => shutdown_text(d, n),
            _ => "needs attention".to_owned(),
        };
        let _ = writeln!(out, "warning: {}: {why}", m.id);
    }
    out
}

/// Log the report and set the model gauges (the start-up check).
pub fn publish(r: &Report) {
    if let Some(e) = &r.check_error {
        tracing::warn!(error = %e, "models check failed: the configured models are not verified upstream");
    }
    for m in &r.models {
        if let Some(days) = m.days_left {
            metrics::gauge!("imagegate_model_shutdown_days", "model" => m.id.clone())
                .set(days as f64);
        }
        match &m.upstream {
            Some(Verdict::Live { .. }) => {
                metrics::gauge!("imagegate_model_live", "model" => m.id.clone()).set(1.0)
            }
            Some(Verdict::Gone) => {
                metrics::gauge!("imagegate_model_live", "model" => m.id.clone()).set(0.0)
            }
            _ => {}
        }
        let profile = m.profile.as_str();
        let upstream = m.upstream_text(r.today);
        if m.served && m.upstream == Some(Verdict::Gone) {
            tracing::warn!(model = %m.id, profile, "model not listed upstream");
        } else if m.warning {
            let shutdown_date = m.effective_shutdown.map(|d| d.to_string());
            tracing::warn!(
                model = %m.id,
                profile,
                shutdown_date,
                days_left = m.days_left,
                upstream,
                "model shuts down soon"
            );
        } else {
            tracing::info!(model = %m.id, profile, served = m.served, upstream, "model checked");
        }
    }
}

/// At `serve` start: with `models.check_at_start` and an upstream key, ask the upstream in a
/// background task (start-up does not wait; a failure is a warning) and publish the report;
/// otherwise publish what the configuration alone says (configured shutdown dates), at once.
pub fn at_start(config: Arc<Config>, upstream: Arc<Upstream>, clock: Clock) {
    if !(config.models.check_at_start && upstream.has_key()) {
        if config.models.check_at_start {
            tracing::info!("models check skipped: no upstream key");
        }
        publish(&report(&config, &Check::NotRun, today_utc(&clock)));
        return;
    }
    tokio::spawn(async move {
        let check = match fetch_listing(&upstream).await {
            Ok(listing) => Check::Listed(listing),
            Err(e) => Check::Failed(e),
        };
        publish(&report(&config, &check, today_utc(&clock)));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ModelEntry, ModelsConfig};

    fn d(y: i16, m: i8, day: i8) -> Date {
        Date::constant(y, m, day)
    }

    const TODAY: Date = Date::constant(2026, 12, 1);

    fn config() -> Config {
        let mut c = Config::default();
        let mut models = ModelsConfig {
            warn_within_days: 30,
            ..ModelsConfig::default()
        };
        models.accepted.clear();
        for (id, family, shutdown) in [
            ("gpt-image-2", "gpt-image-2", None),
            ("gpt-image-2.5-flare", "gpt-image-2.5", Some(d(2027, 6, 1))),
            ("gpt-image-2.6-sunburst", "gpt-image-2.6", None),
            ("gpt-image-1.5", "gpt-image-2", Some(d(2026, 12, 1))),
        ] {
            models.accepted.insert(
                id.into(),
                ModelEntry {
                    family: family.into(),
                    shutdown,
                    prices: None,
                },
            );
        }
        c.models = models;
        c.validation.models = vec!["dall-e-2".into()];
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c
    }

    fn listing(body: &str) -> Check {
        Check::Listed(parse_listing(body.as_bytes()).unwrap())
    }

    fn find<'a>(r: &'a Report, id: &str) -> &'a ModelStatus {
        r.models.iter().find(|m| m.id == id).unwrap()
    }

    #[test]
    fn a_listing_is_read_leniently() {
        let l = parse_listing(
            br#"{"object":"list","data":[
                {"id":"gpt-image-2","object":"model","created":1,"owned_by":"system","shutdown_date":null},
                {"id":"gpt-image-2.5-flare","shutdown_date":"2027-01-15"},
                {"id":"gpt-image-2.6-sunburst"},
                {"id":"odd-date","shutdown_date":"next week"},
                {"id":42},
                {"object":"model"},
                "not an object"
            ]}"#,
        )
        .unwrap();
        let ids: Vec<&str> = l.models.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            [
                "gpt-image-2",
                "gpt-image-2.5-flare",
                "gpt-image-2.6-sunburst",
                "odd-date"
            ]
        );
        assert_eq!(l.models["gpt-image-2"], None);
        assert_eq!(l.models["gpt-image-2.5-flare"], Some(d(2027, 1, 15)));
        assert_eq!(l.models["odd-date"], None);
    }

    #[test]
    fn a_malformed_listing_is_an_error() {
        for body in [
            &b"<html>502</html>"[..],
            b"",
            br#"{"data":{"id":"gpt-image-2"}}"#,
            br#"{"object":"list"}"#,
            br#"[{"id":"gpt-image-2"}]"#,
        ] {
            assert!(
                parse_listing(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            parse_listing(br#"{"data":[]}"#).unwrap(),
            Listing::default()
        );
    }

    #[test]
    fn live_and_gone_models() {
        let c = config();
        let r = report(
            &c,
            &listing(
                r#"{"data":[{"id":"gpt-image-2","shutdown_date":null},{"id":"gpt-image-2.5-flare"},{"id":"dall-e-3"}]}"#,
            ),
            TODAY,
        );
        assert!(r.checked && r.check_error.is_none());
        let m = find(&r, "gpt-image-2");
        assert_eq!(
            m.upstream,
            Some(Verdict::Live {
                shutdown_date: None
            })
        );
        assert_eq!(m.profile, Profile::GptImage);
        assert!(m.default && m.served && !m.warning);
        assert_eq!(m.upstream_text(TODAY), "live");
        let gone = find(&r, "gpt-image-2.6-sunburst");
        assert_eq!(gone.upstream, Some(Verdict::Gone));
        assert!(gone.warning);
        assert_eq!(gone.upstream_text(TODAY), "gone");
        // Retired by its configured date (00:00 UTC today): gone is expected, no warning.
        let retired = find(&r, "gpt-image-1.5");
        assert!(!retired.served && !retired.warning);
        assert_eq!(retired.upstream, Some(Verdict::Gone));
        assert!(r.check_failed(), "a served model is gone");
        // Ids listed upstream but not configured are not reported.
        assert!(r.models.iter().all(|m| m.id != "dall-e-3"));
    }

    #[test]
    fn dall_e_2_ids_are_judged_with_their_per_image_prices() {
        let c = config();
        let r = report(&c, &listing(r#"{"data":[{"id":"dall-e-2"}]}"#), TODAY);
        let m = find(&r, "dall-e-2");
        assert_eq!(m.profile, Profile::DallE2);
        assert_eq!(m.family, None);
        assert_eq!(
            m.upstream,
            Some(Verdict::Live {
                shutdown_date: None
            })
        );
        assert_eq!(
            m.prices_text(),
            "USD/image: 256x256 0.016, 512x512 0.018, 1024x1024 0.020"
        );
        assert_eq!(
            find(&r, "gpt-image-2").prices_text(),
            "USD/1M tokens: text in 5.00, image in 8.00, image out 30.00"
        );
        // The order: gpt-image ids (sorted), then the dall-e-2 ids.
        assert_eq!(r.models.last().unwrap().id, "dall-e-2");
        let r = report(&c, &listing(r#"{"data":[]}"#), TODAY);
        assert_eq!(find(&r, "dall-e-2").upstream, Some(Verdict::Gone));
        assert!(find(&r, "dall-e-2").warning);
    }

    #[test]
    fn shutdown_dates_within_and_after_the_warning_window() {
        let c = config();
        let r = report(
            &c,
            &listing(
                r#"{"data":[
                    {"id":"gpt-image-2","shutdown_date":"2026-12-31"},
                    {"id":"gpt-image-2.6-sunburst","shutdown_date":"2027-01-01"},
                    {"id":"gpt-image-2.5-flare","shutdown_date":"2027-09-01"},
                    {"id":"dall-e-2","shutdown_date":"2026-12-02"}
                ]}"#,
            ),
            TODAY,
        );
        // 30 days: inside the window (the bound is inclusive).
        let m = find(&r, "gpt-image-2");
        assert_eq!(m.days_left, Some(30));
        assert!(m.warning);
        assert_eq!(m.upstream_text(TODAY), "shuts down 2026-12-31 in 30 days");
        // The upstream's date is added to what the config knew (it had none)...
        assert_eq!(m.effective_shutdown, Some(d(2026, 12, 31)));
        assert_eq!(m.shutdown, None, "the configured date is unchanged");
        // ... but does not retire the id: only the configured date does.
        assert!(m.served);
        assert!(c.models.live("gpt-image-2", TODAY).is_some());
        // 31 days: outside.
        let m = find(&r, "gpt-image-2.6-sunburst");
        assert_eq!(m.days_left, Some(31));
        assert!(!m.warning);
        // Configured 2027-06-01, listed 2027-09-01: the earlier date wins (a poll never
        // moves a shutdown later).
        let m = find(&r, "gpt-image-2.5-flare");
        assert_eq!(m.effective_shutdown, Some(d(2027, 6, 1)));
        assert_eq!(m.days_left, Some(182));
        assert!(!m.warning);
        assert_eq!(m.shutdown_text(TODAY), "shuts down 2027-06-01 in 182 days");
        let m = find(&r, "dall-e-2");
        assert_eq!(m.upstream_text(TODAY), "shuts down 2026-12-02 in 1 day");
        assert!(m.warning);
        assert!(
            !r.check_failed(),
            "shutting down soon is a warning, not a failure"
        );
        assert_eq!(shutdown_text(TODAY, 0), "shut down 2026-12-01 (today)");
        assert_eq!(
            shutdown_text(TODAY, -3),
            "shut down 2026-12-01 (3 days ago)"
        );
        // A configured date alone (no check) warns too.
        let mut c = config();
        c.models.accepted.get_mut("gpt-image-2").unwrap().shutdown = Some(d(2026, 12, 10));
        let r = report(&c, &Check::NotRun, TODAY);
        let m = find(&r, "gpt-image-2");
        assert!(!r.checked && m.upstream.is_none() && m.warning);
        assert_eq!(m.days_left, Some(9));
        assert!(!r.check_failed());
    }

    #[test]
    fn a_failed_check_leaves_every_model_unknown() {
        let c = config();
        let r = report(&c, &Check::Failed("upstream answered 500".into()), TODAY);
        assert!(r.checked && r.check_failed());
        assert!(
            r.models
                .iter()
                .all(|m| m.upstream == Some(Verdict::Unknown))
        );
        assert!(r.models.iter().all(|m| m.upstream_text(TODAY) == "unknown"));
        assert!(!find(&r, "gpt-image-2").warning);
        let table = render_table(&r);
        assert!(
            table.contains("upstream check failed: upstream answered 500"),
            "{table}"
        );
    }

    #[test]
    fn the_table_has_one_row_per_model() {
        let c = config();
        let r = report(
            &c,
            &listing(r#"{"data":[{"id":"gpt-image-2","shutdown_date":"2026-12-11"}]}"#),
            TODAY,
        );
        let table = render_table(&r);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("MODEL") && lines[0].ends_with("UPSTREAM"));
        let row = lines
            .iter()
            .find(|l| l.starts_with("gpt-image-2 (default)"))
            .unwrap();
        assert!(row.contains("shuts down 2026-12-11 in 10 days"), "{table}");
        assert!(
            table.contains("warning: gpt-image-2: shuts down 2026-12-11 in 10 days"),
            "{table}"
        );
        assert!(
            table.contains("warning: dall-e-2: not listed by the upstream"),
            "{table}"
        );
        let unchecked = render_table(&report(&c, &Check::NotRun, TODAY));
        assert!(!unchecked.contains("UPSTREAM"), "{unchecked}");
        assert_eq!(unchecked.lines().count(), 1 + 5, "{unchecked}");
    }

    #[test]
    fn publishing_sets_the_model_gauges() {
        let handle = crate::metrics::handle();
        let mut c = config();
        c.models.accepted.insert(
            "gauge-test-model".into(),
            ModelEntry {
                family: "gpt-image-2".into(),
                shutdown: Some(d(2026, 12, 21)),
                prices: None,
            },
        );
        c.validation.models.push("gauge-test-dalle".into());
        c.prices.insert("gauge-test-dalle".into(), BTreeMap::new());
        let r = report(
            &c,
            &listing(r#"{"data":[{"id":"gauge-test-model","shutdown_date":"2027-03-01"}]}"#),
            TODAY,
        );
        publish(&r);
        let text = handle.render();
        assert!(
            text.contains(r#"imagegate_model_shutdown_days{model="gauge-test-model"} 20"#),
            "{text}"
        );
        assert!(
            text.contains(r#"imagegate_model_live{model="gauge-test-model"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"imagegate_model_live{model="gauge-test-dalle"} 0"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"imagegate_model_shutdown_days{model="gauge-test-dalle"}"#),
            "{text}"
        );
    }

    #[test]
    fn the_json_form() {
        let r = report(
            &config(),
            &listing(r#"{"data":[{"id":"gpt-image-2","shutdown_date":"2027-01-15"}]}"#),
            TODAY,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["today"], "2026-12-01");
        let m = &v["models"][0];
        assert_eq!(m["id"], "gpt-image-1.5");
        assert_eq!(m["profile"], "gpt-image");
        assert_eq!(m["shutdown"], "2026-12-01");
        let m = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "gpt-image-2")
            .unwrap();
        assert_eq!(m["upstream"]["status"], "live");
        assert_eq!(m["upstream"]["shutdown_date"], "2027-01-15");
        assert_eq!(m["prices"]["usd_per_1m_tokens"]["image_out"], 30.0);
        let last = v["models"].as_array().unwrap().last().unwrap();
        assert_eq!(last["profile"], "dall-e-2");
        assert_eq!(last["upstream"]["status"], "gone");
        assert_eq!(last["prices"]["usd_per_image"]["1024x1024"], 0.02);
    }
}
