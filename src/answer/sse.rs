//! Parses an upstream `text/event-stream` on the side of the relay (§5, §9 S1, S2, S4, B3, B5).
//!
//! Lines end at `\n`, `\r\n` or `\r`, also across chunk seams. Events are assembled as the SSE
//! specification says (`data:` lines joined with `\n`, dispatch on a blank line, comments and
//! other fields ignored, an unfinished event at the end discarded). Events are told apart by the
//! `type` of their JSON data, as SDK-py does; the `event:` line is ignored.
//!
//! Memory: a line is collected at most once (bytes are copied from the chunk into one buffer,
//! and the first `data:` line of an event is moved, not copied, into the event's data); a line
//! over the limit (default 64 MiB, S2) is not collected at all: the scanner marks the stream
//! over the limit, discards that event and keeps going.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::pricing::Usage;

/// S2: the longest SSE line (and the longest event data) collected.
pub const DEFAULT_LINE_LIMIT: usize = 64 * 1024 * 1024;

/// Line buffers that grew beyond this are freed instead of kept for the next line.
const KEEP_CAPACITY: usize = 64 * 1024;

/// The longest upstream error object kept in [`SseSummary::error`].
const ERROR_KEEP: usize = 4096;

const BOM: &[u8] = b"\xEF\xBB\xBF";

const S4_EVENT: &str = concat!(
    "event: error\n",
    r#"data: {"type":"error","error":{"message":"The upstream stream ended before the image was completed.","type":"server_error","param":null,"code":"upstream_incomplete"}}"#,
    "\n\n"
);

/// The event imagegate ends a broken stream with (S4).
pub fn incomplete_error_event() -> Bytes {
    Bytes::from_static(S4_EVENT.as_bytes())
}

/// What one [`SseScanner::feed`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fed {
    /// Events whose terminating blank line was in this chunk.
    pub events_ended: usize,
    /// The offset just past the line end that completed the last of them: the chunk's bytes up
    /// to here finish an event, so a relay flushing per event can flush there.
    pub last_event_end: Option<usize>,
}

/// What the stream carried so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseSummary {
    /// Bytes fed, over-limit lines included.
    pub bytes: u64,
    /// Events dispatched whose data was inspected (over-limit events excluded).
    pub events: u64,
    /// `image_edit.partial_image` events.
    pub partial_images: u32,
    /// `image_edit.completed` events.
    pub completed: u32,
    /// The usage of each completed event that had a usable one, in order (B5).
    pub usages: Vec<Usage>,
    /// Completed events without a usable `usage` (absent, `null` or not billable).
    pub completed_without_usage: u32,
    /// The first error the stream carried: the value of `error` (or the whole data of a
    /// `{"type":"error"}` event without one) as compact JSON, at most 4 KiB.
    pub error: Option<String>,
    /// A `data: [DONE]` event arrived (SDK-py stops there cleanly).
    pub done: bool,
    /// Events whose data was not a JSON object (nor `[DONE]`).
    pub unparsed_events: u32,
    /// Events that lost a line to the limit, hence were not inspected.
    pub oversized_events: u32,
    /// A line (or an event's data) exceeded the limit.
    pub over_limit: bool,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// After an event's blank line, with at least one `image_edit.completed`, no error event
    /// and nothing over the limit.
    Complete,
    /// After an event's blank line, and the stream carried an error object: upstream ended the
    /// stream with its own error, which the client has seen.
    UpstreamError,
    /// After an event's blank line (or nothing at all), but no `image_edit.completed` arrived.
    NoCompleted,
    /// A line or an event exceeded the limit (the stream otherwise ended between events).
    OverLimit,
    /// In the middle of a line or of an event: the stream broke.
    MidEvent,
}

impl StreamEnd {
    /// The stream ended as OpenAI ends a good one.
    pub fn is_clean(self) -> bool {
        self == StreamEnd::Complete
    }

    /// The relay should end the client's stream with [`incomplete_error_event`] (S4): every
    /// end but `Complete` and `UpstreamError` (the client already has an error event). Note
    /// that the scanner does not know `n`: a `Complete` stream with fewer completed events
    /// than images asked for is for the caller to judge.
    pub fn needs_error_event(self) -> bool {
        !matches!(self, StreamEnd::Complete | StreamEnd::UpstreamError)
    }
}

/// The result of [`SseScanner::finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct SseOutcome {
    pub end: StreamEnd,
    pub summary: SseSummary,
}

/// Watches an SSE answer chunk by chunk; see the module documentation.
#[derive(Debug)]
pub struct SseScanner {
    limit: usize,
    /// The line being collected (without its line end).
    line: Vec<u8>,
    /// The current line went over the limit: its bytes are skipped up to its end.
    line_over: bool,
    /// The last byte fed was `\r`: a `\n` first in the next chunk belongs to that line end.
    after_cr: bool,
    /// No line has ended yet (a UTF-8 BOM may open the stream).
    first_line: bool,
    /// The event's data is `data[data_start..]` (the first data line moved in whole).
    data: Vec<u8>,
    data_start: usize,
    has_data: bool,
    /// A field line (or an over-limit line) was seen since the last blank line.
    in_event: bool,
    /// Part of the current event went over the limit.
    event_broken: bool,
    summary: SseSummary,
}

impl Default for SseScanner {
    fn default() -> Self {
        SseScanner::new(DEFAULT_LINE_LIMIT)
    }
}

/// The few keys of an event's data the scanner reads; `b64_json` is skipped, not copied.
#[derive(Deserialize)]
struct EventProbe {
    #[serde(rename = "type")]
    kind: Option<Value>,
    usage: Option<Value>,
    error: Option<Value>,
}

/// Python truthiness, as SDK-py's `data.get("error")`.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn keep_error(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > ERROR_KEEP {
        let mut cut = ERROR_KEEP;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl SseScanner {
    /// A scanner collecting lines (and event data) up to `line_limit` bytes.
    pub fn new(line_limit: usize) -> SseScanner {
        SseScanner {
            limit: line_limit,
            line: Vec::new(),
            line_over: false,
            after_cr: false,
            first_line: true,
            data: Vec::new(),
            data_start: 0,
            has_data: false,
            in_event: false,
            event_broken: false,
            summary: SseSummary::default(),
        }
    }

    /// What the stream carried so far.
    pub fn summary(&self) -> &SseSummary {
        &self.summary
    }

    /// A line or an event went over the limit so far.
    pub fn is_over_limit(&self) -> bool {
        self.summary.over_limit
    }

    /// Observes the next chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) -> Fed {
        self.summary.bytes += chunk.len() as u64;
        let mut fed = Fed::default();
        let mut i = 0;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                i = 1;
            }
        }
        while i < chunk.len() {
            let rest = &chunk[i..];
            let Some(j) = memchr::memchr2(b'\n', b'\r', rest) else {
                self.collect(rest);
                break;
            };
            self.collect(&rest[..j]);
            let end = i + j;
            let next = if chunk[end] == b'\r' {
                match chunk.get(end + 1) {
                    Some(b'\n') => end + 2,
                    Some(_) => end + 1,
                    None => {
                        self.after_cr = true;
                        end + 1
                    }
                }
            } else {
                end + 1
            };
            if self.end_line() {
                fed.events_ended += 1;
                fed.last_event_end = Some(next);
            }
            i = next;
        }
        fed
    }

    /// Ends the stream: how it ended and what it carried.
    pub fn finish(self) -> SseOutcome {
        let mid_event = !self.line.is_empty() || self.line_over || self.in_event;
        let s = &self.summary;
        let end = if mid_event {
            StreamEnd::MidEvent
        } else if s.over_limit {
            StreamEnd::OverLimit
        } else if s.error.is_some() {
            StreamEnd::UpstreamError
        } else if s.completed == 0 {
            StreamEnd::NoCompleted
        } else {
            StreamEnd::Complete
        };
        SseOutcome {
            end,
            summary: self.summary,
        }
    }

    /// Appends part of the current line, unless that takes it over the limit.
    fn collect(&mut self, bytes: &[u8]) {
        if self.line_over || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > self.limit {
            self.line_over = true;
            self.line = Vec::new();
            self.summary.over_limit = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// A line ended; returns whether it ended an event.
    fn end_line(&mut self) -> bool {
        let first = std::mem::replace(&mut self.first_line, false);
        if self.line_over {
            self.line_over = false;
            self.in_event = true;
            self.event_broken = true;
            return false;
        }
        let start = if first && self.line.starts_with(BOM) {
            BOM.len()
        } else {
            0
        };
        let l = &self.line[start..];
        if l.is_empty() {
            self.line.clear();
            return self.dispatch();
        }
        if l[0] == b':' {
            self.clear_line();
            return false;
        }
        self.in_event = true;
        let (name, value_at) = match memchr::memchr(b':', l) {
            Some(c) => {
                let space = usize::from(l.get(c + 1) == Some(&b' '));
                (&l[..c], start + c + 1 + space)
            }
            None => (l, self.line.len()),
        };
        if name == b"data" {
            if !self.has_data {
                // Move the line in: the only copy of a big data line stays the one `collect` made.
                self.data = std::mem::take(&mut self.line);
                self.data_start = value_at;
                self.has_data = true;
                return false;
            }
            let value = &self.line[value_at..];
            if self.event_broken {
                // The event is lost already; collect nothing more of it.
            } else if self.data.len() - self.data_start + 1 + value.len() > self.limit {
                self.event_broken = true;
                self.summary.over_limit = true;
                self.data = Vec::new();
                self.data_start = 0;
            } else {
                self.data.push(b'\n');
                self.data.extend_from_slice(value);
            }
        }
        // `event`, `id`, `retry` and unknown fields: nothing to keep.
        self.clear_line();
        false
    }

    fn clear_line(&mut self) {
        if self.line.capacity() > KEEP_CAPACITY {
            self.line = Vec::new();
        } else {
            self.line.clear();
        }
    }

    /// A blank line: dispatch the event, if it has data. Returns whether an event ended.
    fn dispatch(&mut self) -> bool {
        let was_event = self.in_event;
        self.in_event = false;
        let broken = std::mem::replace(&mut self.event_broken, false);
        let has_data = std::mem::replace(&mut self.has_data, false);
        let data = std::mem::take(&mut self.data);
        if broken {
            self.summary.oversized_events += 1;
            return true;
        }
        if !has_data {
            // Fields without data (or a stray blank line): no event per the SSE spec.
            return was_event;
        }
        self.summary.events += 1;
        self.inspect(&data[self.data_start..]);
        true
    }

    fn inspect(&mut self, data: &[u8]) {
        let s = &mut self.summary;
        if data.starts_with(b"[DONE]") {
            s.done = true;
            return;
        }
        let Ok(probe) = serde_json::from_slice::<EventProbe>(data) else {
            s.unparsed_events += 1;
            return;
        };
        let kind = probe.kind.as_ref().and_then(Value::as_str);
        match kind {
            Some("image_edit.completed") => {
                s.completed += 1;
                match probe.usage.as_ref().map(Usage::from_value) {
                    Some(Ok(u)) => s.usages.push(u),
                    _ => s.completed_without_usage += 1,
                }
            }
            Some("image_edit.partial_image") => s.partial_images += 1,
            _ => {}
        }
        if s.error.is_none() {
            match &probe.error {
                Some(e) if truthy(e) => s.error = Some(keep_error(e)),
                _ if kind == Some("error") => {
                    // No usable `error` key: keep the whole (small) event instead.
                    s.error = serde_json::from_slice::<Value>(data)
                        .ok()
                        .map(|v| keep_error(&v));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTIAL: &str = r#"{"type":"image_edit.partial_image","b64_json":"QUJD","created_at":1764547200,"size":"1024x1024","quality":"high","background":"transparent","output_format":"png","partial_image_index":0}"#;
    const COMPLETED: &str = r#"{"type":"image_edit.completed","b64_json":"REVG","created_at":1764547210,"size":"1024x1024","quality":"high","background":"transparent","output_format":"png","usage":{"total_tokens":100,"input_tokens":50,"output_tokens":50,"input_tokens_details":{"text_tokens":10,"image_tokens":40}},"safety_identifier":null}"#;

    fn stream(nl: &str) -> String {
        format!(
            "event: image_edit.partial_image{nl}data: {PARTIAL}{nl}{nl}event: image_edit.completed{nl}data: {COMPLETED}{nl}{nl}"
        )
    }

    fn scan_split(body: &[u8], split: usize) -> SseOutcome {
        let mut s = SseScanner::default();
        s.feed(&body[..split]);
        s.feed(&body[split..]);
        s.finish()
    }

    fn check_good(o: &SseOutcome) {
        assert_eq!(o.end, StreamEnd::Complete, "{o:?}");
        assert_eq!(o.summary.partial_images, 1);
        assert_eq!(o.summary.completed, 1);
        assert_eq!(o.summary.usages.len(), 1);
        assert_eq!(o.summary.usages[0].input_image_tokens, 40);
        assert_eq!(o.summary.completed_without_usage, 0);
        assert_eq!(o.summary.events, 2);
        assert_eq!(o.summary.error, None);
    }

    #[test]
    fn every_split_point_every_line_ending() {
        for nl in ["\n", "\r\n", "\r"] {
            let body = stream(nl);
            for split in 0..=body.len() {
                let o = scan_split(body.as_bytes(), split);
                check_good(&o);
                assert_eq!(o.summary.bytes, body.len() as u64);
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        for nl in ["\n", "\r\n", "\r"] {
            let body = stream(nl);
            let mut s = SseScanner::default();
            let mut ended = 0;
            for b in body.as_bytes() {
                let fed = s.feed(std::slice::from_ref(b));
                if fed.events_ended > 0 {
                    assert_eq!(fed.last_event_end, Some(1));
                }
                ended += fed.events_ended;
            }
            assert_eq!(ended, 2);
            check_good(&s.finish());
        }
    }

    #[test]
    fn event_ends_are_reported() {
        let body = stream("\r\n");
        let mut s = SseScanner::default();
        let fed = s.feed(body.as_bytes());
        assert_eq!(fed.events_ended, 2);
        assert_eq!(fed.last_event_end, Some(body.len()));
        let first_end = body.find("\r\n\r\n").unwrap() + 4;
        let mut s = SseScanner::default();
        let fed = s.feed(&body.as_bytes()[..first_end + 3]);
        assert_eq!(
            fed,
            Fed {
                events_ended: 1,
                last_event_end: Some(first_end)
            }
        );
        // A `\r\n` split between chunks: the event ends at the `\r`.
        let mut s = SseScanner::default();
        let fed = s.feed(&body.as_bytes()[..first_end - 1]);
        assert_eq!(fed.last_event_end, Some(first_end - 1));
        let fed = s.feed(&body.as_bytes()[first_end - 1..]);
        assert_eq!(fed.events_ended, 1);
        check_good(&s.finish());
    }

    #[test]
    fn multi_line_data_is_joined() {
        // The completed event's JSON spread over three data lines, one without the space.
        // (Split after commas: the joining `\n` is then JSON whitespace.)
        let (a, rest) = COMPLETED.split_at(COMPLETED.find("\"created_at").unwrap());
        let (b, c) = rest.split_at(rest.find("\"usage").unwrap());
        let body = format!(
            ": keep-alive\nid: 7\nretry: 10\ndata: {PARTIAL}\n\nevent: whatever\ndata: {a}\ndata:{b}\ndata: {c}\n\n"
        );
        for split in 0..=body.len() {
            let o = scan_split(body.as_bytes(), split);
            check_good(&o);
        }
    }

    #[test]
    fn data_lines_join_with_newline() {
        let mut s = SseScanner::default();
        s.feed(b"data: a\r\ndata:b\rdata\ndata:  c\n");
        assert_eq!(&s.data[s.data_start..], b"a\nb\n\n c");
        // The first data line was moved, not copied: the buffer still holds its field name.
        assert_eq!(&s.data[..s.data_start], b"data: ");
    }

    #[test]
    fn type_not_event_line_decides() {
        let body = format!("event: image_edit.partial_image\ndata: {COMPLETED}\n\n");
        let o = scan_split(body.as_bytes(), 0);
        assert_eq!(o.summary.completed, 1);
        assert_eq!(o.summary.partial_images, 0);
    }

    #[test]
    fn several_completed_events_each_have_usage() {
        let body = format!("data: {COMPLETED}\n\ndata: {COMPLETED}\n\ndata: {COMPLETED}\n\n");
        let o = scan_split(body.as_bytes(), 17);
        assert_eq!(o.end, StreamEnd::Complete);
        assert_eq!(o.summary.completed, 3);
        assert_eq!(o.summary.usages.len(), 3);
    }

    #[test]
    fn broken_mid_event_is_incomplete() {
        let body = stream("\n");
        let cut = body.find("event: image_edit.completed").unwrap();
        // Ends between events, before the completed one: no completed event.
        let o = scan_split(&body.as_bytes()[..cut], 10);
        assert_eq!(o.end, StreamEnd::NoCompleted);
        assert!(o.end.needs_error_event());
        // Every cut inside the completed event: mid-event.
        for at in cut + 1..body.len() - 1 {
            let o = scan_split(&body.as_bytes()[..at], at / 2);
            assert_eq!(o.end, StreamEnd::MidEvent, "cut at {at}");
            assert_eq!(o.summary.completed, 0);
            assert!(o.end.needs_error_event());
        }
        // Cut after the data line's newline but before the blank line: still mid-event, and
        // the event is not dispatched (SSE spec).
        let o = scan_split(&body.as_bytes()[..body.len() - 1], 5);
        assert_eq!(o.end, StreamEnd::MidEvent);
        assert_eq!(o.summary.completed, 0);
        // Empty stream.
        assert_eq!(SseScanner::default().finish().end, StreamEnd::NoCompleted);
    }

    #[test]
    fn completed_without_usage() {
        let no_usage = r#"{"type":"image_edit.completed","b64_json":"QQ==","usage":null}"#;
        let bad_usage =
            r#"{"type":"image_edit.completed","b64_json":"QQ==","usage":{"output_tokens":1}}"#;
        let none = r#"{"type":"image_edit.completed","b64_json":"QQ=="}"#;
        let body = format!("data: {no_usage}\n\ndata: {bad_usage}\n\ndata: {none}\n\n");
        let o = scan_split(body.as_bytes(), 3);
        assert_eq!(o.end, StreamEnd::Complete);
        assert_eq!(o.summary.completed, 3);
        assert_eq!(o.summary.completed_without_usage, 3);
        assert!(o.summary.usages.is_empty());
    }

    #[test]
    fn errors_are_noted() {
        let err = r#"{"type":"error","error":{"message":"boom \"quoted\"","type":"server_error","param":null,"code":null}}"#;
        let body = format!("data: {PARTIAL}\n\nevent: error\ndata: {err}\n\n");
        let o = scan_split(body.as_bytes(), 20);
        assert_eq!(o.end, StreamEnd::UpstreamError);
        assert!(!o.end.needs_error_event());
        let e: Value = serde_json::from_str(o.summary.error.as_deref().unwrap()).unwrap();
        assert_eq!(e["type"], "server_error");

        // Any object with a truthy `error` key; a null or empty one is not an error.
        let body = "data: {\"error\":null}\n\ndata: {\"error\":{}}\n\ndata: {\"x\":1,\"error\":\"bad\"}\n\n";
        let o = scan_split(body.as_bytes(), 0);
        assert_eq!(o.summary.error.as_deref(), Some("\"bad\""));
        // `type: error` without an error key keeps the event.
        let o = scan_split(b"data: {\"type\":\"error\",\"message\":\"x\"}\n\n", 0);
        assert!(o.summary.error.as_deref().unwrap().contains("message"));
        // Not JSON at all.
        let o = scan_split(b"data: hello\n\ndata: [DONE]\n\n", 0);
        assert_eq!(o.summary.unparsed_events, 1);
        assert!(o.summary.done);
        assert_eq!(o.end, StreamEnd::NoCompleted);
    }

    #[test]
    fn line_over_the_limit() {
        let big = format!(
            r#"{{"type":"image_edit.partial_image","b64_json":"{}"}}"#,
            "A".repeat(500)
        );
        let body = format!("data: {big}\n\ndata: {COMPLETED}\n\n");
        for split in [0, 1, 100, 300, body.len() - 3] {
            let mut s = SseScanner::new(400);
            s.feed(&body.as_bytes()[..split]);
            s.feed(&body.as_bytes()[split..]);
            assert!(s.is_over_limit());
            let o = s.finish();
            assert_eq!(o.end, StreamEnd::OverLimit);
            assert_eq!(o.summary.oversized_events, 1);
            assert_eq!(o.summary.partial_images, 0);
            // The scanner kept going: the completed event was read.
            assert_eq!(o.summary.completed, 1);
            assert_eq!(o.summary.usages.len(), 1);
            assert_eq!(o.summary.bytes, body.len() as u64);
        }
        // Event data over the limit through many short lines.
        let body = format!("{}\ndata: {COMPLETED}\n\n", "data: AAAAAAAAAA\n".repeat(50));
        let mut s = SseScanner::new(400);
        s.feed(body.as_bytes());
        let o = s.finish();
        assert_eq!(o.end, StreamEnd::OverLimit);
        assert_eq!(o.summary.oversized_events, 1);
        assert_eq!(o.summary.completed, 1);
        // Broken inside the over-limit line: mid-event wins.
        let mut s = SseScanner::new(10);
        s.feed(b"data: 0123456789abcdef");
        assert_eq!(s.finish().end, StreamEnd::MidEvent);
    }

    #[test]
    fn bom_and_blank_lines() {
        let body = format!("\u{FEFF}\n\n\ndata: {COMPLETED}\n\n\n");
        let o = scan_split(body.as_bytes(), 2);
        assert_eq!(o.end, StreamEnd::Complete);
        assert_eq!(o.summary.events, 1);
        // Fields without data do not make an event, but the stream is between events after.
        let o = scan_split(b"event: x\nid: 1\n\n", 4);
        assert_eq!(o.summary.events, 0);
        assert_eq!(o.end, StreamEnd::NoCompleted);
    }

    #[test]
    fn s4_text_is_exact() {
        assert_eq!(
            &incomplete_error_event()[..],
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"message\":\"The upstream stream ended before the image was completed.\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_incomplete\"}}\n\n"
        );
        // And the scanner reads it as an upstream error.
        let o = scan_split(&incomplete_error_event(), 9);
        assert_eq!(o.end, StreamEnd::UpstreamError);
    }
}
