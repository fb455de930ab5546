//! `imagegate quota show`: use and remaining quota per day and month.

use std::process::ExitCode;
use std::sync::Arc;

use super::{QuotaCommand, TableOrJson};
use crate::clock::Clock;
use crate::limits::quota::{QuotaStore, render_table};
use crate::startup::StartupError;

pub fn run(command: &QuotaCommand) -> Result<ExitCode, StartupError> {
    let QuotaCommand::Show {
        config,
        client,
        user,
        format,
    } = command;
    let c = config.load_or_fail()?;
    let store = QuotaStore::open_configured(Arc::new(c), Clock::system())?;
    let lines = store
        .show(client.as_deref(), user.as_deref())
        .map_err(StartupError::Query)?;
    match format {
        TableOrJson::Table => print!("{}", render_table(&lines)),
        TableOrJson::Json => println!(
            "{}",
            serde_json::to_string_pretty(&lines).expect("quota lines serialize")
        ),
    }
    Ok(ExitCode::SUCCESS)
}
