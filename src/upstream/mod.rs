//! The upstream: one pooled hyper client (rustls with webpki roots plus the CAs of
//! `upstream.ca_file`, HTTP/1.1 and h2 by ALPN) and the forwarding call.
//!
//! The caller's headers never go upstream: the request is built from scratch with the injected
//! upstream key (a sensitive header value built once at start). Only an allowlist of response
//! headers comes back, so hop-by-hop headers are dropped by construction. A POST is never
//! re-sent once its body may have gone out: another key of the pool ([`crate::keypool`]) gets
//! it only after a 429 rate limit or a connection that never opened (hyper itself only re-sends
//! a request that never left because its pooled connection was already closed).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ChunkedBody;
use crate::body::gate::Gate;
use crate::clock::Clock;
use crate::config::{Config, Secret};
use crate::edit::canonical::CanonicalBody;
use crate::error::GatewayError;
use crate::keypool::{KeyPool, Pick, Verdict, is_rate_limit_body, rate_limit_wait};
use crate::startup::StartupError;

mod headers;
mod listing;
mod tls;

use headers::is_timeout;
pub use headers::{error_chain, passed_headers};
pub use tls::extra_roots;
use tls::tls_config;

/// One key of the pool as sent: its URLs and identifying headers.
struct Endpoint {
    edits_uri: Uri,
    models_uri: Uri,
    authorization: Option<HeaderValue>,
    organization: Option<HeaderValue>,
    project: Option<HeaderValue>,
}

/// The upstream: one pooled HTTP client and the pool of keys it sends with. Built whole from
/// the config (a reload swaps it whole).
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, ChunkedBody>,
    /// One per key of [`Upstream::pool`], same order.
    endpoints: Vec<Endpoint>,
    pool: KeyPool,
    user_agent: HeaderValue,
    response_timeout: Duration,
}

/// Largest 429 answer read to decide whether it is a rate limit (OpenAI's are a few hundred
/// bytes); a longer one is passed on as it is, as not a rate limit.
const MAX_REFUSAL_BYTES: usize = 64 * 1024;

impl Upstream {
    /// The upstream key, organization and project headers.
    fn identify(&self, endpoint: &Endpoint, req: &mut Request<ChunkedBody>, auth: HeaderValue) {
        let h = req.headers_mut();
        h.insert(header::AUTHORIZATION, auth);
        if let Some(org) = &endpoint.organization {
            h.insert("openai-organization", org.clone());
        }
        if let Some(project) = &endpoint.project {
            h.insert("openai-project", project.clone());
        }
    }

    /// The upstream on the system clock.
    pub fn new(config: &Config) -> Result<Upstream, StartupError> {
        Upstream::with_clock(config, Clock::system())
    }

    /// The upstream, its breakers timed by `clock`.
    pub fn with_clock(config: &Config, clock: Clock) -> Result<Upstream, StartupError> {
        let u = &config.upstream;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(u.connect_timeout));
        http.set_nodelay(true);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(u.ca_file.as_deref())?);
        let https = if u.allow_http {
            builder
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http)
        } else {
            builder
                .https_only()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(u.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let endpoints: Vec<Endpoint> = if u.keys.is_empty() {
            vec![endpoint(
                "upstream",
                &u.base_url,
                config.upstream_key.as_ref(),
                &u.organization,
                &u.project,
            )?]
        } else {
            u.keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    endpoint(
                        &format!("upstream.keys[{i}]"),
                        k.base_url.as_deref().unwrap_or(&u.base_url),
                        k.secret.as_ref(),
                        &k.organization,
                        &k.project,
                    )
                })
                .collect::<Result<_, _>>()?
        };
        let usable: Vec<bool> = endpoints
            .iter()
            .map(|e| e.authorization.is_some())
            .collect();
        Ok(Upstream {
            client,
            pool: KeyPool::from_config(config, &usable, clock),
            endpoints,
            user_agent: HeaderValue::from_str(&format!("imagegate/{}", env!("CARGO_PKG_VERSION")))
                .expect("the crate version is a valid header value"),
            response_timeout: u.response_timeout,
        })
    }

    /// At least one key is loaded.
    pub fn has_key(&self) -> bool {
        self.endpoints.iter().any(|e| e.authorization.is_some())
    }

    /// The key pool (selection and breakers).
    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    /// Send a canonical edit upstream for `client` (its pinned keys, else the pool) and wait
    /// for the response head. A failure says whether the request may have reached the upstream
    /// (see [`SendError`]).
    ///
    /// The retry rule: the same body goes to another key only when the upstream refused it
    /// without doing the work: a 429 rate-limit answer, or a connection that failed to open
    /// (nothing of the request was sent). Never once a body went out otherwise (a 5xx, a
    /// timeout, a broken connection). Each key is tried at most once. A gated body (cut-through)
    /// goes to another key only once its gate is open; a failure after its gate shut is not
    /// held against the key.
    pub async fn send(
        &self,
        canonical: CanonicalBody,
        client: Option<&str>,
    ) -> Result<Sent, SendError> {
        let content_type = canonical.content_type();
        let length = canonical.body.len();
        // The body is kept for another attempt only while another key could take one: with a
        // single choice it goes to hyper, which drops it (and its memory budget) once sent.
        let choices = self.pool.choices(client);
        // Cut-through: the body's last chunk waits for the check (see `body::gate`).
        let gate = canonical.body.gate().cloned();
        let mut body = Some(canonical.body);
        let mut tried: Vec<usize> = Vec::new();
        // What to give the caller when no key is left: a refusal answer, else the last failure.
        let mut refused: Option<Sent> = None;
        let mut failed: Option<SendError> = None;
        loop {
            // Another attempt only with the whole body known: once the check passed.
            if let Some(gate) = gate.as_ref().filter(|_| !tried.is_empty())
                && !gate.decided().await
            {
                return Err(check_failed(None));
            }
            let Some(pick) = self.pool.pick(client, &tried) else {
                break;
            };
            if !tried.is_empty() {
                let reason = if refused.is_some() {
                    "rate_limit"
                } else {
                    "connect"
                };
                metrics::counter!("imagegate_upstream_retries_total", "reason" => reason)
                    .increment(1);
                tracing::info!(key = %pick.name, reason, "sending to another upstream key");
            }
            tried.push(pick.index);
            let mut attempt = Attempt {
                pool: &self.pool,
                pick,
                verdict: Verdict::Nothing,
            };
            let key = attempt.pick.name.clone();
            let endpoint = &self.endpoints[attempt.pick.index];
            let Some(auth) = endpoint.authorization.clone() else {
                continue;
            };
            let this_body = if tried.len() < choices {
                body.clone()
            } else {
                body.take()
            };
            let Some(this_body) = this_body else {
                break;
            };
            let polled = Arc::new(AtomicBool::new(false));
            let mut req = Request::post(endpoint.edits_uri.clone())
                .header(header::CONTENT_TYPE, content_type.as_str())
                .header(header::CONTENT_LENGTH, length)
                .header(header::ACCEPT, "application/json")
                .header(header::USER_AGENT, self.user_agent.clone())
                .body(this_body.flag_polled(polled.clone()))
                .expect("a request built from valid parts");
            self.identify(endpoint, &mut req, auth);
            let failure = match tokio::time::timeout(
                self.response_timeout,
                self.client.request(req),
            )
            .await
            {
                Ok(Ok(resp)) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let (parts, body) = resp.into_parts();
                    let read = tokio::time::timeout(
                        self.response_timeout,
                        http_body_util::Limited::new(body, MAX_REFUSAL_BYTES).collect(),
                    )
                    .await;
                    let Ok(Ok(body)) = read else {
                        // A 429 whose body did not arrive: refused all the same (no work
                        // was done), but there is nothing to pass on.
                        attempt.verdict = Verdict::Failure;
                        return Err(SendError {
                            error: GatewayError::UpstreamUnreachable,
                            reached: false,
                            key: Some(key),
                        });
                    };
                    let body = body.to_bytes();
                    let sent = Sent {
                        response: Response::from_parts(
                            parts,
                            UpstreamBody::Buffered(Some(body.clone())),
                        ),
                        key,
                    };
                    if !is_rate_limit_body(&body) {
                        // insufficient_quota: passed on, and not the key's fault.
                        attempt.verdict = Verdict::Success;
                        return Ok(sent);
                    }
                    attempt.verdict =
                        Verdict::RateLimited(rate_limit_wait(sent.response.headers()));
                    refused = Some(sent);
                    continue;
                }
                Ok(Ok(resp)) => {
                    attempt.verdict = if resp.status().is_server_error() {
                        Verdict::Failure
                    } else {
                        Verdict::Success
                    };
                    return Ok(Sent {
                        response: resp.map(UpstreamBody::Streaming),
                        key,
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(key = %key, error = %error_chain(&e), "upstream request failed");
                    Failure {
                        connect: e.is_connect(),
                        timeout: is_timeout(&e),
                    }
                }
                Err(_) => Failure {
                    connect: false,
                    timeout: true,
                },
            };
            if gate.as_ref().and_then(Gate::state) == Some(false) {
                // The check failed and the body was cut short on purpose: not the key's fault.
                attempt.verdict = Verdict::Nothing;
                return Err(check_failed(Some(key)));
            }
            attempt.verdict = Verdict::Failure;
            let polled = polled.load(Ordering::Acquire);
            let mut error = failure.classify(polled, self.response_timeout);
            error.key = Some(key);
            if failure.connect && !polled {
                // The connection never opened: nothing was sent, another key may serve.
                failed = Some(error);
                continue;
            }
            return Err(error);
        }
        if let Some(sent) = refused {
            return Ok(sent);
        }
        Err(failed.unwrap_or(SendError {
            error: GatewayError::UpstreamKeyMissing,
            reached: false,
            key: None,
        }))
    }
}

/// A send abandoned because the request failed its check (cut-through): nothing complete went
/// upstream. The caller is told the check's error, not this one.
fn check_failed(key: Option<Arc<str>>) -> SendError {
    SendError {
        error: GatewayError::Internal,
        reached: false,
        key,
    }
}

/// The endpoint of one key; header values are checked by the config, errors name `at`.
fn endpoint(
    at: &str,
    base_url: &str,
    secret: Option<&Secret<String>>,
    organization: &Option<String>,
    project: &Option<String>,
) -> Result<Endpoint, StartupError> {
    let base = base_url.trim_end_matches('/');
    let uri = |path: &str| -> Result<Uri, StartupError> {
        format!("{base}{path}")
            .parse()
            .map_err(|e| StartupError::Upstream(format!("{at}: base_url: {e}")))
    };
    let authorization = secret
        .map(|k| {
            HeaderValue::from_str(&format!("Bearer {}", k.expose())).map(|mut h| {
                h.set_sensitive(true);
                h
            })
        })
        .transpose()
        .map_err(|_| {
            StartupError::Upstream(format!("{at}: the key is not a valid header value"))
        })?;
    let plain = |v: &Option<String>, name: &str| -> Result<Option<HeaderValue>, StartupError> {
        v.as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| StartupError::Upstream(format!("{at}.{name}: not a valid header value")))
    };
    Ok(Endpoint {
        edits_uri: uri("/images/edits")?,
        models_uri: uri("/models")?,
        authorization,
        organization: plain(organization, "organization")?,
        project: plain(project, "project")?,
    })
}

/// One attempt on a key: its verdict reaches the breaker when it ends, however it ends.
struct Attempt<'a> {
    pool: &'a KeyPool,
    pick: Pick,
    verdict: Verdict,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.pool.report(&self.pick, self.verdict);
    }
}

/// An upstream answer head and the key that got it.
#[derive(Debug)]
pub struct Sent {
    pub response: Response<UpstreamBody>,
    /// The key's name (safe to log and record).
    pub key: Arc<str>,
}

/// An upstream answer's body: streamed, or read already (a 429 read to classify it).
#[derive(Debug)]
pub enum UpstreamBody {
    Streaming(Incoming),
    Buffered(Option<Bytes>),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Buffered(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming(b) => b.is_end_stream(),
            UpstreamBody::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streaming(b) => b.size_hint(),
            UpstreamBody::Buffered(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// A forwarding call that got no response head.
#[derive(Debug)]
pub struct SendError {
    /// What the caller is told.
    pub error: GatewayError,
    /// The request may have reached the upstream (the connection was up and the body was being
    /// sent), so the upstream may have done and billed the work. `false` only when nothing can
    /// have been sent: a connect failure (refused, unreachable, connect timeout, TLS handshake)
    /// or a deadline that passed before the connection was ready.
    pub reached: bool,
    /// The key of the last attempt, if one was made.
    pub key: Option<Arc<str>>,
}

/// How a forwarding call failed, as the client saw it.
#[derive(Debug, Clone, Copy)]
struct Failure {
    /// The connector failed (the connect phase): nothing was sent.
    connect: bool,
    /// A timeout (the connect timeout, or the response timeout).
    timeout: bool,
}

impl Failure {
    /// `polled`: the client asked for the request body, so the connection was up.
    fn classify(self, polled: bool, response_timeout: Duration) -> SendError {
        let reached = polled && !self.connect;
        let error = if reached && self.timeout {
            GatewayError::UpstreamTimeout {
                after: response_timeout,
            }
        } else {
            // A connect failure, a connect timeout included, is 502: the upstream was never
            // reached. So is a connection that broke after sending.
            GatewayError::UpstreamUnreachable
        };
        SendError {
            error,
            reached,
            key: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::listing::error_summary;
    use super::tls::root_store;
    use super::*;
    use http::HeaderMap;

    #[test]
    fn only_allowlisted_headers_pass() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-request-id", "req_1"),
            ("openai-version", "2020-10-01"),
            ("x-ratelimit-remaining-images", "4"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "a=b"),
            ("content-type", "application/json"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let out = passed_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "content-type",
                "openai-version",
                "x-ratelimit-remaining-images",
                "x-request-id"
            ]
        );
    }

    #[test]
    fn ca_file_adds_to_the_webpki_roots() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        // Other PEM sections (here a private key) are skipped.
        std::fs::write(&file, format!("{}{}", key.serialize_pem(), ca.pem())).unwrap();

        let webpki = webpki_roots::TLS_SERVER_ROOTS.len();
        assert!(webpki > 100, "the Mozilla roots are there");
        assert_eq!(root_store(None).unwrap().len(), webpki);
        assert_eq!(root_store(Some(&file)).unwrap().len(), webpki + 1);

        let mut c = Config::default();
        c.upstream.ca_file = Some(file);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert!(Upstream::new(&c).is_ok());
        c.upstream.ca_file = Some(dir.path().join("missing.pem"));
        let err = Upstream::new(&c)
            .err()
            .expect("a missing CA file is an error");
        assert!(matches!(err, StartupError::CaFile { .. }), "{err:?}");
        let err = err.to_string();
        assert!(
            err.starts_with("upstream.ca_file ") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn error_summaries_hide_keys() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-proj-****abcd. You can find your API key at ...","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let s = error_summary(body);
        assert!(
            s.starts_with(": invalid_api_key: Incorrect API key provided: [redacted]"),
            "{s}"
        );
        assert!(!s.contains("sk-"), "{s}");
        assert_eq!(error_summary(b"<html>"), "");
    }

    #[test]
    fn only_a_failure_after_the_body_was_asked_for_may_have_reached_the_upstream() {
        let after = Duration::from_secs(7);
        let code = |e: &SendError| e.error.parts().code;
        let f = |connect, timeout| Failure { connect, timeout };
        // The connect timeout: 502 upstream_unreachable, nothing sent.
        let e = f(true, true).classify(false, after);
        assert!(!e.reached);
        assert_eq!(code(&e), Some("upstream_unreachable"));
        // Refused: the same.
        let e = f(true, false).classify(false, after);
        assert!(!e.reached);
        assert_eq!(code(&e), Some("upstream_unreachable"));
        // The response timeout before the connection was up (TLS handshake hung): not sent.
        let e = f(false, true).classify(false, after);
        assert!(!e.reached);
        assert_eq!(code(&e), Some("upstream_unreachable"));
        // The response timeout after sending: 504, reached.
        let e = f(false, true).classify(true, after);
        assert!(e.reached);
        assert_eq!(code(&e), Some("upstream_timeout"));
        // A connection that broke after sending: 502, reached.
        let e = f(false, false).classify(true, after);
        assert!(e.reached);
        assert_eq!(code(&e), Some("upstream_unreachable"));
    }

    #[test]
    fn plain_http_needs_opt_in() {
        let mut c = Config::default();
        c.upstream.base_url = "http://127.0.0.1:1/v1".into();
        assert!(c.problems().iter().any(|p| p.contains("allow_http")));
        c.upstream.allow_http = true;
        assert!(c.problems().is_empty());
        assert!(Upstream::new(&c).is_ok());
    }
}
