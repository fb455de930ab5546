//! `[upstream]`: the OpenAI (or compatible) server, the key pool (`[[upstream.keys]]`) and its
//! breaker (`[upstream.breaker]`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use super::ClientConfig;
use super::secret::{Secret, env_secret, fits_bearer_header, read_key_file};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UpstreamConfig {
    /// Base URL; `/images/edits` is appended.
    pub base_url: String,
    /// Allow a plain `http://` base URL (tests, local OpenAI-compatible servers).
    pub allow_http: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending the request to receiving the response head.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest silence of the upstream while it sends an answer (between two events of a
    /// stream); the relay then ends the answer and records it.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Environment variable holding the upstream key.
    pub api_key_env: String,
    /// A file holding the upstream key (takes precedence over the environment variable).
    pub api_key_file: Option<PathBuf>,
    /// Sent as `OpenAI-Organization` when set.
    pub organization: Option<String>,
    /// Sent as `OpenAI-Project` when set.
    pub project: Option<String>,
    /// A PEM file of CA certificates trusted for the upstream in addition to the webpki roots
    /// (a private OpenAI-compatible server, a corporate TLS proxy).
    pub ca_file: Option<PathBuf>,
    /// The key pool (`[[upstream.keys]]`). Empty: one key named `default` from `api_key_env` /
    /// `api_key_file`, `organization` and `project` above.
    pub keys: Vec<UpstreamKeyConfig>,
    /// When a key is benched (`[upstream.breaker]`).
    pub breaker: BreakerConfig,
    /// Cut-through: send the canonical body upstream while the images are still being
    /// checked, holding back its last bytes until they pass (a failed check aborts the upload,
    /// so the upstream never receives a complete request). Off by default.
    pub cut_through: bool,
}

/// One key of the pool (`[[upstream.keys]]`).
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamKeyConfig {
    /// Shown in logs, metrics and the ledger (never the key itself): letters, digits, `.`, `_`,
    /// `-`, at most 64 characters.
    pub name: String,
    /// Environment variable holding the key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// A file holding the key (one of the two is required).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Sent as `OpenAI-Organization` / `OpenAI-Project` with this key.
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub project: Option<String>,
    /// Share of the traffic of clients not pinned to keys (0: only clients pinned to it).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// This key's own upstream base URL (default: `upstream.base_url`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Loaded from `api_key_env` / `api_key_file`, never from the TOML.
    #[serde(skip)]
    pub secret: Option<Secret<String>>,
}

/// The name of the single key of a config without `[[upstream.keys]]`.
pub const DEFAULT_KEY_NAME: &str = "default";

fn default_weight() -> u32 {
    1
}

impl UpstreamKeyConfig {
    /// A key for tests and programmatic configs: weight 1, the secret given.
    pub fn new(name: &str, secret: &str) -> UpstreamKeyConfig {
        UpstreamKeyConfig {
            name: name.into(),
            api_key_env: None,
            api_key_file: None,
            organization: None,
            project: None,
            weight: 1,
            base_url: None,
            secret: Some(Secret::new(secret.into())),
        }
    }
}

/// The key pool's circuit breaker.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BreakerConfig {
    /// Failures in a row (connect failures, 5xx answers, timeouts) that bench a key.
    pub failures: u32,
    /// How long a key is benched after `failures`; then one trial request decides.
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
    /// Bench of a key answered 429 (a rate limit) without `retry-after` or `x-ratelimit-reset-*`.
    #[serde(with = "humantime_serde")]
    pub rate_limit_default: Duration,
    /// Longest bench a 429's `retry-after` can ask for.
    #[serde(with = "humantime_serde")]
    pub rate_limit_max: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            cool_down: Duration::from_secs(30),
            rate_limit_default: Duration::from_secs(10),
            rate_limit_max: Duration::from_secs(300),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: "https://api.openai.com/v1".into(),
            allow_http: false,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            pool_idle_timeout: Duration::from_secs(90),
            api_key_env: "OPENAI_API_KEY".into(),
            api_key_file: None,
            organization: None,
            project: None,
            ca_file: None,
            keys: Vec::new(),
            breaker: BreakerConfig::default(),
            cut_through: false,
        }
    }
}

/// An upstream base URL: http(s), plain http only with `allow_http`.
fn check_base_url(name: &str, url: &str, allow_http: bool, p: &mut Vec<String>) {
    match http::Uri::try_from(url) {
        Ok(uri) => match uri.scheme_str() {
            Some("https") => {}
            Some("http") if allow_http => {}
            Some("http") => p.push(format!(
                "{name}: '{url}' is plain http; set upstream.allow_http = true to allow it"
            )),
            _ => p.push(format!("{name}: '{url}' must be an http(s) URL")),
        },
        Err(e) => p.push(format!("{name}: '{url}' is not a URL: {e}")),
    }
}

impl UpstreamConfig {
    /// Load the secrets of `[[upstream.keys]]` (from each key's file or variable).
    pub(super) fn load_pool_keys(&mut self, problems: &mut Vec<String>) {
        for (i, k) in self.keys.iter_mut().enumerate() {
            let at = format!("upstream.keys[{i}] ({})", k.name);
            k.secret = match (&k.api_key_file, &k.api_key_env) {
                (Some(file), _) => read_key_file(file, &at, problems),
                (None, Some(var)) => {
                    let v = env_secret(var);
                    if v.is_none() {
                        problems.push(format!("{at}: the environment variable {var} is not set"));
                    }
                    v
                }
                // Reported by `problems`.
                (None, None) => None,
            };
            if let Some(key) = &k.secret
                && !fits_bearer_header(key)
            {
                problems.push(format!(
                    "{at}: the key contains characters not allowed in a header"
                ));
            }
        }
    }

    /// Load the single upstream key (`api_key_file`, else the variable `api_key_env`).
    pub(super) fn load_single_key(&self, problems: &mut Vec<String>) -> Option<Secret<String>> {
        let key = match &self.api_key_file {
            Some(file) => read_key_file(file, "upstream.api_key_file", problems),
            None => env_secret(&self.api_key_env),
        };
        if let Some(key) = &key
            && !fits_bearer_header(key)
        {
            problems.push("the upstream key contains characters not allowed in a header".into());
        }
        key
    }

    /// Problems of `[upstream]`, its key pool and breaker, and of `clients[].upstream_key`
    /// (which names keys of the pool).
    pub(super) fn problems(&self, clients: &[ClientConfig], p: &mut Vec<String>) {
        for (name, d) in [
            ("upstream.connect_timeout", self.connect_timeout),
            ("upstream.response_timeout", self.response_timeout),
            ("upstream.idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                p.push(format!("{name}: must be greater than zero"));
            }
        }
        let u = self;
        check_base_url("upstream.base_url", &u.base_url, u.allow_http, p);
        self.key_pool_problems(clients, p);
        for (name, v) in [("organization", &u.organization), ("project", &u.project)] {
            if let Some(v) = v
                && http::HeaderValue::from_str(v).is_err()
            {
                p.push(format!("upstream.{name}: not a valid header value"));
            }
        }
        if let Some(file) = &u.ca_file
            && let Err(detail) = read_ca_file(file)
        {
            p.push(format!("upstream.ca_file {}: {detail}", file.display()));
        }
    }

    /// Problems of `[[upstream.keys]]`, `[upstream.breaker]` and `clients[].upstream_key`.
    fn key_pool_problems(&self, clients: &[ClientConfig], p: &mut Vec<String>) {
        let u = self;
        let mut names = std::collections::HashSet::new();
        for (i, k) in u.keys.iter().enumerate() {
            let at = format!("upstream.keys[{i}]");
            if k.name.is_empty()
                || k.name.len() > 64
                || !k
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                p.push(format!(
                    "{at}.name: 1 to 64 letters, digits, '.', '_' or '-' (it is shown in logs and metrics)"
                ));
            } else if !names.insert(k.name.as_str()) {
                p.push(format!("{at}.name: '{}' is used twice", k.name));
            }
            match (&k.api_key_env, &k.api_key_file) {
                // A secret given in code (tests, embedding programs) needs neither.
                (None, None) if k.secret.is_none() => {
                    p.push(format!("{at}: set api_key_env or api_key_file"))
                }
                (Some(_), Some(_)) => {
                    p.push(format!("{at}: set api_key_env or api_key_file, not both"))
                }
                _ => {}
            }
            for (name, v) in [("organization", &k.organization), ("project", &k.project)] {
                if let Some(v) = v
                    && http::HeaderValue::from_str(v).is_err()
                {
                    p.push(format!("{at}.{name}: not a valid header value"));
                }
            }
            if let Some(url) = &k.base_url {
                check_base_url(&format!("{at}.base_url"), url, u.allow_http, p);
            }
        }
        if !u.keys.is_empty() {
            if u.keys.iter().all(|k| k.weight == 0) {
                p.push("upstream.keys: at least one key needs a weight above 0".into());
            }
            for (name, set) in [
                ("api_key_file", u.api_key_file.is_some()),
                ("organization", u.organization.is_some()),
                ("project", u.project.is_some()),
            ] {
                if set {
                    p.push(format!(
                        "upstream.{name}: set it on each of [[upstream.keys]] instead (the single-key form and the pool do not mix)"
                    ));
                }
            }
        }
        if u.breaker.failures == 0 {
            p.push("upstream.breaker.failures: must be at least 1".into());
        }
        for (name, d) in [
            ("upstream.breaker.cool_down", u.breaker.cool_down),
            (
                "upstream.breaker.rate_limit_default",
                u.breaker.rate_limit_default,
            ),
            ("upstream.breaker.rate_limit_max", u.breaker.rate_limit_max),
        ] {
            if d.is_zero() {
                p.push(format!("{name}: must be greater than zero"));
            }
        }
        for (i, c) in clients.iter().enumerate() {
            let Some(pin) = &c.upstream_key else { continue };
            if pin.names().is_empty() {
                p.push(format!("clients[{i}].upstream_key: names no key"));
            }
            for n in pin.names() {
                let known = if u.keys.is_empty() {
                    n == DEFAULT_KEY_NAME
                } else {
                    u.keys.iter().any(|k| &k.name == n)
                };
                if !known {
                    p.push(format!(
                        "clients[{i}].upstream_key: no key named '{n}' in [[upstream.keys]]"
                    ));
                }
            }
        }
    }
}

/// The CA certificates of a PEM file (`upstream.ca_file`) as trust anchors. Other PEM sections
/// (keys, CRLs) are skipped. The error says what is wrong (the caller names the key and the
/// path): the file cannot be read, is not PEM, holds no certificate, or holds one that cannot be
/// a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| match e {
            rustls::pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
            other => format!("not a PEM file: {other}"),
        })?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
    }
    Ok(roots)
}
