//! The numbers of one per-minute limit, the windows it reports in `x-ratelimit-*` and the
//! refusals it answers with, shared by the in-memory and the Redis backends so both answer with
//! the same windows, waits and messages. A refusal carries the facts; `limits::refusal` words the
//! 429 (or the 503 of an unreachable shared limiter) from them.

use std::sync::Arc;
use std::time::Duration;

use crate::limits::EndUser;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Requests,
    Images,
}

impl Counted {
    /// As the 429 message names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Requests => "requests",
            Counted::Images => "images",
        }
    }
}

/// Whose limit refused: a client's own limit or one of an end user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    Client(Arc<str>),
    EndUser(EndUser),
}

/// Why a per-minute rate check refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateRefusal {
    /// A limit is spent (boxed: refusals travel in `Result`s beside the headers' windows).
    Exhausted(Box<Exhausted>),
    /// The shared limiter (Redis) cannot be reached and `limits.redis_failure` is
    /// `fail_closed`, so the request is refused rather than admitted unchecked.
    Unavailable,
}

/// A spent limit: which one, whose, its numbers, what was asked and what is available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub counted: Counted,
    pub of: Limited,
    pub per_minute: u32,
    pub burst: u32,
    /// Cells the request asked for: 1 request, or `n` images.
    pub requested: u32,
    /// Cells available now.
    pub available: u32,
    /// When the request could pass.
    pub retry_after: Duration,
}

/// The numbers of one limit, shared by the in-memory and the Redis backends so both answer
/// with the same windows, waits and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitSpec {
    pub(crate) per_minute: u32,
    pub(crate) burst: u32,
}

impl LimitSpec {
    /// `None` when the limit is off (absent or zero); the burst defaults to the rate.
    pub(crate) fn new(per_minute: Option<u32>, burst: Option<u32>) -> Option<LimitSpec> {
        let per_minute = per_minute.filter(|&v| v > 0)?;
        let burst = burst.filter(|&b| b > 0).unwrap_or(per_minute);
        Some(LimitSpec { per_minute, burst })
    }

    /// Time to earn one cell (governor's `replenish_1_per`).
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_secs(60) / self.per_minute
    }

    /// Time for an emptied bucket to be full again (governor's `tau`).
    pub(crate) fn refill(&self) -> Duration {
        self.interval() * self.burst
    }

    /// The window after an admitted request that left `remaining` cells.
    pub(crate) fn window(&self, remaining: u32) -> Window {
        Window {
            limit: self.per_minute,
            remaining,
            reset: self.interval() * self.burst.saturating_sub(remaining),
        }
    }

    /// A request of `cost` cells refused until `wait` has passed.
    pub(crate) fn refusal(&self, cost: u32, wait: Duration) -> Refusal {
        // Cells still missing for this request: one per interval of waiting.
        let interval = self.interval().as_nanos().max(1);
        let missing = u32::try_from(wait.as_nanos().div_ceil(interval)).unwrap_or(u32::MAX);
        let available = cost.saturating_sub(missing);
        let reset = wait + self.interval() * self.burst.saturating_sub(cost);
        Refusal {
            window: Window {
                limit: self.per_minute,
                remaining: available,
                reset,
            },
            wait,
            available,
        }
    }

    /// More cells than the burst: this request can never pass (config validation keeps image
    /// bursts >= 10, the largest n).
    pub(crate) fn beyond_burst(&self) -> Refusal {
        Refusal {
            window: Window {
                limit: self.per_minute,
                remaining: 0,
                reset: self.refill(),
            },
            wait: self.refill(),
            available: 0,
        }
    }

    /// The refusal of a request of `cost` cells of `counted`, on the limit of `of`.
    pub(crate) fn refused(
        &self,
        counted: Counted,
        of: Limited,
        cost: u32,
        refusal: &Refusal,
    ) -> RateRefusal {
        RateRefusal::Exhausted(Box::new(Exhausted {
            counted,
            of,
            per_minute: self.per_minute,
            burst: self.burst,
            requested: cost,
            available: refusal.available,
            retry_after: refusal.wait,
        }))
    }
}

/// Why a limit refused: the window for the headers, how long to wait, cells available now.
pub(crate) struct Refusal {
    pub(crate) window: Window,
    pub(crate) wait: Duration,
    pub(crate) available: u32,
}

/// The state of one limit after a check, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

/// What the per-user check saw, for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateStatus {
    pub requests: Option<Window>,
    pub images: Option<Window>,
}

impl RateStatus {
    /// The gateway's own `x-ratelimit-*` headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some(w) = self.requests {
            h.push(("x-ratelimit-limit-requests", w.limit.to_string()));
            h.push(("x-ratelimit-remaining-requests", w.remaining.to_string()));
            h.push(("x-ratelimit-reset-requests", format_reset(w.reset)));
        }
        if let Some(w) = self.images {
            h.push(("x-ratelimit-limit-images", w.limit.to_string()));
            h.push(("x-ratelimit-remaining-images", w.remaining.to_string()));
            h.push(("x-ratelimit-reset-images", format_reset(w.reset)));
        }
        h
    }
}

/// OpenAI's duration style: `12ms`, `1.5s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{:.3}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(12)), "12ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(20)), "20s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn a_refusal_carries_the_numbers_of_its_limit() {
        // 6/min, burst 3: one cell every 10 s. Waiting 15 s for one cell: none available.
        let spec = LimitSpec::new(Some(6), Some(3)).unwrap();
        let refusal = spec.refusal(1, Duration::from_secs(15));
        assert_eq!(refusal.available, 0);
        assert_eq!(refusal.window.reset, Duration::from_secs(35));
        let RateRefusal::Exhausted(e) =
            spec.refused(Counted::Images, Limited::Client("c".into()), 1, &refusal)
        else {
            panic!("not an exhausted limit")
        };
        assert_eq!(
            (
                e.per_minute,
                e.burst,
                e.requested,
                e.available,
                e.retry_after
            ),
            (6, 3, 1, 0, Duration::from_secs(15))
        );
        assert_eq!(e.counted.as_str(), "images");
        assert_eq!(spec.beyond_burst().wait, Duration::from_secs(30));
    }
}
