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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::app::{self, AppService, AppState, ClientAddr};
use crate::body::{Body, BoxError};
use crate::clock::Clock;
use crate::config::{Config, ServerConfig};
use crate::startup::StartupError;

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

/// How every connection is handled, from `[server]`.
#[derive(Debug, Clone)]
struct ConnSettings {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// Also how long a closing connection with no request left gets to finish its goodbye.
    keep_alive_timeout: Duration,
    max_connections: usize,
    probe_connections: usize,
}

impl ConnSettings {
    fn new(server: &ServerConfig) -> Self {
        ConnSettings {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            keep_alive_timeout: server.http2_keep_alive_timeout,
            max_connections: server.max_connections,
            probe_connections: server.probe_connections,
        }
    }

    /// A probe connection (above `max_connections`): closed once idle for a moment after its
    /// answer, and never later than `header_read_timeout` idle.
    fn for_probes(&self) -> Self {
        ConnSettings {
            idle_timeout: self
                .idle_timeout
                .min(self.header_read_timeout)
                .min(PROBE_IDLE),
            ..self.clone()
        }
    }
}

/// How long a probe connection may stay idle after its answer.
const PROBE_IDLE: Duration = Duration::from_secs(1);

/// The service of a probe connection: `/healthz` and `/readyz` go to the application (which
/// answers them above the overload layer); anything else is 503 `overloaded` with
/// `Retry-After`. HTTP/1 answers carry `Connection: close`.
fn probes_only(app: AppService) -> AppService {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move {
            let http1 = req.version() <= http::Version::HTTP_11;
            let mut resp = if matches!(req.uri().path(), "/healthz" | "/readyz") {
                app.oneshot(req).await?
            } else {
                crate::error::GatewayError::Overloaded.into_response()
            };
            if http1 {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    }))
}

/// The two stages of stopping: `drain` stops the accept loops and asks every connection to
/// finish its requests and close; `abort` (at the end of the grace period, or when the serving
/// future is dropped) drops whatever is left.
#[derive(Clone, Default)]
struct Stop {
    drain: CancellationToken,
    abort: CancellationToken,
}

fn connection_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.http2_max_concurrent_streams)
        .keep_alive_interval(server.http2_keep_alive_interval)
        .keep_alive_timeout(server.http2_keep_alive_timeout);
    builder
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

/// Accept on one listener until `stop.drain`; each connection runs in its own task, tracked by
/// `connections`, holding one of the listener's `max_connections` permits.
async fn accept_loop(
    listening: Listening,
    builder: auto::Builder<TokioExecutor>,
    settings: Arc<ConnSettings>,
    connections: TaskTracker,
    stop: Stop,
) {
    let Listening {
        name,
        listener,
        service,
        tls,
    } = listening;
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    // Only the API listener serves health probes.
    let probe_places = if name == "api" {
        settings.probe_connections
    } else {
        0
    };
    let probe_permits = Arc::new(Semaphore::new(probe_places));
    let probe_settings = Arc::new(settings.for_probes());
    let probe_service = probes_only(service.clone());
    let open = metrics::gauge!("imagegate_open_connections", "listener" => name);
    let refused = metrics::counter!("imagegate_connections_refused_total", "listener" => name);
    let probes = metrics::counter!("imagegate_probe_connections_total", "listener" => name);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually out of file descriptors: back off briefly instead of spinning.
                    tracing::warn!(error = %e, listener = name, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        () = stop.drain.cancelled() => break,
                    }
                }
            },
            () = stop.drain.cancelled() => break,
        };
        let (permit, probe) = match permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match probe_permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    probes.increment(1);
                    (permit, true)
                }
                Err(_) => {
                    // Closing at once (rather than leaving the connection in the kernel's
                    // backlog) tells the client now, and frees the descriptor.
                    refused.increment(1);
                    tracing::debug!(%peer, listener = name, "max_connections reached: connection closed");
                    drop(stream);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        open.increment(1.0);
        let conn = connection(
            Accepted {
                stream,
                peer,
                tls: tls(),
                listener: name,
                _permit: permit,
            },
            if probe {
                probe_service.clone()
            } else {
                service.clone()
            },
            builder.clone(),
            if probe {
                probe_settings.clone()
            } else {
                settings.clone()
            },
            stop.clone(),
        );
        let open = open.clone();
        connections.spawn(async move {
            conn.await;
            open.decrement(1.0);
        });
    }
    tracing::debug!(listener = name, "listener closed");
}

/// Why a connection is asked to close before its peer closes it.
#[derive(Debug, Clone, Copy)]
enum Closing {
    Drain,
    Idle,
}

/// A connection just accepted.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    /// The listener's TLS acceptor at accept time, if it has TLS.
    tls: Option<TlsAcceptor>,
    listener: &'static str,
    /// The connection's place under `max_connections`, held until it ends (handshake included).
    _permit: OwnedSemaphorePermit,
}

/// Serve one connection to its end: the TLS handshake first when the listener has TLS (under
/// the first-bytes deadline, given up on a drain), then HTTP.
async fn connection(
    accepted: Accepted,
    app: AppService,
    builder: auto::Builder<TokioExecutor>,
    settings: Arc<ConnSettings>,
    stop: Stop,
) {
    let Accepted {
        stream,
        peer,
        tls,
        listener,
        _permit,
    } = accepted;
    let deadline = tokio::time::Instant::now() + settings.header_read_timeout;
    let Some(acceptor) = tls else {
        let io = FirstBytesDeadline::until(stream, deadline);
        return http(io, peer, app, builder, settings, stop).await;
    };
    let failed = |reason: &str| {
        metrics::counter!("imagegate_tls_handshake_failures_total", "listener" => listener)
            .increment(1);
        tracing::debug!(%peer, listener, reason, "TLS handshake failed");
    };
    tokio::select! {
        shaken = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => match shaken {
            Ok(Ok(tls)) => {
                let io = FirstBytesDeadline::until(tls, deadline);
                http(io, peer, app, builder, settings, stop).await;
            }
            Ok(Err(e)) => failed(&e.to_string()),
            Err(_) => failed("no handshake within header_read_timeout"),
        },
        () = stop.drain.cancelled() => {}
    }
}

/// Serve HTTP on one connection to its end: until the peer closes it, it errs, or it is closed
/// for idleness or by the drain.
async fn http<I>(
    io: FirstBytesDeadline<I>,
    peer: SocketAddr,
    app: AppService,
    builder: auto::Builder<TokioExecutor>,
    settings: Arc<ConnSettings>,
    stop: Stop,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::default();
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(peer));
            let active = activity.start();
            let answer = app.clone().oneshot(req);
            async move {
                let resp = answer.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    Body::new(Tracked {
                        inner: body,
                        _active: active,
                    })
                }))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let closing = tokio::select! {
        ended = conn.as_mut() => return log_end(ended, peer),
        () = stop.drain.cancelled() => Closing::Drain,
        () = activity.idle_for(settings.idle_timeout) => Closing::Idle,
    };
    tracing::debug!(%peer, ?closing, "closing connection");
    conn.as_mut().graceful_shutdown();
    // Requests in progress finish (on a drain the grace period bounds them, through `abort`).
    // Once none is, the connection has the keep-alive timeout to finish its goodbye: an h2 peer
    // that never acknowledges the GOAWAY's PING would otherwise hold it open (and a drain would
    // last the whole grace period for it).
    tokio::select! {
        ended = conn.as_mut() => log_end(ended, peer),
        () = activity.idle_for(settings.keep_alive_timeout) => {
            tracing::debug!(%peer, ?closing, "connection dropped: it did not close after its goodbye");
        }
        () = stop.abort.cancelled() => {
            tracing::debug!(%peer, "connection dropped at the end of the grace period");
        }
    }
}

fn log_end(ended: Result<(), BoxError>, peer: SocketAddr) {
    if let Err(e) = ended {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Requests in progress on one connection: started when hyper calls the service, finished when
/// the response body is finished or dropped.
#[derive(Clone, Default)]
struct Activity(Arc<watch::Sender<usize>>);

/// One request in progress; dropping it ends it.
struct Active(Arc<watch::Sender<usize>>);

impl Activity {
    fn start(&self) -> Active {
        self.0.send_modify(|n| *n += 1);
        Active(self.0.clone())
    }

    /// Resolves once no request has been in progress for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            if rx.wait_for(|n| *n == 0).await.is_err() {
                // Unreachable while `self` holds the sender; never call the connection idle.
                return std::future::pending().await;
            }
            tokio::select! {
                () = tokio::time::sleep(timeout) => return,
                changed = rx.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in progress until it is finished or
    /// dropped.
    struct Tracked {
        #[pin]
        inner: Body,
        _active: Active,
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Enforces `header_read_timeout` on a connection's first bytes. hyper-util's auto builder
    /// reads up to 24 bytes to tell HTTP/1 from h2 before hyper's own header-read timeout starts,
    /// so without this a client that connects and sends nothing (or half the h2 preface) would
    /// hold a connection forever. Once 24 bytes have arrived the guard is off.
    struct FirstBytesDeadline<T> {
        #[pin]
        io: T,
        deadline: Pin<Box<tokio::time::Sleep>>,
        seen: usize,
    }
}

impl<T> FirstBytesDeadline<T> {
    const PREFACE: usize = 24;

    #[cfg(test)]
    fn new(io: T, timeout: std::time::Duration) -> Self {
        Self::until(io, tokio::time::Instant::now() + timeout)
    }

    fn until(io: T, deadline: tokio::time::Instant) -> Self {
        FirstBytesDeadline {
            io,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            seen: 0,
        }
    }
}

impl<T: AsyncRead> AsyncRead for FirstBytesDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if *this.seen >= Self::PREFACE {
            return this.io.poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match this.io.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                *this.seen = if n == 0 {
                    Self::PREFACE
                } else {
                    *this.seen + n
                };
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within header_read_timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for FirstBytesDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A guarded reader over an in-memory pipe, and the writer end that plays the client.
    fn guarded() -> (
        FirstBytesDeadline<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let (server, client) = tokio::io::duplex(1024);
        (FirstBytesDeadline::new(server, TIMEOUT), client)
    }

    #[tokio::test(start_paused = true)]
    async fn silence_times_out_at_the_deadline() {
        let (mut io, _client) = guarded();
        let started = tokio::time::Instant::now();
        let err = io.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), TIMEOUT, "not a moment earlier or later");
    }

    #[tokio::test(start_paused = true)]
    async fn fewer_than_24_bytes_do_not_disarm_it() {
        let (mut io, mut client) = guarded();
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 16);
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn twenty_four_bytes_disarm_it() {
        let (mut io, mut client) = guarded();
        // Two pieces: the count adds up across reads.
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 16);
        client.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        // Long past the deadline, a read simply waits for data.
        let quiet = tokio::time::timeout(TIMEOUT * 3, io.read(&mut buf)).await;
        assert!(quiet.is_err(), "a read after the preface is not cut off");
        client.write_all(b"more").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn end_of_stream_is_passed_through_and_disarms_it() {
        let (mut io, client) = guarded();
        drop(client);
        assert_eq!(io.read(&mut [0u8; 8]).await.unwrap(), 0);
        tokio::time::advance(TIMEOUT * 2).await;
        assert_eq!(io.read(&mut [0u8; 8]).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_pass_through() {
        let (mut io, mut client) = guarded();
        io.write_all(b"HTTP/1.1 408").await.unwrap();
        io.flush().await.unwrap();
        let mut buf = [0u8; 12];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 408");
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_end_of_the_last_request() {
        let idle = Duration::from_secs(60);
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        // No request at all: idle after the timeout.
        activity.idle_for(idle).await;
        assert_eq!(started.elapsed(), idle);

        // A request in progress (a long streamed answer) is never idle.
        let active = activity.start();
        let waiting = tokio::time::timeout(idle * 5, activity.idle_for(idle)).await;
        assert!(
            waiting.is_err(),
            "busy for five idle timeouts, still not idle"
        );
        // Its end starts the clock again.
        let ended = tokio::time::Instant::now();
        drop(active);
        activity.idle_for(idle).await;
        assert_eq!(ended.elapsed(), idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_idle_wait_restarts_it() {
        let idle = Duration::from_secs(60);
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        let waiter = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle_for(idle).await })
        };
        tokio::time::sleep(idle / 2).await;
        drop(activity.start());
        waiter.await.unwrap();
        assert_eq!(started.elapsed(), idle / 2 + idle);
    }
}
