//! `imagegate serve`: run the gateway until SIGTERM or SIGINT, then drain.
//!
//! In two steps so that `main` can start telemetry in between: [`prepare`] loads the
//! configuration (whose `[log]` section telemetry needs), [`run`] serves it.

use std::net::SocketAddr;
use std::process::ExitCode;

use super::{ConfigArg, exposure, warnings};
use crate::config::Config;
use crate::startup::StartupError;
use crate::{models_check, server};

/// The configuration to serve, with `--listen` applied.
pub fn prepare(config: &ConfigArg, listen: Option<SocketAddr>) -> Result<Config, StartupError> {
    let mut c = config.load_or_fail()?;
    if let Some(addr) = listen {
        c.server.listen = addr;
    }
    // Safe by default: refuse to expose the demo key, or a gateway without clients.
    let refused = exposure(&c).problems;
    if !refused.is_empty() {
        return Err(StartupError::Config(refused));
    }
    Ok(c)
}

/// Serve `config` (telemetry already started): log the warnings, bind, serve until a signal,
/// drain. Exit 0 after a clean stop.
pub fn run(config: Config) -> Result<ExitCode, StartupError> {
    for w in warnings(&config) {
        tracing::warn!("{w}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(StartupError::Runtime)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<ExitCode, StartupError> {
    let running = server::spawn(config).await?;
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
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
