//! Relay phase: the upstream body copied to the caller as it arrives, what it says (images,
//! usage, events) observed on the side, its end held back until the record is committed.

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
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

/// How long each side of the relay may be silent.
#[derive(Debug, Clone, Copy)]
pub struct RelayTimeouts {
    /// The upstream sends nothing for this long: the answer ends as stalled.
    pub upstream_idle: Duration,
    /// The caller takes no chunk for this long: it is treated as gone.
    pub caller_idle: Duration,
}

/// Hand a chunk to the caller's body; false when the caller is gone or did not take it in time.
async fn deliver(
    tx: &mpsc::Sender<Result<Bytes, BoxError>>,
    chunk: Bytes,
    within: Duration,
) -> bool {
    matches!(
        tokio::time::timeout(within, tx.send(Ok(chunk))).await,
        Ok(Ok(()))
    )
}

/// What is left to give the caller once the record is written.
pub struct Tail {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    caller_idle: Duration,
    /// The last chunk of a JSON answer, held back: a caller that knows the length (or reads to
    /// the end) must not see the whole answer before its record is committed. An event stream
    /// holds back only its end (and, when it broke, the closing error event of S4).
    last: Vec<Bytes>,
}

impl Tail {
    /// Send the held-back chunk and end the caller's body.
    pub async fn finish(self) {
        for chunk in self.last {
            if !deliver(&self.tx, chunk, self.caller_idle).await {
                break;
            }
        }
    }
}

/// Copy the upstream body to the caller as it arrives (a JSON answer one chunk behind); when
/// the caller is gone keep reading to the end, so what the answer cost is known. A body that
/// sends nothing for `idle` ends as stalled.
pub async fn pump<B>(
    body: B,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    mut watch: Watch,
    timeouts: RelayTimeouts,
) -> (RelayOutcome, Tail, Observed)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let idle = timeouts.upstream_idle;
    let mut body = std::pin::pin!(body);
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
                    && !deliver(&tx, chunk, timeouts.caller_idle).await
                {
                    // Gone, or not reading: keep reading upstream (the cost must be known)
                    // without holding the answer for a caller that does not take it.
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
            let _ = deliver(&tx, chunk, timeouts.caller_idle).await;
        }
        let _ = tokio::time::timeout(timeouts.caller_idle, tx.send(Err(e))).await;
    }
    if outcome.caller_gone {
        last.clear();
    }
    (
        outcome,
        Tail {
            tx,
            caller_idle: timeouts.caller_idle,
            last,
        },
        observed,
    )
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
    use futures_util::StreamExt;
    use http_body_util::StreamBody;

    type Frames = Vec<Result<http_body::Frame<Bytes>, std::io::Error>>;

    fn body(chunks: &[&str]) -> Frames {
        chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::from(c.to_string()))))
            .collect()
    }

    fn timeouts() -> RelayTimeouts {
        RelayTimeouts {
            upstream_idle: Duration::from_secs(300),
            caller_idle: Duration::from_secs(60),
        }
    }

    async fn drain(mut rx: mpsc::Receiver<Result<Bytes, BoxError>>) -> (String, bool) {
        let mut out = String::new();
        let mut failed = false;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(b) => out.push_str(std::str::from_utf8(&b).unwrap()),
                Err(_) => failed = true,
            }
        }
        (out, failed)
    }

    #[tokio::test]
    async fn a_json_answer_is_relayed_one_chunk_behind_and_its_usage_read() {
        let chunks = [
            r#"{"created":1,"data":[{"b64_json":"QUJD"},"#,
            r#"{"b64_json":"REVG"}],"usage":{"input_tokens":10,"output_tokens":20,"#,
            r#""input_tokens_details":{"text_tokens":10,"image_tokens":0}}}"#,
        ];
        let (tx, mut rx) = mpsc::channel(8);
        let stream = StreamBody::new(futures_util::stream::iter(body(&chunks)));
        let (outcome, tail, observed) = pump(
            stream,
            tx,
            Watch::Json(JsonAnswerScanner::new()),
            timeouts(),
        )
        .await;
        assert!(outcome.complete && !outcome.caller_gone);
        // Two chunks went out; the last waits for the record.
        let mut seen = String::new();
        while let Ok(Ok(b)) = rx.try_recv() {
            seen.push_str(std::str::from_utf8(&b).unwrap());
        }
        assert_eq!(seen, format!("{}{}", chunks[0], chunks[1]));
        let Observed::Json(a) = observed else {
            panic!("a JSON observation")
        };
        assert_eq!(a.items, 2);
        assert_eq!(a.usage.unwrap().unwrap().output_tokens, 20);
        tail.finish().await;
        let (rest, failed) = drain(rx).await;
        assert_eq!(rest, chunks[2]);
        assert!(!failed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_reading_is_gone_and_the_upstream_is_read_to_its_end() {
        let chunks: Vec<String> = (0..6)
            .map(|i| format!(r#"{{"b64_json":"{i}"}},"#))
            .collect();
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (tx, rx) = mpsc::channel(1);
        let stream = StreamBody::new(futures_util::stream::iter(body(&refs)));
        let (outcome, tail, observed) = pump(
            stream,
            tx,
            Watch::Images(ImageCounter::default()),
            timeouts(),
        )
        .await;
        assert!(outcome.caller_gone, "{outcome:?}");
        assert!(outcome.complete, "the upstream answer was read to its end");
        assert!(matches!(observed, Observed::Images(6)), "{observed:?}");
        assert!(
            tail.last.is_empty(),
            "nothing is held for a caller that left"
        );
        drop(rx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_with_the_incomplete_event() {
        let partial = "event: image_edit.partial_image\ndata: {\"type\":\"image_edit.partial_image\",\"b64_json\":\"QQ==\",\"partial_image_index\":0}\n\n";
        let frames =
            futures_util::stream::iter(body(&[partial])).chain(futures_util::stream::pending());
        let (tx, rx) = mpsc::channel(8);
        let (outcome, tail, observed) = pump(
            StreamBody::new(frames),
            tx,
            Watch::Events(SseScanner::new(1 << 20)),
            timeouts(),
        )
        .await;
        assert!(outcome.stalled && !outcome.complete);
        let Observed::Events(o) = observed else {
            panic!("an event observation")
        };
        assert_eq!(o.summary.partial_images, 1);
        tail.finish().await;
        let (text, failed) = drain(rx).await;
        assert!(!failed, "an event stream ends cleanly, with an error event");
        assert_eq!(
            text,
            format!(
                "{partial}{}",
                std::str::from_utf8(&incomplete_error_event()).unwrap()
            )
        );
    }

    #[tokio::test]
    async fn a_json_answer_that_breaks_off_breaks_the_callers_body() {
        let frames: Frames = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"{\"data\":["))),
            Err(std::io::Error::other("reset")),
        ];
        let (tx, rx) = mpsc::channel(8);
        let (outcome, tail, _) = pump(
            StreamBody::new(futures_util::stream::iter(frames)),
            tx,
            Watch::Json(JsonAnswerScanner::new()),
            timeouts(),
        )
        .await;
        assert!(!outcome.complete);
        assert!(tail.last.is_empty(), "what came was already sent");
        drop(tail);
        let (text, failed) = drain(rx).await;
        assert_eq!(text, "{\"data\":[");
        assert!(
            failed,
            "the caller sees a broken body, not a short valid one"
        );
    }

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
