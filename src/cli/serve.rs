//! `imagegate serve`: run the gateway until SIGTERM or SIGINT, then drain. SIGHUP reloads the
//! configuration (`src/reload.rs`): the same file, the same `--listen`.
//!
//! In two steps so that `main` can start telemetry in between: [`prepare`] loads the
//! configuration (whose `[log]` section telemetry needs), [`run`] serves it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use super::{ConfigArg, exposure, warnings};
use crate::app::{AppState, ConfigSource};
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
/// drain. Exit 0 after a clean stop. A reload reads `source` again (through [`prepare`]).
pub fn run(
    config: Config,
    source: &ConfigArg,
    listen: Option<SocketAddr>,
) -> Result<ExitCode, StartupError> {
    for w in warnings(&config) {
        tracing::warn!("{w}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(StartupError::Runtime)?;
    let path = source.config.clone();
    let reread: ConfigSource = Arc::new(move || {
        let c = prepare(
            &ConfigArg {
                config: path.clone(),
            },
            listen,
        )
        .map_err(|e| e.lines())?;
        for w in warnings(&c) {
            tracing::warn!("{w}");
        }
        Ok(c)
    });
    runtime.block_on(serve(config, reread))
}

async fn serve(config: Config, source: ConfigSource) -> Result<ExitCode, StartupError> {
    let running = server::spawn(config).await?;
    running.state.set_source(source);
    // Installed before the gateway says it listens: from then on SIGHUP reloads (its default
    // action would end the process).
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("installing a SIGHUP handler");
    // In the background when it asks the upstream: start-up does not wait for it.
    models_check::at_start(
        running.state.config(),
        running.state.live().upstream.clone(),
        running.state.clock.clone(),
    );
    tracing::info!(addr = %running.addr, version = env!("CARGO_PKG_VERSION"), "imagegate listening");
    let reloads = tokio::spawn(reload_on_hangup(running.state.clone(), hangup));
    shutdown_signal().await;
    reloads.abort();
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Reload on every SIGHUP, one at a time, off the runtime's workers.
async fn reload_on_hangup(state: Arc<AppState>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the configuration");
        let state = state.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || state.reload("SIGHUP")).await {
            tracing::error!(error = %e, "the reload task failed");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
