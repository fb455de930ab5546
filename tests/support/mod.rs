//! Integration-test support for imagegate: a mock OpenAI upstream, PNG fixtures, a multipart
//! builder and two small HTTP client helpers. Include with `mod support;`.
//!
//! None of the helpers sets a timeout of its own except [`raw_exchange`] (10 s, as specified);
//! wrap [`send`] in `tokio::time::timeout` where a hang is possible. Beware that with a paused
//! tokio clock (`start_paused`), timers auto-advance while the runtime waits on real sockets.
#![allow(dead_code)]

pub mod fixtures;
pub mod gateway;
pub mod ledger_v1;
pub mod mock_upstream;
pub mod multipart;
pub mod pg;
pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A complete HTTP response.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON; panics (showing the body) when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as (lossy) text; the first one if repeated.
    pub fn header(&self, n: &str) -> Option<String> {
        self.headers
            .get(n)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Extra: the body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request over a fresh connection (hyper::client::conn::http1); reads the full
/// body. Adds `host: <addr>` unless `headers` has a Host; hyper adds `content-length` for
/// the body. Panics on any transport error (use [`try_send`] to observe those).
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Resp {
    match try_send(addr, method, path, headers, body).await {
        Ok(r) => r,
        Err(e) => panic!("send {method} {path} to {addr}: {e}"),
    }
}

/// Extra: like [`send`], but transport errors (connection refused or reset, connection
/// closed before a complete response, ...) come back as `Err(description)`.
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Resp, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });

    let method = Method::from_bytes(method.as_bytes()).map_err(|e| format!("method: {e}"))?;
    let mut builder = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", addr.to_string());
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;

    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send_request: {e}"))?;
        let (head, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: head.status.as_u16(),
            headers: head.headers,
            body,
        })
    }
    .await;
    drop(sender);
    driver.abort();
    result
}

/// Writes `request_bytes` on a fresh TcpStream while reading; returns everything received
/// until EOF, a read error, or 10 s. Servers keep HTTP/1.1 connections open after an answer,
/// so send `Connection: close` unless the 10 s wait is intended. Write errors (the server
/// closed early) are ignored; what was received is still returned.
pub async fn raw_exchange(addr: SocketAddr, request_bytes: &[u8]) -> Vec<u8> {
    raw_exchange_for(addr, request_bytes, Duration::from_secs(10)).await
}

/// Extra: [`raw_exchange`] with a chosen time limit.
pub async fn raw_exchange_for(addr: SocketAddr, request_bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("raw_exchange: connect");
    let mut out = Vec::new();
    let (mut rd, mut wr) = stream.split();
    let exchange = async {
        let write = async {
            let _ = wr.write_all(request_bytes).await;
            let _ = wr.flush().await;
        };
        let read = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::join!(write, read);
    };
    let _ = tokio::time::timeout(limit, exchange).await;
    out
}

/// Extra: how [`raw_exchange_until_end`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed the connection (end of stream).
    Closed,
    /// A read failed (usually a reset by the peer).
    Reset,
    /// The time limit passed with the connection still open.
    Limit,
}

/// Extra: like [`raw_exchange_for`], and how the exchange ended: closed or reset by the peer,
/// or still open when `limit` passed. The limit only keeps a test from hanging; the ending is
/// what a test asserts.
pub async fn raw_exchange_until_end(
    addr: SocketAddr,
    request_bytes: &[u8],
    limit: Duration,
) -> (Vec<u8>, Ended) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("raw_exchange_until_end: connect");
    let mut out = Vec::new();
    let (mut rd, mut wr) = stream.split();
    let exchange = async {
        let write = async {
            let _ = wr.write_all(request_bytes).await;
            let _ = wr.flush().await;
        };
        let read = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => return Ended::Closed,
                    Err(_) => return Ended::Reset,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::join!(write, read).1
    };
    let ended = tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Ended::Limit);
    (out, ended)
}

/// Extra: the status code of a raw HTTP/1.x response (`HTTP/1.1 413 ...`), if any.
pub fn raw_status(response: &[u8]) -> Option<u16> {
    let line_end = response.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&response[..line_end]).ok()?;
    let mut it = line.split(' ');
    if !it.next()?.starts_with("HTTP/") {
        return None;
    }
    it.next()?.parse().ok()
}
