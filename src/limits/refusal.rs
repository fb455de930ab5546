//! The limits' refusals worded as OpenAI words them: end-user resolution ([`EndUserError`])
//! and the per-minute rate limits ([`RateRefusal`]). The limit code says what is wrong; the
//! wording, param, code (and, through [`GatewayError`], status, type and retry headers) are
//! decided here, once.

use std::time::Duration;

use super::EndUserError;
use super::rate::{Limited, RateRefusal};
use crate::error::{GatewayError, too_long};

impl From<EndUserError> for GatewayError {
    fn from(e: EndUserError) -> Self {
        let field = |code, message: String| GatewayError::field("user", code, message);
        match e {
            EndUserError::ControlCharacters => field(
                "invalid_value",
                "Invalid 'user': control characters are not allowed in an end-user id.".into(),
            ),
            EndUserError::TooLong { max, got } => {
                field("string_above_max_length", too_long("user", max, got))
            }
            EndUserError::Missing => field(
                "missing_required_parameter",
                "Missing required parameter: 'user'. This gateway charges every request to an end user; send the end user's id in 'user'.".into(),
            ),
            EndUserError::NotTheKeysUser { own } => field(
                "invalid_value",
                format!(
                    "Invalid 'user': this key belongs to '{own}'; send 'user' as '{own}' or leave it out."
                ),
            ),
        }
    }
}

impl From<RateRefusal> for GatewayError {
    fn from(r: RateRefusal) -> Self {
        let e = match r {
            RateRefusal::Unavailable => return GatewayError::RateLimiterUnavailable,
            RateRefusal::Exhausted(e) => e,
        };
        let who = match &e.of {
            Limited::Client(client) => format!("client '{client}'"),
            Limited::EndUser(user) => user.label(),
        };
        GatewayError::RateLimited {
            message: format!(
                "Rate limit reached for {} per minute for {who} on this gateway. Limit: {}/1min (burst {}). Requested: {}, available now: {}. Please try again in {}.",
                e.counted.as_str(),
                e.per_minute,
                e.burst,
                e.requested,
                e.available,
                human(e.retry_after)
            ),
            retry_after: e.retry_after,
        }
    }
}

/// A wait as the 429 message words it: `250ms`, `1.5s`.
fn human(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::StatusCode;

    use super::*;
    use crate::limits::EndUser;
    use crate::limits::rate::{Counted, Exhausted};

    use crate::error::rendered;

    fn field(
        param: &str,
        code: &str,
        message: &str,
    ) -> (u16, &'static str, Option<String>, String, String) {
        (
            400,
            "invalid_request_error",
            Some(param.into()),
            code.into(),
            message.into(),
        )
    }

    #[test]
    fn end_user_refusals_name_the_user_field() {
        assert_eq!(
            rendered(EndUserError::ControlCharacters),
            field(
                "user",
                "invalid_value",
                "Invalid 'user': control characters are not allowed in an end-user id."
            )
        );
        assert_eq!(
            rendered(EndUserError::TooLong { max: 256, got: 257 }),
            field(
                "user",
                "string_above_max_length",
                "Invalid 'user': string too long. Expected a string with maximum length 256, but got a string with length 257 instead."
            )
        );
        assert_eq!(
            rendered(EndUserError::Missing),
            field(
                "user",
                "missing_required_parameter",
                "Missing required parameter: 'user'. This gateway charges every request to an end user; send the end user's id in 'user'."
            )
        );
        assert_eq!(
            rendered(EndUserError::NotTheKeysUser {
                own: "alice".into()
            }),
            field(
                "user",
                "invalid_value",
                "Invalid 'user': this key belongs to 'alice'; send 'user' as 'alice' or leave it out."
            )
        );
    }

    #[test]
    fn rate_refusals_are_429s_with_their_numbers_and_retry_headers() {
        let spent = |of, counted, retry_after| {
            RateRefusal::Exhausted(Box::new(Exhausted {
                counted,
                of,
                per_minute: 6,
                burst: 3,
                requested: 4,
                available: 1,
                retry_after,
            }))
        };
        let user = Limited::EndUser(EndUser {
            client: Arc::from("web"),
            user: Some("u-1".into()),
        });
        let (status, kind, param, code, message) =
            rendered(spent(user, Counted::Images, Duration::from_millis(1500)));
        assert_eq!(
            (status, kind, param, code.as_str()),
            (429, "requests", None, "rate_limit_exceeded")
        );
        assert_eq!(
            message,
            "Rate limit reached for images per minute for user 'u-1' of client 'web' on this gateway. Limit: 6/1min (burst 3). Requested: 4, available now: 1. Please try again in 1.5s."
        );
        let client = GatewayError::from(spent(
            Limited::Client("web".into()),
            Counted::Requests,
            Duration::from_millis(250),
        ));
        assert!(client.parts().message.starts_with(
            "Rate limit reached for requests per minute for client 'web' on this gateway."
        ));
        assert!(
            client
                .parts()
                .message
                .ends_with("Please try again in 250ms.")
        );
        let resp = client.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            (
                resp.headers()["retry-after"].to_str().unwrap(),
                resp.headers()["retry-after-ms"].to_str().unwrap()
            ),
            ("1", "250")
        );
        let down = GatewayError::from(RateRefusal::Unavailable);
        assert_eq!(down, GatewayError::RateLimiterUnavailable);
        assert_eq!(
            down.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
