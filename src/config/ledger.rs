//! `[ledger]`: where the usage ledger and the quota use live (SQLite or PostgreSQL).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default of `ledger.stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LedgerConfig {
    /// SQLite database holding the usage ledger and quota use.
    pub path: PathBuf,
    /// `none`, `sha256` or `full`.
    pub prompt: PromptPolicy,
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
    pub sqlite_synchronous: Synchronous,
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
        f.write_str(&redact_pg_url(&self.0))
    }
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            path: PathBuf::from("data/imagegate.db"),
            prompt: PromptPolicy::Sha256,
            queue: 1024,
            backend: LedgerBackend::Sqlite,
            postgres_url: None,
            postgres_schema: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            replica_id: None,
            startup_wait: Duration::from_secs(30),
            health_interval: Duration::from_secs(5),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            sqlite_synchronous: Synchronous::Full,
        }
    }
}

impl LedgerConfig {
    /// The PostgreSQL settings, when `backend = "postgres"` and a URL is set.
    pub fn postgres(&self) -> Option<PgSettings> {
        if self.backend != LedgerBackend::Postgres {
            return None;
        }
        Some(PgSettings {
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
            (LedgerBackend::Postgres, Some(u)) => PathBuf::from(redact_pg_url(&u.0)),
            _ => self.path.clone(),
        }
    }
}

impl LedgerConfig {
    /// Problems of `[ledger]`.
    pub(super) fn problems(&self, p: &mut Vec<String>) {
        if self.queue == 0 {
            p.push("ledger.queue: must be at least 1".into());
        }
        if self.backend == LedgerBackend::Postgres {
            match &self.postgres_url {
                None => p.push(
                    "ledger.postgres_url: required when ledger.backend = \"postgres\" (or set IMAGEGATE_POSTGRES_URL)"
                        .into(),
                ),
                Some(u) => {
                    if let Err(e) = u.0.parse::<postgres::Config>() {
                        p.push(format!(
                            "ledger.postgres_url {}: {e}",
                            redact_pg_url(&u.0)
                        ));
                    }
                }
            }
            if self.pool_size == 0 {
                p.push("ledger.pool_size: must be at least 1".into());
            }
            if self.health_interval.is_zero() {
                p.push("ledger.health_interval: must be greater than zero".into());
            }
        }
        if self.stall_timeout.is_zero() {
            p.push("ledger.stall_timeout: must be greater than zero".into());
        }
    }
}

/// What the ledger keeps of the prompt (`ledger.prompt`; `ledger::PromptPolicy::apply` applies it). Configured as `none`, `sha256` (default) or `full`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptPolicy {
    /// Nothing.
    None,
    /// `sha256:` + 64 hex digits of the prompt's UTF-8 bytes: proves which prompt was sent
    /// without keeping it.
    #[default]
    Sha256,
    /// The prompt itself.
    Full,
}

/// SQLite's `synchronous` setting for the ledger connection (`ledger.sqlite_synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync the WAL at every commit: durable across power loss. The default.
    #[default]
    Full,
    /// fsync only at checkpoints: durable across a process crash, not a power loss.
    Normal,
}

/// How to reach PostgreSQL. `Debug` never shows the password.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user:password@host:port/db?...` or `host=... user=...`.
    pub url: String,
    /// Tables live in this schema (`SET search_path` on every connection); `None`: the
    /// server's default (`public`).
    pub schema: Option<String>,
    /// Connections of the quota store's pool (the ledger writer and each reader hold one more).
    pub pool_size: usize,
    /// Timeout of a connection attempt.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &redact_pg_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `url` with any password replaced by `***` (URL and key=value forms).
pub fn redact_pg_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => authority.to_owned(),
            },
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            None => tail.to_owned(),
            Some((path, query)) => {
                let query = query
                    .split('&')
                    .map(|p| {
                        if p.to_ascii_lowercase().starts_with("password=") {
                            "password=***".to_owned()
                        } else {
                            p.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("&");
                format!("{path}?{query}")
            }
        };
        format!("{scheme}://{authority}{tail}")
    } else {
        url.split_whitespace()
            .map(|kv| {
                if kv.to_ascii_lowercase().starts_with("password=") {
                    "password=***".to_owned()
                } else {
                    kv.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}
