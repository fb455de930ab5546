//! Typed configuration: read once at start, validated once, every problem reported together.
//!
//! The file is TOML (`config/imagegate.toml` documents every key and its default). Unknown keys
//! are errors, collected with their full path. Secrets are [`Secret`], whose `Debug` and
//! `Display` print `[redacted]`. Environment overrides: `IMAGEGATE_UPSTREAM_URL` (upstream base
//! URL), `IMAGEGATE_REDIS_URL` (`limits.redis_url`) and the variable named by
//! `upstream.api_key_env` (default `OPENAI_API_KEY`).
//!
//! This module composes the sections, one file each, and reports their problems; each section's
//! file holds its type, its defaults and its own checks. `load` reads the file and the
//! environment; `keys` parses key hashes once; `secret` keeps secrets from being printed.
//! `limits` holds `[limits]`, `[quotas]` and `[prices]` (re-exported as `limits::spec`),
//! `models` the `[models]` section (re-exported as `crate::models`): configuration is plain
//! data and imports no other module of the gateway but `tls`.

mod admin;
mod cache;
mod clients;
mod keys;
mod ledger;
pub mod limits;
mod load;
mod log;
pub mod models;
mod secret;
mod server;
mod upstream;
mod validation;

use serde::Deserialize;

pub use admin::{AdminConfig, METRICS_TOKEN_ENV, MetricsAuth};
pub use cache::CacheConfig;
pub use clients::{ClientConfig, KeyPin};
pub use keys::{KeyHash, hash_key};
pub use ledger::{
    DEFAULT_STALL_TIMEOUT, LedgerBackend, LedgerConfig, PgSettings, PgUrl, PromptPolicy,
    Synchronous, redact_pg_url,
};
pub use log::{LogConfig, LogFormat};
pub use secret::Secret;
pub use server::ServerConfig;
pub use upstream::{
    BreakerConfig, DEFAULT_KEY_NAME, UpstreamConfig, UpstreamKeyConfig, read_ca_file,
};
pub use validation::{
    DEFAULT_MAX_CONVERSION_BYTES, DEFAULT_MAX_PIXELS, Size, TransparencyPolicy, ValidationConfig,
};

use limits::{LimitsConfig, Prices, QuotasConfig, default_prices};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub validation: ValidationConfig,
    pub models: models::ModelsConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub quotas: QuotasConfig,
    pub prices: Prices,
    pub ledger: LedgerConfig,
    pub admin: AdminConfig,
    pub cache: CacheConfig,
    pub clients: Vec<ClientConfig>,
    /// The upstream key, loaded from the environment or `upstream.api_key_file`; never from the
    /// TOML itself, so the config file can be committed.
    #[serde(skip)]
    pub upstream_key: Option<Secret<String>>,
}

/// The config file path to use when none is given.
pub const DEFAULT_PATH: &str = "config/imagegate.toml";

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            validation: ValidationConfig::default(),
            models: models::ModelsConfig::default(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            quotas: QuotasConfig::default(),
            prices: default_prices(),
            ledger: LedgerConfig::default(),
            admin: AdminConfig::default(),
            cache: CacheConfig::default(),
            clients: Vec::new(),
            upstream_key: None,
        }
    }
}

impl Config {
    /// Whether an upstream key is loaded: the single key, or a key of the pool.
    pub fn has_upstream_key(&self) -> bool {
        if self.upstream.keys.is_empty() {
            self.upstream_key.is_some()
        } else {
            self.upstream.keys.iter().any(|k| k.secret.is_some())
        }
    }

    /// Semantic checks that serde cannot express: each section's, then those across sections.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let largest_body = if self.models.serves_gpt_image() {
            self.validation
                .body_cap()
                .max(self.models.limits.body_cap())
        } else {
            self.validation.body_cap()
        };
        self.server.problems(largest_body, &mut p);
        self.upstream.problems(&self.clients, &mut p);
        self.validation.problems(&mut p);
        p.extend(self.models.problems(&self.validation.models));
        p.extend(self.limits.per_user.problems("limits.per_user"));
        p.extend(self.limits.per_client.problems("limits.per_client"));
        if self.limits.max_tracked_users_per_client == 0 {
            p.push("limits.max_tracked_users_per_client: must be at least 1".into());
        }
        p.extend(limits::redis_problems(&self.limits));
        p.extend(self.quotas.per_user.problems("quotas.per_user"));
        p.extend(self.quotas.per_client.problems("quotas.per_client"));
        if jiff::tz::TimeZone::get(&self.quotas.time_zone).is_err() {
            p.push(format!(
                "quotas.time_zone: unknown time zone '{}'",
                self.quotas.time_zone
            ));
        }
        self.price_problems(&mut p);
        self.ledger.problems(&mut p);
        let client_hashes =
            clients::problems(&self.clients, self.validation.max_user_chars, &mut p);
        self.admin
            .problems(self.server.listen, &client_hashes, &mut p);
        p
    }

    /// Every model of the dall-e-2 profile needs a price for every size.
    fn price_problems(&self, p: &mut Vec<String>) {
        for model in &self.validation.models {
            match self.prices.get(model) {
                None => p.push(format!("prices: no prices for model '{model}'")),
                Some(sizes) => {
                    for size in Size::ALL {
                        match sizes.get(size.as_str()) {
                            Some(usd) if usd.is_finite() && *usd >= 0.0 => {}
                            Some(_) => p.push(format!(
                                "prices.{model}.{}: must be a non-negative number",
                                size.as_str()
                            )),
                            None => p.push(format!(
                                "prices.{model}: no price for size {}",
                                size.as_str()
                            )),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().problems().is_empty());
        assert_eq!(Config::default().validation.body_cap(), 9 * 1024 * 1024);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            bogus = 1
            [server]
            max_in_flight = 0
            nope = "x"
            [upstream]
            base_url = "http://example.invalid/v1"
            [[clients]]
            name = "a"
            key_hash = "md5:abc"
        "#;
        let errs = Config::from_toml(text).unwrap_err();
        let all = errs.join("\n");
        assert!(all.contains("unknown key: bogus"), "{all}");
        assert!(all.contains("unknown key: server.nope"), "{all}");
        assert!(all.contains("server.max_in_flight"), "{all}");
        assert!(all.contains("allow_http"), "{all}");
        assert!(all.contains("clients[0].key_hash"), "{all}");
        assert_eq!(errs.len(), 5, "{all}");
    }

    #[test]
    fn connection_settings_must_be_positive() {
        let text = r#"
            [server]
            max_connections = 0
            idle_timeout = "0s"
            http2_max_concurrent_streams = 0
            http2_keep_alive_interval = "0s"
            http2_keep_alive_timeout = "0s"
        "#;
        let all = Config::from_toml(text).unwrap_err().join("\n");
        for key in [
            "server.max_connections",
            "server.idle_timeout",
            "server.http2_max_concurrent_streams",
            "server.http2_keep_alive_interval",
            "server.http2_keep_alive_timeout",
        ] {
            assert!(all.contains(key), "{key} missing from: {all}");
        }
        let s = ServerConfig::default();
        assert_eq!(
            (
                s.max_connections,
                s.idle_timeout,
                s.http2_max_concurrent_streams
            ),
            (1024, Duration::from_secs(60), 64)
        );
    }

    #[test]
    fn the_admin_key_must_differ_from_every_client_key() {
        let mut c = Config::default();
        for (name, key) in [("a", "ig-client-a"), ("b", "ig-client-b")] {
            c.clients.push(ClientConfig {
                name: name.into(),
                key_hash: hash_key(key),
                ..Default::default()
            });
        }
        c.admin.listen = Some("127.0.0.1:9091".parse().unwrap());
        c.admin.key_hash = Some(hash_key("ig-admin"));
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        // The same key, even spelled with upper-case hex.
        c.admin.key_hash = Some(KeyHash::parse(
            &hash_key("ig-client-b")
                .to_string()
                .to_uppercase()
                .replace("SHA256:", "sha256:"),
        ));
        let problems = c.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("admin.key_hash:") && p.contains("must differ")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_key_pool_parses_and_loads_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("team.key");
        std::fs::write(&file, "sk-team-from-file\n").unwrap();
        let text = format!(
            r#"
            [upstream]
            allow_http = true
            [upstream.breaker]
            failures = 5
            cool_down = "2s"
            [[upstream.keys]]
            name = "main"
            api_key_env = "IMAGEGATE_TEST_POOL_KEY_MAIN"
            weight = 3
            [[upstream.keys]]
            name = "team-b"
            api_key_file = "{}"
            organization = "org-b"
            project = "proj_b"
            weight = 0
            base_url = "http://127.0.0.1:9/v1"
            [[clients]]
            name = "a"
            key_hash = "{}"
            upstream_key = "team-b"
            [[clients]]
            name = "b"
            key_hash = "{}"
            upstream_key = ["main", "team-b"]
            "#,
            file.display(),
            hash_key("ka"),
            hash_key("kb")
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        // The variable is set nowhere (setting one is unsafe in edition 2024): the missing
        // variable is reported by name, the file form loads.
        let errs = Config::load(&path, true).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("upstream.keys[0] (main)")
                && errs[0].contains("IMAGEGATE_TEST_POOL_KEY_MAIN"),
            "{errs:?}"
        );
        let (mut c, unknown) = Config::parse(&text).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(c.apply_env().len(), 1);
        let k = &c.upstream.keys[1];
        assert_eq!(k.secret.as_ref().unwrap().expose(), "sk-team-from-file");
        assert_eq!((k.weight, k.organization.as_deref()), (0, Some("org-b")));
        assert_eq!(c.upstream.keys[0].weight, 3);
        assert_eq!(
            (c.upstream.breaker.failures, c.upstream.breaker.cool_down),
            (5, Duration::from_secs(2))
        );
        assert_eq!(
            c.clients[0].upstream_key,
            Some(KeyPin::One("team-b".into()))
        );
        assert_eq!(
            c.clients[1].upstream_key.as_ref().unwrap().names(),
            ["main", "team-b"]
        );
        assert!(c.has_upstream_key());
        // The key never shows in the config's Debug.
        assert!(!format!("{c:?}").contains("sk-team-from-file"));
    }

    #[test]
    fn key_pool_problems_are_reported() {
        let text = r#"
            [upstream]
            organization = "org-top"
            [upstream.breaker]
            failures = 0
            cool_down = "0s"
            [[upstream.keys]]
            name = "a b"
            api_key_env = "X"
            [[upstream.keys]]
            name = "k"
            [[upstream.keys]]
            name = "k"
            api_key_env = "Y"
            api_key_file = "/y"
            weight = 0
            base_url = "http://plain.invalid/v1"
            [[clients]]
            name = "c"
            key_hash = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
            upstream_key = "nope"
        "#;
        let all = Config::from_toml(text).unwrap_err().join("\n");
        for expected in [
            "upstream.keys[0].name",
            "upstream.keys[1]: set api_key_env or api_key_file",
            "upstream.keys[2].name: 'k' is used twice",
            "upstream.keys[2]: set api_key_env or api_key_file, not both",
            "upstream.keys[2].base_url",
            "upstream.organization: set it on each of [[upstream.keys]]",
            "upstream.breaker.failures",
            "upstream.breaker.cool_down",
            "clients[0].upstream_key: no key named 'nope'",
        ] {
            assert!(all.contains(expected), "{expected} missing from: {all}");
        }
        // Without a pool, the single key is called `default`.
        let mut c = Config::default();
        c.clients.push(ClientConfig {
            name: "c".into(),
            key_hash: hash_key("c"),
            upstream_key: Some(KeyPin::One(DEFAULT_KEY_NAME.into())),
            ..Default::default()
        });
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }

    #[test]
    fn ledger_sqlite_synchronous_is_full_unless_set_and_takes_only_its_two_values() {
        use crate::ledger::Synchronous;
        assert_eq!(
            Config::default().ledger.sqlite_synchronous,
            Synchronous::Full
        );
        let c = Config::from_toml("[ledger]\nsqlite_synchronous = \"normal\"\n").unwrap();
        assert_eq!(c.ledger.sqlite_synchronous, Synchronous::Normal);
        let errs = Config::from_toml("[ledger]\nsqlite_synchronous = \"off\"\n")
            .unwrap_err()
            .join("\n");
        assert!(errs.contains("sqlite_synchronous"), "{errs}");
    }

    #[test]
    fn the_metrics_token_is_loaded_and_must_differ_from_the_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics-token");
        std::fs::write(&file, "ig-metrics-token\n").unwrap();
        let mut c = Config::default();
        c.admin.metrics_auth = MetricsAuth::Token;
        c.admin.metrics_token_file = Some(file.clone());
        assert!(c.apply_env().is_empty());
        assert_eq!(
            c.admin.metrics_token.as_ref().map(|t| t.expose().as_str()),
            Some("ig-metrics-token")
        );
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.admin.key_hash = Some(hash_key("ig-metrics-token"));
        assert!(
            c.problems()
                .iter()
                .any(|p| p.starts_with("admin.metrics_token:") && p.contains("must differ")),
            "{:?}",
            c.problems()
        );
        std::fs::write(&file, "  ").unwrap();
        assert!(
            c.apply_env()
                .iter()
                .any(|p| p.starts_with("admin.metrics_token_file") && p.contains("empty"))
        );
        let parsed: AdminConfig = toml::from_str("metrics_auth = \"none\"").unwrap();
        assert_eq!(parsed.metrics_auth, MetricsAuth::None);
    }

    #[test]
    fn the_metrics_token_is_loaded_with_a_key_pool_too() {
        // With [[upstream.keys]] the keys are read by the pool; the metrics token must still be
        // read (it once was skipped, leaving /metrics to the admin key alone).
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("metrics-token");
        std::fs::write(&token, "ig-metrics-token\n").unwrap();
        let key = dir.path().join("pool.key");
        std::fs::write(&key, "sk-pool-from-file\n").unwrap();
        let text = format!(
            "[admin]\nmetrics_auth = \"token\"\nmetrics_token_file = {token:?}\n\
             [[upstream.keys]]\nname = \"main\"\napi_key_file = {key:?}\n"
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let c = Config::load(&path, true).unwrap();
        assert_eq!(
            c.admin.metrics_token.as_ref().map(|t| t.expose().as_str()),
            Some("ig-metrics-token")
        );
        std::fs::remove_file(&token).unwrap();
        let errs = Config::load(&path, true).unwrap_err();
        assert!(
            errs.iter()
                .any(|p| p.starts_with("admin.metrics_token_file")),
            "{errs:?}"
        );
    }
}
