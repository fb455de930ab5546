//! The usage record of every request to the edits route, whatever its outcome.
//!
//! Opens a ledger [`Record`] (request id, time received, client address) before anything can
//! refuse the request, and shares it with the layers below through a [`Trail`] extension, which
//! they fill in (client, end user, fields, image digests, cost). When the response comes back:
//! - a request that was forwarded was handed off to the forwarding task, which completes the
//!   record after the answer (nothing to do here);
//! - any other response is a refusal: the record is written as `rejected` with the status and,
//!   from the error's [`ErrorParts`], the reason's code, param and message, and committed
//!   before the response is returned (a body that broke off mid-upload is `client_gone`);
//! - when the response future is dropped first (the caller disconnected mid-upload), a guard
//!   writes the record as `client_gone`, without blocking and without losing it.
//!
//! Only requests to the edits route are recorded; others pass through untouched. Rejects
//! nothing; reads `RequestId` and `ClientAddr`, writes `Trail`.

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use super::BoxFuture;
use super::request_id::RequestId;
use crate::body::Body;
use crate::clock::Clock;
use crate::error::{CallerLeft, ErrorParts};
use crate::extensions::ClientAddr;
use crate::ledger::store::LedgerOp;
use crate::ledger::{Ledger, Outcome, Record};
pub use crate::record::{Trail, commit, commit_detached, note_error};

/// The route whose every request is recorded (any method).
pub fn is_edits_route(path: &str) -> bool {
    matches!(path, "/v1/images/edits" | "/v1/images/edits/")
}

#[derive(Clone)]
pub struct UsageLayer {
    ledger: Ledger,
    clock: Clock,
}

impl UsageLayer {
    pub fn new(ledger: Ledger, clock: Clock) -> Self {
        UsageLayer { ledger, clock }
    }
}

impl<S> Layer<S> for UsageLayer {
    type Service = Usage<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Usage {
            inner,
            ledger: self.ledger.clone(),
            clock: self.clock.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Usage<S> {
    inner: S,
    ledger: Ledger,
    clock: Clock,
}

/// Writes the record as `client_gone` if the request future is dropped before it was written.
struct DisconnectGuard {
    trail: Trail,
    ledger: Ledger,
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.trail.take_open() {
            record.outcome = Outcome::ClientGone;
            record.reason_message =
                Some("the caller disconnected before an answer was sent".into());
            record.total_ms = Some(self.trail.elapsed_ms());
            commit_detached(&self.ledger, LedgerOp::Final(record));
        }
    }
}

impl<S, B> Service<Request<B>> for Usage<S>
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
        if !is_edits_route(req.uri().path()) {
            let mut inner = super::take_ready(&mut self.inner);
            return Box::pin(async move { inner.call(req).await });
        }
        let id = req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default();
        let mut record = Record::new(id, self.clock.now_wall());
        record.client_addr = req
            .extensions()
            .get::<ClientAddr>()
            .map(|a| a.0.to_string());
        let trail = Trail::new(record);
        req.extensions_mut().insert(trail.clone());
        let guard = DisconnectGuard {
            trail,
            ledger: self.ledger.clone(),
        };
        let mut inner = super::take_ready(&mut self.inner);
        let ledger = self.ledger.clone();
        Box::pin(async move {
            let Ok(resp) = inner.call(req).await;
            if let Some(mut record) = guard.trail.take_open() {
                record.outcome = Outcome::Rejected;
                record.status = Some(resp.status().as_u16());
                // A body that broke off mid-upload means the caller left: the answer is never
                // delivered, so this is not a refusal.
                if resp.extensions().get::<CallerLeft>().is_some() {
                    record.outcome = Outcome::ClientGone;
                    record.status = None;
                }
                if let Some(parts) = resp.extensions().get::<ErrorParts>() {
                    note_error(&mut record, parts);
                }
                record.total_ms = Some(guard.trail.elapsed_ms());
                commit(&ledger, LedgerOp::Final(record)).await;
            }
            drop(guard);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, SystemTime};

    use futures_util::FutureExt;
    use http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::error::GatewayError;
    use crate::ledger::{
        LedgerError, LedgerStore, SqliteStore, UsageQuery, UsageRow, VerifyReport,
    };
    use crate::middleware::testing::{answer, text};

    /// An in-memory SQLite store that the test reads while the ledger's writer owns it.
    #[derive(Clone)]
    struct Shared(Arc<Mutex<SqliteStore>>);

    impl Shared {
        fn lock(&self) -> MutexGuard<'_, SqliteStore> {
            self.0.lock().unwrap()
        }
        fn get(&self, id: &str) -> Option<Record> {
            self.lock().get(id).unwrap()
        }
        /// (chain entries, record rows), after checking the chain.
        fn counts(&self) -> (u64, u64) {
            let v = self.lock().verify().unwrap();
            assert!(v.is_ok(), "{v:?}");
            (v.entries, v.records)
        }
    }

    impl LedgerStore for Shared {
        fn recover(&mut self) -> Result<usize, LedgerError> {
            self.lock().recover()
        }
        fn write_batch(
            &mut self,
            ops: &[LedgerOp],
        ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
            self.lock().write_batch(ops)
        }
        fn get(&self, id: &str) -> Result<Option<Record>, LedgerError> {
            self.lock().get(id)
        }
        fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
            self.lock().usage(q)
        }
        fn export(
            &self,
            q: &UsageQuery,
            out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
        ) -> Result<(), LedgerError> {
            self.lock().export(q, out)
        }
        fn verify(&self) -> Result<VerifyReport, LedgerError> {
            self.lock().verify()
        }
    }

    fn ledger() -> (Ledger, Shared) {
        let store = Shared(Arc::new(Mutex::new(SqliteStore::open_in_memory().unwrap())));
        (Ledger::start(Box::new(store.clone()), 16).unwrap(), store)
    }

    /// 2025-01-02T03:04:05Z, standing still.
    fn clock() -> Clock {
        Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_787_045))
    }

    /// A request to `path` carrying a fresh request id and the client address 192.0.2.7:4321.
    fn request(path: &str) -> (Request<()>, String) {
        let id = RequestId::generate();
        let addr: SocketAddr = "192.0.2.7:4321".parse().unwrap();
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .extension(id.clone())
            .extension(ClientAddr(addr))
            .body(())
            .unwrap();
        (req, id.as_str().to_owned())
    }

    #[tokio::test]
    async fn a_refusal_is_committed_once_as_rejected_with_its_reason() {
        let (ledger, store) = ledger();
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(ledger.clone(), clock()))
            .service_fn(|req: Request<()>| {
                // A layer below fills in the trail, then refuses.
                let trail = req.extensions().get::<Trail>().expect("a trail").clone();
                trail.update(|r| r.client = Some("acme".into()));
                async {
                    Ok::<_, Infallible>(
                        GatewayError::field("n", "integer_below_min_value", "n is too small")
                            .into_response(),
                    )
                }
            });
        let (req, id) = request("/v1/images/edits");
        let Ok(resp) = svc.oneshot(req).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

        // Committed before the response was returned.
        let r = store.get(&id).expect("the refusal is recorded");
        assert_eq!(r.outcome, Outcome::Rejected);
        assert_eq!(r.status, Some(400));
        assert_eq!(r.reason_code.as_deref(), Some("integer_below_min_value"));
        assert_eq!(r.reason_param.as_deref(), Some("n"));
        assert_eq!(r.reason_message.as_deref(), Some("n is too small"));
        assert_eq!(r.client.as_deref(), Some("acme"));
        assert_eq!(r.client_addr.as_deref(), Some("192.0.2.7:4321"));
        assert_eq!(r.received_at.to_string(), "2025-01-02T03:04:05Z");
        assert!(r.total_ms.is_some());
        ledger.close().await.unwrap();
        assert_eq!(store.counts(), (1, 1), "written more than once");
    }

    #[tokio::test]
    async fn a_refusal_without_a_code_records_the_error_type() {
        let (ledger, store) = ledger();
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(ledger.clone(), clock()))
            .service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(GatewayError::MissingKey.into_response())
            });
        let (req, id) = request("/v1/images/edits/");
        let Ok(resp) = svc.oneshot(req).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let r = store.get(&id).expect("recorded");
        assert_eq!(r.outcome, Outcome::Rejected);
        assert_eq!(r.status, Some(401));
        assert_eq!(r.reason_code.as_deref(), Some("invalid_request_error"));
        assert_eq!(r.reason_param, None);
        ledger.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_body_that_broke_off_is_client_gone() {
        let (ledger, store) = ledger();
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(ledger.clone(), clock()))
            .service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(GatewayError::BodyIncomplete.into_response())
            });
        let (req, id) = request("/v1/images/edits");
        let Ok(resp) = svc.oneshot(req).await;
        assert!(resp.extensions().get::<CallerLeft>().is_some());
        let r = store.get(&id).expect("recorded");
        assert_eq!(r.outcome, Outcome::ClientGone);
        assert_eq!(r.status, None, "no answer was delivered");
        assert_eq!(r.reason_code.as_deref(), Some("incomplete_body"));
        ledger.close().await.unwrap();
        assert_eq!(store.counts(), (1, 1));
    }

    #[tokio::test]
    async fn a_dropped_request_is_client_gone() {
        let (ledger, store) = ledger();
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(ledger.clone(), clock()))
            .service_fn(|_req: Request<()>| {
                std::future::pending::<Result<Response<Body>, Infallible>>()
            });
        let (req, id) = request("/v1/images/edits");
        let mut fut = Box::pin(svc.oneshot(req));
        assert!(
            (&mut fut).now_or_never().is_none(),
            "the inner service answered"
        );
        assert!(store.get(&id).is_none(), "recorded before the caller left");
        drop(fut);
        // The guard queues the record without waiting; closing the ledger flushes it.
        ledger.close().await.unwrap();
        let r = store.get(&id).expect("the dropped request is recorded");
        assert_eq!(r.outcome, Outcome::ClientGone);
        assert_eq!(r.status, None);
        assert_eq!(
            r.reason_message.as_deref(),
            Some("the caller disconnected before an answer was sent")
        );
        assert_eq!(r.client_addr.as_deref(), Some("192.0.2.7:4321"));
        assert_eq!(store.counts(), (1, 1));
    }

    #[tokio::test]
    async fn a_handed_off_request_is_left_to_the_forwarding_task() {
        let (ledger, store) = ledger();
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(ledger.clone(), clock()))
            .service_fn(|req: Request<()>| {
                let record = req.extensions().get::<Trail>().unwrap().hand_off();
                assert_eq!(record.outcome, Outcome::Forwarding);
                async { answer(StatusCode::OK) }
            });
        let (req, id) = request("/v1/images/edits");
        let Ok(resp) = svc.oneshot(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        ledger.close().await.unwrap();
        assert!(
            store.get(&id).is_none(),
            "the usage layer wrote a handed-off record"
        );
        assert_eq!(store.counts(), (0, 0));
    }

    #[tokio::test]
    async fn other_paths_pass_untouched_and_unrecorded() {
        let (ledger, store) = ledger();
        let svc = ServiceBuilder::new()
            .layer(UsageLayer::new(ledger.clone(), clock()))
            .service_fn(|req: Request<()>| {
                assert!(
                    req.extensions().get::<Trail>().is_none(),
                    "a trail on {}",
                    req.uri()
                );
                async { answer(StatusCode::NOT_FOUND) }
            });
        for path in [
            "/v1/models",
            "/v1/images/generations",
            "/v1/images/edits/x",
            "/",
        ] {
            let (req, id) = request(path);
            let Ok(resp) = svc.clone().oneshot(req).await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(resp.headers()["x-inner"], "yes");
            assert_eq!(text(resp).await, "inner");
            assert!(store.get(&id).is_none(), "{path} was recorded");
        }
        ledger.close().await.unwrap();
        assert_eq!(store.counts(), (0, 0));
    }
}
