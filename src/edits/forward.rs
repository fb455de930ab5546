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
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::cut_through::Verdict;
use super::relay::{ChannelBody, ImageCounter, Observed, RelayTimeouts, Watch, pump};
use super::reserve::ReservationGuard;
use crate::BoxFuture;
use crate::answer::{JsonAnswerScanner, SseScanner};
use crate::body::Body;
use crate::edit::canonical::CanonicalBody;
use crate::error::GatewayError;
use crate::ledger::CostBasis;
use crate::ledger::store::LedgerOp;
use crate::ledger::{Ledger, Outcome, Record};
use crate::pricing::{Usage, cost_micros_sum};
use crate::record::{Trail, commit, commit_detached, note_error};
use crate::upstream::{SendError, Sent, Upstream, passed_headers};

/// What forwarding needs, built once at start.
#[derive(Clone)]
pub struct Forwarder {
    pub upstream: Arc<Upstream>,
    /// Longest silence of each side of the relay.
    pub timeouts: RelayTimeouts,
    /// Forwarding tasks running at once (they outlive their connections and the in-flight
    /// limit); a request that finds none free is refused 503 before forwarding.
    pub slots: Arc<Semaphore>,
    pub ledger: Ledger,
    /// Forwarding tasks, which outlive their connections; shutdown waits for them.
    pub tasks: TaskTracker,
    /// `upstream.cut_through`: the body may go upstream while its images are checked.
    pub cut_through: bool,
}

impl Forwarder {
    /// Forward in a task of its own and stream the answer back.
    pub async fn forward(
        &self,
        canonical: CanonicalBody,
        answer: Expect,
        reservation: ReservationGuard,
        trail: Trail,
    ) -> Result<Response<Body>, GatewayError> {
        self.forward_checking(canonical, answer, reservation, trail, None)
            .await
    }

    /// [`Forwarder::forward`] of a body whose check may still run (cut-through, see
    /// [`super::cut_through`]).
    pub async fn forward_checking(
        &self,
        canonical: CanonicalBody,
        answer: Expect,
        reservation: ReservationGuard,
        trail: Trail,
        check: Option<BoxFuture<Verdict>>,
    ) -> Result<Response<Body>, GatewayError> {
        if !self.upstream.has_key() {
            reservation.refund().await;
            return Err(GatewayError::UpstreamKeyMissing);
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!("every forwarding slot is taken; refusing before forwarding");
            reservation.refund().await;
            return Err(GatewayError::Overloaded);
        };
        // From here on the task owns the record and the reservation. It is spawned before the
        // first await, so a caller that disconnects now cannot leave a record behind unwritten.
        let record = trail.hand_off();
        let (head_tx, head_rx) = oneshot::channel();
        let span = tracing::Span::current();
        let this = self.clone();
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                // Held until the record is complete and the answer relayed.
                let _slot = slot;
                this.run(
                    canonical,
                    check,
                    answer,
                    reservation,
                    trail,
                    record,
                    head_tx,
                )
                .await
            },
            span,
        ));
        let (parts, body) = head_rx.await.map_err(|_| GatewayError::Internal)??;
        let mut resp = Response::new(Body::new(body));
        *resp.status_mut() = parts.status;
        *resp.headers_mut() = passed_headers(&parts.headers);
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH)
            && !is_event_stream(&parts.headers)
        {
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
    #[allow(clippy::too_many_arguments)]
    async fn run(
        self,
        canonical: CanonicalBody,
        check: Option<BoxFuture<Verdict>>,
        answer: Expect,
        reservation: ReservationGuard,
        trail: Trail,
        record: Record,
        mut head_tx: oneshot::Sender<Result<(http::response::Parts, ChannelBody), GatewayError>>,
    ) {
        let mut reservation = reservation;
        // Completes the record if this task ends without doing so (a panic).
        let mut record = Unfinished {
            record: Some(record),
            begun: false,
            sent: false,
            settled: false,
            ledger: self.ledger.clone(),
            started: trail.clone(),
        };
        if let Err(e) = self.ledger.begin_forwarding((*record).clone()).await {
            tracing::error!(error = %e, "ledger refused the forwarding record; not forwarding");
            reservation.refund().await;
            let refusal = GatewayError::LedgerUnavailable;
            record.outcome = Outcome::Rejected;
            note_error(&mut record, &refusal.parts());
            record.total_ms = Some(trail.elapsed_ms());
            // Kept by the writer and retried until the store takes it again.
            commit_detached(&self.ledger, LedgerOp::Final(record.take()));
            let _ = head_tx.send(Err(refusal));
            return;
        }
        record.begun = true;
        if head_tx.is_closed() {
            // The caller left while the record was committed: nothing has gone upstream
            // yet, so nothing is spent.
            reservation.refund().await;
            record.outcome = Outcome::ClientGone;
            record.reason_message =
                Some("the caller disconnected before the request was forwarded".into());
            record.images_returned = Some(0);
            self.complete(record.take(), &trail).await;
            return;
        }
        // From here on the upstream may do (and bill) the work: a reservation left unsettled
        // (a panic) is charged in full, as the record then says.
        reservation.charge_if_dropped();
        record.sent = true;
        let sent = std::time::Instant::now();
        let client = record.client.clone();
        let upstream = match check {
            None => self.upstream.send(canonical, client.as_deref()).await,
            Some(check) => {
                let sending =
                    self.send_while_checking(canonical, client, check, &mut head_tx, &mut record);
                match sending.await {
                    Ok(upstream) => upstream,
                    Err(stop) => {
                        reservation.refund().await;
                        record.settled = true;
                        let error = stop.note(&mut record);
                        self.complete(record.take(), &trail).await;
                        if let Some(e) = error {
                            let _ = head_tx.send(Err(e));
                        }
                        return;
                    }
                }
            }
        };
        #[cfg(any(test, feature = "testkit"))]
        if record.user.as_deref() == Some(crate::testkit::PANIC_AFTER_SEND_USER) {
            panic!("testkit: a forwarding task panics after the upstream answered");
        }
        match upstream {
            Err(SendError {
                error: e,
                reached,
                key,
            }) => {
                record.upstream_key = key.map(|k| k.to_string());
                record.outcome = match e {
                    GatewayError::UpstreamTimeout { .. } => Outcome::UpstreamTimeout,
                    _ => Outcome::UpstreamError,
                };
                note_error(&mut record, &e.parts());
                record.images_returned = Some(0);
                record.upstream_ms = Some(sent.elapsed().as_millis() as u64);
                if reached {
                    // The upstream may have done (and billed) the work: without an answer
                    // saying otherwise, the whole reservation is charged.
                    record.cost_settled_micros = reservation.charge_all().await;
                    record.cost_basis = Some(CostBasis::Estimated);
                } else {
                    // Nothing was sent: nothing is spent.
                    reservation.refund().await;
                    record.cost_settled_micros = 0;
                }
                record.settled = true;
                self.complete(record.take(), &trail).await;
                let _ = head_tx.send(Err(e));
            }
            Ok(Sent { response, key }) => {
                record.upstream_key = Some(key.to_string());
                let (parts, body) = response.into_parts();
                let status = parts.status;
                record.status = Some(status.as_u16());
                record.upstream_status = Some(status.as_u16());
                record.upstream_request_id = parts
                    .headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let events = is_event_stream(&parts.headers);
                let watch = if !status.is_success() {
                    Watch::Nothing
                } else {
                    answer.watch(events)
                };
                let (tx, rx) = mpsc::channel(8);
                // An event stream may gain a closing error event (S4): no fixed length.
                let hint = if events {
                    None
                } else {
                    http_body::Body::size_hint(&body).exact()
                };
                let _ = head_tx.send(Ok((
                    parts,
                    ChannelBody {
                        rx,
                        remaining: hint,
                    },
                )));
                let (outcome, tail, observed) = pump(body, tx, watch, self.timeouts).await;
                let bill = if status.is_success() && !outcome.complete {
                    // The upstream accepted the work but its answer broke off or stalled: it
                    // does not say what was done, so the whole reservation is charged.
                    Bill::whole(&observed, &reservation)
                } else {
                    Bill::of(&observed, &reservation)
                };
                let images = bill.images;
                record.cost_settled_micros =
                    reservation.settle(bill.charged_images, bill.micros).await;
                record.settled = true;
                record.images_returned = Some(images);
                record.upstream_ms = Some(sent.elapsed().as_millis() as u64);
                bill.note(&mut record);
                let broke = match &observed {
                    Observed::Events(o) => !outcome.complete || o.end.needs_error_event(),
                    _ => !outcome.complete,
                };
                record.outcome = if outcome.caller_gone {
                    record.reason_message =
                        Some("the caller disconnected before the whole answer was sent".into());
                    Outcome::ClientGone
                } else if outcome.stalled {
                    record.reason_message = Some(format!(
                        "the upstream sent nothing for {} seconds mid-answer",
                        self.timeouts.upstream_idle.as_secs()
                    ));
                    Outcome::UpstreamTimeout
                } else if broke {
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
                self.complete(record.take(), &trail).await;
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

/// The record of a forwarding task until it is handed to the ledger. If the task ends
/// without doing so (it panicked), dropping this commits it: a request never begun as
/// `rejected` (nothing spent; its reservation is refunded), a begun one as `upstream_error`
/// charged what its reservation is: what it was settled to, else in full once sent (the
/// upstream may have done the work; see [`ReservationGuard::charge_if_dropped`]), else nothing.
struct Unfinished {
    record: Option<Record>,
    /// The `forwarding` record is committed.
    begun: bool,
    /// The request is going (or went) upstream: unsettled, its reservation is charged in full.
    sent: bool,
    /// The reservation is settled and `cost_settled_micros` says to what.
    settled: bool,
    ledger: Ledger,
    started: Trail,
}

impl Unfinished {
    /// The record, handed over for committing.
    fn take(&mut self) -> Record {
        self.record.take().expect("the record is committed once")
    }
}

impl std::ops::Deref for Unfinished {
    type Target = Record;
    fn deref(&self) -> &Record {
        self.record.as_ref().expect("the record is committed once")
    }
}

impl std::ops::DerefMut for Unfinished {
    fn deref_mut(&mut self) -> &mut Record {
        self.record.as_mut().expect("the record is committed once")
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        tracing::error!(
            begun = self.begun,
            "the forwarding task ended without completing its record (a panic); completing it"
        );
        metrics::counter!("imagegate_forwarding_task_failures_total").increment(1);
        note_error(&mut record, &GatewayError::Internal.parts());
        record.reason_message = Some("the forwarding task failed (internal error)".into());
        record.total_ms = Some(self.started.elapsed_ms());
        let op = if self.begun {
            record.outcome = Outcome::UpstreamError;
            // What the quota is charged too: the settlement made, else the whole reservation
            // once sent (`ReservationGuard::charge_if_dropped`), else nothing (a refund).
            if !self.settled {
                record.cost_settled_micros = if self.sent {
                    record.cost_basis = Some(CostBasis::Estimated);
                    record.cost_reserved_micros
                } else {
                    0
                };
            }
            record.images_returned.get_or_insert(0);
            LedgerOp::Complete(record)
        } else {
            record.outcome = Outcome::Rejected;
            record.cost_settled_micros = 0;
            LedgerOp::Final(record)
        };
        commit_detached(&self.ledger, op);
    }
}

/// The kind of answer a request expects.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// dall-e-2: a JSON list of images.
    Images,
    /// gpt-image: JSON with `usage`, or (when the upstream answers `text/event-stream`) events
    /// of which one line may be `line_limit` bytes.
    GptImage { line_limit: usize },
}

impl Expect {
    fn watch(self, events: bool) -> Watch {
        match (self, events) {
            (Expect::Images, _) => Watch::Images(ImageCounter::default()),
            (Expect::GptImage { line_limit }, true) => Watch::Events(SseScanner::new(line_limit)),
            (Expect::GptImage { .. }, false) => Watch::Json(JsonAnswerScanner::new()),
        }
    }
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// What an answer costs and what the record says of it (§7, B1–B6).
#[derive(Debug, Default)]
struct Bill {
    /// Images returned (at most the request's `n`).
    images: u32,
    /// Images charged against the quota.
    charged_images: u32,
    micros: i64,
    basis: Option<CostBasis>,
    usages: Vec<Usage>,
}

impl Bill {
    /// The whole reservation, for an answer that does not say what was done; the images
    /// counted so far (capped at `n`) are still reported as returned.
    fn whole(observed: &Observed, reservation: &ReservationGuard) -> Bill {
        let seen = Bill::of(observed, reservation);
        Bill {
            images: seen.images,
            charged_images: reservation.reserved_images(),
            micros: reservation.reserved_micros(),
            basis: Some(CostBasis::Estimated),
            usages: seen.usages,
        }
    }

    /// The bill of an answer, its images capped at the reserved `n` (an upstream that returns
    /// more than was asked cannot make the gateway charge more).
    fn of(observed: &Observed, reservation: &ReservationGuard) -> Bill {
        let (images, usages): (u32, Vec<Usage>) = match observed {
            // An error answer costs nothing (B2).
            Observed::Nothing => return Bill::default(),
            Observed::Images(n) => {
                let images = u32::try_from(*n)
                    .unwrap_or(u32::MAX)
                    .min(reservation.reserved_images());
                return Bill {
                    images,
                    charged_images: images,
                    micros: reservation.cost_of_images(images),
                    basis: Some(CostBasis::PerImage),
                    usages: Vec::new(),
                };
            }
            Observed::Json(a) => (
                u32::try_from(a.items).unwrap_or(u32::MAX),
                a.usage
                    .iter()
                    .filter_map(|u| u.as_ref().ok())
                    .cloned()
                    .collect(),
            ),
            Observed::Events(o) => (o.summary.completed, o.summary.usages.clone()),
        };
        let images = images.min(reservation.reserved_images());
        let Some(prices) = reservation.token_prices() else {
            return Bill {
                images,
                charged_images: images,
                micros: reservation.cost_of_images(images),
                basis: Some(CostBasis::PerImage),
                usages,
            };
        };
        if usages.is_empty() {
            // No usage: what was reserved is charged (B3).
            return Bill {
                images,
                charged_images: images,
                micros: reservation.reserved_micros(),
                basis: Some(CostBasis::Estimated),
                usages,
            };
        }
        match cost_micros_sum(usages.iter(), prices) {
            Ok(m) => Bill {
                images,
                charged_images: images,
                micros: i64::try_from(m).unwrap_or(i64::MAX),
                basis: Some(CostBasis::Usage),
                usages,
            },
            Err(_) => Bill {
                images,
                charged_images: images,
                micros: reservation.reserved_micros(),
                basis: Some(CostBasis::Estimated),
                usages,
            },
        }
    }

    /// Write the usage and cost basis into the record.
    fn note(&self, record: &mut Record) {
        record.cost_basis = self.basis;
        if self.usages.is_empty() {
            return;
        }
        let sum = |f: fn(&Usage) -> u64| Some(self.usages.iter().map(f).sum::<u64>());
        record.input_tokens = sum(|u| u.input_tokens);
        record.input_text_tokens = sum(|u| u.input_text_tokens);
        record.input_image_tokens = sum(|u| u.input_image_tokens);
        record.output_tokens = sum(|u| u.output_tokens);
        record.total_tokens = sum(|u| u.total_tokens.unwrap_or(u.input_tokens + u.output_tokens));
        let raws: Vec<&str> = self.usages.iter().map(|u| u.raw.as_str()).collect();
        record.usage_extra = Some(if raws.len() == 1 {
            raws[0].to_owned()
        } else {
            format!("[{}]", raws.join(","))
        });
    }
}
