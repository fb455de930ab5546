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
        let client = req.extensions().get::<Caller>().map(|c| c.client.clone());
        let rates = self.rates.clone();
        let mut inner = super::take_ready(&mut self.inner);
        Box::pin(async move {
            if let Some(client) = client
                && let Err(e) = rates.check_client(&client).await
            {
                tracing::info!("client rate limit reached");
                return Ok(crate::error::GatewayError::from(e).into_response());
            }
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};

    use http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::clock::Clock;
    use crate::config::{ClientConfig, Config, hash_key};
    use crate::limits::rate::RateLimits;
    use crate::limits::spec::RateSpec;
    use crate::middleware::testing::{answer, error_of};

    /// Clients `a` (index 0) and `b` (index 1), each allowed 60 requests a minute, 2 at once;
    /// the clock stands still until advanced.
    fn rates() -> (Arc<dyn RateBackend>, Clock) {
        let mut c = Config::default();
        c.limits.per_client = RateSpec {
            requests_per_minute: Some(60),
            requests_burst: Some(2),
            ..Default::default()
        };
        for name in ["a", "b"] {
            c.clients.push(ClientConfig {
                name: name.into(),
                key_hash: hash_key(name),
                ..Default::default()
            });
        }
        let clock = Clock::manual(SystemTime::UNIX_EPOCH);
        (Arc::new(RateLimits::new(&c, clock.clone())), clock)
    }

    fn caller(client: &str, index: usize) -> Caller {
        Caller {
            client: client.into(),
            index,
        }
    }

    #[tokio::test]
    async fn a_client_over_its_limit_gets_429_and_others_pass() {
        let (rates, clock) = rates();
        let calls = Arc::new(AtomicUsize::new(0));
        let inner_calls = calls.clone();
        let svc = ServiceBuilder::new()
            .layer(ClientLimitLayer::new(rates))
            .service_fn(move |_req: Request<()>| {
                inner_calls.fetch_add(1, Ordering::SeqCst);
                async { answer(StatusCode::OK) }
            });
        let send = |who: Option<Caller>| {
            let mut req = Request::builder().uri("/v1/images/edits");
            if let Some(who) = who {
                req = req.extension(who);
            }
            let svc = svc.clone();
            async move {
                let Ok(resp) = svc.oneshot(req.body(()).unwrap()).await;
                resp
            }
        };

        for i in 0..2 {
            let resp = send(Some(caller("a", 0))).await;
            assert_eq!(resp.status(), StatusCode::OK, "request {i} of a");
        }
        let refused = send(Some(caller("a", 0))).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()["retry-after"], "1");
        assert_eq!(refused.headers()["retry-after-ms"], "1000");
        let e = error_of(refused).await;
        assert_eq!(e["code"], "rate_limit_exceeded");
        assert_eq!(e["type"], "requests");
        assert!(e["message"].as_str().unwrap().contains("client 'a'"), "{e}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the refused request went in"
        );

        // b has its own bucket; a request without a caller is not this layer's business.
        for who in [Some(caller("b", 1)), Some(caller("b", 1)), None] {
            let resp = send(who.clone()).await;
            assert_eq!(resp.status(), StatusCode::OK, "{who:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);

        // One request a second comes back to a.
        clock.advance(Duration::from_secs(1));
        assert_eq!(send(Some(caller("a", 0))).await.status(), StatusCode::OK);
        assert_eq!(
            send(Some(caller("a", 0))).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }
}
