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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::middleware::testing::answer;

    /// Sends `req` through a request-id layer over an inner service that answers with
    /// `upstream_id` as `x-request-id` when given; returns the response and the id the inner
    /// service saw.
    async fn through(
        req: Request<()>,
        upstream_id: Option<&'static str>,
    ) -> (Response<Body>, Option<RequestId>) {
        let seen = Arc::new(Mutex::new(None));
        let inner_seen = seen.clone();
        let svc = ServiceBuilder::new()
            .layer(RequestIdLayer)
            .service_fn(move |req: Request<()>| {
                *inner_seen.lock().unwrap() = req.extensions().get::<RequestId>().cloned();
                async move {
                    let mut resp = answer(StatusCode::CREATED)?;
                    if let Some(id) = upstream_id {
                        resp.headers_mut()
                            .insert("x-request-id", HeaderValue::from_static(id));
                    }
                    Ok(resp)
                }
            });
        let Ok(resp) = svc.oneshot(req).await;
        let seen = seen.lock().unwrap().clone();
        (resp, seen)
    }

    fn header<'a>(resp: &'a Response<Body>, name: &str) -> &'a str {
        resp.headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name}"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn the_gateway_id_is_in_both_headers_and_the_extension() {
        let (resp, seen) = through(Request::new(()), None).await;
        let id = seen.expect("the inner service got a RequestId");
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(&resp, "x-imagegate-request-id"), id.as_str());
        assert_eq!(header(&resp, "x-request-id"), id.as_str());
        let hex = id.as_str().strip_prefix("req_").expect("req_ prefix");
        assert_eq!(hex.len(), 32, "{id:?}");
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{id:?}"
        );
        assert_eq!(
            resp.headers()["x-inner"],
            "yes",
            "the inner response was kept"
        );
    }

    #[tokio::test]
    async fn an_id_sent_by_the_caller_is_replaced() {
        let req = Request::builder()
            .header("x-request-id", "req_chosen_by_the_caller")
            .header("x-imagegate-request-id", "req_forged")
            .body(())
            .unwrap();
        let (resp, seen) = through(req, None).await;
        let id = seen.unwrap();
        assert_ne!(id.as_str(), "req_chosen_by_the_caller");
        assert_ne!(id.as_str(), "req_forged");
        assert_eq!(header(&resp, "x-request-id"), id.as_str());
        assert_eq!(header(&resp, "x-imagegate-request-id"), id.as_str());
    }

    #[tokio::test]
    async fn the_upstream_id_stays_in_x_request_id() {
        let (resp, seen) = through(Request::new(()), Some("req_upstream_42")).await;
        let id = seen.unwrap();
        assert_eq!(header(&resp, "x-request-id"), "req_upstream_42");
        assert_eq!(header(&resp, "x-imagegate-request-id"), id.as_str());
        assert_eq!(resp.headers().get_all("x-request-id").iter().count(), 1);
    }

    #[tokio::test]
    async fn every_request_gets_a_new_id() {
        let (first, _) = through(Request::new(()), None).await;
        let (second, _) = through(Request::new(()), None).await;
        assert_ne!(
            header(&first, "x-imagegate-request-id"),
            header(&second, "x-imagegate-request-id")
        );
    }
}
