//! [`FirstBytesDeadline`]: the deadline on a connection's first bytes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// Enforces `header_read_timeout` on a connection's first bytes. hyper-util's auto builder
    /// reads up to 24 bytes to tell HTTP/1 from h2 before hyper's own header-read timeout starts,
    /// so without this a client that connects and sends nothing (or half the h2 preface) would
    /// hold a connection forever. Once 24 bytes have arrived the guard is off.
    pub(super) struct FirstBytesDeadline<T> {
        #[pin]
        io: T,
        deadline: Pin<Box<tokio::time::Sleep>>,
        seen: usize,
    }
}

impl<T> FirstBytesDeadline<T> {
    const PREFACE: usize = 24;

    #[cfg(test)]
    pub(super) fn new(io: T, timeout: std::time::Duration) -> Self {
        Self::until(io, tokio::time::Instant::now() + timeout)
    }

    pub(super) fn until(io: T, deadline: tokio::time::Instant) -> Self {
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
    use std::time::Duration;

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
}
