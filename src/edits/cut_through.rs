//! Cut-through (`upstream.cut_through`): the canonical body goes upstream while the images are
//! still being checked, its last chunk held back until they passed ([`crate::body::gate`]).
//!
//! Taken only when the canonical body cannot depend on the check: no file may be converted
//! ([`png_check::may_convert`](crate::edit::png_check::may_convert), from IHDR and the chunks
//! before the image data) and the validated cache does not already know every file (then there
//! is nothing to wait for). The check says so right after taking the digests
//! ([`Early`](super::check_images::Early)); otherwise the normal path runs.
//!
//! The rules of the normal path hold:
//! - the `forwarding` record is committed before the first byte goes upstream;
//! - a failed check shuts the gate: the upload is aborted before its last byte, the caller gets
//!   the check's own error, the record is completed `rejected` with it, the reservation is
//!   refunded, and the key is not blamed ([`Upstream::send`](crate::upstream::Upstream::send));
//! - an upstream that answers (or fails) before the check ended waits for it: a failed check
//!   wins; a passed one relays the answer (a failure then counts as not reached: the upstream
//!   never had the whole request);
//! - another key is tried only once the check passed (the whole body is then known);
//! - a caller that leaves before the check ended aborts the upload and the decode: recorded
//!   `client_gone`, nothing spent.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::check_images::{
    Checked, Early, FileDigest, check_images, note_files, start_check_images,
};
use super::forward::{Expect, Forwarder};
use super::read_body::BudgetHold;
use super::reserve::ReservationGuard;
use super::validated::ValidatedCache;
use crate::BoxFuture;
use crate::body::Body;
use crate::body::gate::gate;
use crate::edit::ImageEdit;
use crate::edit::canonical::{self, CanonicalBody};
use crate::edit::png_check::PngRules;
use crate::error::GatewayError;
use crate::ledger::{Outcome, Record};
use crate::record::{Trail, note_error};
use crate::upstream::{SendError, Sent};

/// The check-images phase: its result, or (cut-through) the check still running while the body
/// may go upstream.
pub enum Checking {
    Done(Checked),
    Running(Running),
}

/// A check that runs on, and the digests of its files (for the `forwarding` record).
pub struct Running {
    image: FileDigest,
    mask: Option<FileDigest>,
    check: BoxFuture<Checked>,
}

/// The check-images phase; with `cut_through`, it returns as soon as the check tells that the
/// body may go upstream while it decodes.
pub async fn check_or_start(
    permits: &Arc<tokio::sync::Semaphore>,
    validated: &Arc<ValidatedCache>,
    rules: &PngRules,
    edit: &ImageEdit,
    cut_through: bool,
) -> Checking {
    if !cut_through {
        return Checking::Done(check_images(permits, validated, rules, edit).await);
    }
    let (tx, rx) = oneshot::channel();
    let mut check: BoxFuture<Checked> = Box::pin(start_check_images(
        permits,
        validated,
        rules,
        edit,
        Some(tx),
    ));
    let early = tokio::select! {
        biased;
        early = rx => early.ok(),
        checked = &mut check => return Checking::Done(checked),
    };
    match early {
        Some(Early::Overlap(image, mask)) => Checking::Running(Running { image, mask, check }),
        _ => Checking::Done(check.await),
    }
}

/// Canonical body → forward while checking → relay → settle and record (dall-e-2 profile).
/// The files go as received: the check cannot change them.
pub async fn forward_dall_e_2(
    forwarder: &Forwarder,
    edit: ImageEdit,
    running: Running,
    held: BudgetHold,
    reservation: ReservationGuard,
    trail: Trail,
    started: std::time::Instant,
) -> Result<http::Response<Body>, GatewayError> {
    let Running { image, mask, check } = running;
    trail.update(|r| note_files(r, Some(&image), mask.as_ref()));
    let mut canonical = canonical::encode(
        &edit,
        edit.image.bytes.clone(),
        edit.mask.as_ref().map(|m| m.bytes.clone()),
    );
    canonical.body = canonical.body.holding(Arc::new(held));
    drop(edit);
    let verdict: BoxFuture<Verdict> = Box::pin(async move {
        let checked = check.await;
        if checked.result.is_ok() {
            metrics::histogram!("imagegate_validation_duration_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        Verdict {
            result: checked.result.map(drop),
            note: Box::new(move |r: &mut Record| {
                if let Some((image, mask)) = &checked.digests {
                    note_files(r, Some(image), mask.as_ref());
                }
            }),
        }
    });
    forwarder
        .forward_checking(canonical, Expect::Images, reservation, trail, Some(verdict))
        .await
}

/// The end of a check that ran while its body went upstream.
pub struct Verdict {
    pub result: Result<(), GatewayError>,
    /// Writes what the check learnt of the files into the record.
    pub note: Box<dyn FnOnce(&mut Record) + Send>,
}

/// Why a cut-through send stopped short of the upstream's answer.
pub enum Stop {
    /// The check failed with this error: the upload was aborted before its last byte.
    Refused(GatewayError),
    /// The caller left before the check ended: the upload and the decode were stopped.
    CallerGone,
}

impl Stop {
    /// Write the outcome into the record (nothing spent); the error the caller gets (none: the
    /// caller left).
    pub(super) fn note(self, record: &mut Record) -> Option<GatewayError> {
        record.cost_settled_micros = 0;
        match self {
            Stop::Refused(e) => {
                record.outcome = Outcome::Rejected;
                note_error(record, &e.parts());
                Some(e)
            }
            Stop::CallerGone => {
                record.outcome = Outcome::ClientGone;
                record.reason_message = Some(
                    "the caller disconnected while its request was checked; the upload was cut short"
                        .into(),
                );
                record.images_returned = Some(0);
                None
            }
        }
    }
}

impl Forwarder {
    /// Send `canonical` upstream gated by `check` (see the module): the upstream's answer or
    /// failure once the check passed, else why it stopped. The check's findings are written
    /// into `record` when it ends.
    pub(super) async fn send_while_checking<T>(
        &self,
        canonical: CanonicalBody,
        client: Option<String>,
        mut check: BoxFuture<Verdict>,
        caller: &mut oneshot::Sender<T>,
        record: &mut Record,
    ) -> Result<Result<Sent, SendError>, Stop> {
        let (opener, gate) = gate();
        let canonical = CanonicalBody {
            body: canonical.body.gated(gate),
            ..canonical
        };
        let upstream = self.upstream.clone();
        let mut send: BoxFuture<Result<Sent, SendError>> =
            Box::pin(async move { upstream.send(canonical, client.as_deref()).await });
        // What the upstream said before the check ended, if it did.
        let mut early = None;
        // A check that ended already (a fault early in the data): nothing goes upstream.
        let ended = futures_util::FutureExt::now_or_never(&mut check);
        let started = ended.is_none();
        let verdict = if let Some(verdict) = ended {
            verdict
        } else {
            loop {
                tokio::select! {
                    verdict = &mut check => break verdict,
                    sent = &mut send, if early.is_none() => early = Some(sent),
                    _ = caller.closed(), if early.is_none() => {
                        tracing::info!("the caller left during the check: aborting the upload");
                        counted("caller_gone");
                        drop((opener, check));
                        self.finish_abort(send);
                        return Err(Stop::CallerGone);
                    }
                }
            }
        };
        (verdict.note)(record);
        match verdict.result {
            Err(e) => {
                tracing::info!("the check failed: aborting the upload before its last byte");
                counted("refused");
                drop(opener);
                if started && early.is_none() {
                    self.finish_abort(send);
                }
                Err(Stop::Refused(e))
            }
            Ok(()) => {
                opener.open();
                counted("passed");
                Ok(match early {
                    // It failed before the last byte could go: the upstream never had the
                    // whole request.
                    Some(Err(e)) => Err(SendError {
                        reached: false,
                        ..e
                    }),
                    Some(Ok(sent)) => Ok(sent),
                    None => send.await,
                })
            }
        }
    }

    /// Drive an aborted send to its end in a tracked task, so the upload is cut and its
    /// connection closed while the caller is answered.
    fn finish_abort(&self, send: BoxFuture<Result<Sent, SendError>>) {
        self.tasks.spawn(async move {
            let _ = send.await;
        });
    }
}

/// `imagegate_cut_through_total{result}`: requests forwarded while checked, by how their check
/// ended.
fn counted(result: &'static str) {
    metrics::counter!("imagegate_cut_through_total", "result" => result).increment(1);
}
