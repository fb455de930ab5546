//! The accept loop: HTTP/1.1 and h2 on one port (hyper-util's auto builder), a header-read
//! timeout (which hyper only enforces when a timer is set), and graceful shutdown: on the
//! shutdown signal the listener closes, connections finish their in-flight requests, and after
//! `server.shutdown_grace` whatever is left is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::app::{self, AppState, ClientAddr};
use crate::clock::Clock;
use crate::config::Config;
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
    let state = AppState::new(config, clock)?;
    spawn_state(state).await
}

/// Serve an already built state in a background task (tests inject their own ledger store).
pub async fn spawn_state(state: AppState) -> Result<RunningServer, StartupError> {
    let listen = state.config.server.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: listen,
            admin: false,
            source,
        })?;
    let addr = listener.local_addr().map_err(StartupError::LocalAddr)?;
    let state = Arc::new(state);
    let admin = crate::admin::start(state.clone()).await?;
    let admin_addr = admin.as_ref().map(|(a, _)| *a);
    let (tx, rx) = oneshot::channel();
    let serving = serve(listener, state.clone(), async {
        let _ = rx.await;
    });
    let task = tokio::spawn(async move {
        serving.await;
        if let Some((_, admin)) = admin {
            admin.abort();
        }
    });
    Ok(RunningServer {
        addr,
        admin_addr,
        state,
        shutdown: Some(tx),
        task,
    })
}

/// Serve until `shutdown` resolves, then drain.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let server = &state.config.server;
    let app = app::build(state.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    let graceful = GracefulShutdown::new();
    // Forget end users whose buckets are full again, so idle users do not hold memory.
    let sweeper = {
        let rates = state.rates.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                rates.sweep();
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually out of file descriptors: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req| {
            req.extensions_mut().insert(ClientAddr(peer));
            app.clone().oneshot(req)
        });
        let io = FirstBytesDeadline::new(stream, server.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    sweeper.abort();
    let grace = server.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let deadline = tokio::time::Instant::now() + grace;
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep_until(deadline) => tracing::warn!("grace period over, dropping remaining connections"),
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

    fn new(io: T, timeout: std::time::Duration) -> Self {
        FirstBytesDeadline {
            io,
            deadline: Box::pin(tokio::time::sleep(timeout)),
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
