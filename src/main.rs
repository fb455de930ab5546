//! Life cycle only: parse the command line, start telemetry for `serve`, dispatch to the
//! command's `run` (in `src/cli/`), and map a [`StartupError`] to its message and exit code
//! (2 listing every configuration problem, 1 for the rest).

use std::process::ExitCode;

use clap::Parser;
use imagegate::cli::{self, Cli, Command};
use imagegate::startup::StartupError;
use imagegate::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logging = false;
    let result = match &cli.command {
        Command::Serve {
            config,
            listen,
            log_format,
        } => cli::serve::prepare(config, *listen).and_then(|c| {
            telemetry::init(log_format.unwrap_or(c.log.format), &c.log.level);
            logging = true;
            cli::serve::run(c, config, *listen)
        }),
        Command::CheckConfig { config, listen } => cli::check_config::run(config, *listen),
        Command::HashKey => cli::hash_key::run(),
        Command::Migrate { config } => cli::migrate::run(config),
        Command::Usage {
            config,
            filters,
            group_by,
            format,
        } => cli::usage::run(config, filters, group_by.as_deref(), format),
        Command::Audit { command } => cli::audit::run(command),
        Command::Ledger { command } => cli::ledger::run(command),
        Command::Quota { command } => cli::quota::run(command),
        Command::Models {
            config,
            check,
            format,
        } => cli::models::run(config, *check, *format),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e, logging);
            e.exit_code()
        }
    }
}

/// To the log once telemetry runs, else on stderr, one `error:` line per cause.
fn report(e: &StartupError, logging: bool) {
    if logging {
        tracing::error!(error = %e, "cannot start");
    } else {
        for line in e.lines() {
            eprintln!("error: {line}");
        }
    }
}
