//! `imagegate check-config`: load the configuration, print every warning or every problem.

use std::process::ExitCode;

use std::net::SocketAddr;

use super::{ConfigArg, exposure, warnings};
use crate::startup::StartupError;

/// Exit 0 when the configuration loads (warnings on stdout), 2 listing every problem on stdout.
/// The problems are this command's report, not a failure of it.
/// The exposure rules `serve` applies (a demo key or no client on a non-loopback address) are
/// problems here too; `listen` checks as if served with `serve --listen ADDR`.
pub fn run(config: &ConfigArg, listen: Option<SocketAddr>) -> Result<ExitCode, StartupError> {
    match config.load() {
        Ok(mut c) => {
            if let Some(addr) = listen {
                c.server.listen = addr;
            }
            for w in warnings(&c) {
                println!("warning: {w}");
            }
            let problems = exposure(&c).problems;
            for p in &problems {
                println!("error: {p}");
            }
            if problems.is_empty() {
                println!("{}: ok", config.shown());
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{}: {} problem(s)", config.shown(), problems.len());
                Ok(ExitCode::from(2))
            }
        }
        Err(problems) => {
            for p in &problems {
                println!("error: {p}");
            }
            println!("{}: {} problem(s)", config.shown(), problems.len());
            Ok(ExitCode::from(2))
        }
    }
}
