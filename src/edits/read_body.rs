//! Read-body phase: the whole body under the cap and the deadline, held against the global
//! budget of buffered request bytes. A declared length over the cap is refused before a single
//! body byte is read; a declared length is reserved in the budget before reading, an
//! undeclared one as it arrives. A request that finds no room within `server.buffer_wait`
//! gets 503 `overloaded` with `Retry-After`; the budget is released when the bytes are dropped
//! (after they went upstream, or with the refusal).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// The global budget of request bytes held in memory, counted in KiB.
#[derive(Clone)]
pub struct BufferBudget {
    permits: Arc<Semaphore>,
    wait: Duration,
}

/// Budget held for one request's bytes; released on drop.
#[derive(Debug, Default)]
pub struct BudgetHold {
    permits: Vec<OwnedSemaphorePermit>,
}

impl BudgetHold {
    /// KiB held.
    pub fn kib(&self) -> usize {
        self.permits.iter().map(|p| p.num_permits()).sum()
    }
}

impl BufferBudget {
    pub fn new(max_bytes: usize, wait: Duration) -> BufferBudget {
        BufferBudget {
            permits: Arc::new(Semaphore::new(kib(max_bytes).min(Semaphore::MAX_PERMITS))),
            wait,
        }
    }

    /// KiB free now.
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }

    /// Add room for `bytes` more to `hold`, waiting at most the configured time.
    async fn grow(&self, hold: &mut BudgetHold, bytes: usize) -> Result<(), GatewayError> {
        let n = u32::try_from(kib(bytes)).map_err(|_| GatewayError::BufferFull {
            retry_after: self.wait,
        })?;
        if n == 0 {
            return Ok(());
        }
        let full = || GatewayError::BufferFull {
            retry_after: self.wait.max(Duration::from_secs(1)),
        };
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => {
                hold.permits.push(p);
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(full()),
        }
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// Read the capped body under its deadline, holding its bytes against the budget.
pub async fn read_body<B>(
    limits: BodyLimits,
    budget: &BufferBudget,
    req: Request<B>,
) -> Result<(Bytes, BudgetHold), GatewayError>
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
    let mut hold = BudgetHold::default();
    let mut reserved = 0usize;
    if let Some(len) = declared {
        reserved = len as usize;
        budget.grow(&mut hold, reserved).await?;
    }
    let mut body = std::pin::pin!(Limited::new(req.into_body(), cap));
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            received += data.len();
            if received > reserved {
                // Undeclared (or longer than declared: hyper refuses that) bytes: grow in
                // steps of at least 64 KiB so that small chunks do not each take a permit.
                let step = (received - reserved)
                    .max(64 * 1024)
                    .min(cap - reserved.min(cap));
                budget.grow(&mut hold, step).await.map_err(|e| {
                    Box::new(BudgetError(e)) as Box<dyn std::error::Error + Send + Sync>
                })?;
                reserved += step;
            }
            chunks.push(data);
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Err(_) => Err(GatewayError::BodyTimeout {
            after: limits.timeout,
        }),
        Ok(Ok(())) => {
            let bytes = match chunks.len() {
                0 => Bytes::new(),
                1 => chunks.pop().expect("one chunk"),
                _ => {
                    let mut all = bytes::BytesMut::with_capacity(received);
                    for c in &chunks {
                        all.extend_from_slice(c);
                    }
                    all.freeze()
                }
            };
            Ok((bytes, hold))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::BodyTooLarge { limit: cap })
        }
        Ok(Err(e)) => match e.downcast::<BudgetError>() {
            Ok(b) => Err(b.0),
            Err(e) => {
                tracing::info!(error = %error_chain(&*e), "request body could not be read");
                Err(GatewayError::BodyIncomplete)
            }
        },
    }
}

/// A budget refusal carried through the body-reading error channel.
#[derive(Debug)]
struct BudgetError(GatewayError);

impl std::fmt::Display for BudgetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the buffered-bytes budget is exhausted")
    }
}

impl std::error::Error for BudgetError {}

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

    fn budget() -> BufferBudget {
        BufferBudget::new(1 << 20, Duration::from_secs(1))
    }

    async fn read_body<B>(limits: BodyLimits, req: Request<B>) -> Result<Bytes, GatewayError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        super::read_body(limits, &budget(), req).await.map(|r| r.0)
    }

    #[tokio::test]
    async fn the_budget_is_held_until_the_bytes_are_dropped() {
        let budget = BufferBudget::new(10 * 1024, Duration::from_secs(1));
        let req = Request::builder()
            .header(header::CONTENT_LENGTH, "6000")
            .body(full(vec![7u8; 6000]))
            .unwrap();
        let (bytes, hold) = super::read_body(limits(1 << 20), &budget, req)
            .await
            .unwrap();
        assert_eq!(bytes.len(), 6000);
        assert_eq!(hold.kib(), 6);
        assert_eq!(budget.available_kib(), 4);
        drop(hold);
        assert_eq!(budget.available_kib(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_finds_no_room_waits_then_gets_503() {
        let budget = BufferBudget::new(10 * 1024, Duration::from_secs(3));
        let first = Request::builder()
            .header(header::CONTENT_LENGTH, "8000")
            .body(full(vec![1u8; 8000]))
            .unwrap();
        let (_bytes, _hold) = super::read_body(limits(1 << 20), &budget, first)
            .await
            .unwrap();
        let second = Request::builder()
            .header(header::CONTENT_LENGTH, "8000")
            .body(full(vec![2u8; 8000]))
            .unwrap();
        let e = super::read_body(limits(1 << 20), &budget, second)
            .await
            .unwrap_err();
        assert_eq!(
            e,
            GatewayError::BufferFull {
                retry_after: Duration::from_secs(3)
            }
        );
        let r = e.into_response();
        assert_eq!(r.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "3");
    }

    #[tokio::test(start_paused = true)]
    async fn an_undeclared_body_is_held_as_it_arrives() {
        let budget = BufferBudget::new(100 * 1024, Duration::from_secs(1));
        let chunks = StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![0u8; 70 * 1024]))),
            Ok(http_body::Frame::data(Bytes::from(vec![0u8; 40 * 1024]))),
        ]));
        let e = super::read_body(limits(1 << 20), &budget, Request::new(chunks))
            .await
            .unwrap_err();
        assert!(matches!(e, GatewayError::BufferFull { .. }), "{e:?}");
        assert_eq!(
            budget.available_kib(),
            100,
            "a refusal releases what it held"
        );
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
