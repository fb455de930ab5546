//! Requests in progress on one connection, for its idle timeout.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use crate::body::{Body, BoxError};

/// Requests in progress on one connection: started when hyper calls the service, finished when
/// the response body is finished or dropped.
#[derive(Clone, Default)]
pub(super) struct Activity(Arc<watch::Sender<usize>>);

/// One request in progress; dropping it ends it.
pub(super) struct Active(Arc<watch::Sender<usize>>);

impl Activity {
    pub(super) fn start(&self) -> Active {
        self.0.send_modify(|n| *n += 1);
        Active(self.0.clone())
    }

    /// Resolves once no request has been in progress for `timeout`.
    pub(super) async fn idle_for(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            if rx.wait_for(|n| *n == 0).await.is_err() {
                // Unreachable while `self` holds the sender; never call the connection idle.
                return std::future::pending().await;
            }
            tokio::select! {
                () = tokio::time::sleep(timeout) => return,
                changed = rx.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in progress until it is finished or
    /// dropped.
    pub(super) struct Tracked {
        #[pin]
        inner: Body,
        _active: Active,
    }
}

impl Tracked {
    /// `inner`, with its request counted until it ends.
    pub(super) fn new(inner: Body, active: Active) -> Self {
        Tracked {
            inner,
            _active: active,
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_end_of_the_last_request() {
        let idle = Duration::from_secs(60);
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        // No request at all: idle after the timeout.
        activity.idle_for(idle).await;
        assert_eq!(started.elapsed(), idle);

        // A request in progress (a long streamed answer) is never idle.
        let active = activity.start();
        let waiting = tokio::time::timeout(idle * 5, activity.idle_for(idle)).await;
        assert!(
            waiting.is_err(),
            "busy for five idle timeouts, still not idle"
        );
        // Its end starts the clock again.
        let ended = tokio::time::Instant::now();
        drop(active);
        activity.idle_for(idle).await;
        assert_eq!(ended.elapsed(), idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_idle_wait_restarts_it() {
        let idle = Duration::from_secs(60);
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        let waiter = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle_for(idle).await })
        };
        tokio::time::sleep(idle / 2).await;
        drop(activity.start());
        waiter.await.unwrap();
        assert_eq!(started.elapsed(), idle / 2 + idle);
    }
}
