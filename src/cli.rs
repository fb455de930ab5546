//! The command line (clap). `main.rs` dispatches on [`Command`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, LogFormat};

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
    },
    /// Read a gateway key on stdin and print the form `clients[].key_hash` stores.
    HashKey,
    /// Quotas: use and remaining per period.
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
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

    pub fn shown(&self) -> String {
        self.config
            .clone()
            .unwrap_or_else(|| config::DEFAULT_PATH.into())
            .display()
            .to_string()
    }
}

/// Warnings that do not stop the gateway but that an operator should see.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.clients.is_empty() {
        w.push("no clients are configured: every request will be refused with 401".into());
    }
    if config.upstream_key.is_none() {
        w.push(format!(
            "no upstream key: set {} or upstream.api_key_file; valid requests will be answered 503",
            config.upstream.api_key_env
        ));
    }
    let demo = config::hash_key(DEMO_KEY);
    if config.clients.iter().any(|c| c.key_hash == demo) {
        w.push(format!("a client uses the documented demo key '{DEMO_KEY}': replace it before exposing the gateway"));
    }
    w
}

/// The demo key of the example configuration (documented in the README).
pub const DEMO_KEY: &str = "ig-demo-key-change-me";
