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
        AuditCommand::Verify {
            config,
            format,
            expect_head,
        } => verify(config, *format, expect_head.as_deref()),
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

/// Check the hash chain: exit 0 when whole, 1 naming the first broken link, or when the
/// expected head is not the chain's.
fn verify(
    config: &ConfigArg,
    format: TableOrJson,
    expect_head: Option<&str>,
) -> Result<ExitCode, StartupError> {
    let (c, store) = open_ledger(config)?;
    let report = store
        .verify()
        .map_err(|e| StartupError::Query(e.to_string()))?;
    let head = report
        .head
        .as_ref()
        .map(|h| format!("seq {} hash {}", h.seq, h.hash))
        .unwrap_or_else(|| "empty".into());
    // `--expect-head`: None when it matches (or is not given), else the mismatch.
    let mut mismatch = None;
    if report.first_broken.is_none()
        && let Some(expected) = expect_head
    {
        let (seq, hash) = match expected.split_once(':') {
            Some((seq, hash)) => match seq.trim().parse::<u64>() {
                Ok(seq) => (Some(seq), hash.trim()),
                Err(_) => {
                    println!(
                        "{}: --expect-head {expected:?}: SEQ must be a number",
                        c.ledger.location().display()
                    );
                    return Ok(ExitCode::from(2));
                }
            },
            None => (None, expected.trim()),
        };
        let found = match seq {
            None => report.head.as_ref().map(|h| h.hash.clone()),
            Some(seq) => store
                .entry_hash(seq)
                .map_err(|e| StartupError::Query(e.to_string()))?,
        };
        if !found
            .as_deref()
            .is_some_and(|f| f.eq_ignore_ascii_case(hash))
        {
            let at = seq.map_or("the head".to_string(), |s| format!("entry {s}"));
            mismatch = Some(format!(
                "HEAD MISMATCH: expected {at} to be {hash}, the chain has {}; head {head} \
                 (a truncated or rewritten tail, or another ledger)",
                found.as_deref().unwrap_or("no such entry"),
            ));
        }
    }
    if format == TableOrJson::Json {
        let mut json =
            serde_json::to_value(&report).map_err(|e| StartupError::Query(e.to_string()))?;
        json["ok"] = (report.is_ok() && mismatch.is_none()).into();
        if let Some(m) = &mismatch {
            json["head_mismatch"] = m.clone().into();
        }
        println!("{json}");
        return Ok(if report.is_ok() && mismatch.is_none() {
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
    if let Some(m) = mismatch {
        println!("{}: {m}", c.ledger.location().display());
        return Ok(ExitCode::from(1));
    }
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
