//! Forward, relay and settle phases: the `forwarding` record is committed, the canonical body goes
//! upstream, the answer is relayed, the reservation settled and the record completed, all in a
//! task of its own that outlives the caller's connection.
//!
//! The `forwarding` record is committed before any byte goes upstream; if the ledger cannot
//! take it, nothing is forwarded (503) and the refusal is recorded. The task then owns the
//! record and the quota reservation: it reads the answer to its end (even when the caller
//! left), settles the reservation with the images actually returned, and commits the completed
//! record before the caller's body ends, so a caller that saw the whole answer can find its
//! record.

use std::sync::Arc;

use http::{HeaderValue, Response, header};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::relay::{ChannelBody, pump};
use super::reserve::ReservationGuard;
use crate::body::Body;
use crate::edit::canonical::CanonicalBody;
use crate::error::GatewayError;
use crate::ledger::store::LedgerOp;
use crate::ledger::{Ledger, Outcome, Record};
use crate::middleware::usage::{Trail, commit, commit_detached, note_error};
use crate::upstream::{Upstream, passed_headers};

/// What forwarding needs, built once at start.
#[derive(Clone)]
pub struct Forwarder {
    pub upstream: Arc<Upstream>,
    pub ledger: Ledger,
    /// Forwarding tasks, which outlive their connections; shutdown waits for them.
    pub tasks: TaskTracker,
}

impl Forwarder {
    /// Forward in a task of its own and stream the answer back.
    pub async fn forward(
        &self,
        canonical: CanonicalBody,
        reservation: ReservationGuard,
        trail: Trail,
    ) -> Result<Response<Body>, GatewayError> {
        if !self.upstream.has_key() {
            reservation.refund().await;
            return Err(GatewayError::UpstreamKeyMissing);
        }
        // From here on the task owns the record and the reservation. It is spawned before the
        // first await, so a caller that disconnects now cannot leave a record behind unwritten.
        let record = trail.hand_off();
        let (head_tx, head_rx) = oneshot::channel();
        let span = tracing::Span::current();
        let this = self.clone();
        self.tasks.spawn(tracing::Instrument::instrument(
            this.run(canonical, reservation, trail, record, head_tx),
            span,
        ));
        let (parts, body) = head_rx.await.map_err(|_| GatewayError::Internal)??;
        let mut resp = Response::new(Body::new(body));
        *resp.status_mut() = parts.status;
        *resp.headers_mut() = passed_headers(&parts.headers);
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, len.clone());
        }
        if !resp.headers().contains_key(header::CONTENT_TYPE) {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        Ok(resp)
    }

    /// The forwarding task.
    async fn run(
        self,
        canonical: CanonicalBody,
        reservation: ReservationGuard,
        trail: Trail,
        mut record: Record,
        head_tx: oneshot::Sender<Result<(http::response::Parts, ChannelBody), GatewayError>>,
    ) {
        if let Err(e) = self.ledger.begin_forwarding(record.clone()).await {
            tracing::error!(error = %e, "ledger refused the forwarding record; not forwarding");
            reservation.refund().await;
            let refusal = GatewayError::LedgerUnavailable;
            record.outcome = Outcome::Rejected;
            note_error(&mut record, &refusal.parts());
            record.total_ms = Some(trail.elapsed_ms());
            // Kept by the writer and retried until the store takes it again.
            commit_detached(&self.ledger, LedgerOp::Final(record));
            let _ = head_tx.send(Err(refusal));
            return;
        }
        if head_tx.is_closed() {
            // The caller left while the record was committed: nothing has gone upstream
            // yet, so nothing is spent.
            reservation.refund().await;
            record.outcome = Outcome::ClientGone;
            record.reason_message =
                Some("the caller disconnected before the request was forwarded".into());
            record.images_returned = Some(0);
            self.complete(record, &trail).await;
            return;
        }
        let sent = std::time::Instant::now();
        match self.upstream.send(canonical).await {
            Err(e) => {
                record.outcome = match e {
                    GatewayError::UpstreamTimeout { .. } => Outcome::UpstreamTimeout,
                    _ => Outcome::UpstreamError,
                };
                note_error(&mut record, &e.parts());
                record.images_returned = Some(0);
                record.upstream_ms = Some(sent.elapsed().as_millis() as u64);
                reservation.refund().await;
                self.complete(record, &trail).await;
                let _ = head_tx.send(Err(e));
            }
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let status = parts.status;
                record.status = Some(status.as_u16());
                record.upstream_status = Some(status.as_u16());
                record.upstream_request_id = parts
                    .headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let (tx, rx) = mpsc::channel(8);
                let hint = http_body::Body::size_hint(&body).exact();
                let _ = head_tx.send(Ok((
                    parts,
                    ChannelBody {
                        rx,
                        remaining: hint,
                    },
                )));
                let (outcome, tail) = pump(body, tx, status.is_success()).await;
                let images = outcome.images as u32;
                let cost = reservation.cost_of_images(images);
                record.cost_settled_micros = reservation.settle(images, cost).await;
                record.images_returned = Some(images);
                record.upstream_ms = Some(sent.elapsed().as_millis() as u64);
                record.outcome = if outcome.caller_gone {
                    record.reason_message =
                        Some("the caller disconnected before the whole answer was sent".into());
                    Outcome::ClientGone
                } else if !outcome.complete {
                    record.reason_message = Some("the upstream answer broke off".into());
                    Outcome::UpstreamError
                } else {
                    Outcome::Answered
                };
                tracing::info!(
                    images,
                    caller_gone = outcome.caller_gone,
                    "upstream answer relayed"
                );
                self.complete(record, &trail).await;
                // Only now does the caller get the end of the answer.
                tail.finish().await;
            }
        }
    }

    /// Commit the completed record of a forwarded request.
    async fn complete(&self, mut record: Record, trail: &Trail) {
        record.total_ms = Some(trail.elapsed_ms());
        commit(&self.ledger, LedgerOp::Complete(record)).await;
    }
}
