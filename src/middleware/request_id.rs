//! Request ids and the per-request tracing span.
//!
//! Gives every request a fresh id (`req_` + 32 hex digits; ids sent by callers are ignored, so
//! the ledger's ids are unique), stores it as a [`RequestId`] extension, runs the inner service
//! inside a span carrying the id, and stamps the response: `x-imagegate-request-id` always holds
//! the gateway's id, and `x-request-id` holds the upstream's id when the answer came from the
//! upstream, the gateway's id otherwise. Logs one line per finished request. Rejects nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use super::BoxFuture;
use crate::body::Body;

/// The header that always carries the gateway's own id (`x-request-id` carries the upstream's
/// when the answer came from upstream).
pub static GATEWAY_REQUEST_ID: HeaderName = HeaderName::from_static("x-imagegate-request-id");

/// The gateway's id for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    pub fn generate() -> RequestId {
        RequestId(format!("req_{}", uuid::Uuid::new_v4().simple()).into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = RequestId::generate();
        let span = tracing::info_span!(
            "request",
            id = %id.as_str(),
            method = %req.method(),
            path = %req.uri().path(),
            client = tracing::field::Empty,
            user = tracing::field::Empty,
        );
        req.extensions_mut().insert(id.clone());
        let mut inner = super::take_ready(&mut self.inner);
        let started = Instant::now();
        Box::pin(
            async move {
                let Ok(mut resp) = inner.call(req).await;
                let value = HeaderValue::from_str(id.as_str()).expect("request ids are ASCII");
                let headers = resp.headers_mut();
                headers.insert(&GATEWAY_REQUEST_ID, value.clone());
                if !headers.contains_key("x-request-id") {
                    headers.insert("x-request-id", value);
                }
                tracing::info!(
                    status = resp.status().as_u16(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "request finished"
                );
                Ok(resp)
            }
            .instrument(span),
        )
    }
}
