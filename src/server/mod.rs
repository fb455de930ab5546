//! The accept path, one for both listeners (the API and, when `admin.listen` is set, the admin
//! listener): HTTP/1.1 and h2 on one port (hyper-util's auto builder), and for every connection:
//!
//! - a cap on open connections per listener (`server.max_connections`): a semaphore permit is
//!   taken at accept and lives in the connection's task; above the cap, the API listener has
//!   `server.probe_connections` places where only `/healthz` and `/readyz` are answered (one
//!   answer, then closed; anything else 503 `overloaded`), so probes pass during a flood; a
//!   connection accepted above those too is closed at once, before a byte is read;
//! - TLS when the listener has it (`server.tls`, `admin.tls`; ALPN `h2` and `http/1.1`): the
//!   acceptor of the configuration in force when the connection is accepted (a reload that
//!   renews the certificate serves it to the next connections). The handshake runs in the
//!   connection's task, holding its `max_connections` permit, under the first-bytes deadline;
//! - a deadline on the first bytes ([`FirstBytesDeadline`]) and hyper's header-read timeout (which
//!   hyper only enforces when a timer is set); with TLS the same deadline (counted from accept)
//!   covers the handshake and then the first 24 decrypted bytes;
//! - HTTP/2 keep-alive pings (`server.http2_keep_alive_interval` / `_timeout`);
//! - an idle timeout (`server.idle_timeout`): a connection that carries no request for that long
//!   is closed gracefully (HTTP/2: GOAWAY), and dropped if it has not closed
//!   `http2_keep_alive_timeout` later (a peer that never acknowledges the GOAWAY's PING). On
//!   HTTP/1, hyper's header-read timer also runs while a keep-alive connection waits for its next
//!   request, so there the shorter of the two timeouts applies;
//! - graceful shutdown: on the shutdown signal both listeners close, connections finish their
//!   in-flight requests (a connection with none left is dropped if it has not closed
//!   `http2_keep_alive_timeout` after its goodbye), and after `server.shutdown_grace` whatever
//!   is left is dropped.
//!
//! A request counts as in progress on its connection from the moment hyper hands it to the
//! service until its response body is finished or dropped, so a long streamed answer is not
//! idle.

//!
//! Files: here the server's start and `serve`; `conn` the accept loop and a connection;
//! `activity` requests in progress (idle timeout); `deadline` the first-bytes deadline.

mod activity;
mod conn;
mod deadline;

use std::future::Future;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::app::{self, AppService, AppState};
use crate::clock::Clock;
use crate::config::Config;
use crate::startup::StartupError;
use conn::{ConnSettings, Stop, accept_loop, connection_builder};

/// A gateway running in the background (used by `main` and by the tests).
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The admin listener's address, when `admin.listen` is set.
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// Ask for a graceful shutdown and wait until it is done.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind the configured address and serve in a background task, on the system clock.
pub async fn spawn(config: Config) -> Result<RunningServer, StartupError> {
    spawn_with_clock(config, Clock::system()).await
}

/// Like [`spawn`] with a given clock (tests use a manual one).
pub async fn spawn_with_clock(config: Config, clock: Clock) -> Result<RunningServer, StartupError> {
    let state = off_runtime(move || AppState::new(config, clock))?;
    spawn_state(state).await
}

/// Run start-up work that may block on a runtime of its own (the synchronous PostgreSQL client
/// drives one): on a plain thread that has this runtime's handle entered (so it may spawn tasks)
/// but is not one of its workers, where a nested `block_on` would panic.
fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    let handle = tokio::runtime::Handle::try_current().ok();
    std::thread::scope(|s| {
        s.spawn(move || {
            let _entered = handle.as_ref().map(tokio::runtime::Handle::enter);
            work()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A bound listener and the service its connections get.
pub struct Listening {
    /// `api` or `admin`: the `listener` label of the connection metrics, and in logs.
    pub name: &'static str,
    pub listener: TcpListener,
    pub service: AppService,
    /// The TLS acceptor for the next connection (asked at every accept); `None`: plain HTTP.
    pub tls: TlsSource,
}

/// Where a listener finds its TLS acceptor at each accept (the configuration in force).
pub type TlsSource = Arc<dyn Fn() -> Option<TlsAcceptor> + Send + Sync>;

/// Serve an already built state in a background task (tests inject their own ledger store).
pub async fn spawn_state(state: AppState) -> Result<RunningServer, StartupError> {
    let listen = state.config().server.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: listen,
            admin: false,
            source,
        })?;
    let addr = listener.local_addr().map_err(StartupError::LocalAddr)?;
    let state = Arc::new(state);
    let api_tls: TlsSource = {
        let state = state.clone();
        Arc::new(move || state.live().api_tls.clone())
    };
    let mut listeners = vec![Listening {
        name: "api",
        listener,
        service: app::build(state.clone()),
        tls: api_tls,
    }];
    let mut admin_addr = None;
    let admin_state = state.clone();
    if let Some(service) = off_runtime(move || crate::admin::build(admin_state))? {
        let listen = state
            .config()
            .admin
            .listen
            .expect("admin::build returns a service only when admin.listen is set");
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartupError::Listen {
                addr: listen,
                admin: true,
                source,
            })?;
        let bound = listener.local_addr().map_err(StartupError::LocalAddr)?;
        tracing::info!(addr = %bound, "admin listener");
        admin_addr = Some(bound);
        let admin_tls: TlsSource = {
            let state = state.clone();
            Arc::new(move || state.live().admin_tls.clone())
        };
        listeners.push(Listening {
            name: "admin",
            listener,
            service,
            tls: admin_tls,
        });
    }
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve(listeners, state.clone(), async {
        let _ = rx.await;
    }));
    Ok(RunningServer {
        addr,
        admin_addr,
        state,
        shutdown: Some(tx),
        task,
    })
}

/// Serve every listener until `shutdown` resolves, then drain.
pub async fn serve(
    listeners: Vec<Listening>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    // Read once: these settings need a restart (`src/reload.rs`).
    let config = state.config();
    let server = &config.server;
    let settings = Arc::new(ConnSettings::new(server));
    let builder = connection_builder(server);
    let stop = Stop::default();
    // If this future is dropped (the task aborted), the connections go with it.
    let _abort_on_drop = stop.abort.clone().drop_guard();
    let connections = TaskTracker::new();
    // Forget end users whose buckets are full again, so idle users do not hold memory.
    let sweeper = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                state.live().rates.sweep();
            }
        })
    };
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            accept_loop(
                l,
                builder.clone(),
                settings.clone(),
                connections.clone(),
                stop.clone(),
            )
        })
        .collect();
    let accepting = futures_util::future::join_all(accepting);
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => {}
        _ = accepting => tracing::error!("the accept loops ended before the shutdown signal"),
    }
    // The accept loops are dropped with this select (and their listeners with them: new
    // connections are refused from here on); `drain` asks every connection to finish its
    // requests and close.
    stop.drain.cancel();
    sweeper.abort();
    let grace = server.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let deadline = tokio::time::Instant::now() + grace;
    connections.close();
    tokio::select! {
        () = connections.wait() => tracing::info!("all connections closed"),
        () = tokio::time::sleep_until(deadline) => {
            tracing::warn!(
                connections = connections.len(),
                "grace period over, dropping remaining connections"
            );
            stop.abort.cancel();
        }
    }
    // Forwarding tasks outlive their connections: let them finish their ledger records.
    state.tasks.close();
    if tokio::time::timeout_at(deadline, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = state.tasks.len(),
            "grace period over with upstream calls still running"
        );
    }
    match state.ledger.clone().close().await {
        Ok(()) => tracing::info!("ledger flushed and closed"),
        Err(e) => {
            tracing::error!(error = %e, "ledger closed with records not written (they are logged)")
        }
    }
}
