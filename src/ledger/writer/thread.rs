//! The writer thread: it takes a job (waiting), then what is already queued, commits them in
//! one transaction and answers each waiter (see the parent module's doc for the failure rules).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use super::{
    Busy, CLOSE_ATTEMPTS, Job, LOST_TARGET, MAX_BATCH, MAX_RETAINED, RETRY_MAX, RETRY_MIN, Reply,
    Stats, lock, log_lost,
};
use crate::ledger::LedgerError;
use crate::ledger::store::{BatchResults, LedgerOp, LedgerStore, SqliteTask};

/// Jobs of one transaction.
#[derive(Default)]
struct Batch {
    ops: Vec<LedgerOp>,
    replies: Vec<Option<Reply>>,
    tasks: Vec<Box<dyn SqliteTask>>,
}

impl Batch {
    fn push(&mut self, op: LedgerOp, reply: Option<Reply>) {
        self.ops.push(op);
        self.replies.push(reply);
    }

    fn len(&self) -> usize {
        self.ops.len() + self.tasks.len()
    }

    fn take(&mut self, job: Job, stats: &Stats) {
        stats.depth.fetch_sub(1, Ordering::SeqCst);
        match job {
            Job::Op { op, reply, permit } => {
                drop(permit); // queue space for the next waiter
                self.push(op, reply);
            }
            Job::Task(task) => self.tasks.push(task),
        }
    }
}

fn reply(to: Option<Reply>, result: Result<(), LedgerError>) {
    if let Some(to) = to {
        // The waiter may be gone (its request was dropped); the write stands anyway.
        let _ = to.send(result);
    }
}

/// The writer thread: batches until every sender is gone, then a last try for what it keeps.
pub(super) fn run(
    mut store: Box<dyn LedgerStore>,
    rx: mpsc::Receiver<Job>,
    stats: &Stats,
    probe_every: Option<Duration>,
) -> Result<(), LedgerError> {
    // An idle writer checks its store this often (`ledger.health_interval` for PostgreSQL,
    // else PROBE_EVERY), so readiness follows the store between writes.
    let probe_every = probe_every.unwrap_or(PROBE_EVERY);
    let mut retained: VecDeque<LedgerOp> = VecDeque::new();
    let mut backoff = RETRY_MIN;
    loop {
        let first = if retained.is_empty() {
            match rx.recv_timeout(probe_every) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => {
                    probe(store.as_mut(), stats);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv_timeout(backoff) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        let mut batch = Batch::default();
        let old = retained.len().min(MAX_BATCH);
        for op in retained.drain(..old) {
            batch.push(op, None);
        }
        if let Some(job) = first {
            batch.take(job, stats);
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.take(job, stats),
                Err(_) => break,
            }
        }
        let failed = commit(store.as_mut(), batch, &mut retained, stats);
        backoff = if failed {
            (backoff * 2).min(RETRY_MAX)
        } else {
            RETRY_MIN
        };
    }

    // Closed, and everything queued has been through `commit`. Retry what is retained.
    let mut attempts = 0;
    while !retained.is_empty() && attempts < CLOSE_ATTEMPTS {
        attempts += 1;
        let mut batch = Batch::default();
        let n = retained.len().min(MAX_BATCH);
        for op in retained.drain(..n) {
            batch.push(op, None);
        }
        if commit(store.as_mut(), batch, &mut retained, stats) {
            std::thread::sleep(RETRY_MIN * attempts);
        } else {
            attempts = 0;
        }
    }
    stats.retained.store(0, Ordering::SeqCst);
    if retained.is_empty() {
        return Ok(());
    }
    let n = retained.len();
    for op in &retained {
        stats.lost.fetch_add(1, Ordering::SeqCst);
        log_lost(op, "the ledger closed while its store was failing");
    }
    Err(LedgerError::Unavailable(format!(
        "{n} records could not be written before the ledger closed (logged under {LOST_TARGET})"
    )))
}

/// How often an idle writer checks that its store can still be written.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// An idle writer's check of its store: while healthy, a cheap check that readiness falls
/// when the store can no longer be written (a deleted or read-only ledger file); while not, a
/// write that changes nothing, so readiness comes back only once writes succeed again.
fn probe(store: &mut dyn LedgerStore, stats: &Stats) {
    let healthy = stats.healthy.load(Ordering::SeqCst);
    let _busy = Busy::start(stats);
    match catch_unwind(AssertUnwindSafe(|| {
        if healthy {
            store.check()
        } else {
            store.try_write()
        }
    })) {
        Ok(Ok(())) => {
            if !stats.healthy.swap(true, Ordering::SeqCst) {
                tracing::info!("ledger writable again");
            }
        }
        Ok(Err(e)) => {
            if stats.healthy.swap(false, Ordering::SeqCst) {
                tracing::error!(error = %e, "ledger cannot be written; forwarding stops until it can");
            }
        }
        Err(_) => {
            stats.healthy.store(false, Ordering::SeqCst);
        }
    }
}

/// `write_batch_with`, with a panic of the store turned into an error.
fn guarded_write(
    store: &mut dyn LedgerStore,
    ops: &[LedgerOp],
    tasks: &mut [Box<dyn SqliteTask>],
) -> Result<BatchResults, LedgerError> {
    catch_unwind(AssertUnwindSafe(|| store.write_batch_with(ops, tasks))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(LedgerError::Store(format!(
            "the ledger store panicked: {what}"
        )))
    })
}

/// Write one batch and answer its waiters. Returns whether the store failed transiently.
fn commit(
    store: &mut dyn LedgerStore,
    batch: Batch,
    retained: &mut VecDeque<LedgerOp>,
    stats: &Stats,
) -> bool {
    let Batch {
        ops,
        replies,
        mut tasks,
    } = batch;
    if ops.is_empty() && tasks.is_empty() {
        return false;
    }
    let mut task_answers: Vec<Result<(), LedgerError>> = Vec::new();
    let mut answers = Vec::with_capacity(ops.len());
    let give_up = |op: &LedgerOp, why: &str| {
        if !op.is_begin() {
            stats.lost.fetch_add(1, Ordering::SeqCst);
        }
        log_lost(op, why);
    };
    let written = {
        let _busy = Busy::start(stats);
        guarded_write(store, &ops, &mut tasks)
    };
    let failed = match written {
        Ok((results, done)) => {
            task_answers = done;
            if let Some(head) = store.tip() {
                *lock(&stats.head) = Some(head);
            }
            if !stats.healthy.swap(true, Ordering::SeqCst) {
                tracing::info!("ledger writes succeed again");
            }
            let mut results = results.into_iter();
            for (op, to) in ops.into_iter().zip(replies) {
                let result = results.next().unwrap_or_else(|| {
                    Err(LedgerError::Store(
                        "the store returned too few results".into(),
                    ))
                });
                if let Err(e) = &result {
                    give_up(&op, &e.to_string());
                }
                answers.push((to, result));
            }
            false
        }
        Err(e) if e.is_transient() => {
            // Once per outage at error level; the retries of an outage at debug.
            if stats.healthy.swap(false, Ordering::SeqCst) {
                tracing::error!(error = %e, records = ops.len(), "ledger write failed; forwarding stops until it succeeds");
            } else {
                tracing::debug!(error = %e, records = ops.len(), "ledger write failed again");
            }
            task_answers = tasks.iter().map(|_| Err(e.clone())).collect();
            for (op, to) in ops.into_iter().zip(replies) {
                if op.is_begin() {
                    answers.push((to, Err(e.clone())));
                } else if retained.len() < MAX_RETAINED {
                    retained.push_back(op);
                    answers.push((to, Err(LedgerError::Deferred(e.to_string()))));
                } else {
                    give_up(&op, "too many records are waiting for the failing store");
                    answers.push((to, Err(e.clone())));
                }
            }
            true
        }
        Err(e) if ops.len() + tasks.len() == 1 => {
            task_answers = tasks.iter().map(|_| Err(e.clone())).collect();
            for (op, to) in ops.into_iter().zip(replies) {
                give_up(&op, &e.to_string());
                answers.push((to, Err(e.clone())));
            }
            false
        }
        Err(e) => {
            // Maybe one op's fault: isolate it by writing them one by one.
            tracing::warn!(error = %e, records = ops.len(), "ledger batch failed; retrying its records one by one");
            let mut failed = false;
            for (op, to) in ops.into_iter().zip(replies) {
                let mut single = Batch::default();
                single.push(op, to);
                failed |= commit(store, single, retained, stats);
            }
            for task in tasks.drain(..) {
                let mut single = Batch::default();
                single.tasks.push(task);
                failed |= commit(store, single, retained, stats);
            }
            failed
        }
    };
    // Counters first, so a waiter that wakes up sees them current.
    stats.retained.store(retained.len(), Ordering::SeqCst);
    for (to, result) in answers {
        reply(to, result);
    }
    // Tasks handed to a one-by-one retry above were answered there.
    for (task, result) in tasks.into_iter().zip(task_answers) {
        task.done(result);
    }
    failed
}
