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
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Owned by the request path.
    Open,
    /// Owned by the forwarding task, which completes it.
    HandedOff,
    /// Written.
    Done,
}

struct TrailState {
    record: Record,
    stage: Stage,
}

/// The record of one request under construction, shared by the layers that fill it in.
#[derive(Clone)]
pub struct Trail {
    state: Arc<Mutex<TrailState>>,
    started: Instant,
}

impl Trail {
    fn new(record: Record) -> Trail {
        Trail {
            state: Arc::new(Mutex::new(TrailState {
                record,
                stage: Stage::Open,
            })),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TrailState> {
        // Updates are plain field writes: a panic cannot leave the record half-changed.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fill in fields of the record.
    pub fn update(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.lock().record);
    }

    /// Milliseconds since the request arrived.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The forwarding task takes over the record: it is returned as it stands, marked
    /// `forwarding`, and this trail will not write it again.
    pub fn hand_off(&self) -> Record {
        let mut s = self.lock();
        s.stage = Stage::HandedOff;
        s.record.outcome = Outcome::Forwarding;
        s.record.clone()
    }

    /// Take the record for writing if the request path still owns it.
    fn take_open(&self) -> Option<Record> {
        let mut s = self.lock();
        if s.stage != Stage::Open {
            return None;
        }
        s.stage = Stage::Done;
        Some(s.record.clone())
    }
}

/// Write an error's status and reason into a record (the code, or the error type when the
/// error has no code, e.g. a missing key).
pub fn note_error(record: &mut Record, parts: &ErrorParts) {
    if record.outcome != Outcome::ClientGone {
        record.status = Some(parts.status.as_u16());
    }
    record.reason_code = Some(parts.code.unwrap_or(parts.kind).to_owned());
    record.reason_param = parts.param.clone();
    record.reason_message = Some(parts.message.clone());
}

/// Write a finished record: the one place where a request's metrics are observed and its
/// final ledger write is made. Waits until the record is committed (or deferred: the writer
/// keeps and retries it).
pub async fn commit(ledger: &Ledger, op: LedgerOp) {
    crate::metrics::request_finished(op.record());
    let started = std::time::Instant::now();
    if let Err(e) = ledger.finish(op).await {
        tracing::warn!(error = %e, "a finished record is not committed yet");
    }
    metrics::histogram!("imagegate_ledger_write_seconds").record(started.elapsed().as_secs_f64());
    metrics::gauge!("imagegate_ledger_queue_depth").set(ledger.queue_depth() as f64);
}

/// [`commit`] for paths that cannot wait (drop guards, a refused `forwarding` record): the
/// record is queued and the writer keeps it until the store takes it.
pub fn commit_detached(ledger: &Ledger, op: LedgerOp) {
    crate::metrics::request_finished(op.record());
    ledger.finish_detached(op);
}

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
