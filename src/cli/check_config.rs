//! `imagegate check-config`: load the configuration, print every warning or every problem.

use std::process::ExitCode;

use super::{ConfigArg, warnings};
use crate::startup::StartupError;

/// Exit 0 when the configuration loads (warnings on stdout), 2 listing every problem on stdout.
/// The problems are this command's report, not a failure of it.
pub fn run(config: &ConfigArg) -> Result<ExitCode, StartupError> {
    match config.load() {
        Ok(c) => {
            for w in warnings(&c) {
                println!("warning: {w}");
            }
            println!("{}: ok", config.shown());
            Ok(ExitCode::SUCCESS)
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
