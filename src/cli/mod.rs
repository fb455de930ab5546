//! The command line: the clap types here, the body of each command in a file of its own, each
//! with a `run` that returns an exit code or a [`StartupError`]. `main.rs` parses, starts
//! telemetry for `serve`, dispatches on [`Command`] and maps errors to exit codes.

pub mod audit;
pub mod check_config;
pub mod hash_key;
pub mod ledger;
pub mod migrate;
pub mod models;
pub mod quota;
pub mod serve;
pub mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, LogFormat};
use crate::ledger::UsageFilters;
use crate::startup::StartupError;

#[derive(Debug, Parser)]
#[command(
    name = "imagegate",
    version,
    about = "A validating, re-keying gateway for OpenAI's image-edit API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log format, overriding `log.format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check a configuration file; print every problem; exit non-zero on any.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Check as if served with `serve --listen ADDR`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Read a gateway key on stdin and print the form `clients[].key_hash` stores.
    HashKey,
    /// Create or upgrade the ledger's tables (PostgreSQL: the versioned migrations; SQLite:
    /// the in-place upgrade), then exit. `serve` does the same at start.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ledger administration: `ledger copy` moves a SQLite ledger into PostgreSQL.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Usage report from the ledger: requests, images, spend, tokens, rejections by reason.
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filters: Filters,
        /// Group rows by `user`, `client`, `day` (days in `quotas.time_zone`) or `model`; one total row if absent.
        #[arg(long, value_parser = ["user", "client", "day", "model"])]
        group_by: Option<String>,
        /// Output format.
        #[arg(long, value_parser = ["table", "csv", "json"], default_value = "table")]
        format: String,
    },
    /// The audit trail: export records, verify the hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The configured models: profile, family, shutdown date, prices; with --check, what the
    /// upstream's `GET /models` says of each. Exit 1 when --check fails or a served model is gone.
    Models {
        #[command(flatten)]
        config: ConfigArg,
        /// Ask the upstream which configured models it still lists (`GET /models`, 10 s at most).
        #[arg(long)]
        check: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: TableOrJson,
    },
    /// Quotas: use and remaining per period.
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Copy the SQLite ledger (hash chain, records, quota use) into PostgreSQL, chain intact:
    /// it becomes the chain of one replica (`--replica`), `audit verify` passes on the target.
    /// One transaction, verified before it commits. Stop the gateway that writes the file first.
    Copy {
        #[command(flatten)]
        config: ConfigArg,
        /// The SQLite ledger to copy [default: `ledger.path` of the configuration].
        #[arg(long)]
        from: Option<PathBuf>,
        /// The target: `postgres://user:password@host:port/db` (or set IMAGEGATE_COPY_TO).
        #[arg(long, env = "IMAGEGATE_COPY_TO", hide_env_values = true)]
        to: String,
        /// Put the tables in this schema [default: `ledger.postgres_schema`, else the server's].
        #[arg(long)]
        schema: Option<String>,
        /// The replica id the copied chain is filed under; the replica started with this id
        /// continues it [default: `ledger.replica_id`, else the host name].
        #[arg(long)]
        replica: Option<String>,
        /// Copy even if the target already holds data (the replica's chain must still be empty
        /// and no request id may exist there already).
        #[arg(long)]
        allow_non_empty: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Export ledger records, one per request.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filters: Filters,
        /// `jsonl` (one JSON record per line) or `csv`.
        #[arg(long, value_parser = ["jsonl", "csv"])]
        format: String,
        /// At most this many records.
        #[arg(long)]
        limit: Option<u64>,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check the ledger's hash chain; name the first broken link. Exit 1 when broken.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Output format (`json`: the whole report, with the head of each replica's chain).
        #[arg(long, value_enum, default_value = "table")]
        format: TableOrJson,
        /// A chain head kept elsewhere (`/metrics`, a log, a backup): `HASH` must be the
        /// current head; `SEQ:HASH` must be entry SEQ (the chain may have grown since). Exit 1
        /// when it is not (a truncated or rewritten tail).
        #[arg(long, value_name = "[SEQ:]HASH")]
        expect_head: Option<String>,
    },
}

/// The `--since/--until/--client/--user` flags of `usage` and `audit export`; the same filters
/// as `GET /admin/usage` ([`UsageFilters`]).
#[derive(Debug, Args, Default, Clone)]
pub struct Filters {
    /// Only requests received at or after this time (RFC 3339, or YYYY-MM-DD in `quotas.time_zone`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only requests received before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this client.
    #[arg(long)]
    pub client: Option<String>,
    /// Only this end user.
    #[arg(long)]
    pub user: Option<String>,
}

impl From<&Filters> for UsageFilters {
    fn from(f: &Filters) -> UsageFilters {
        UsageFilters {
            since: f.since.clone(),
            until: f.until.clone(),
            client: f.client.clone(),
            user: f.user.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Show use and remaining quota per day and month.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
        /// Only this end user (of every client, or of --client).
        #[arg(long)]
        user: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: TableOrJson,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TableOrJson {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file [default: config/imagegate.toml; embedded defaults if it is missing].
    #[arg(long, env = "IMAGEGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn load(&self) -> Result<Config, Vec<String>> {
        match &self.config {
            Some(path) => Config::load(path, true),
            None => Config::load(std::path::Path::new(config::DEFAULT_PATH), false),
        }
    }

    /// [`ConfigArg::load`] for the commands that stop on any problem.
    pub fn load_or_fail(&self) -> Result<Config, StartupError> {
        self.load().map_err(StartupError::Config)
    }

    pub fn shown(&self) -> String {
        self.config
            .clone()
            .unwrap_or_else(|| config::DEFAULT_PATH.into())
            .display()
            .to_string()
    }
}

/// Warnings that do not stop the gateway but that an operator should see. The exposure rules
/// ([`exposure`]) add theirs: a demo key or no client on a loopback address.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if !config.has_upstream_key() {
        w.push(format!(
            "no upstream key: set {} or upstream.api_key_file; valid requests will be answered 503",
            config.upstream.api_key_env
        ));
    }
    w.extend(exposure(config).warnings);
    w
}

/// What the exposure rules say of a configuration about to be served.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// Reasons to refuse to serve: `serve` exits, `check-config` exits 2.
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Safe by default: a gateway reachable from other hosts (API or admin listener on a
/// non-loopback address) must not accept the documented demo key, and must have a client. On a
/// loopback address (127.0.0.0/8, ::1) both are only warnings, so the quick start works. No key
/// is ever named in the messages.
pub fn exposure(config: &Config) -> Exposure {
    let mut e = Exposure::default();
    let mut exposed: Vec<String> = Vec::new();
    if !is_loopback(config.server.listen) {
        exposed.push(format!("server.listen {}", config.server.listen));
    }
    if let Some(admin) = config.admin.listen
        && !is_loopback(admin)
    {
        exposed.push(format!("admin.listen {admin}"));
    }
    let demo = config::hash_key(DEMO_KEY);
    let is_demo = |c: &&config::ClientConfig| c.key_hash == demo;
    for c in config.clients.iter().filter(is_demo) {
        let what = format!(
            "client '{}' uses the documented demo key (the example configuration's, printed in \
             the README)",
            c.name
        );
        if exposed.is_empty() {
            e.warnings.push(format!(
                "{what}: replace it (printf %s \"$NEW_KEY\" | imagegate hash-key) before \
                 listening on a non-loopback address"
            ));
        } else {
            e.problems.push(format!(
                "{what} while the gateway listens on a non-loopback address ({}): refusing to \
                 serve; replace its key_hash (printf %s \"$NEW_KEY\" | imagegate hash-key) or \
                 listen on 127.0.0.1",
                exposed.join(", ")
            ));
        }
    }
    if config.clients.is_empty() {
        if is_loopback(config.server.listen) {
            e.warnings
                .push("no clients are configured: every request will be refused with 401".into());
        } else {
            e.problems.push(format!(
                "no clients are configured while the gateway listens on a non-loopback address \
                 (server.listen {}): refusing to serve; add a [[clients]] table to the \
                 configuration file (IMAGEGATE_CONFIG or --config)",
                config.server.listen
            ));
        }
    }
    e
}

/// 127.0.0.0/8, ::1, and ::ffff:127.0.0.0/104.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The demo key of the example configuration (documented in the README).
pub const DEMO_KEY: &str = "ig-demo-key-change-me";

/// Open the ledger named by a config for reading (`usage`, `audit`).
pub fn open_ledger(
    config: &ConfigArg,
) -> Result<(Config, Box<dyn crate::ledger::LedgerStore>), StartupError> {
    let c = config.load_or_fail()?;
    if c.ledger.backend == config::LedgerBackend::Sqlite && !c.ledger.path.exists() {
        return Err(StartupError::NoLedger {
            path: c.ledger.path.clone(),
        });
    }
    match crate::ledger::open_reader(&c.ledger) {
        Ok(store) => Ok((c, store)),
        Err(e) => Err(StartupError::LedgerRead {
            path: c.ledger.location(),
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, admin: Option<&str>, clients: &[&str]) -> Config {
        let mut text = format!("[server]\nlisten = \"{listen}\"\n");
        if let Some(admin) = admin {
            text.push_str(&format!(
                "[admin]\nlisten = \"{admin}\"\nkey_hash = \"{}\"\n",
                config::hash_key("admin-key-for-tests")
            ));
        }
        for (i, key) in clients.iter().enumerate() {
            text.push_str(&format!(
                "[[clients]]\nname = \"c{i}\"\nkey_hash = \"{}\"\n",
                config::hash_key(key)
            ));
        }
        Config::parse(&text).expect("valid").0
    }

    #[test]
    fn the_demo_key_is_a_problem_only_off_loopback() {
        for listen in [
            "127.0.0.1:8080",
            "127.1.2.3:0",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            let e = exposure(&config(listen, None, &[DEMO_KEY]));
            assert!(e.problems.is_empty(), "{listen}: {e:?}");
            assert_eq!(e.warnings.len(), 1, "{listen}");
        }
        for listen in ["0.0.0.0:8080", "[::]:8080", "10.0.0.1:8080"] {
            let e = exposure(&config(listen, None, &["a-real-key", DEMO_KEY]));
            assert_eq!(e.problems.len(), 1, "{listen}: {e:?}");
            assert!(e.problems[0].contains("client 'c1' uses the documented demo key"));
            assert!(!e.problems[0].contains(DEMO_KEY));
        }
        // The admin listener counts too.
        let e = exposure(&config("127.0.0.1:8080", Some("0.0.0.0:9090"), &[DEMO_KEY]));
        assert_eq!(e.problems.len(), 1, "{e:?}");
        assert!(e.problems[0].contains("admin.listen 0.0.0.0:9090"));
        // Other keys are fine anywhere.
        assert_eq!(
            exposure(&config(
                "0.0.0.0:8080",
                Some("0.0.0.0:9090"),
                &["a-real-key"]
            )),
            Exposure::default()
        );
    }

    #[test]
    fn no_client_is_a_problem_only_off_loopback() {
        let e = exposure(&config("0.0.0.0:8080", None, &[]));
        assert_eq!(e.problems.len(), 1);
        assert!(e.problems[0].contains("no clients are configured"));
        let e = exposure(&config("127.0.0.1:8080", None, &[]));
        assert!(e.problems.is_empty());
        assert_eq!(e.warnings.len(), 1);
    }
}
