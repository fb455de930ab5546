//! Lifecycle only: command line → configuration (exit 2 listing every problem) → telemetry →
//! serve → drain on SIGTERM/SIGINT.

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use imagegate::cli::{Cli, Command, ConfigArg, QuotaCommand, TableOrJson, warnings};
use imagegate::{config, server, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::HashKey => hash_key(),
        Command::Quota {
            command:
                QuotaCommand::Show {
                    config,
                    client,
                    user,
                    format,
                },
        } => quota_show(&config, client.as_deref(), user.as_deref(), format),
        Command::CheckConfig { config } => match config.load() {
            Ok(c) => {
                for w in warnings(&c) {
                    println!("warning: {w}");
                }
                println!("{}: ok", config.shown());
                ExitCode::SUCCESS
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
    let listen = config.server.listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let state = match imagegate::app::AppState::new(config, imagegate::clock::Clock::system()) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "imagegate listening");
    server::serve(listener, state, shutdown_signal()).await;
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
