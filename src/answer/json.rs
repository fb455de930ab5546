//! Reads a JSON images answer (§4) on the side of the relay, in O(1) memory: it follows the JSON
//! structure (depth, strings, escapes) byte by byte, counts the items of the top-level `data`
//! array and captures the raw value of the top-level `usage` (at most 64 KiB) and of a few short
//! top-level strings. It is not a validator: malformed JSON gives best-effort figures, and
//! [`JsonAnswer::complete`] says whether the top-level value was closed.

use crate::pricing::{Usage, UsageError};

/// The longest `usage` value captured.
pub const USAGE_LIMIT: usize = 64 * 1024;
/// The longest top-level string value (`size`, `quality`, …) captured.
const SHORT_LIMIT: usize = 256;
/// Keys longer than this are none of the keys looked for.
const KEY_LIMIT: usize = 64;

/// The top-level keys the scanner cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Data,
    Usage,
    Size,
    Quality,
    OutputFormat,
    Background,
    Other,
}

impl Key {
    fn of(name: &[u8]) -> Key {
        match name {
            b"data" => Key::Data,
            b"usage" => Key::Usage,
            b"size" => Key::Size,
            b"quality" => Key::Quality,
            b"output_format" => Key::OutputFormat,
            b"background" => Key::Background,
            _ => Key::Other,
        }
    }

    fn limit(self) -> usize {
        match self {
            Key::Usage => USAGE_LIMIT,
            _ => SHORT_LIMIT,
        }
    }
}

#[derive(Debug)]
struct Capture {
    key: Key,
    buf: Vec<u8>,
    over: bool,
}

/// What a JSON answer carried.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonAnswer {
    /// Bytes fed.
    pub bytes: u64,
    /// Objects directly inside the top-level `data` array.
    pub items: u64,
    /// The top-level `usage`: `None` when absent or `null`; an error when it cannot be billed
    /// (malformed, over 64 KiB, missing counts).
    pub usage: Option<Result<Usage, UsageError>>,
    /// Top-level string values, when present and strings.
    pub size: Option<String>,
    pub quality: Option<String>,
    pub output_format: Option<String>,
    pub background: Option<String>,
    /// The top-level value was an object and was closed.
    pub complete: bool,
}

/// Watches a JSON answer chunk by chunk; see the module documentation.
#[derive(Debug, Default)]
pub struct JsonAnswerScanner {
    /// Open containers.
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The top-level value is an object (the first container opened at depth 0 was `{`).
    top_object: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    /// The string being read is a depth-1 key: its bytes so far (bounded).
    in_key: bool,
    key: Vec<u8>,
    key_over: bool,
    key_escaped: bool,
    /// The key whose value is being read at depth 1.
    current: Option<Key>,
    /// The depth-2 container is the `data` array.
    in_data: bool,
    capture: Option<Capture>,
    out: JsonAnswer,
}

impl JsonAnswerScanner {
    pub fn new() -> JsonAnswerScanner {
        JsonAnswerScanner::default()
    }

    /// Items counted so far.
    pub fn items(&self) -> u64 {
        self.out.items
    }

    /// Observes the next chunk of the answer.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.out.bytes += chunk.len() as u64;
        let mut i = 0;
        while i < chunk.len() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    self.string_bytes(&chunk[i..i + 1]);
                    i += 1;
                    continue;
                }
                // Skip through the string fast: only `"` and `\` matter inside it.
                match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
                    None => {
                        self.string_bytes(&chunk[i..]);
                        i = chunk.len();
                    }
                    Some(j) => {
                        let k = i + j;
                        self.string_bytes(&chunk[i..k]);
                        self.capture_bytes(&chunk[k..k + 1]);
                        if chunk[k] == b'\\' {
                            self.escape = true;
                            if self.in_key {
                                self.key_escaped = true;
                                self.key_push(b"\\");
                            }
                        } else {
                            self.in_string = false;
                            self.string_ended();
                        }
                        i = k + 1;
                    }
                }
                continue;
            }
            let b = chunk[i];
            i += 1;
            self.structural(b);
        }
    }

    /// Ends the answer: what it carried.
    pub fn finish(mut self) -> JsonAnswer {
        // A capture still open at the end is a truncated value: nothing to parse.
        if let Some(c) = self.capture.take()
            && c.key == Key::Usage
        {
            self.out.usage = Some(Err(UsageError::Json("truncated".into())));
        }
        self.out
    }

    fn structural(&mut self, b: u8) {
        match b {
            b'"' => {
                self.capture_bytes(b"\"");
                self.in_string = true;
                if self.depth == 1 && self.top_object && self.expect_key {
                    self.in_key = true;
                    self.key.clear();
                    self.key_over = false;
                    self.key_escaped = false;
                }
            }
            b'{' | b'[' => {
                self.capture_bytes(&[b]);
                self.depth = self.depth.saturating_add(1);
                match self.depth {
                    1 => {
                        self.top_object = b == b'{';
                        self.expect_key = true;
                    }
                    2 => self.in_data = b == b'[' && self.current == Some(Key::Data),
                    3 if self.in_data && b == b'{' => self.out.items += 1,
                    _ => {}
                }
            }
            b'}' | b']' => {
                if self.depth == 1 {
                    self.end_value();
                    if self.top_object {
                        self.out.complete = true;
                    }
                } else {
                    self.capture_bytes(&[b]);
                }
                if self.depth == 2 {
                    self.in_data = false;
                }
                self.depth = self.depth.saturating_sub(1);
            }
            b',' if self.depth == 1 => {
                self.end_value();
                self.expect_key = true;
            }
            b':' if self.depth == 1 => {
                self.expect_key = false;
                if let Some(key) = self.current.filter(|k| *k != Key::Data && *k != Key::Other) {
                    self.capture = Some(Capture {
                        key,
                        buf: Vec::new(),
                        over: false,
                    });
                }
            }
            _ => self.capture_bytes(&[b]),
        }
    }

    /// Bytes inside a string (not its closing quote).
    fn string_bytes(&mut self, bytes: &[u8]) {
        if self.in_key {
            self.key_push(bytes);
        }
        self.capture_bytes(bytes);
    }

    fn key_push(&mut self, bytes: &[u8]) {
        if self.key_over || bytes.is_empty() {
            return;
        }
        if self.key.len() + bytes.len() > KEY_LIMIT {
            self.key_over = true;
            self.key.clear();
        } else {
            self.key.extend_from_slice(bytes);
        }
    }

    fn string_ended(&mut self) {
        if !self.in_key {
            return;
        }
        self.in_key = false;
        self.current = Some(if self.key_over {
            Key::Other
        } else if self.key_escaped {
            // A key written with escapes (`"us\u0061ge"`): decode it.
            let mut quoted = Vec::with_capacity(self.key.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(&self.key);
            quoted.push(b'"');
            serde_json::from_slice::<String>(&quoted)
                .map(|k| Key::of(k.as_bytes()))
                .unwrap_or(Key::Other)
        } else {
            Key::of(&self.key)
        });
    }

    fn capture_bytes(&mut self, bytes: &[u8]) {
        let Some(c) = self.capture.as_mut() else {
            return;
        };
        if c.over {
            return;
        }
        if c.buf.len() + bytes.len() > c.key.limit() {
            c.over = true;
            c.buf = Vec::new();
        } else {
            c.buf.extend_from_slice(bytes);
        }
    }

    /// A depth-1 value ended (at `,` or the closing `}`).
    fn end_value(&mut self) {
        self.current = None;
        let Some(c) = self.capture.take() else {
            return;
        };
        let raw = c.buf.trim_ascii();
        match c.key {
            Key::Usage => {
                self.out.usage = if c.over {
                    Some(Err(UsageError::TooLarge))
                } else if raw == b"null" {
                    None
                } else {
                    Some(Usage::from_slice(raw))
                }
            }
            key => {
                let s = if c.over {
                    None
                } else {
                    serde_json::from_slice::<String>(raw).ok()
                };
                match key {
                    Key::Size => self.out.size = s,
                    Key::Quality => self.out.quality = s,
                    Key::OutputFormat => self.out.output_format = s,
                    Key::Background => self.out.background = s,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{
  "created": 1764547200,
  "data": [ { "b64_json": "iVBORw0KGgo=" }, {"b64_json":"QUJD"} ],
  "background": "opaque",
  "output_format": "png",
  "quality": "medium",
  "size": "1536x864",
  "safety_identifier": "user-hash",
  "usage": {
    "input_tokens": 1060,
    "input_tokens_details": { "text_tokens": 60, "image_tokens": 1000 },
    "output_tokens": 2000,
    "output_tokens_details": { "image_tokens": 2000, "text_tokens": 0 },
    "total_tokens": 3060
  }
}"#;

    fn scan_split(body: &[u8], split: usize) -> JsonAnswer {
        let mut s = JsonAnswerScanner::new();
        s.feed(&body[..split]);
        s.feed(&body[split..]);
        s.finish()
    }

    fn check(a: &JsonAnswer) {
        assert_eq!(a.items, 2);
        let u = a.usage.clone().unwrap().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.input_text_tokens,
                u.input_image_tokens,
                u.output_tokens
            ),
            (1060, 60, 1000, 2000)
        );
        assert_eq!(
            crate::pricing::cost_micros(&u, &crate::pricing::TokenPrices::gpt_image_2()),
            Ok(68_300)
        );
        assert_eq!(a.size.as_deref(), Some("1536x864"));
        assert_eq!(a.quality.as_deref(), Some("medium"));
        assert_eq!(a.output_format.as_deref(), Some("png"));
        assert_eq!(a.background.as_deref(), Some("opaque"));
        assert!(a.complete);
    }

    #[test]
    fn every_split_point() {
        for split in 0..=BODY.len() {
            let a = scan_split(BODY.as_bytes(), split);
            check(&a);
            assert_eq!(a.bytes, BODY.len() as u64);
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut s = JsonAnswerScanner::new();
        for b in BODY.as_bytes() {
            s.feed(std::slice::from_ref(b));
        }
        check(&s.finish());
    }

    #[test]
    fn not_fooled_by_strings() {
        // "usage" and "data", braces, brackets, commas and colons inside strings, escaped quotes
        // and backslashes, a nested "usage" key and a "data" array inside another object.
        let body = r#"{"note":"a \"usage\": {\"input_tokens\": 1} ,\\","msg":"}]{[,:","data":[{"b64_json":"QQ==","x":"{\"b64_json\":1}"},{"b64_json":"\\\""}],"other":{"usage":{"input_tokens":9,"output_tokens":9},"data":[{},{},{}]},"list":[{"usage":1}],"usage":{"input_tokens":3,"output_tokens":4,"note":"}\"usage\""},"size":"1024x1024"}"#;
        for split in 0..=body.len() {
            let a = scan_split(body.as_bytes(), split);
            assert_eq!(a.items, 2, "split {split}");
            let u = a.usage.unwrap().unwrap();
            assert_eq!((u.input_tokens, u.output_tokens), (3, 4));
            assert_eq!(a.size.as_deref(), Some("1024x1024"));
            assert!(a.complete);
        }
    }

    #[test]
    fn escaped_key_is_decoded() {
        let body = br#"{"us\u0061ge":{"input_tokens":1,"output_tokens":2},"d\u0061ta":[{}]}"#;
        let a = scan_split(body, 7);
        assert_eq!(a.usage.unwrap().unwrap().output_tokens, 2);
        assert_eq!(a.items, 1);
    }

    #[test]
    fn absent_null_and_bad_usage() {
        let a = scan_split(br#"{"created":1,"data":[{"b64_json":"QQ=="}]}"#, 5);
        assert_eq!(a.usage, None);
        assert_eq!(a.items, 1);
        let a = scan_split(br#"{"usage":null,"data":[]}"#, 5);
        assert_eq!(a.usage, None);
        assert_eq!(a.items, 0);
        let a = scan_split(br#"{"usage":{"input_tokens":1}}"#, 5);
        assert_eq!(a.usage, Some(Err(UsageError::Missing("output_tokens"))));
        let big = format!(
            r#"{{"usage":{{"input_tokens":1,"output_tokens":1,"pad":"{}"}},"data":[{{}}]}}"#,
            "x".repeat(USAGE_LIMIT)
        );
        let a = scan_split(big.as_bytes(), 100);
        assert_eq!(a.usage, Some(Err(UsageError::TooLarge)));
        assert_eq!(a.items, 1);
        assert!(a.complete);
    }

    #[test]
    fn truncated_answer() {
        let cut = BODY.find("\"total_tokens\"").unwrap();
        let a = scan_split(&BODY.as_bytes()[..cut], 10);
        assert!(!a.complete);
        assert_eq!(a.items, 2);
        assert!(matches!(a.usage, Some(Err(UsageError::Json(_)))));
        // Cut inside the data array.
        let cut = BODY.find("QUJD").unwrap();
        let a = scan_split(&BODY.as_bytes()[..cut], 10);
        assert_eq!(a.items, 2);
        assert_eq!(a.usage, None);
        assert!(!a.complete);
    }

    #[test]
    fn not_an_object() {
        let a = scan_split(
            br#"[{"usage":{"input_tokens":1,"output_tokens":1}},{"data":[{}]}]"#,
            3,
        );
        assert_eq!(a.items, 0);
        assert_eq!(a.usage, None);
        assert!(!a.complete);
        // `data` that is an object does not count its values.
        let a = scan_split(br#"{"data":{"a":{},"b":{}}}"#, 3);
        assert_eq!(a.items, 0);
        // Non-string short fields are ignored.
        let a = scan_split(br#"{"size":1024,"quality":["high"]}"#, 3);
        assert_eq!((a.size, a.quality), (None, None));
    }

    #[test]
    fn large_b64_is_skipped_in_one_pass() {
        let b64 = "A".repeat(1 << 20);
        let body = format!(
            r#"{{"created":1,"data":[{{"b64_json":"{b64}"}},{{"b64_json":"{b64}"}}],"usage":{{"input_tokens":1,"output_tokens":1}}}}"#
        );
        let mut s = JsonAnswerScanner::new();
        for c in body.as_bytes().chunks(8191) {
            s.feed(c);
        }
        let a = s.finish();
        assert_eq!(a.items, 2);
        assert!(a.usage.unwrap().is_ok());
    }
}
