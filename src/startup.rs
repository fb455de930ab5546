//! Every way a command can stop before (or instead of) doing its work, and the exit code of each.
//!
//! The start-up functions (configuration, [`AppState`](crate::app::AppState), the upstream
//! client, the key table, the quota store, the listeners) return [`StartupError`] rather than a
//! bare string, so the caller can tell the causes apart; `main` prints the error (one line per
//! configuration problem) and exits with [`StartupError::exit_code`]. The commands that read the
//! ledger (`usage`, `audit`, `quota`, `hash-key`) use the same type for their own failures.
//!
//! No variant holds a secret: the upstream key and the gateway keys never reach a message (a key
//! that is not a valid header value is named, not shown).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Why a command could not start or finish.
#[derive(Debug)]
pub enum StartupError {
    // ---- configuration ----
    /// The configuration did not load: every problem, in order.
    Config(Vec<String>),
    /// `clients[].key_hash` is not a SHA-256 hex digest.
    ClientKeyHash { client: String, detail: String },
    /// `admin.key_hash` is not a SHA-256 hex digest.
    AdminKeyHash(String),
    /// `[models]` could not be turned into the model table (the message names the key).
    Models(String),

    // ---- listeners ----
    /// A listener could not be bound.
    Listen {
        addr: SocketAddr,
        /// The admin listener rather than the gateway's.
        admin: bool,
        source: std::io::Error,
    },
    /// The bound listener's address could not be read.
    LocalAddr(std::io::Error),
    /// The async runtime could not be built.
    Runtime(std::io::Error),

    // ---- ledger and quota store ----
    /// The ledger could not be opened (or recovered) for writing.
    LedgerOpen { path: PathBuf, detail: String },
    /// The admin listener's ledger reader could not be opened.
    AdminLedger { path: PathBuf, detail: String },
    /// A command that reads the ledger found no file at `ledger.path`.
    NoLedger { path: PathBuf },
    /// A command could not open the ledger for reading.
    LedgerRead { path: PathBuf, detail: String },
    /// The quota store could not be opened or set up.
    QuotaStore { path: PathBuf, detail: String },

    // ---- upstream client ----
    /// `upstream.ca_file` cannot be read, is not PEM, or holds no usable CA certificate.
    CaFile { path: PathBuf, detail: String },
    /// The TLS client configuration could not be built.
    Tls(String),
    /// The upstream client could not be built (the message names the config key).
    Upstream(String),

    // ---- the commands' own work ----
    /// `usage` / `audit export`: a filter (`--since`, `--until`, the time zone, the grouping)
    /// is not valid.
    Filter(String),
    /// A ledger or quota query failed.
    Query(String),
    /// `audit export --output`: the file could not be created.
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Writing the command's output failed.
    Write(std::io::Error),
    /// `hash-key`: stdin could not be read.
    Stdin(std::io::Error),
    /// `hash-key`: stdin held no key.
    NoKeyOnStdin,
}

impl StartupError {
    /// The process exit code: 2 for a configuration or argument problem, 1 for the rest.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            StartupError::Config(_) | StartupError::Filter(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }

    /// One line per cause: every configuration problem on its own line, else the message.
    pub fn lines(&self) -> Vec<String> {
        match self {
            StartupError::Config(problems) => problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::Config(problems) => match problems.as_slice() {
                [] => f.write_str("the configuration did not load"),
                [one] => f.write_str(one),
                many => write!(
                    f,
                    "{} configuration problems: {}",
                    many.len(),
                    many.join("; ")
                ),
            },
            StartupError::ClientKeyHash { client, detail } => {
                write!(f, "client '{client}': key_hash {detail}")
            }
            StartupError::AdminKeyHash(detail) => write!(f, "admin.key_hash: {detail}"),
            StartupError::Models(detail) => f.write_str(detail),
            StartupError::Listen {
                addr,
                admin,
                source,
            } => {
                let which = if *admin { " (admin)" } else { "" };
                write!(f, "cannot listen on {addr}{which}: {source}")
            }
            StartupError::LocalAddr(e) => write!(f, "cannot read the bound address: {e}"),
            StartupError::Runtime(e) => write!(f, "cannot start the runtime: {e}"),
            StartupError::LedgerOpen { path, detail } => {
                write!(f, "ledger {}: {detail}", path.display())
            }
            StartupError::AdminLedger { path, detail } => {
                write!(f, "admin: ledger {}: {detail}", path.display())
            }
            StartupError::NoLedger { path } => {
                write!(f, "no ledger at {} (ledger.path)", path.display())
            }
            StartupError::LedgerRead { path, detail } => {
                write!(f, "{}: {detail}", path.display())
            }
            StartupError::QuotaStore { path, detail } => {
                write!(f, "quota store {}: {detail}", path.display())
            }
            StartupError::CaFile { path, detail } => {
                write!(f, "upstream.ca_file {}: {detail}", path.display())
            }
            StartupError::Tls(detail) => write!(f, "TLS: {detail}"),
            StartupError::Upstream(detail) => f.write_str(detail),
            StartupError::Filter(detail) | StartupError::Query(detail) => f.write_str(detail),
            StartupError::Output { path, source } => write!(f, "{}: {source}", path.display()),
            StartupError::Write(e) => write!(f, "{e}"),
            StartupError::Stdin(e) => write!(f, "cannot read stdin: {e}"),
            StartupError::NoKeyOnStdin => {
                f.write_str("no key on stdin (try: printf %s \"$KEY\" | imagegate hash-key)")
            }
        }
    }
}

impl std::error::Error for StartupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartupError::Listen { source, .. } | StartupError::Output { source, .. } => {
                Some(source)
            }
            StartupError::LocalAddr(e)
            | StartupError::Runtime(e)
            | StartupError::Write(e)
            | StartupError::Stdin(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_is_displayed_with_its_exit_code() {
        let problems = StartupError::Config(vec!["a: bad".into(), "b: worse".into()]);
        assert_eq!(
            problems.to_string(),
            "2 configuration problems: a: bad; b: worse"
        );
        assert_eq!(problems.lines(), ["a: bad", "b: worse"]);
        assert_eq!(problems.exit_code(), ExitCode::from(2));
        assert_eq!(
            StartupError::Filter("--since: x".into()).exit_code(),
            ExitCode::from(2)
        );

        let listen = StartupError::Listen {
            addr: "127.0.0.1:8080".parse().unwrap(),
            admin: true,
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert!(
            listen
                .to_string()
                .starts_with("cannot listen on 127.0.0.1:8080 (admin): "),
            "{listen}"
        );
        assert_eq!(listen.exit_code(), ExitCode::FAILURE);
        assert!(std::error::Error::source(&listen).is_some());

        let ca = StartupError::CaFile {
            path: "/etc/ca.pem".into(),
            detail: "cannot read: gone".into(),
        };
        assert_eq!(
            ca.to_string(),
            "upstream.ca_file /etc/ca.pem: cannot read: gone"
        );
        let ledger = StartupError::LedgerOpen {
            path: "data/ledger.db".into(),
            detail: "locked".into(),
        };
        assert_eq!(ledger.to_string(), "ledger data/ledger.db: locked");
        assert_eq!(ledger.lines(), ["ledger data/ledger.db: locked"]);
    }
}
