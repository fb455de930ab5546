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
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::upstream::error_chain;

/// The body limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Most bytes a body may have (413 above).
    pub cap: usize,
    /// Time the whole body has to arrive once the headers are in (408 after).
    pub timeout: Duration,
    /// Slowest average rate in bytes per second once `rate_grace` has passed (408 below);
    /// 0 = off.
    pub min_rate: u64,
    /// Time from the start of the body during which `min_rate` is not enforced.
    pub rate_grace: Duration,
}

impl BodyLimits {
    /// When a body that has delivered `received` bytes since `start` falls below the minimum
    /// rate if nothing more arrives: the later of the end of the grace and the time at which
    /// `received` bytes are exactly the minimum rate. `None` when the rate is not enforced.
    fn rate_deadline(&self, start: Instant, received: usize) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        Some(start + self.rate_grace.max(earned))
    }
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
        // Moved forward by the time spent waiting for the budget: the caller is not to blame.
        let mut start = Instant::now();
        loop {
            let next = body.frame();
            let frame = match limits.rate_deadline(start, received) {
                None => next.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                    Ok(frame) => frame,
                    Err(_) => {
                        let slow = GatewayError::BodyTooSlow {
                            min_rate: limits.min_rate,
                            received: received as u64,
                            after: start.elapsed(),
                        };
                        return Err(
                            Box::new(BudgetError(slow)) as Box<dyn std::error::Error + Send + Sync>
                        );
                    }
                },
            };
            let Some(frame) = frame else {
                break;
            };
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
                let waiting = Instant::now();
                budget.grow(&mut hold, step).await.map_err(|e| {
                    Box::new(BudgetError(e)) as Box<dyn std::error::Error + Send + Sync>
                })?;
                start += waiting.elapsed();
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

/// A budget refusal (or a body below the minimum rate) carried through the body-reading error
/// channel.
#[derive(Debug)]
struct BudgetError(GatewayError);

impl std::fmt::Display for BudgetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the body read was refused (budget or rate)")
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
            min_rate: 0,
            rate_grace: Duration::from_secs(10),
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

    /// A body of `chunks` frames of `size` bytes, one every `every`.
    fn trickle(
        chunks: usize,
        size: usize,
        every: Duration,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, std::io::Error>>>
    {
        StreamBody::new(futures_util::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((
                Ok(http_body::Frame::data(Bytes::from(vec![b'x'; size]))),
                i + 1,
            ))
        }))
    }

    fn rated(min_rate: u64) -> BodyLimits {
        BodyLimits {
            cap: 1 << 20,
            timeout: Duration::from_secs(600),
            min_rate,
            rate_grace: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_trickled_below_the_minimum_rate_is_refused_after_the_grace() {
        // 100 bytes a second against a minimum of 1024 B/s: refused once the grace is over
        // (1000 bytes by then, less than 10 s × 1024 B/s), long before the body deadline.
        let started = Instant::now();
        let e = read_body(
            rated(1024),
            Request::new(trickle(600, 100, Duration::from_secs(1))),
        )
        .await
        .unwrap_err();
        let waited = started.elapsed();
        assert!(
            (Duration::from_secs(10)..Duration::from_secs(11)).contains(&waited),
            "{waited:?}"
        );
        let GatewayError::BodyTooSlow {
            min_rate, received, ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((min_rate, received), (1024, 1000));
        let parts = e.parts();
        assert_eq!(parts.status, http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(parts.code, Some("request_timeout"));
        assert!(
            parts.message.contains("too slowly") && parts.message.contains("1024 bytes per second"),
            "{}",
            parts.message
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_the_minimum_rate_is_read_however_long_it_takes() {
        // 2 KiB a second for 30 s: above 1024 B/s all along.
        let body = read_body(
            rated(1024),
            Request::new(trickle(30, 2048, Duration::from_secs(1))),
        )
        .await
        .unwrap();
        assert_eq!(body.len(), 30 * 2048);
        // A body that stops after a fast start is refused once its average drops below.
        let started = Instant::now();
        let stops = StreamBody::new(futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
                Bytes::from(vec![b'x'; 20 * 1024]),
            ))]),
            futures_util::stream::pending(),
        ));
        let e = read_body(rated(1024), Request::new(stops))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                GatewayError::BodyTooSlow {
                    received: 20480,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            started.elapsed().as_secs(),
            20,
            "20 KiB earn 20 s at 1 KiB/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_of_zero_is_off() {
        let body = read_body(
            rated(0),
            Request::new(trickle(30, 1, Duration::from_secs(1))),
        )
        .await
        .unwrap();
        assert_eq!(body.len(), 30);
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
