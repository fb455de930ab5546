//! `imagegate audit export` and `imagegate audit verify`: the audit trail of the ledger.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use super::{AuditCommand, ConfigArg, Filters, TableOrJson, open_ledger};
use crate::ledger::{UsageFilters, write_export};
use crate::startup::StartupError;

pub fn run(command: &AuditCommand) -> Result<ExitCode, StartupError> {
    match command {
        AuditCommand::Export {
            config,
            filters,
            format,
            limit,
            output,
        } => export(config, filters, format, *limit, output.as_deref()),
        AuditCommand::Verify { config, format } => verify(config, *format),
    }
}

/// Export the records to stdout or `--output`; the count on stderr.
fn export(
    config: &ConfigArg,
    filters: &Filters,
    format: &str,
    limit: Option<u64>,
    output: Option<&Path>,
) -> Result<ExitCode, StartupError> {
    let (c, store) = open_ledger(config)?;
    let mut query = UsageFilters::from(filters)
        .query(None, &c.quotas.time_zone)
        .map_err(StartupError::Filter)?;
    query.limit = limit;
    let format = format.parse().expect("clap restricts the format");
    let mut out: Box<dyn Write> = match output {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(source) => {
                return Err(StartupError::Output {
                    path: path.to_path_buf(),
                    source,
                });
            }
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let result = write_export(store.as_ref(), &query, format, &mut *out);
    let flushed = out.flush();
    let n = result.map_err(|e| StartupError::Query(e.to_string()))?;
    flushed.map_err(StartupError::Write)?;
    eprintln!("{n} record(s) exported");
    Ok(ExitCode::SUCCESS)
}

/// Check the hash chain: exit 0 when whole, 1 naming the first broken link.
fn verify(config: &ConfigArg, format: TableOrJson) -> Result<ExitCode, StartupError> {
    let (c, store) = open_ledger(config)?;
    let report = store
        .verify()
        .map_err(|e| StartupError::Query(e.to_string()))?;
    if format == TableOrJson::Json {
        let mut json =
            serde_json::to_value(&report).map_err(|e| StartupError::Query(e.to_string()))?;
        json["ok"] = report.is_ok().into();
        println!("{json}");
        return Ok(if report.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    for chain in &report.chains {
        println!(
            "replica {}: head seq {} hash {}",
            chain.replica, chain.head.seq, chain.head.hash
        );
    }
    let head = report
        .head
        .as_ref()
        .map(|h| format!("seq {} hash {}", h.seq, h.hash))
        .unwrap_or_else(|| "empty".into());
    match &report.first_broken {
        None => {
            println!(
                "{}: ok: {} chain entries, {} records; head {head}",
                c.ledger.location().display(),
                report.entries,
                report.records
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(b) => {
            println!(
                "{}: BROKEN at seq {} (request {}): {}; {} entries verified before it",
                c.ledger.location().display(),
                b.seq,
                b.request_id,
                b.reason,
                report.entries
            );
            Ok(ExitCode::from(1))
        }
    }
}
