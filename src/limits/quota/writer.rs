//! Quota changes run by the ledger's writer thread on its SQLite connection (one writer on
//! the file), the caller waiting for the commit.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;

use rusqlite::Connection;

use crate::ledger::store::SqliteTask;
use crate::ledger::{Ledger, LedgerError};

/// How long a change waits for the ledger's writer to take it (as the quota store's own
/// connection waited for the file's write lock, `busy_timeout`).
const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// States of a [`WriterTask`], shared with its waiter.
const WAITING: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;

/// A quota change run by the ledger's writer thread, its result sent back once committed.
struct WriterTask<F, T> {
    work: F,
    out: Option<T>,
    state: std::sync::Arc<AtomicU8>,
    reply: mpsc::SyncSender<Result<T, LedgerError>>,
}

impl<F, T> SqliteTask for WriterTask<F, T>
where
    F: FnMut(&Connection) -> rusqlite::Result<T> + Send + 'static,
    T: Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> Result<(), LedgerError> {
        // A waiter that gave up is told "unavailable": its change must not happen after all.
        if let Err(CANCELLED) =
            self.state
                .compare_exchange(WAITING, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
        {
            self.out = None;
            return Ok(());
        }
        self.out = Some((self.work)(conn)?);
        Ok(())
    }

    fn done(self: Box<Self>, committed: Result<(), LedgerError>) {
        let WriterTask { out, reply, .. } = *self;
        let result = committed.and_then(|()| {
            out.ok_or_else(|| LedgerError::Unavailable("the quota change was cancelled".into()))
        });
        // The waiter may have given up.
        let _ = reply.send(result);
    }
}

/// Run `work` on the ledger's writer thread in its next transaction and wait for the commit
/// (a blocking call: from the blocking pool, a `Drop` or start-up). A change the writer has not
/// started within [`WRITER_WAIT`] is cancelled and answered `Unavailable`.
pub(super) fn run_on_writer<T: Send + 'static>(
    ledger: &Ledger,
    work: impl FnMut(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, LedgerError> {
    let (reply, answer) = mpsc::sync_channel(1);
    let state = std::sync::Arc::new(AtomicU8::new(WAITING));
    ledger.run_task(Box::new(WriterTask {
        work,
        out: None,
        state: state.clone(),
        reply,
    }));
    match answer.recv_timeout(WRITER_WAIT) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(LedgerError::Closed),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if state
                .compare_exchange(WAITING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Err(LedgerError::Unavailable(format!(
                    "the ledger writer did not take the quota change within {} s",
                    WRITER_WAIT.as_secs()
                )));
            }
            // Started: its outcome is known only once its transaction ends.
            answer.recv().unwrap_or(Err(LedgerError::Closed))
        }
    }
}
