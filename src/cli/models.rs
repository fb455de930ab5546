//! `imagegate models [--check] [--format table|json]`: the configured models and, with
//! `--check`, what the upstream's `GET /models` says of each.

use std::process::ExitCode;

use super::{ConfigArg, TableOrJson};
use crate::clock::Clock;
use crate::config::Config;
use crate::models_check::{self, Check};
use crate::startup::StartupError;
use crate::upstream::Upstream;

/// Exit 0, or 1 when `--check` failed or found a model the gateway still serves gone upstream;
/// 2 on configuration problems.
pub fn run(config: &ConfigArg, check: bool, format: TableOrJson) -> Result<ExitCode, StartupError> {
    let c = config.load_or_fail()?;
    let today = models_check::today_utc(&Clock::system());
    let found = if check { ask(&c) } else { Check::NotRun };
    let report = models_check::report(&c, &found, today);
    match format {
        TableOrJson::Table => print!("{}", models_check::render_table(&report)),
        TableOrJson::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        ),
    }
    if check && report.check_failed() {
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// Ask the upstream once (`GET /models`), on a runtime of its own. A failure is part of the
/// report, not an error of the command.
fn ask(c: &Config) -> Check {
    if !c.has_upstream_key() {
        return Check::Failed(format!(
            "no upstream key: set {} or upstream.api_key_file",
            c.upstream.api_key_env
        ));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Check::Failed(StartupError::Runtime(e).to_string()),
    };
    runtime.block_on(async {
        let upstream = match Upstream::new(c) {
            Ok(u) => u,
            Err(e) => return Check::Failed(e.to_string()),
        };
        match models_check::fetch_listing(&upstream).await {
            Ok(listing) => Check::Listed(listing),
            Err(e) => Check::Failed(e),
        }
    })
}
