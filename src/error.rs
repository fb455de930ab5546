//! Every way a request can end without a forwarded answer, and how each one is rendered.
//!
//! Errors are responses: handlers return `GatewayError`, and [`GatewayError::into_response`]
//! turns it into OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`. The match in
//! [`GatewayError::parts`] is exhaustive and grouped by fault (client / upstream / internal), so a
//! new variant cannot be added without deciding its status, type, param and code. Internal details
//! (I/O errors, upstream bodies) are logged by the caller, never put into a message. Domain code
//! returns its own typed refusals (`edit::form::FormError`, `limits::EndUserError`,
//! `limits::rate::RateRefusal`); their `From` conversions live beside them (`edit::form::error`,
//! `limits::refusal`) and word them with the shared wordings of `domain`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Body, full};

mod domain;
pub(crate) mod png;

pub(crate) use domain::{quoted_list, too_long};
pub use png::PngRejection;

/// One rejected or failed request.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayError {
    // ---- client faults ----
    /// No `Authorization: Bearer` header.
    MissingKey,
    /// A key was sent but matches no configured client. Holds a masked form of the key.
    InvalidKey { masked: String },
    /// No route for the path.
    UnknownUrl { method: String, path: String },
    /// The path exists but not for this method.
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    /// The request is not `multipart/form-data` with a boundary.
    UnsupportedContentType { content_type: String },
    /// The body could not be parsed as multipart.
    InvalidMultipart { detail: String },
    /// The body is larger than the configured cap.
    BodyTooLarge { limit: usize },
    /// The body did not arrive within the configured deadline.
    BodyTimeout { after: Duration },
    /// The body arrived slower than the configured minimum rate (after its grace period).
    BodyTooSlow {
        min_rate: u64,
        received: u64,
        after: Duration,
    },
    /// The body stream broke off (the caller disconnected or sent a malformed chunk).
    BodyIncomplete,
    /// A form field broke a rule: param, code and message as OpenAI words them.
    Field {
        param: String,
        code: &'static str,
        message: String,
    },
    /// A 400 in OpenAI's envelope with its own type (`invalid_request_error` or
    /// `image_generation_user_error`), param and code: the GPT-image profile's refusals.
    Invalid(Box<Invalid>),
    /// The image or mask failed the PNG checks.
    Png {
        part: &'static str,
        rejection: PngRejection,
        /// The configured byte limit, for the "less than N MB" wording.
        max_bytes: usize,
    },
    /// A per-minute rate limit is exhausted.
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    /// A daily or monthly quota is exhausted.
    QuotaExceeded {
        message: String,
        retry_after: Option<Duration>,
    },
    /// An admin route without the admin key (a gateway key is not one).
    AdminKeyRequired,
    /// An admin route's query string or filter is not understood.
    InvalidQuery { message: String },
    /// `/admin/requests/{id}` names no request in the ledger.
    RecordNotFound { id: String },

    // ---- upstream faults ----
    /// The upstream could not be reached (connect, TLS, reset before an answer).
    UpstreamUnreachable,
    /// The upstream did not answer within the response timeout.
    UpstreamTimeout { after: Duration },

    // ---- internal / capacity ----
    /// Too many requests in flight on this gateway.
    Overloaded,
    /// The request bytes held in memory are at their cap and did not drop below it in time.
    BufferFull { retry_after: Duration },
    /// No upstream key is configured, so nothing can be forwarded.
    UpstreamKeyMissing,
    /// The shared rate limiter (Redis) cannot be reached and `limits.redis_failure` is
    /// `fail_closed`, so the request is refused rather than admitted unchecked.
    RateLimiterUnavailable,
    /// The usage ledger cannot record the request, so it is not forwarded.
    LedgerUnavailable,
    /// The usage ledger cannot be read (an admin report or lookup).
    LedgerUnreadable,
    /// A bug. The detail goes to the log only.
    Internal,
}

/// The pieces of a [`GatewayError::Invalid`] (boxed: errors travel in `Result`s).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub message: String,
}

/// Marks an error response whose cause is the caller leaving (a body that broke off
/// mid-upload): the record's outcome is `client_gone`, not a refusal.
#[derive(Debug, Clone, Copy)]
pub struct CallerLeft;

/// The rendered pieces of an error. Also attached to the error response as an extension, so
/// outer layers (the usage ledger) can record why a request was refused.
#[derive(Debug, Clone)]
pub struct ErrorParts {
    pub status: StatusCode,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub message: String,
}

impl GatewayError {
    pub fn field(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        GatewayError::Field {
            param: param.into(),
            code,
            message: message.into(),
        }
    }

    /// `invalid_request_error`, 400, with a param and code.
    pub fn invalid_request(
        param: Option<&str>,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        GatewayError::Invalid(Box::new(Invalid {
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code,
            message: message.into(),
        }))
    }

    /// `image_generation_user_error`, 400, with a param and code.
    pub fn image_user_error(
        param: Option<&str>,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        GatewayError::Invalid(Box::new(Invalid {
            kind: "image_generation_user_error",
            param: param.map(str::to_owned),
            code,
            message: message.into(),
        }))
    }

    pub fn parts(&self) -> ErrorParts {
        use GatewayError::*;
        const INVALID: &str = "invalid_request_error";
        let p = |status, kind, param: Option<&str>, code, message: String| ErrorParts {
            status,
            kind,
            param: param.map(str::to_owned),
            code,
            message,
        };
        match self {
            // client faults
            MissingKey => p(
                StatusCode::UNAUTHORIZED,
                INVALID,
                None,
                None,
                "You didn't provide an API key. You need to provide your gateway key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
            ),
            InvalidKey { masked } => p(
                StatusCode::UNAUTHORIZED,
                INVALID,
                None,
                Some("invalid_api_key"),
                format!("Incorrect API key provided: {masked}. This gateway accepts only the gateway keys its operator issued."),
            ),
            UnknownUrl { method, path } => p(
                StatusCode::NOT_FOUND,
                INVALID,
                None,
                Some("unknown_url"),
                format!("Invalid URL ({method} {path})"),
            ),
            MethodNotAllowed { method, path, allowed } => p(
                StatusCode::METHOD_NOT_ALLOWED,
                INVALID,
                None,
                Some("method_not_allowed"),
                format!("Method {method} is not allowed for {path}. Allowed: {allowed}."),
            ),
            UnsupportedContentType { content_type } => p(
                StatusCode::BAD_REQUEST,
                INVALID,
                None,
                Some("unsupported_content_type"),
                format!(
                    "Unsupported content type: '{content_type}'. This API method only accepts 'multipart/form-data' requests, but you specified the header 'Content-Type: {content_type}'. Please try again with a supported content type."
                ),
            ),
            InvalidMultipart { detail } => p(
                StatusCode::BAD_REQUEST,
                INVALID,
                None,
                Some("invalid_multipart"),
                format!("Could not parse the multipart/form-data body: {detail}."),
            ),
            BodyTooLarge { limit } => p(
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID,
                None,
                Some("request_too_large"),
                format!("The request body is larger than this gateway accepts ({limit} bytes)."),
            ),
            BodyTimeout { after } => p(
                StatusCode::REQUEST_TIMEOUT,
                INVALID,
                None,
                Some("request_timeout"),
                format!("The request body did not arrive within {} seconds.", after.as_secs()),
            ),
            BodyTooSlow {
                min_rate,
                received,
                after,
            } => p(
                StatusCode::REQUEST_TIMEOUT,
                INVALID,
                None,
                Some("request_timeout"),
                format!(
                    "The request body arrived too slowly: {received} bytes in {:.1} seconds, below this gateway's minimum of {min_rate} bytes per second.",
                    after.as_secs_f64()
                ),
            ),
            BodyIncomplete => p(
                StatusCode::BAD_REQUEST,
                INVALID,
                None,
                Some("incomplete_body"),
                "The request body ended before it was complete.".into(),
            ),
            Field { param, code, message } => {
                p(StatusCode::BAD_REQUEST, INVALID, Some(param), Some(code), message.clone())
            }
            Invalid(i) => p(
                StatusCode::BAD_REQUEST,
                i.kind,
                i.param.as_deref(),
                i.code,
                i.message.clone(),
            ),
            Png { part, rejection, max_bytes } => p(
                StatusCode::BAD_REQUEST,
                INVALID,
                Some(part),
                Some(rejection.code()),
                rejection.message_with_limit(part, *max_bytes),
            ),
            RateLimited { message, .. } => p(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                None,
                Some("rate_limit_exceeded"),
                message.clone(),
            ),
            QuotaExceeded { message, .. } => p(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                None,
                Some("insufficient_quota"),
                message.clone(),
            ),
            AdminKeyRequired => p(
                StatusCode::UNAUTHORIZED,
                INVALID,
                None,
                Some("invalid_api_key"),
                "The admin routes need the admin key as a Bearer token.".into(),
            ),
            InvalidQuery { message } => p(
                StatusCode::BAD_REQUEST,
                INVALID,
                None,
                Some("invalid_value"),
                message.clone(),
            ),
            RecordNotFound { id } => p(
                StatusCode::NOT_FOUND,
                INVALID,
                None,
                Some("not_found"),
                format!("No request '{id}' in the ledger."),
            ),
            // upstream faults
            UpstreamUnreachable => p(
                StatusCode::BAD_GATEWAY,
                "server_error",
                None,
                Some("upstream_unreachable"),
                "The gateway could not reach the upstream API. Please try again.".into(),
            ),
            UpstreamTimeout { after } => p(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                None,
                Some("upstream_timeout"),
                format!("The upstream API did not answer within {} seconds.", after.as_secs()),
            ),
            // internal / capacity
            Overloaded => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("overloaded"),
                "The gateway is handling too many requests. Please try again shortly.".into(),
            ),
            BufferFull { .. } => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("overloaded"),
                "The gateway is holding as many request bytes as it may. Please try again shortly.".into(),
            ),
            UpstreamKeyMissing => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("upstream_key_missing"),
                "The gateway has no upstream API key configured, so it cannot forward requests.".into(),
            ),
            RateLimiterUnavailable => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("rate_limiter_unavailable"),
                "The gateway cannot reach its shared rate limiter, so it cannot admit this request. Please try again shortly.".into(),
            ),
            LedgerUnavailable => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("ledger_unavailable"),
                "The gateway cannot record this request in its usage ledger, so it was not forwarded. Please try again later.".into(),
            ),
            LedgerUnreadable => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("ledger_unavailable"),
                "The ledger could not be read.".into(),
            ),
            Internal => p(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
                "The gateway had an internal error while processing your request.".into(),
            ),
        }
    }

    /// Retry hints for the response, if any.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => Some(*retry_after),
            GatewayError::QuotaExceeded { retry_after, .. } => *retry_after,
            GatewayError::BufferFull { retry_after } => Some(*retry_after),
            GatewayError::RateLimiterUnavailable => Some(Duration::from_secs(1)),
            // Shed load (max_in_flight, max_forwarding): a well-behaved client waits a moment.
            GatewayError::Overloaded => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Render as an OpenAI-shaped JSON response.
    pub fn into_response(self) -> Response<Body> {
        let parts = self.parts();
        let mut resp = error_response(&parts);
        resp.extensions_mut().insert(parts);
        if matches!(self, GatewayError::BodyIncomplete) {
            resp.extensions_mut().insert(CallerLeft);
        }
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            h.insert(
                "retry-after-ms",
                HeaderValue::from(after.as_millis().max(1) as u64),
            );
        }
        if let GatewayError::MethodNotAllowed { allowed, .. } = &self {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        if let GatewayError::QuotaExceeded { .. } = &self {
            // Retrying before the period resets cannot succeed: tell the SDKs not to.
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

/// The JSON envelope for already rendered parts.
pub fn error_response(parts: &ErrorParts) -> Response<Body> {
    let body = serde_json::json!({
        "error": {
            "message": parts.message,
            "type": parts.kind,
            "param": parts.param,
            "code": parts.code,
        }
    });
    let bytes = Bytes::from(serde_json::to_vec(&body).expect("a json! value always serializes"));
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = parts.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Mask a presented key for messages the way OpenAI does: a few leading characters, the last four.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len().max(3));
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

/// (status, type, param, code, message) as the envelope carries them: what the unit tests of the
/// domain's conversions compare.
#[cfg(test)]
pub(crate) fn rendered(
    e: impl Into<GatewayError>,
) -> (u16, &'static str, Option<String>, String, String) {
    let p = e.into().parts();
    (
        p.status.as_u16(),
        p.kind,
        p.param,
        p.code.unwrap_or("-").to_owned(),
        p.message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_never_reveals_short_keys() {
        assert_eq!(mask_key("abc"), "***");
        assert_eq!(mask_key("abcdefgh"), "********");
        assert_eq!(mask_key("ig-live-0123456789"), "ig-***6789");
    }

    #[test]
    fn every_error_has_all_four_envelope_keys() {
        let e = GatewayError::MissingKey.parts();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(e.code.is_none() && e.param.is_none());
        let f = GatewayError::field("n", "invalid_type", "x").parts();
        assert_eq!(f.param.as_deref(), Some("n"));
        assert_eq!(f.code, Some("invalid_type"));
    }

    #[test]
    fn rate_limit_carries_retry_headers() {
        let r = GatewayError::RateLimited {
            message: "m".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1500");
    }
}
