//! Typed configuration: read once at start, validated once, every problem reported together.
//!
//! The file is TOML (`config/imagegate.toml` documents every key and its default). Unknown keys
//! are errors, collected with their full path. Secrets are [`Secret`], whose `Debug` and
//! `Display` print `[redacted]`. Environment overrides: `IMAGEGATE_UPSTREAM_URL` (upstream base
//! URL), `IMAGEGATE_REDIS_URL` (`limits.redis_url`) and the variable named by
//! `upstream.api_key_env` (default `OPENAI_API_KEY`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::edit::png_check::Transparency;
use crate::limits::spec::{
    ClientKind, LimitsConfig, Prices, QuotaSpec, QuotasConfig, RateSpec, UserOverride,
    default_prices,
};

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// The only way to read the value; grep for it to audit every use.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub validation: ValidationConfig,
    pub models: crate::models::ModelsConfig,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Address of the API listener.
    pub listen: SocketAddr,
    /// Time allowed for a client to send the request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time allowed for the whole request body to arrive.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Slowest average transfer rate of a request body, in bytes per second, once
    /// `body_rate_grace` has passed (408 below it); 0 = off.
    pub min_body_rate: u64,
    /// Time from the end of the request head during which a body is not held to
    /// `min_body_rate`.
    #[serde(with = "humantime_serde")]
    pub body_rate_grace: Duration,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Requests handled at once across all connections; more are answered 503 at once.
    pub max_in_flight: usize,
    /// PNG checks that may run at once on the blocking pool.
    pub max_concurrent_decodes: usize,
    /// Request bytes held in memory at once across all requests (bodies being read, checked and
    /// forwarded). A request that would exceed it waits up to `buffer_wait`, then gets 503.
    pub max_buffered_bytes: usize,
    /// Forwarding tasks running at once (each outlives its connection until the answer is
    /// relayed and recorded); a request that finds none free is refused 503 before forwarding.
    pub max_forwarding: usize,
    /// A caller that takes no chunk of its answer for this long is treated as gone (the
    /// upstream answer is still read to its end, so its cost is known).
    #[serde(with = "humantime_serde")]
    pub caller_idle_timeout: Duration,
    /// How long a request waits for room in `max_buffered_bytes`.
    #[serde(with = "humantime_serde")]
    pub buffer_wait: Duration,
    /// Connections open at once on each listener (the API and the admin listener count
    /// separately); a connection accepted above it is closed at once.
    pub max_connections: usize,
    /// API listener: connections accepted above `max_connections` that may only ask
    /// `GET /healthz` or `/readyz` (anything else: 503 `overloaded`), each closed after one
    /// answer and within `header_read_timeout`, so a probe on a new connection is answered
    /// while a flood holds every regular place. 0 turns them off.
    pub probe_connections: usize,
    /// A connection that carries no request for this long is closed (HTTP/1 keep-alive between
    /// requests; HTTP/2 with no open stream, including one that sent its preface and then
    /// nothing).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2: streams (requests) open at once on one connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2: a PING is sent after this long without a frame from the client.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Duration,
    /// HTTP/2: the connection is closed when a PING is not acknowledged within this long. Also
    /// the time a closing connection (idle, or draining on shutdown) with no request left gets
    /// to finish its goodbye (GOAWAY) before it is dropped.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
    /// TLS termination on the API listener (`[server.tls]`: `cert_file`, `key_file`); plain
    /// HTTP when absent. The files are read again at every reload.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            body_rate_grace: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            max_in_flight: 256,
            max_concurrent_decodes: 4,
            max_buffered_bytes: 1024 * 1024 * 1024,
            max_forwarding: 512,
            caller_idle_timeout: Duration::from_secs(60),
            buffer_wait: Duration::from_secs(10),
            max_connections: 1024,
            probe_connections: 8,
            idle_timeout: Duration::from_secs(60),
            http2_max_concurrent_streams: 64,
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(20),
            tls: None,
        }
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransparencyPolicy {
    Strict,
    Compatible,
}

impl From<TransparencyPolicy> for Transparency {
    fn from(p: TransparencyPolicy) -> Self {
        match p {
            TransparencyPolicy::Strict => Transparency::Strict,
            TransparencyPolicy::Compatible => Transparency::Compatible,
        }
    }
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
            max_conversion_bytes: crate::edit::png_check::PngRules::DEFAULT_MAX_CONVERSION_BYTES,
        }
    }
}

impl ValidationConfig {
    pub fn body_cap(&self) -> usize {
        self.max_body_bytes
            .unwrap_or(2 * self.max_image_bytes + 1024 * 1024)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `imagegate=debug,hyper=info`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ClientConfig {
    /// Name used in logs, the ledger and reports.
    pub name: String,
    /// `sha256:<64 hex>` as printed by `imagegate hash-key`.
    pub key_hash: String,
    /// `app` (passes its end users in `user`) or `personal` (one person's key).
    #[serde(default)]
    pub kind: ClientKind,
    /// For `personal` clients: the person's user name, charged for every request.
    #[serde(default)]
    pub user: Option<String>,
    /// This client's own limits (over `[limits.per_client]`).
    #[serde(default)]
    pub limits: RateSpec,
    /// Limits of each of this client's users (over `[limits.per_user]`).
    #[serde(default)]
    pub user_limits: RateSpec,
    /// This client's own quotas (over `[quotas.per_client]`).
    #[serde(default)]
    pub quotas: QuotaSpec,
    /// Quotas of each of this client's users (over `[quotas.per_user]`).
    #[serde(default)]
    pub user_quotas: QuotaSpec,
    /// Overrides for single users of this client.
    #[serde(default)]
    pub users: Vec<UserOverride>,
    /// The upstream key(s) this client's requests use (names of `[[upstream.keys]]`); none:
    /// any key of the pool.
    #[serde(default)]
    pub upstream_key: Option<KeyPin>,
}

/// `clients[].upstream_key`: one key name or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum KeyPin {
    One(String),
    Many(Vec<String>),
}

impl KeyPin {
    pub fn names(&self) -> &[String] {
        match self {
            KeyPin::One(n) => std::slice::from_ref(n),
            KeyPin::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LedgerConfig {
    /// SQLite database holding the usage ledger and quota use.
    pub path: PathBuf,
    /// `none`, `sha256` or `full`.
    pub prompt: crate::ledger::PromptPolicy,
    /// Records waiting for the writer; when full, requests wait (nothing is dropped).
    pub queue: usize,
    /// Where the ledger and the quota use live: `sqlite` (the file at `path`, one gateway
    /// process) or `postgres` (shared by several replicas).
    pub backend: LedgerBackend,
    /// PostgreSQL connection URL (`postgres://user:password@host:5432/db`); the environment
    /// variable `IMAGEGATE_POSTGRES_URL` overrides it. Never logged with its password.
    pub postgres_url: Option<PgUrl>,
    /// PostgreSQL schema holding the tables (`search_path`); none: the server's default.
    pub postgres_schema: Option<String>,
    /// Connections of the quota store's pool (the ledger writer and the admin reader hold
    /// one each besides).
    pub pool_size: usize,
    /// Timeout of one PostgreSQL connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// This process's identity in a shared ledger: its hash chain and the records it recovers
    /// at start. Default: the host name. Must be stable across restarts and unique among the
    /// replicas running at once.
    pub replica_id: Option<String>,
    /// PostgreSQL: how long `serve` keeps trying to reach the server at start before it gives
    /// up (0: one attempt).
    #[serde(with = "humantime_serde")]
    pub startup_wait: Duration,
    /// PostgreSQL: while no record is written for this long, the writer checks the server
    /// (`SELECT 1`), so `/readyz` follows an outage (and its end) even when idle.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// A store call (a commit, a health check) running longer than this makes the ledger
    /// stalled: `/readyz` fails and new edits are refused 503 `ledger_unavailable` before any
    /// quota is reserved, until the call ends (a PostgreSQL server frozen with its connections
    /// open neither answers nor fails).
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// SQLite: `full` (default) makes every commit durable across a power loss (an fsync of
    /// the WAL per commit, two per forwarded request); `normal` across a process crash only
    /// (fsync at checkpoints), for less CPU and latency per request.
    pub sqlite_synchronous: crate::ledger::Synchronous,
}

/// `[ledger] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerBackend {
    #[default]
    Sqlite,
    Postgres,
}

/// A PostgreSQL URL: `Debug` hides the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct PgUrl(pub String);

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::ledger::postgres::redact_url(&self.0))
    }
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            path: PathBuf::from("data/imagegate.db"),
            prompt: crate::ledger::PromptPolicy::Sha256,
            queue: 1024,
            backend: LedgerBackend::Sqlite,
            postgres_url: None,
            postgres_schema: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            replica_id: None,
            startup_wait: Duration::from_secs(30),
            health_interval: Duration::from_secs(5),
            stall_timeout: crate::ledger::writer::DEFAULT_STALL_TIMEOUT,
            sqlite_synchronous: crate::ledger::Synchronous::Full,
        }
    }
}

impl LedgerConfig {
    /// The PostgreSQL settings, when `backend = "postgres"` and a URL is set.
    pub fn postgres(&self) -> Option<crate::ledger::PgSettings> {
        if self.backend != LedgerBackend::Postgres {
            return None;
        }
        Some(crate::ledger::PgSettings {
            url: self.postgres_url.as_ref()?.0.clone(),
            schema: self.postgres_schema.clone(),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
        })
    }

    /// `replica_id`, or the host name, or `default`.
    pub fn replica(&self) -> String {
        if let Some(r) = self.replica_id.as_ref().filter(|r| !r.trim().is_empty()) {
            return r.trim().to_owned();
        }
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "default".to_owned())
    }

    /// Where the ledger is, for messages: the path, or the URL without its password.
    pub fn location(&self) -> PathBuf {
        match (&self.backend, &self.postgres_url) {
            (LedgerBackend::Postgres, Some(u)) => {
                PathBuf::from(crate::ledger::postgres::redact_url(&u.0))
            }
            _ => self.path.clone(),
        }
    }
}

/// The validated-image cache (`edits::validated`): a file whose SHA-256 passed the checks
/// recently under the same rules is not decoded again. Any of the three at 0 turns it off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CacheConfig {
    /// Files remembered at once.
    pub validated_images_max_entries: usize,
    /// Bytes the entries may hold (keys, values and bookkeeping, a fixed size per entry: no
    /// image bytes are ever stored).
    pub validated_images_max_bytes: usize,
    /// How long a validation is trusted, from the check that made it.
    #[serde(with = "humantime_serde")]
    pub validated_images_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            validated_images_max_entries: 10_000,
            validated_images_max_bytes: 4 * 1024 * 1024,
            validated_images_ttl: Duration::from_secs(600),
        }
    }
}

/// The admin listener: off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/admin/usage`, `/admin/requests/{id}`, `/metrics`).
    pub listen: Option<SocketAddr>,
    /// `sha256:<64 hex>` of the admin key (`imagegate hash-key`); required with `listen`.
    pub key_hash: Option<String>,
    /// Who may read `/metrics`: the admin key (default), its own token, or anyone.
    pub metrics_auth: MetricsAuth,
    /// With `metrics_auth = "token"`: a file holding the metrics token (else the environment
    /// variable `IMAGEGATE_METRICS_TOKEN`). Never in the TOML itself.
    pub metrics_token_file: Option<PathBuf>,
    /// The metrics token, loaded from `metrics_token_file` or the environment.
    #[serde(skip)]
    pub metrics_token: Option<Secret<String>>,
    /// TLS termination on the admin listener (`[admin.tls]`), separate from the API's.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// Read a key file; problems name `at` and the path (never the contents).
fn read_key_file(file: &Path, at: &str, problems: &mut Vec<String>) -> Option<Secret<String>> {
    match std::fs::read_to_string(file) {
        Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim().to_string())),
        Ok(_) => {
            problems.push(format!("{at} {}: is empty", file.display()));
            None
        }
        Err(e) => {
            problems.push(format!("{at} {}: {e}", file.display()));
            None
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

/// How `/metrics` on the admin listener is guarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAuth {
    /// The admin key, as for the routes that read records.
    #[default]
    AdminKey,
    /// Its own Bearer token (or the admin key): a scraper need not hold the key that reads
    /// records.
    Token,
    /// No key at all (for a listener only the monitoring network reaches).
    None,
}

/// The environment variable of the metrics token.
pub const METRICS_TOKEN_ENV: &str = "IMAGEGATE_METRICS_TOKEN";

/// The stored form of a gateway key.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// Parse a stored key hash into its 32 digest bytes.
pub fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s
        .strip_prefix("sha256:")
        .ok_or_else(|| "must start with 'sha256:' (use `imagegate hash-key`)".to_string())?;
    let bytes =
        hex::decode(hex_part).map_err(|_| "is not valid hex after 'sha256:'".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "must hold 64 hex digits after 'sha256:'".to_string())
}

/// The config file path to use when none is given.
pub const DEFAULT_PATH: &str = "config/imagegate.toml";

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            validation: ValidationConfig::default(),
            models: crate::models::ModelsConfig::default(),
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
    fn apply_env(&mut self) -> Vec<String> {
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
        if !self.upstream.keys.is_empty() {
            for (i, k) in self.upstream.keys.iter_mut().enumerate() {
                let at = format!("upstream.keys[{i}] ({})", k.name);
                k.secret = match (&k.api_key_file, &k.api_key_env) {
                    (Some(file), _) => read_key_file(file, &at, &mut problems),
                    (None, Some(var)) => {
                        let v = std::env::var(var)
                            .ok()
                            .filter(|s| !s.trim().is_empty())
                            .map(|s| Secret::new(s.trim().to_string()));
                        if v.is_none() {
                            problems
                                .push(format!("{at}: the environment variable {var} is not set"));
                        }
                        v
                    }
                    // Reported by `problems`.
                    (None, None) => None,
                };
                if let Some(key) = &k.secret
                    && http::HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err()
                {
                    problems.push(format!(
                        "{at}: the key contains characters not allowed in a header"
                    ));
                }
            }
            return problems;
        }
        self.upstream_key = match &self.upstream.api_key_file {
            Some(file) => read_key_file(file, "upstream.api_key_file", &mut problems),
            None => std::env::var(&self.upstream.api_key_env)
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|s| Secret::new(s.trim().to_string())),
        };
        if let Some(key) = &self.upstream_key
            && http::HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err()
        {
            problems.push("the upstream key contains characters not allowed in a header".into());
        }
        if self.admin.metrics_auth == MetricsAuth::Token {
            self.admin.metrics_token = match &self.admin.metrics_token_file {
                Some(file) => match std::fs::read_to_string(file) {
                    Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim().to_string())),
                    Ok(_) => {
                        problems.push(format!(
                            "admin.metrics_token_file {}: is empty",
                            file.display()
                        ));
                        None
                    }
                    Err(e) => {
                        problems.push(format!("admin.metrics_token_file {}: {e}", file.display()));
                        None
                    }
                },
                None => std::env::var(METRICS_TOKEN_ENV)
                    .ok()
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| Secret::new(s.trim().to_string())),
            };
            if self.admin.metrics_token.is_none() && self.admin.metrics_token_file.is_none() {
                problems.push(format!(
                    "admin.metrics_auth = \"token\" needs admin.metrics_token_file or {METRICS_TOKEN_ENV}"
                ));
            }
        }
        problems
    }

    /// Whether an upstream key is loaded: the single key, or a key of the pool.
    pub fn has_upstream_key(&self) -> bool {
        if self.upstream.keys.is_empty() {
            self.upstream_key.is_some()
        } else {
            self.upstream.keys.iter().any(|k| k.secret.is_some())
        }
    }

    /// Problems of `[[upstream.keys]]`, `[upstream.breaker]` and `clients[].upstream_key`.
    fn key_pool_problems(&self, p: &mut Vec<String>) {
        let u = &self.upstream;
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
        for (i, c) in self.clients.iter().enumerate() {
            let Some(pin) = &c.upstream_key else { continue };
            if pin.names().is_empty() {
                p.push(format!("clients[{i}].upstream_key: names no key"));
            }
            for n in pin.names() {
                let known = if u.keys.is_empty() {
                    n == crate::keypool::DEFAULT_KEY_NAME
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

    /// Semantic checks that serde cannot express.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let s = &self.server;
        for (name, d) in [
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.body_read_timeout", s.body_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
            (
                "server.http2_keep_alive_interval",
                s.http2_keep_alive_interval,
            ),
            (
                "server.http2_keep_alive_timeout",
                s.http2_keep_alive_timeout,
            ),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
            ("server.caller_idle_timeout", s.caller_idle_timeout),
            ("server.buffer_wait", s.buffer_wait),
        ] {
            if d.is_zero() {
                p.push(format!("{name}: must be greater than zero"));
            }
        }
        if s.min_body_rate > 0 && s.body_rate_grace.is_zero() {
            p.push(
                "server.body_rate_grace: must be greater than zero while server.min_body_rate is set"
                    .into(),
            );
        }
        if s.max_in_flight == 0 {
            p.push("server.max_in_flight: must be at least 1".into());
        }
        if s.max_forwarding == 0 {
            p.push("server.max_forwarding: must be at least 1".into());
        }
        let largest_body = if self.models.serves_gpt_image() {
            self.validation
                .body_cap()
                .max(self.models.limits.body_cap())
        } else {
            self.validation.body_cap()
        };
        if s.max_buffered_bytes < largest_body {
            p.push(format!(
                "server.max_buffered_bytes: must be at least the largest body cap ({largest_body} bytes), or the largest valid request could never be read"
            ));
        }
        if s.max_connections == 0 {
            p.push("server.max_connections: must be at least 1".into());
        }
        if s.http2_max_concurrent_streams == 0 {
            p.push("server.http2_max_concurrent_streams: must be at least 1".into());
        }
        if s.max_concurrent_decodes == 0 {
            p.push("server.max_concurrent_decodes: must be at least 1".into());
        }
        let u = &self.upstream;
        check_base_url("upstream.base_url", &u.base_url, u.allow_http, &mut p);
        self.key_pool_problems(&mut p);
        for (name, v) in [("organization", &u.organization), ("project", &u.project)] {
            if let Some(v) = v
                && http::HeaderValue::from_str(v).is_err()
            {
                p.push(format!("upstream.{name}: not a valid header value"));
            }
        }
        if let Some(file) = &u.ca_file
            && let Err(e) = crate::upstream::extra_roots(file)
        {
            p.push(e.to_string());
        }
        let v = &self.validation;
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
        p.extend(self.models.problems(&v.models));
        if v.max_parts < 2 {
            p.push("validation.max_parts: must be at least 2".into());
        }
        if v.max_conversion_bytes == 0 {
            p.push("validation.max_conversion_bytes: must be at least 1".into());
        }
        p.extend(self.limits.per_user.problems("limits.per_user"));
        p.extend(self.limits.per_client.problems("limits.per_client"));
        if self.limits.max_tracked_users_per_client == 0 {
            p.push("limits.max_tracked_users_per_client: must be at least 1".into());
        }
        p.extend(crate::limits::rate_redis::problems(&self.limits));
        p.extend(self.quotas.per_user.problems("quotas.per_user"));
        p.extend(self.quotas.per_client.problems("quotas.per_client"));
        if jiff::tz::TimeZone::get(&self.quotas.time_zone).is_err() {
            p.push(format!(
                "quotas.time_zone: unknown time zone '{}'",
                self.quotas.time_zone
            ));
        }
        for model in &v.models {
            match self.prices.get(model) {
                None => p.push(format!("prices: no prices for model '{model}'")),
                Some(sizes) => {
                    for size in crate::edit::Size::ALL {
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
        match (&self.admin.listen, &self.admin.key_hash) {
            (Some(_), None) => p.push("admin.key_hash: required when admin.listen is set".into()),
            (_, Some(h)) => {
                if let Err(e) = parse_key_hash(h) {
                    p.push(format!("admin.key_hash: {e}"));
                }
            }
            (None, None) => {}
        }
        if let (Some(admin), listen) = (self.admin.listen, self.server.listen)
            && admin == listen
            && admin.port() != 0
        {
            p.push("admin.listen: must differ from server.listen".into());
        }
        for (at, files) in [("server.tls", &s.tls), ("admin.tls", &self.admin.tls)] {
            if let Some(files) = files
                && let Err(e) = crate::tls::acceptor(files, at)
            {
                p.push(e);
            }
        }
        if self.admin.tls.is_some() && self.admin.listen.is_none() {
            p.push("admin.tls: the admin listener is off; set admin.listen".into());
        }
        if self.ledger.queue == 0 {
            p.push("ledger.queue: must be at least 1".into());
        }
        if self.ledger.backend == LedgerBackend::Postgres {
            match &self.ledger.postgres_url {
                None => p.push(
                    "ledger.postgres_url: required when ledger.backend = \"postgres\" (or set IMAGEGATE_POSTGRES_URL)"
                        .into(),
                ),
                Some(u) => {
                    if let Err(e) = u.0.parse::<postgres::Config>() {
                        p.push(format!(
                            "ledger.postgres_url {}: {e}",
                            crate::ledger::postgres::redact_url(&u.0)
                        ));
                    }
                }
            }
            if self.ledger.pool_size == 0 {
                p.push("ledger.pool_size: must be at least 1".into());
            }
            if self.ledger.health_interval.is_zero() {
                p.push("ledger.health_interval: must be greater than zero".into());
            }
        }
        if self.ledger.stall_timeout.is_zero() {
            p.push("ledger.stall_timeout: must be greater than zero".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if c.name.trim().is_empty() {
                p.push(format!("clients[{i}].name: must not be empty"));
            } else if !names.insert(c.name.clone()) {
                p.push(format!("clients[{i}].name: '{}' is used twice", c.name));
            }
            match parse_key_hash(&c.key_hash) {
                Ok(h) => {
                    if !hashes.insert(h) {
                        p.push(format!(
                            "clients[{i}].key_hash: the same key is used by two clients"
                        ));
                    }
                }
                Err(e) => p.push(format!("clients[{i}].key_hash: {e}")),
            }
            match (c.kind, &c.user) {
                (ClientKind::Personal, None) => p.push(format!(
                    "clients[{i}].user: a personal client needs its user's name"
                )),
                (ClientKind::Personal, Some(u))
                    if crate::limits::normalize_user(u, v.max_user_chars).is_err() =>
                {
                    p.push(format!("clients[{i}].user: not a valid user name"))
                }
                (ClientKind::App, Some(_)) => p.push(format!(
                    "clients[{i}].user: only personal clients have a user"
                )),
                _ => {}
            }
            let at = format!("clients[{i}]");
            p.extend(c.limits.problems(&format!("{at}.limits")));
            p.extend(c.user_limits.problems(&format!("{at}.user_limits")));
            p.extend(c.quotas.problems(&format!("{at}.quotas")));
            p.extend(c.user_quotas.problems(&format!("{at}.user_quotas")));
            for (j, u) in c.users.iter().enumerate() {
                p.extend(u.limits.problems(&format!("{at}.users[{j}].limits")));
                p.extend(u.quotas.problems(&format!("{at}.users[{j}].quotas")));
            }
        }
        if let Some(token) = &self.admin.metrics_token {
            let token = crate::middleware::auth::key_digest(token.expose());
            let admin = self
                .admin
                .key_hash
                .as_deref()
                .and_then(|h| parse_key_hash(h).ok());
            if hashes.contains(&token) || admin == Some(token) {
                p.push(
                    "admin.metrics_token: the metrics token must differ from the admin key and every client key"
                        .into(),
                );
            }
        }
        if let Some(admin) = self
            .admin
            .key_hash
            .as_deref()
            .and_then(|h| parse_key_hash(h).ok())
            && hashes.contains(&admin)
        {
            p.push(
                "admin.key_hash: the admin key is also a client's key; it must differ from every client key"
                    .into(),
            );
        }
        p
    }
}

#[cfg(test)]
mod tests {
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
        c.admin.key_hash = Some(
            hash_key("ig-client-b")
                .to_uppercase()
                .replace("SHA256:", "sha256:"),
        );
        let problems = c.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("admin.key_hash:") && p.contains("must differ")),
            "{problems:?}"
        );
    }

    #[test]
    fn key_hash_round_trips() {
        let h = hash_key("ig-test");
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64);
        assert!(parse_key_hash(&h).is_ok());
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
            upstream_key: Some(KeyPin::One(crate::keypool::DEFAULT_KEY_NAME.into())),
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
    fn secrets_are_redacted() {
        let s = Secret::new("sk-live-123".to_string());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
    }
}
