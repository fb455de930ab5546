//! What comes back from the upstream: the response headers passed to the caller, and errors
//! worded for logs.

use http::HeaderMap;

/// Response headers passed back to the caller (names are lowercase; `x-ratelimit-` is a prefix).
pub(super) const PASS_THROUGH: [&str; 9] = [
    "content-type",
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
    "openai-organization",
    "openai-model",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
];

pub(super) fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        if err.to_string().contains("timed out") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An error and its sources on one line, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

/// The upstream response headers that go back to the caller.
pub fn passed_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        let n = name.as_str();
        if PASS_THROUGH.contains(&n) || n.starts_with("x-ratelimit-") {
            out.append(name.clone(), value.clone());
        }
    }
    out
}
