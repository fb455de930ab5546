//! The bounded pool the image checks of both profiles run on: at most
//! `server.max_concurrent_decodes` jobs at once, each holding its permit inside the blocking job
//! (released when the work ends, not when the caller leaves), and cancelled at its next row when
//! the caller leaves (the future is dropped).

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::edit::cancel::{Cancel, CancelOnDrop};

/// Run `job` on the blocking pool under one decode permit. `None`: the pool is closed or the job
/// panicked (logged as `what`).
pub async fn run<T: Send + 'static>(
    permits: &Arc<Semaphore>,
    what: &'static str,
    job: impl FnOnce(&Cancel) -> T + Send + 'static,
) -> Option<T> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    // Dropped with this future: cancels the job at its next row.
    let cancel_on_drop = CancelOnDrop::new();
    let cancel = cancel_on_drop.handle();
    let done = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        job(&cancel)
    })
    .await;
    drop(cancel_on_drop);
    done.map_err(|e| tracing::error!(error = %e, "{what} task failed"))
        .ok()
}
