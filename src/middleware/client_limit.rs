//! The per-client request limit, checked right after authentication and before the body is
//! read, so a client over its limit costs the gateway almost nothing. Over the limit → 429
//! `rate_limit_exceeded` (type `requests`) with `Retry-After` and `retry-after-ms`. Reads the
//! [`Caller`] extension; writes nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use super::BoxFuture;
use super::auth::Caller;
use crate::body::Body;
use crate::limits::rate::RateBackend;

#[derive(Clone)]
pub struct ClientLimitLayer {
    rates: Arc<dyn RateBackend>,
}

impl ClientLimitLayer {
    pub fn new(rates: Arc<dyn RateBackend>) -> Self {
        ClientLimitLayer { rates }
    }
}

impl<S> Layer<S> for ClientLimitLayer {
    type Service = ClientLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientLimit {
            inner,
            rates: self.rates.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ClientLimit<S> {
    inner: S,
    rates: Arc<dyn RateBackend>,
}

impl<S, B> Service<Request<B>> for ClientLimit<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(caller) = req.extensions().get::<Caller>()
            && let Err(e) = self.rates.check_client(&caller.client)
        {
            tracing::info!("client rate limit reached");
            return Box::pin(async move { Ok(e.into_response()) });
        }
        let mut inner = super::take_ready(&mut self.inner);
        Box::pin(async move { inner.call(req).await })
    }
}
