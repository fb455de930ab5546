//! `[server]`: the API listener, its connections and the bounds on requests in flight.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Address of the API listener.
    pub listen: SocketAddr,
    /// Time allowed for a client to send the request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time allowed for the whole request body to arrive.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Slowest average transfer rate of a request body, in bytes per second, once
    /// `body_rate_grace` has passed (408 below it); 0 = off.
    pub min_body_rate: u64,
    /// Time from the end of the request head during which a body is not held to
    /// `min_body_rate`.
    #[serde(with = "humantime_serde")]
    pub body_rate_grace: Duration,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Requests handled at once across all connections; more are answered 503 at once.
    pub max_in_flight: usize,
    /// PNG checks that may run at once on the blocking pool.
    pub max_concurrent_decodes: usize,
    /// Request bytes held in memory at once across all requests (bodies being read, checked and
    /// forwarded). A request that would exceed it waits up to `buffer_wait`, then gets 503.
    pub max_buffered_bytes: usize,
    /// Forwarding tasks running at once (each outlives its connection until the answer is
    /// relayed and recorded); a request that finds none free is refused 503 before forwarding.
    pub max_forwarding: usize,
    /// A caller that takes no chunk of its answer for this long is treated as gone (the
    /// upstream answer is still read to its end, so its cost is known).
    #[serde(with = "humantime_serde")]
    pub caller_idle_timeout: Duration,
    /// How long a request waits for room in `max_buffered_bytes`.
    #[serde(with = "humantime_serde")]
    pub buffer_wait: Duration,
    /// Connections open at once on each listener (the API and the admin listener count
    /// separately); a connection accepted above it is closed at once.
    pub max_connections: usize,
    /// API listener: connections accepted above `max_connections` that may only ask
    /// `GET /healthz` or `/readyz` (anything else: 503 `overloaded`), each closed after one
    /// answer and within `header_read_timeout`, so a probe on a new connection is answered
    /// while a flood holds every regular place. 0 turns them off.
    pub probe_connections: usize,
    /// A connection that carries no request for this long is closed (HTTP/1 keep-alive between
    /// requests; HTTP/2 with no open stream, including one that sent its preface and then
    /// nothing).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2: streams (requests) open at once on one connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2: a PING is sent after this long without a frame from the client.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Duration,
    /// HTTP/2: the connection is closed when a PING is not acknowledged within this long. Also
    /// the time a closing connection (idle, or draining on shutdown) with no request left gets
    /// to finish its goodbye (GOAWAY) before it is dropped.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
    /// TLS termination on the API listener (`[server.tls]`: `cert_file`, `key_file`); plain
    /// HTTP when absent. The files are read again at every reload.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            body_rate_grace: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            max_in_flight: 256,
            max_concurrent_decodes: 4,
            max_buffered_bytes: 1024 * 1024 * 1024,
            max_forwarding: 512,
            caller_idle_timeout: Duration::from_secs(60),
            buffer_wait: Duration::from_secs(10),
            max_connections: 1024,
            probe_connections: 8,
            idle_timeout: Duration::from_secs(60),
            http2_max_concurrent_streams: 64,
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(20),
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Problems of `[server]`; `largest_body` is the largest body cap of the models served.
    pub(super) fn problems(&self, largest_body: usize, p: &mut Vec<String>) {
        let s = self;
        for (name, d) in [
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.body_read_timeout", s.body_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
            (
                "server.http2_keep_alive_interval",
                s.http2_keep_alive_interval,
            ),
            (
                "server.http2_keep_alive_timeout",
                s.http2_keep_alive_timeout,
            ),
            ("server.caller_idle_timeout", s.caller_idle_timeout),
            ("server.buffer_wait", s.buffer_wait),
        ] {
            if d.is_zero() {
                p.push(format!("{name}: must be greater than zero"));
            }
        }
        if s.min_body_rate > 0 && s.body_rate_grace.is_zero() {
            p.push(
                "server.body_rate_grace: must be greater than zero while server.min_body_rate is set"
                    .into(),
            );
        }
        if s.max_in_flight == 0 {
            p.push("server.max_in_flight: must be at least 1".into());
        }
        if s.max_forwarding == 0 {
            p.push("server.max_forwarding: must be at least 1".into());
        }
        if s.max_buffered_bytes < largest_body {
            p.push(format!(
                "server.max_buffered_bytes: must be at least the largest body cap ({largest_body} bytes), or the largest valid request could never be read"
            ));
        }
        if s.max_connections == 0 {
            p.push("server.max_connections: must be at least 1".into());
        }
        if s.http2_max_concurrent_streams == 0 {
            p.push("server.http2_max_concurrent_streams: must be at least 1".into());
        }
        if s.max_concurrent_decodes == 0 {
            p.push("server.max_concurrent_decodes: must be at least 1".into());
        }
        if let Some(files) = &s.tls
            && let Err(e) = crate::tls::acceptor(files, "server.tls")
        {
            p.push(e);
        }
    }
}
