//! `imagegate ledger copy`: a SQLite ledger into PostgreSQL (see [`crate::ledger::copy`]).

use std::process::ExitCode;

use super::LedgerCommand;
use crate::ledger::PgSettings;
use crate::ledger::copy::{CopyOptions, sqlite_to_postgres};
use crate::ledger::postgres::redact_url;
use crate::startup::StartupError;

pub fn run(command: &LedgerCommand) -> Result<ExitCode, StartupError> {
    let LedgerCommand::Copy {
        config,
        from,
        to,
        schema,
        replica,
        allow_non_empty,
    } = command;
    let c = config.load_or_fail()?;
    let source = from.clone().unwrap_or_else(|| c.ledger.path.clone());
    if !source.exists() {
        return Err(StartupError::NoLedger { path: source });
    }
    if let Err(e) = to.parse::<postgres::Config>() {
        return Err(StartupError::Config(vec![format!(
            "--to {}: {e}",
            redact_url(to)
        )]));
    }
    let target = PgSettings {
        url: to.clone(),
        schema: schema.clone().or_else(|| c.ledger.postgres_schema.clone()),
        pool_size: 1,
        connect_timeout: c.ledger.connect_timeout,
    };
    let options = CopyOptions {
        replica: replica.clone().unwrap_or_else(|| c.ledger.replica()),
        allow_non_empty: *allow_non_empty,
    };
    let shown = match &target.schema {
        Some(s) => format!("{} (schema {s})", redact_url(to)),
        None => redact_url(to),
    };
    let report =
        sqlite_to_postgres(&source, &target, &options).map_err(|e| StartupError::LedgerOpen {
            path: source.clone(),
            detail: e.to_string(),
        })?;
    println!(
        "{} -> {shown}: copied {} chain entries, {} records, {} quota rows as replica {}",
        source.display(),
        report.entries,
        report.records,
        report.quota_rows,
        report.replica
    );
    if let Some(head) = &report.head {
        println!(
            "verified: replica {} head seq {} hash {}",
            report.replica, head.seq, head.hash
        );
    }
    if report.forwarding > 0 {
        println!(
            "{} records are still 'forwarding': the replica {} turns them 'unknown' at its first start",
            report.forwarding, report.replica
        );
    }
    Ok(ExitCode::SUCCESS)
}
