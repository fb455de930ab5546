//! Observers of an upstream GPT-image answer as it is relayed chunk by chunk
//! (`gpt-image-models.md` §4, §5, §9 S1–S5, B2–B5). They never hold the whole body: the relay
//! forwards every chunk unchanged and feeds a copy of the view to a scanner on the side.
//!
//! - [`sse::SseScanner`]: a `text/event-stream` answer (`stream=true`).
//! - [`json::JsonAnswerScanner`]: a JSON answer (`stream` absent or false).

pub mod json;
pub mod sse;

pub use json::{JsonAnswer, JsonAnswerScanner};
pub use sse::{
    DEFAULT_LINE_LIMIT, Fed, SseOutcome, SseScanner, SseSummary, StreamEnd, incomplete_error_event,
};
