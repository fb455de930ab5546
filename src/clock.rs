//! The gateway's clock: monotonic time for the rate limiters (governor reads it through its
//! `Clock` trait) and wall time for quota periods. In production both follow the system; tests
//! build a manual clock that stands still until advanced, so limits can be tested exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone)]
pub struct Clock {
    start: Instant,
    wall_start: SystemTime,
    /// `Some`: manual time, nanoseconds advanced since `wall_start`.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock {
            start: Instant::now(),
            wall_start: SystemTime::now(),
            manual: None,
        }
    }

    /// A clock that stands still at `wall_start` until [`Clock::advance`] moves it.
    pub fn manual(wall_start: SystemTime) -> Clock {
        Clock {
            start: Instant::now(),
            wall_start,
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Move a manual clock forward (no effect on a system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    /// Monotonic time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        match &self.manual {
            Some(m) => Duration::from_nanos(m.load(Ordering::SeqCst)),
            None => self.start.elapsed(),
        }
    }

    /// Wall time now.
    pub fn now_wall(&self) -> jiff::Timestamp {
        let t = match &self.manual {
            Some(_) => self.wall_start + self.elapsed(),
            None => SystemTime::now(),
        };
        jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400));
        assert_eq!(c.elapsed(), Duration::ZERO);
        c.advance(Duration::from_secs(90));
        assert_eq!(c.elapsed(), Duration::from_secs(90));
        assert_eq!(c.now_wall().as_second(), 86_490);
    }
}
