//! Body types shared by the stack: one boxed response body, and a body made of `Bytes` chunks
//! (the canonical multipart, which reuses the image bytes instead of copying them), whose last
//! chunk may wait for a check ([`gate`]).

pub mod gate;

use std::any::Any;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of every service in the stack.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body that yields a list of `Bytes` in order; its exact length is known up front.
#[derive(Default, Clone)]
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
    /// Kept alive as long as the body: the memory-budget permit of the bytes it carries, so the
    /// budget is released when the client that sends it drops it.
    hold: Option<Arc<dyn Any + Send + Sync>>,
    /// Set when the sender first asks for a frame: from then on the request may have reached
    /// its peer (the connection is up and its head written or about to be).
    polled: Option<Arc<AtomicBool>>,
    /// Cut-through: the last chunk waits for this gate ([`ChunkedBody::gated`]).
    gate: Option<gate::Gate>,
}

impl std::fmt::Debug for ChunkedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedBody")
            .field("chunks", &self.chunks.len())
            .field("remaining", &self.remaining)
            .field("gate", &self.gate)
            .finish()
    }
}

impl ChunkedBody {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ChunkedBody {
            chunks: chunks.into(),
            remaining,
            hold: None,
            polled: None,
            gate: None,
        }
    }

    /// Set `flag` when the body is first polled (by the client that sends it).
    pub fn flag_polled(mut self, flag: Arc<AtomicBool>) -> Self {
        self.polled = Some(flag);
        self
    }

    /// Keep `hold` alive until this body (and every clone) is dropped.
    pub fn holding(mut self, hold: Arc<dyn Any + Send + Sync>) -> Self {
        self.hold = Some(hold);
        self
    }

    pub fn len(&self) -> u64 {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// Concatenate into one buffer (tests and diagnostics only; the forward path streams).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.remaining as usize);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = gate::GateShut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(flag) = &self.polled {
            flag.store(true, Ordering::Release);
        }
        if self.chunks.len() == 1 {
            match gate::poll_last(&mut self.gate, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(shut)) => return Poll::Ready(Some(Err(shut))),
                Poll::Ready(Ok(())) => {}
            }
        }
        match self.chunks.pop_front() {
            Some(chunk) => {
                self.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
