//! Reading the file: TOML into [`Config`] (unknown keys collected), environment overrides,
//! secrets from files and the environment, then every problem reported together.

use std::path::Path;

use super::{Config, PgUrl, Secret};

impl Config {
    /// Parse TOML text: the config and the unknown keys found (as problems); a syntax or type
    /// error stops the parse.
    pub(crate) fn parse(text: &str) -> Result<(Config, Vec<String>), Vec<String>> {
        let de = toml::Deserializer::parse(text).map_err(|e| vec![e.to_string()])?;
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> =
            serde_ignored::deserialize(de, |path| unknown.push(format!("unknown key: {path}")));
        match parsed {
            Ok(config) => Ok((config, unknown)),
            Err(e) => {
                unknown.push(e.to_string());
                Err(unknown)
            }
        }
    }

    /// Parse TOML text. Every unknown key and every invalid value is reported at once.
    pub fn from_toml(text: &str) -> Result<Config, Vec<String>> {
        let (config, mut problems) = Config::parse(text)?;
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Load from a file, apply environment overrides, load the upstream key, then check it all
    /// once, so every problem (file, environment, key file) is reported together.
    ///
    /// When `path` is the default path and the file does not exist, the embedded defaults are
    /// used, so `imagegate serve` works on a fresh checkout.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, Vec<String>> {
        let at = |errs: Vec<String>| -> Vec<String> {
            errs.into_iter()
                .map(|e| format!("{}: {e}", path.display()))
                .collect()
        };
        let (mut config, mut problems) = match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text)
                .map(|(c, unknown)| (c, at(unknown)))
                .map_err(at)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                (Config::default(), Vec::new())
            }
            Err(e) => return Err(vec![format!("{}: cannot read: {e}", path.display())]),
        };
        problems.extend(config.apply_env());
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Environment overrides and the upstream key; returns what went wrong.
    pub(super) fn apply_env(&mut self) -> Vec<String> {
        if let Ok(url) = std::env::var("IMAGEGATE_UPSTREAM_URL") {
            self.upstream.base_url = url;
        }
        if let Ok(url) = std::env::var("IMAGEGATE_POSTGRES_URL")
            && !url.trim().is_empty()
        {
            self.ledger.postgres_url = Some(PgUrl(url.trim().to_owned()));
        }
        if let Ok(url) = std::env::var("IMAGEGATE_REDIS_URL")
            && !url.trim().is_empty()
        {
            self.limits.redis_url = Some(Secret::new(url.trim().to_string()));
        }
        let mut problems = Vec::new();
        // The metrics token is read whichever way the upstream keys are given.
        self.admin.load_metrics_token(&mut problems);
        if self.upstream.keys.is_empty() {
            self.upstream_key = self.upstream.load_single_key(&mut problems);
        } else {
            self.upstream.load_pool_keys(&mut problems);
        }
        problems
    }
}
