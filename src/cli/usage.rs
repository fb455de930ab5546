//! `imagegate usage`: the usage report from the ledger.

use std::process::ExitCode;

use super::{ConfigArg, Filters, open_ledger};
use crate::ledger::{UsageFilters, render_usage};
use crate::startup::StartupError;

/// Exit 0 with the report on stdout; 2 on a bad filter or configuration, 1 when the ledger
/// cannot be read.
pub fn run(
    config: &ConfigArg,
    filters: &Filters,
    group_by: Option<&str>,
    format: &str,
) -> Result<ExitCode, StartupError> {
    let (c, store) = open_ledger(config)?;
    let query = UsageFilters::from(filters)
        .query(group_by, &c.quotas.time_zone)
        .map_err(StartupError::Filter)?;
    let format = format.parse().expect("clap restricts the format");
    let rows = store
        .usage(&query)
        .map_err(|e| StartupError::Query(e.to_string()))?;
    print!("{}", render_usage(&rows, format));
    Ok(ExitCode::SUCCESS)
}
