//! A body whose last chunk waits for a verdict (cut-through, `upstream.cut_through`).
//!
//! [`gate`] makes a pair. The [`Gate`] goes with a [`ChunkedBody`] ([`ChunkedBody::gated`]),
//! which then yields every chunk but its last at once and its last only once the gate is open.
//! The [`GateOpener`] stays with whoever runs the check: [`GateOpener::open`] lets the last
//! chunk go; dropping the opener without opening shuts the gate, and the body then fails with
//! [`GateShut`] instead of yielding its last chunk. The client sending it aborts the request
//! (HTTP/1.1: the connection is closed short of its `Content-Length`; h2: the stream is reset),
//! so the peer never receives a complete request.
//!
//! Clones of a gated body (another attempt on another key) share the gate.

use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::Shared;
use tokio::sync::oneshot;

use super::ChunkedBody;

/// The verdict a gated body waits for; clones share it.
#[derive(Clone)]
pub struct Gate(Shared<oneshot::Receiver<()>>);

/// Opens the gate ([`GateOpener::open`]) or, dropped unopened, shuts it.
#[derive(Debug)]
pub struct GateOpener(oneshot::Sender<()>);

/// A gate and its opener.
pub fn gate() -> (GateOpener, Gate) {
    let (tx, rx) = oneshot::channel();
    (GateOpener(tx), Gate(rx.shared()))
}

impl GateOpener {
    /// Let the last chunk go.
    pub fn open(self) {
        let _ = self.0.send(());
    }
}

impl Gate {
    /// `Some(true)`: open; `Some(false)`: shut; `None`: not decided yet.
    pub fn state(&self) -> Option<bool> {
        self.0.clone().now_or_never().map(|r| r.is_ok())
    }

    /// Wait for the verdict: `true` when open.
    pub async fn decided(&self) -> bool {
        self.0.clone().await.is_ok()
    }

    fn poll_decided(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        self.0.poll_unpin(cx).map(|r| r.is_ok())
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Gate").field(&self.state()).finish()
    }
}

/// The error of a body whose gate was shut: the request is cut short on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateShut;

impl std::fmt::Display for GateShut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request failed its checks: its body is cut short")
    }
}

impl std::error::Error for GateShut {}

/// Before the last chunk of a gated body: `Ready(Ok)` to go on, `Pending` to wait, `Ready(Err)`
/// when the gate is shut.
pub(super) fn poll_last(
    gate: &mut Option<Gate>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), GateShut>> {
    let Some(g) = gate else {
        return Poll::Ready(Ok(()));
    };
    match g.poll_decided(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(true) => {
            // Open for good: later polls (none: this was the last chunk) need not ask again.
            *gate = None;
            Poll::Ready(Ok(()))
        }
        Poll::Ready(false) => Poll::Ready(Err(GateShut)),
    }
}

impl ChunkedBody {
    /// This body with its last chunk held back until `gate` opens (see the module).
    pub fn gated(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The gate this body waits for, if any.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Body as _;

    use super::*;

    fn body() -> ChunkedBody {
        ChunkedBody::new(vec![
            Bytes::from_static(b"head"),
            Bytes::from_static(b"image"),
            Bytes::from_static(b"--end--"),
        ])
    }

    type Polled = Poll<Option<Result<Bytes, GateShut>>>;

    fn poll(body: &mut ChunkedBody, cx: &mut Context<'_>) -> Polled {
        Pin::new(body)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map(|f| f.into_data().expect("data frames only"))))
    }

    fn data(p: Polled) -> Bytes {
        match p {
            Poll::Ready(Some(Ok(b))) => b,
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    #[test]
    fn every_chunk_but_the_last_goes_before_the_verdict_and_the_last_after_opening() {
        let (opener, gate) = gate();
        let mut b = body().gated(gate);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(data(poll(&mut b, &mut cx)), "head");
        assert_eq!(data(poll(&mut b, &mut cx)), "image");
        assert!(poll(&mut b, &mut cx).is_pending(), "the last chunk waits");
        assert!(poll(&mut b, &mut cx).is_pending(), "and keeps waiting");
        assert_eq!(
            b.size_hint().exact(),
            Some(7),
            "the held chunk is still owed"
        );
        assert!(!b.is_end_stream());
        opener.open();
        assert_eq!(data(poll(&mut b, &mut cx)), "--end--");
        assert!(matches!(poll(&mut b, &mut cx), Poll::Ready(None)));
        assert!(b.is_end_stream());
    }

    #[test]
    fn a_shut_gate_fails_the_body_instead_of_its_last_chunk() {
        let (opener, gate) = gate();
        let mut b = body().gated(gate.clone());
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(data(poll(&mut b, &mut cx)), "head");
        assert_eq!(data(poll(&mut b, &mut cx)), "image");
        assert!(poll(&mut b, &mut cx).is_pending());
        assert_eq!(gate.state(), None);
        drop(opener);
        assert_eq!(gate.state(), Some(false));
        assert!(matches!(
            poll(&mut b, &mut cx),
            Poll::Ready(Some(Err(GateShut)))
        ));
    }

    #[test]
    fn opening_wakes_the_waiting_sender() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (opener, gate) = gate();
            let b = body().gated(gate);
            let collect = tokio::spawn(http_body_util::BodyExt::collect(b));
            tokio::task::yield_now().await;
            assert!(!collect.is_finished());
            opener.open();
            let all = collect.await.unwrap().unwrap().to_bytes();
            assert_eq!(all, "headimage--end--");
        });
    }

    #[test]
    fn clones_share_the_verdict() {
        let (opener, gate) = gate();
        let a = body().gated(gate);
        let mut b = a.clone();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        opener.open();
        let mut all = Vec::new();
        while let Poll::Ready(Some(Ok(chunk))) = poll(&mut b, &mut cx) {
            all.extend_from_slice(&chunk);
        }
        assert_eq!(all, b"headimage--end--");
        assert_eq!(a.gate().and_then(Gate::state), Some(true));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(a.gate().unwrap().decided()));
    }

    #[test]
    fn an_ungated_body_never_waits() {
        let mut b = body();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for want in ["head", "image", "--end--"] {
            assert_eq!(data(poll(&mut b, &mut cx)), want);
        }
        assert!(b.gate().is_none());
    }
}
