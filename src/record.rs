//! The record of one request to the edits route under construction ([`Trail`]), shared by the
//! usage layer that opens it (`middleware::usage`) and the phases that fill it in (`edits`), and
//! the one place a finished record is observed and written ([`commit`], [`commit_detached`]).
//! A neutral module: the layer and the phases both depend on it, it depends on neither.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::error::ErrorParts;
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
    pub(crate) fn new(record: Record) -> Trail {
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

    /// The request's id.
    pub fn request_id(&self) -> String {
        self.lock().record.request_id.clone()
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
    pub(crate) fn take_open(&self) -> Option<Record> {
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
/// keeps and retries it), but not behind a stalled store (`ledger.stall_timeout`): then the
/// record is queued and the answer goes out.
pub async fn commit(ledger: &Ledger, op: LedgerOp) {
    if ledger.stalled() {
        // The store neither answers nor fails: queue the record and answer now (the writer
        // writes it when the store comes back).
        return commit_detached(ledger, op);
    }
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
