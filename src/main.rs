//! Lifecycle only: command line → configuration (exit 2 listing every problem) → telemetry →
//! serve → drain on SIGTERM/SIGINT.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::Parser;
use imagegate::cli::{
    AuditCommand, Cli, Command, ConfigArg, Filters, QuotaCommand, TableOrJson, exposure, warnings,
};
use imagegate::ledger::sqlite::SqliteStore;
use imagegate::ledger::store::LedgerStore;
use imagegate::{config, models_check, server, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::HashKey => hash_key(),
        Command::Usage {
            config,
            filters,
            group_by,
            format,
        } => usage(&config, &filters, group_by.as_deref(), &format),
        Command::Audit {
            command:
                AuditCommand::Export {
                    config,
                    filters,
                    format,
                    limit,
                    output,
                },
        } => audit_export(&config, &filters, &format, limit, output.as_deref()),
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => audit_verify(&config),
        Command::Quota {
            command:
                QuotaCommand::Show {
                    config,
                    client,
                    user,
                    format,
                },
        } => quota_show(&config, client.as_deref(), user.as_deref(), format),
        Command::Models {
            config,
            check,
            format,
        } => models(&config, check, format),
        Command::CheckConfig { config, listen } => match config.load() {
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
                    ExitCode::SUCCESS
                } else {
                    println!("{}: {} problem(s)", config.shown(), problems.len());
                    ExitCode::from(2)
                }
            }
            Err(problems) => {
                for p in &problems {
                    println!("error: {p}");
                }
                println!("{}: {} problem(s)", config.shown(), problems.len());
                ExitCode::from(2)
            }
        },
        Command::Serve {
            config,
            listen,
            log_format,
        } => {
            let mut c = match config.load() {
                Ok(c) => c,
                Err(problems) => return config_problems(&problems),
            };
            if let Some(addr) = listen {
                c.server.listen = addr;
            }
            // Safe by default: refuse to expose the demo key, or a gateway without clients.
            let refused = exposure(&c).problems;
            if !refused.is_empty() {
                return config_problems(&refused);
            }
            telemetry::init(log_format.unwrap_or(c.log.format), &c.log.level);
            for w in warnings(&c) {
                tracing::warn!("{w}");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(c))
        }
    }
}

async fn serve(config: config::Config) -> ExitCode {
    let running = match server::spawn(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // In the background when it asks the upstream: start-up does not wait for it.
    models_check::at_start(
        running.state.config.clone(),
        running.state.upstream.clone(),
        running.state.clock.clone(),
    );
    tracing::info!(addr = %running.addr, version = env!("CARGO_PKG_VERSION"), "imagegate listening");
    shutdown_signal().await;
    running.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// `imagegate models [--check] [--format table|json]`: exit 0, or 1 when `--check` failed or
/// found a model the gateway still serves gone upstream; 2 on configuration problems.
fn models(config: &ConfigArg, check: bool, format: TableOrJson) -> ExitCode {
    let c = match config.load() {
        Ok(c) => c,
        Err(problems) => return config_problems(&problems),
    };
    let today = models_check::today_utc(&imagegate::clock::Clock::system());
    let found = if check {
        run_check(&c)
    } else {
        models_check::Check::NotRun
    };
    let report = models_check::report(&c, &found, today);
    match format {
        TableOrJson::Table => print!("{}", models_check::render_table(&report)),
        TableOrJson::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        ),
    }
    if check && report.check_failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Ask the upstream once (`GET /models`), on a runtime of its own.
fn run_check(c: &config::Config) -> models_check::Check {
    use models_check::Check;
    if c.upstream_key.is_none() {
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
        Err(e) => return Check::Failed(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let upstream = match imagegate::upstream::Upstream::new(c) {
            Ok(u) => u,
            Err(e) => return Check::Failed(e),
        };
        match upstream.list_models(models_check::CHECK_TIMEOUT).await {
            Ok(listing) => Check::Listed(listing),
            Err(e) => Check::Failed(e),
        }
    })
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read stdin: {e}");
        return ExitCode::FAILURE;
    }
    let key = input.trim_end_matches(['\r', '\n']);
    if key.trim().is_empty() {
        eprintln!("error: no key on stdin (try: printf %s \"$KEY\" | imagegate hash-key)");
        return ExitCode::FAILURE;
    }
    println!("{}", config::hash_key(key));
    ExitCode::SUCCESS
}

/// Print every problem of a configuration that failed to load.
fn config_problems(problems: &[String]) -> ExitCode {
    for p in problems {
        eprintln!("error: {p}");
    }
    ExitCode::from(2)
}

fn quota_show(
    config: &ConfigArg,
    client: Option<&str>,
    user: Option<&str>,
    format: TableOrJson,
) -> ExitCode {
    let c = match config.load() {
        Ok(c) => c,
        Err(problems) => return config_problems(&problems),
    };
    let path = c.ledger.path.clone();
    let store = match imagegate::limits::quota::QuotaStore::open(
        &path,
        std::sync::Arc::new(c),
        imagegate::clock::Clock::system(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match store.show(client, user) {
        Ok(lines) => {
            match format {
                TableOrJson::Table => print!("{}", imagegate::limits::quota::render_table(&lines)),
                TableOrJson::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&lines).expect("quota lines serialize")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Open the ledger named by a config for reading.
fn open_ledger(config: &ConfigArg) -> Result<(imagegate::config::Config, SqliteStore), ExitCode> {
    let c = config.load().map_err(|p| config_problems(&p))?;
    if !c.ledger.path.exists() {
        eprintln!(
            "error: no ledger at {} (ledger.path)",
            c.ledger.path.display()
        );
        return Err(ExitCode::FAILURE);
    }
    match SqliteStore::open_reader(&c.ledger.path) {
        Ok(store) => Ok((c, store)),
        Err(e) => {
            eprintln!("error: {}: {e}", c.ledger.path.display());
            Err(ExitCode::FAILURE)
        }
    }
}

fn usage(config: &ConfigArg, filters: &Filters, group_by: Option<&str>, format: &str) -> ExitCode {
    let (c, store) = match open_ledger(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let query = match filters.query(group_by, &c.quotas.time_zone) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let format = format.parse().expect("clap restricts the format");
    match store.usage(&query) {
        Ok(rows) => {
            print!("{}", imagegate::ledger::render_usage(&rows, format));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn audit_export(
    config: &ConfigArg,
    filters: &Filters,
    format: &str,
    limit: Option<u64>,
    output: Option<&std::path::Path>,
) -> ExitCode {
    let (c, store) = match open_ledger(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let mut query = match filters.query(None, &c.quotas.time_zone) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    query.limit = limit;
    let format = format.parse().expect("clap restricts the format");
    let mut out: Box<dyn std::io::Write> = match output {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let result = imagegate::ledger::write_export(&store, &query, format, &mut *out);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(n), Ok(())) => {
            eprintln!("{n} record(s) exported");
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        (_, Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn audit_verify(config: &ConfigArg) -> ExitCode {
    let (c, store) = match open_ledger(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    match store.verify() {
        Ok(report) => {
            let head = report
                .head
                .as_ref()
                .map(|h| format!("seq {} hash {}", h.seq, h.hash))
                .unwrap_or_else(|| "empty".into());
            match &report.first_broken {
                None => {
                    println!(
                        "{}: ok: {} chain entries, {} records; head {head}",
                        c.ledger.path.display(),
                        report.entries,
                        report.records
                    );
                    ExitCode::SUCCESS
                }
                Some(b) => {
                    println!(
                        "{}: BROKEN at seq {} (request {}): {}; {} entries verified before it",
                        c.ledger.path.display(),
                        b.seq,
                        b.request_id,
                        b.reason,
                        report.entries
                    );
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
