//! Configuration of limits and quotas: the `[limits]`, `[quotas]` and `[prices]` tables and the
//! per-client / per-user overrides inside `[[clients]]`.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::IntoConnectionInfo;
use serde::Deserialize;

use super::Secret;

/// Per-minute rate limits. A missing value means "inherit"; `0` means "no limit".
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct RateSpec {
    pub requests_per_minute: Option<u32>,
    /// Requests that may arrive at once; default: requests_per_minute.
    pub requests_burst: Option<u32>,
    pub images_per_minute: Option<u32>,
    /// Images (sum of `n`) that may be asked for at once; default: images_per_minute. Must be at
    /// least 10 (the largest `n`), or large requests could never pass.
    pub images_burst: Option<u32>,
}

impl RateSpec {
    /// `self` with missing values taken from `base`.
    pub fn over(self, base: RateSpec) -> RateSpec {
        RateSpec {
            requests_per_minute: self.requests_per_minute.or(base.requests_per_minute),
            requests_burst: self.requests_burst.or(base.requests_burst),
            images_per_minute: self.images_per_minute.or(base.images_per_minute),
            images_burst: self.images_burst.or(base.images_burst),
        }
    }

    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        let ipm = self.images_per_minute.unwrap_or(0);
        let burst = self.images_burst.unwrap_or(ipm);
        if ipm > 0 && burst < 10 {
            p.push(format!("{at}.images_burst: must be at least 10 (the largest n) when images_per_minute is set"));
        }
        if self.requests_burst == Some(0) && self.requests_per_minute.unwrap_or(0) > 0 {
            p.push(format!("{at}.requests_burst: must be at least 1"));
        }
        p
    }
}

/// Daily and monthly quotas. A missing value means "inherit"; `0` means "no quota".
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
pub struct QuotaSpec {
    pub images_per_day: Option<u64>,
    pub images_per_month: Option<u64>,
    pub usd_per_day: Option<f64>,
    pub usd_per_month: Option<f64>,
}

impl QuotaSpec {
    pub fn over(self, base: QuotaSpec) -> QuotaSpec {
        QuotaSpec {
            images_per_day: self.images_per_day.or(base.images_per_day),
            images_per_month: self.images_per_month.or(base.images_per_month),
            usd_per_day: self.usd_per_day.or(base.usd_per_day),
            usd_per_month: self.usd_per_month.or(base.usd_per_month),
        }
    }

    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [
            ("usd_per_day", self.usd_per_day),
            ("usd_per_month", self.usd_per_month),
        ] {
            if let Some(v) = v
                && (!v.is_finite() || v < 0.0)
            {
                p.push(format!("{at}.{name}: must be a non-negative number"));
            }
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingUser {
    /// 400 `missing_required_parameter`, param `user`.
    Reject,
    /// Charge the request to the client itself (the default: SDK code that never sets `user`
    /// keeps working).
    #[default]
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UserMismatch {
    /// Replace the sent `user` with the key's own user.
    #[default]
    Overwrite,
    /// 400 `invalid_value`, param `user`.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// `app` clients that send no `user`: `reject` or `client` (charge the client).
    pub missing_user: MissingUser,
    /// `personal` clients that send another `user`: `overwrite` or `reject`.
    pub personal_user_mismatch: UserMismatch,
    /// End users tracked in memory per client; see the README for what happens at the cap.
    pub max_tracked_users_per_client: usize,
    /// Defaults for every end user.
    pub per_user: RateSpec,
    /// Defaults for every client (checked before the body is read; only requests count).
    pub per_client: RateSpec,
    /// Where the rate limits live: `memory` (this process) or `redis` (shared by replicas).
    pub backend: RateBackendKind,
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`); the environment variable
    /// `IMAGEGATE_REDIS_URL` overrides it. A secret: never logged (see [`redact_url`]).
    pub redis_url: Option<Secret<String>>,
    /// Prefix of every Redis key the gateway writes.
    pub redis_prefix: String,
    /// How long one rate check may wait for Redis before the failure policy applies.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// What a check does when Redis fails or times out.
    pub redis_failure: RedisFailure,
}

/// `[limits] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RateBackendKind {
    /// In this process (governor); each replica limits on its own.
    #[default]
    Memory,
    /// On Redis, shared by every replica that uses the same URL and prefix.
    Redis,
}

/// `[limits] redis_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    /// Answer from this replica's own in-memory limiter until Redis is back.
    #[default]
    FailOpen,
    /// Answer 503 `rate_limiter_unavailable` until Redis is back.
    FailClosed,
}

/// A Redis URL fit for logs: the password, if any, replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let shown = if userinfo.contains(':') || !userinfo.is_empty() {
        // `redis://:pw@host` or `redis://user:pw@host`; a lone `redis://pw@host` is a password
        // too for some clients, so it is hidden as well.
        if userinfo.contains(':') {
            format!("{user}:***")
        } else {
            "***".to_owned()
        }
    } else {
        String::new()
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            missing_user: MissingUser::Client,
            personal_user_mismatch: UserMismatch::Overwrite,
            max_tracked_users_per_client: 10_000,
            per_user: RateSpec {
                requests_per_minute: Some(20),
                requests_burst: Some(5),
                images_per_minute: Some(40),
                images_burst: Some(20),
            },
            per_client: RateSpec {
                requests_per_minute: Some(600),
                requests_burst: Some(100),
                images_per_minute: None,
                images_burst: None,
            },
            backend: RateBackendKind::Memory,
            redis_url: None,
            redis_prefix: "imagegate:".into(),
            redis_timeout: Duration::from_millis(50),
            redis_failure: RedisFailure::FailOpen,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QuotasConfig {
    /// IANA time zone in which days and months start (`UTC`, `Europe/Paris`, ...).
    pub time_zone: String,
    pub per_user: QuotaSpec,
    pub per_client: QuotaSpec,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        QuotasConfig {
            time_zone: "UTC".into(),
            per_user: QuotaSpec::default(),
            per_client: QuotaSpec::default(),
        }
    }
}

/// USD per image returned, per model and size.
pub type Prices = BTreeMap<String, BTreeMap<String, f64>>;

pub fn default_prices() -> Prices {
    let mut dalle2 = BTreeMap::new();
    dalle2.insert("256x256".to_string(), 0.016);
    dalle2.insert("512x512".to_string(), 0.018);
    dalle2.insert("1024x1024".to_string(), 0.020);
    let mut p = BTreeMap::new();
    p.insert("dall-e-2".to_string(), dalle2);
    p
}

/// USD → micro-dollars, the unit of every stored amount.
pub fn usd_to_micros(usd: f64) -> i64 {
    (usd * 1_000_000.0).round() as i64
}

pub fn micros_to_usd(micros: i64) -> String {
    format!("{:.6}", micros as f64 / 1_000_000.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// An application that passes its own end users in `user`.
    #[default]
    App,
    /// One person's key: `user` is that person's configured name.
    Personal,
}

/// Per-user overrides inside a client.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UserOverride {
    pub user: String,
    #[serde(default)]
    pub limits: RateSpec,
    #[serde(default)]
    pub quotas: QuotaSpec,
}

/// The configuration's problems with the Redis settings (for `check-config` and start-up).
pub fn redis_problems(l: &LimitsConfig) -> Vec<String> {
    let mut p = Vec::new();
    if l.backend == RateBackendKind::Redis {
        match &l.redis_url {
            None => p.push(
                "limits.redis_url: required when limits.backend = \"redis\" (or set IMAGEGATE_REDIS_URL)"
                    .into(),
            ),
            Some(url) => {
                if let Err(e) = url.expose().as_str().into_connection_info() {
                    p.push(format!(
                        "limits.redis_url: '{}' is not a Redis URL: {e}",
                        redact_url(url.expose())
                    ));
                }
            }
        }
        if l.redis_timeout.is_zero() {
            p.push("limits.redis_timeout: must be greater than zero".into());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://:hunter2@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("rediss://me:hunter2@h/1"), "rediss://me:***@h/1");
        assert_eq!(redact_url("redis://hunter2@h"), "redis://***@h");
    }

    #[test]
    fn a_bad_url_is_a_problem() {
        let l = LimitsConfig {
            backend: RateBackendKind::Redis,
            redis_url: Some(Secret::new("http://:pw@nowhere".into())),
            ..Default::default()
        };
        let p = redis_problems(&l);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("limits.redis_url"), "{p:?}");
        assert!(!p[0].contains("pw"), "the password is never shown: {p:?}");
        let none = LimitsConfig {
            backend: RateBackendKind::Redis,
            ..Default::default()
        };
        assert_eq!(redis_problems(&none).len(), 1);
        assert!(redis_problems(&LimitsConfig::default()).is_empty());
    }
}
