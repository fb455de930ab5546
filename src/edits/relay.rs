//! Relay phase: the upstream body copied to the caller one chunk behind, the images counted on
//! the side, the last chunk held back until the record is committed.

use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::body::BoxError;
use crate::upstream::error_chain;

/// What relaying an answer observed.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayOutcome {
    /// Image items seen in a successful answer.
    pub images: usize,
    /// The caller stopped reading before the end.
    pub caller_gone: bool,
    /// The upstream body ended cleanly.
    pub complete: bool,
}

/// What is left to give the caller once the record is written.
pub struct Tail {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    /// The last chunk of the answer, held back: a caller that knows the length (or reads to
    /// the end) must not see the whole answer before its record is committed.
    last: Option<Bytes>,
}

impl Tail {
    /// Send the held-back chunk and end the caller's body.
    pub async fn finish(self) {
        if let Some(last) = self.last {
            let _ = self.tx.send(Ok(last)).await;
        }
    }
}

/// Copy the upstream body to the caller, one chunk behind; when the caller is gone keep reading
/// to the end, so the images returned are known.
pub async fn pump(
    mut body: Incoming,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    count: bool,
) -> (RelayOutcome, Tail) {
    let mut counter = ImageCounter::default();
    let mut outcome = RelayOutcome::default();
    let mut held: Option<Bytes> = None;
    loop {
        match body.frame().await {
            None => {
                outcome.complete = true;
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "upstream body failed");
                if !outcome.caller_gone {
                    if let Some(prev) = held.take() {
                        let _ = tx.send(Ok(prev)).await;
                    }
                    let _ = tx.send(Err(Box::new(e))).await;
                }
                break;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if count {
                    counter.feed(&data);
                }
                if let Some(prev) = held.replace(data)
                    && !outcome.caller_gone
                    && tx.send(Ok(prev)).await.is_err()
                {
                    outcome.caller_gone = true;
                }
            }
        }
    }
    outcome.images = counter.count;
    // A caller that stopped reading is also gone if it left while the last chunk was held.
    if !outcome.caller_gone && tx.is_closed() {
        outcome.caller_gone = true;
    }
    let last = if outcome.caller_gone { None } else { held };
    (outcome, Tail { tx, last })
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
