//! Global load shedding: at most `server.max_in_flight` requests are handled at once, across all
//! connections (one semaphore shared by every clone, unlike tower's per-clone
//! `ConcurrencyLimitLayer`). A request over the limit is answered at once with 503 `overloaded`
//! instead of queueing. The permit is held until the response head is ready. Reads nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::BoxFuture;
use crate::body::Body;
use crate::error::GatewayError;

#[derive(Debug, Clone)]
pub struct OverloadLayer {
    permits: Arc<Semaphore>,
}

impl OverloadLayer {
    pub fn new(max_in_flight: usize) -> Self {
        OverloadLayer {
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// Share permits held elsewhere (the app state, so the number in flight can be observed).
    pub fn with_permits(permits: Arc<Semaphore>) -> Self {
        OverloadLayer { permits }
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = Overload<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Overload {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Overload<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<Request<B>> for Overload<S>
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
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!("shedding load: max_in_flight reached");
            return Box::pin(async { Ok(GatewayError::Overloaded.into_response()) });
        };
        let mut inner = super::take_ready(&mut self.inner);
        metrics::gauge!("imagegate_in_flight_requests").increment(1.0);
        Box::pin(async move {
            let resp = inner.call(req).await;
            drop(permit);
            metrics::gauge!("imagegate_in_flight_requests").decrement(1.0);
            resp
        })
    }
}
