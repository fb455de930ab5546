//! `imagegate migrate`: create or upgrade the ledger's tables and exit.

use std::process::ExitCode;

use super::ConfigArg;
use crate::ledger::postgres::migrate;
use crate::ledger::sqlite::SqliteStore;
use crate::startup::StartupError;

pub fn run(config: &ConfigArg) -> Result<ExitCode, StartupError> {
    let c = config.load_or_fail()?;
    let fail = |e: crate::ledger::LedgerError| StartupError::LedgerOpen {
        path: c.ledger.location(),
        detail: e.to_string(),
    };
    match c.ledger.postgres() {
        Some(settings) => {
            let mut client = settings.connect().map_err(fail)?;
            let version = migrate(&mut client).map_err(fail)?;
            println!(
                "PostgreSQL ledger {} at schema version {version}",
                c.ledger.location().display()
            );
        }
        None => {
            SqliteStore::open(&c.ledger.path).map_err(fail)?;
            println!("SQLite ledger {} is current", c.ledger.path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
