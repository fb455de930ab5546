//! The bounded pool the image checks of both profiles run on: at most
//! `server.max_concurrent_decodes` jobs at once, each holding its permit inside the blocking job
//! (released when the work ends, not when the caller leaves), and cancelled at its next row when
//! the caller leaves (the future is dropped).
//!
//! Metrics: `imagegate_decodes_running` (gauge) counts the jobs running on the blocking pool
//! (from the moment a job starts to the moment it returns, whether its caller is still there or
//! not); `imagegate_decodes_cancelled_total` counts the jobs that noticed at a row that their
//! caller had left and stopped there.

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
        let running = Running::start();
        let out = job(&cancel);
        drop(running);
        if cancel.noticed() {
            metrics::counter!("imagegate_decodes_cancelled_total").increment(1);
        }
        out
    })
    .await;
    drop(cancel_on_drop);
    done.map_err(|e| tracing::error!(error = %e, "{what} task failed"))
        .ok()
}

/// One job counted in `imagegate_decodes_running` until dropped (a panicking job included).
struct Running(metrics::Gauge);

impl Running {
    fn start() -> Running {
        let gauge = metrics::gauge!("imagegate_decodes_running");
        gauge.increment(1.0);
        Running(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
