//! Read-body phase: the whole body under the cap and the deadline. A declared length over the
//! cap is refused before a single body byte is read.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Limited};

use crate::error::GatewayError;
use crate::upstream::error_chain;

/// The body limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Most bytes a body may have (413 above).
    pub cap: usize,
    /// Time the whole body has to arrive once the headers are in (408 after).
    pub timeout: Duration,
}

/// Read the capped body under its deadline.
pub async fn read_body<B>(limits: BodyLimits, req: Request<B>) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cap = limits.cap;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > cap as u64) {
        return Err(GatewayError::BodyTooLarge { limit: cap });
    }
    let limited = Limited::new(req.into_body(), cap);
    match tokio::time::timeout(limits.timeout, limited.collect()).await {
        Err(_) => Err(GatewayError::BodyTimeout {
            after: limits.timeout,
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::BodyTooLarge { limit: cap })
        }
        Ok(Err(e)) => {
            tracing::info!(error = %error_chain(&*e), "request body could not be read");
            Err(GatewayError::BodyIncomplete)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::full;
    use http_body_util::StreamBody;

    fn limits(cap: usize) -> BodyLimits {
        BodyLimits {
            cap,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn reads_a_body_within_the_cap() {
        let req = Request::new(full("hello"));
        assert_eq!(read_body(limits(5), req).await.unwrap(), "hello");
    }

    #[tokio::test]
    async fn refuses_a_declared_length_over_the_cap_before_reading() {
        let req = Request::builder()
            .header(header::CONTENT_LENGTH, "6")
            .body(full("hello!"))
            .unwrap();
        assert_eq!(
            read_body(limits(5), req).await,
            Err(GatewayError::BodyTooLarge { limit: 5 })
        );
    }

    #[tokio::test]
    async fn refuses_an_undeclared_body_over_the_cap() {
        let req = Request::new(full("hello!"));
        assert_eq!(
            read_body(limits(5), req).await,
            Err(GatewayError::BodyTooLarge { limit: 5 })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_times_out() {
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, std::io::Error>,
        >());
        let req = Request::new(stalled);
        assert_eq!(
            read_body(limits(5), req).await,
            Err(GatewayError::BodyTimeout {
                after: Duration::from_secs(5)
            })
        );
    }

    #[tokio::test]
    async fn a_broken_body_is_incomplete() {
        let broken = StreamBody::new(futures_util::stream::iter(vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"he"))),
            Err(std::io::Error::other("reset")),
        ]));
        let req = Request::new(broken);
        assert_eq!(
            read_body(limits(5), req).await,
            Err(GatewayError::BodyIncomplete)
        );
    }
}
