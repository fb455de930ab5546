//! One listener's accept loop and one connection's life: limits, probes, TLS, HTTP, idle and
//! drain.

use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::Listening;
use super::activity::{Activity, Tracked};
use super::deadline::FirstBytesDeadline;
use crate::app::{AppService, ClientAddr};
use crate::body::{Body, BoxError};
use crate::config::ServerConfig;

/// How every connection is handled, from `[server]`.
#[derive(Debug, Clone)]
pub(super) struct ConnSettings {
    pub(super) header_read_timeout: Duration,
    pub(super) idle_timeout: Duration,
    /// Also how long a closing connection with no request left gets to finish its goodbye.
    pub(super) keep_alive_timeout: Duration,
    pub(super) max_connections: usize,
    pub(super) probe_connections: usize,
}

impl ConnSettings {
    pub(super) fn new(server: &ServerConfig) -> Self {
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
    pub(super) fn for_probes(&self) -> Self {
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
pub(super) const PROBE_IDLE: Duration = Duration::from_secs(1);

/// The service of a probe connection: `/healthz` and `/readyz` go to the application (which
/// answers them above the overload layer); anything else is 503 `overloaded` with
/// `Retry-After`. HTTP/1 answers carry `Connection: close`.
pub(super) fn probes_only(app: AppService) -> AppService {
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
pub(super) struct Stop {
    pub(super) drain: CancellationToken,
    pub(super) abort: CancellationToken,
}

pub(super) fn connection_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
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

/// Accept on one listener until `stop.drain`; each connection runs in its own task, tracked by
/// `connections`, holding one of the listener's `max_connections` permits.
pub(super) async fn accept_loop(
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
pub(super) enum Closing {
    Drain,
    Idle,
}

/// A connection just accepted.
pub(super) struct Accepted {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    /// The listener's TLS acceptor at accept time, if it has TLS.
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) listener: &'static str,
    /// The connection's place under `max_connections`, held until it ends (handshake included).
    pub(super) _permit: OwnedSemaphorePermit,
}

/// Serve one connection to its end: the TLS handshake first when the listener has TLS (under
/// the first-bytes deadline, given up on a drain), then HTTP.
pub(super) async fn connection(
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
pub(super) async fn http<I>(
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
                Ok::<_, std::convert::Infallible>(
                    resp.map(|body| Body::new(Tracked::new(body, active))),
                )
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

pub(super) fn log_end(ended: Result<(), BoxError>, peer: SocketAddr) {
    if let Err(e) = ended {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}
