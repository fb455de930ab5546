//! Cancellation of a running image check.
//!
//! The checks run on the blocking pool, where dropping the request future does not stop them.
//! The async side creates a [`CancelOnDrop`] per request and hands the job a [`Cancel`]; the
//! row loops of the decoders ask [`Cancel::is_cancelled`] before each row, so a decode whose
//! caller left stops at its next row instead of running to the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::{CancellationToken, DropGuard};

/// A handle the decoders poll between rows. [`Cancel::never`] is never cancelled.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Inner);

#[derive(Debug, Clone, Default)]
enum Inner {
    #[default]
    Never,
    /// The token, and whether a poll has seen it cancelled (shared by the clones).
    Token(CancellationToken, Arc<AtomicBool>),
    /// Tests: cancelled from the `n`th poll on; counts the polls.
    #[cfg(test)]
    AfterPolls(std::sync::Arc<std::sync::atomic::AtomicU64>, u64),
}

impl Cancel {
    /// A handle that is never cancelled (for callers that always wait for the result).
    pub fn never() -> Cancel {
        Cancel(Inner::Never)
    }

    /// A handle cancelled with `token`.
    pub fn new(token: CancellationToken) -> Cancel {
        Cancel(Inner::Token(token, Arc::default()))
    }

    /// Whether a poll of this handle (or a clone) has answered "cancelled": the job noticed
    /// that its caller left and stopped early.
    pub fn noticed(&self) -> bool {
        match &self.0 {
            Inner::Token(_, noticed) => noticed.load(Ordering::Relaxed),
            _ => false,
        }
    }

    /// Tests: a handle that reports cancelled from its `n`th poll on, and the poll count.
    #[cfg(test)]
    pub(crate) fn after_polls(n: u64) -> (Cancel, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let polls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        (Cancel(Inner::AfterPolls(polls.clone(), n)), polls)
    }

    pub fn is_cancelled(&self) -> bool {
        match &self.0 {
            Inner::Never => false,
            Inner::Token(token, noticed) => {
                let cancelled = token.is_cancelled();
                if cancelled {
                    noticed.store(true, Ordering::Relaxed);
                }
                cancelled
            }
            #[cfg(test)]
            Inner::AfterPolls(polls, n) => {
                polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= *n
            }
        }
    }
}

/// Held by the async side of one request: cancels its [`Cancel`] handles when dropped (the
/// request future was dropped, or the check finished and nobody needs the handle any more).
#[derive(Debug)]
pub struct CancelOnDrop {
    token: CancellationToken,
    _guard: DropGuard,
}

impl CancelOnDrop {
    pub fn new() -> CancelOnDrop {
        let token = CancellationToken::new();
        CancelOnDrop {
            _guard: token.clone().drop_guard(),
            token,
        }
    }

    /// A handle for the blocking job.
    pub fn handle(&self) -> Cancel {
        Cancel::new(self.token.clone())
    }
}

impl Default for CancelOnDrop {
    fn default() -> Self {
        CancelOnDrop::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_guard_cancels_its_handles() {
        let guard = CancelOnDrop::new();
        let handle = guard.handle();
        assert!(!handle.is_cancelled());
        assert!(!handle.noticed());
        drop(guard);
        assert!(!handle.noticed(), "not polled since");
        assert!(handle.is_cancelled());
        assert!(handle.clone().noticed(), "a poll saw it");
        assert!(!Cancel::never().is_cancelled());
    }
}
