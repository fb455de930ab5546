//! Global load shedding: at most `server.max_in_flight` requests are handled at once, across all
//! connections (one semaphore shared by every clone, unlike tower's per-clone
//! `ConcurrencyLimitLayer`). A request over the limit is answered at once with 503 `overloaded`
//! and `Retry-After: 1` instead of queueing. The permit is held until the response head is ready.
//! Reads nothing.

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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::middleware::testing::{answer, error_of, text};

    /// Wait (bounded) until `n` requests are inside the inner service.
    async fn until_inside(entered: &AtomicUsize, n: usize) {
        for _ in 0..1000 {
            if entered.load(Ordering::SeqCst) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{n} requests never got inside");
    }

    #[tokio::test]
    async fn over_max_in_flight_is_503_until_a_permit_comes_back() {
        let entered = Arc::new(AtomicUsize::new(0));
        // Each request inside the inner service waits for one permit of `gate`.
        let gate = Arc::new(Semaphore::new(0));
        let (inner_entered, inner_gate) = (entered.clone(), gate.clone());
        let svc = ServiceBuilder::new()
            .layer(OverloadLayer::new(2))
            .service_fn(move |_req: Request<()>| {
                let (entered, gate) = (inner_entered.clone(), inner_gate.clone());
                async move {
                    entered.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("never closed").forget();
                    answer(StatusCode::OK)
                }
            });
        let request = || Request::builder().uri("/").body(()).unwrap();

        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(request())))
            .collect();
        until_inside(&entered, 2).await;

        let Ok(shed) = svc.clone().oneshot(request()).await;
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            shed.headers()["retry-after"],
            "1",
            "a shed answer says when to retry"
        );
        let e = error_of(shed).await;
        assert_eq!(e["code"], "overloaded");
        assert_eq!(e["type"], "server_error");
        assert_eq!(
            entered.load(Ordering::SeqCst),
            2,
            "the shed request went in"
        );

        gate.add_permits(2);
        for h in held {
            let Ok(resp) = h.await.expect("the task ran");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(text(resp).await, "inner");
        }

        // Both permits are back: two requests are admitted again.
        gate.add_permits(2);
        for _ in 0..2 {
            let Ok(resp) = svc.clone().oneshot(request()).await;
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert_eq!(entered.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn clones_share_one_limit() {
        let layer = OverloadLayer::new(1);
        let gate = Arc::new(Semaphore::new(0));
        let inner_gate = gate.clone();
        let inner = tower::service_fn(move |_req: Request<()>| {
            let gate = inner_gate.clone();
            async move {
                gate.acquire().await.expect("never closed").forget();
                answer(StatusCode::OK)
            }
        });
        // Two services from the same layer, as two connections would get.
        let first = layer.layer(inner.clone());
        let second = layer.layer(inner);
        let mut held = Box::pin(first.oneshot(Request::new(())));
        assert!(futures_util::poll!(&mut held).is_pending());
        let Ok(shed) = second.clone().oneshot(Request::new(())).await;
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(held); // a dropped request gives its permit back
        gate.add_permits(1);
        let Ok(resp) = second.oneshot(Request::new(())).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
}
