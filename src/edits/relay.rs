//! Relay phase: the upstream body copied to the caller as it arrives, what it says (images,
//! usage, events) observed on the side, its end held back until the record is committed.

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::answer::{
    JsonAnswer, JsonAnswerScanner, SseOutcome, SseScanner, incomplete_error_event,
};
use crate::body::BoxError;
use crate::upstream::error_chain;

/// What the relay watches for in an answer, by the kind of answer expected.
pub enum Watch {
    /// A dall-e-2 JSON answer: image items counted.
    Images(ImageCounter),
    /// A gpt-image JSON answer: items counted, `usage` captured.
    Json(JsonAnswerScanner),
    /// A gpt-image event stream: events parsed on the side, usage from the completed events.
    Events(SseScanner),
    /// Nothing (an error answer).
    Nothing,
}

/// What the watch saw once the answer ended.
#[derive(Debug)]
pub enum Observed {
    Images(usize),
    Json(JsonAnswer),
    Events(SseOutcome),
    Nothing,
}

impl Watch {
    fn feed(&mut self, data: &[u8]) {
        match self {
            Watch::Images(c) => c.feed(data),
            Watch::Json(j) => j.feed(data),
            Watch::Events(e) => {
                e.feed(data);
            }
            Watch::Nothing => {}
        }
    }

    fn finish(self) -> Observed {
        match self {
            Watch::Images(c) => Observed::Images(c.count),
            Watch::Json(j) => Observed::Json(j.finish()),
            Watch::Events(e) => Observed::Events(e.finish()),
            Watch::Nothing => Observed::Nothing,
        }
    }
}

/// How relaying an answer went.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayOutcome {
    /// The caller stopped reading before the end.
    pub caller_gone: bool,
    /// The upstream body ended cleanly.
    pub complete: bool,
    /// The upstream sent nothing for the idle timeout.
    pub stalled: bool,
}

/// What is left to give the caller once the record is written.
pub struct Tail {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    /// The last chunk of a JSON answer, held back: a caller that knows the length (or reads to
    /// the end) must not see the whole answer before its record is committed. An event stream
    /// holds back only its end (and, when it broke, the closing error event of S4).
    last: Vec<Bytes>,
}

impl Tail {
    /// Send the held-back chunk and end the caller's body.
    pub async fn finish(self) {
        for chunk in self.last {
            if self.tx.send(Ok(chunk)).await.is_err() {
                break;
            }
        }
    }
}

/// Copy the upstream body to the caller as it arrives (a JSON answer one chunk behind); when
/// the caller is gone keep reading to the end, so what the answer cost is known. A body that
/// sends nothing for `idle` ends as stalled.
pub async fn pump(
    mut body: Incoming,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    mut watch: Watch,
    idle: Duration,
) -> (RelayOutcome, Tail, Observed) {
    let events = matches!(watch, Watch::Events(_));
    let mut outcome = RelayOutcome::default();
    let mut held: Option<Bytes> = None;
    let mut broke: Option<BoxError> = None;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(f) => f,
            Err(_) => {
                tracing::warn!(after = ?idle, "the upstream answer stalled");
                outcome.stalled = true;
                broke = Some("the upstream answer stalled".into());
                break;
            }
        };
        match frame {
            None => {
                outcome.complete = true;
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "upstream body failed");
                broke = Some(Box::new(e));
                break;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                watch.feed(&data);
                let send = if events {
                    Some(data)
                } else {
                    held.replace(data)
                };
                if let Some(chunk) = send
                    && !outcome.caller_gone
                    && tx.send(Ok(chunk)).await.is_err()
                {
                    outcome.caller_gone = true;
                }
            }
        }
    }
    // A caller that stopped reading is also gone if it left while the last chunk was held.
    if !outcome.caller_gone && tx.is_closed() {
        outcome.caller_gone = true;
    }
    let observed = watch.finish();
    let mut last: Vec<Bytes> = held.into_iter().collect();
    if let Observed::Events(o) = &observed {
        if o.end.needs_error_event() || broke.is_some() {
            // S4: a stream that ended before its image was completed ends with an error event
            // the SDKs raise, instead of a silent end.
            last.push(incomplete_error_event());
        }
    } else if let Some(e) = broke
        && !outcome.caller_gone
    {
        // A JSON answer that broke off: the caller gets what came, then a broken body.
        for chunk in last.drain(..) {
            let _ = tx.send(Ok(chunk)).await;
        }
        let _ = tx.send(Err(e)).await;
    }
    if outcome.caller_gone {
        last.clear();
    }
    (outcome, Tail { tx, last }, observed)
}

/// Counts the image items of an OpenAI images answer as it streams by: each item has exactly one
/// `"url"` or `"b64_json"` key, and neither sequence can occur unescaped inside a JSON string.
#[derive(Debug, Default)]
pub struct ImageCounter {
    tail: Vec<u8>,
    pub count: usize,
}

impl ImageCounter {
    const KEYS: [&'static [u8]; 2] = [b"\"url\"", b"\"b64_json\""];
    const KEEP: usize = 9; // longest key minus one

    pub fn feed(&mut self, chunk: &[u8]) {
        // Matches that start in the kept tail and end in this chunk.
        let mut seam = self.tail.clone();
        seam.extend_from_slice(&chunk[..chunk.len().min(Self::KEEP)]);
        let tail_len = self.tail.len();
        for key in Self::KEYS {
            self.count += memchr::memmem::find_iter(&seam, key)
                .filter(|&i| i < tail_len && i + key.len() > tail_len)
                .count();
            self.count += memchr::memmem::find_iter(chunk, key).count();
        }
        // Keep the last KEEP bytes seen.
        if chunk.len() >= Self::KEEP {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - Self::KEEP..]);
        } else {
            let start = seam.len().saturating_sub(Self::KEEP);
            self.tail = seam.split_off(start);
        }
    }
}

/// The caller-facing body of a relayed answer.
pub struct ChannelBody {
    pub rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    pub remaining: Option<u64>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_items_across_chunk_seams() {
        let answer = br#"{"created": 1, "data": [{"url": "https://x/1"}, {"url":"https://x/2"}, {"b64_json": "QUJD"}]}"#;
        for split in 0..answer.len() {
            let mut c = ImageCounter::default();
            c.feed(&answer[..split]);
            c.feed(&answer[split..]);
            assert_eq!(c.count, 3, "split at {split}");
        }
        let mut bytewise = ImageCounter::default();
        for b in answer.iter() {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(bytewise.count, 3);
    }

    #[test]
    fn escaped_keys_inside_strings_do_not_count() {
        let mut c = ImageCounter::default();
        c.feed(br#"{"data": [{"url": "a\"url\"b", "revised_prompt": "say \"b64_json\""}]}"#);
        assert_eq!(c.count, 1);
    }
}
