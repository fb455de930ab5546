//! `[ledger]`: where the usage ledger and the quota use live (SQLite or PostgreSQL).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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
                            crate::ledger::postgres::redact_url(&u.0)
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
