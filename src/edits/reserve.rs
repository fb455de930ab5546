//! Reserve-quota phase: the request's upper-bound cost is held against the daily and monthly
//! quotas before any decoding or forwarding. The [`ReservationGuard`] is settled exactly once:
//! explicitly with what the answer cost, or as a full refund when it is dropped (a rejection
//! after the reservation, a caller that left, a task that ended early).

use std::sync::Arc;
use std::time::Duration;

use crate::error::GatewayError;
use crate::limits::EndUser;
use crate::limits::quota::{QuotaStore, Reservation};
use crate::pricing::TokenPrices;

/// How the settled cost of a request is found from its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    /// A fixed price per image returned (dall-e-2), in micro-dollars.
    PerImage(i64),
    /// Token prices: the cost comes from the answer's `usage` (gpt-image).
    Tokens(TokenPrices),
}

/// Reserve `images` and `micros` for `who` on the blocking pool, held under `request_id`.
pub async fn reserve(
    quotas: &Arc<QuotaStore>,
    request_id: &str,
    who: &EndUser,
    images: u32,
    micros: i64,
    pricing: Pricing,
) -> Result<ReservationGuard, GatewayError> {
    let store = quotas.clone();
    let who = who.clone();
    let id = request_id.to_owned();
    let reservation = tokio::task::spawn_blocking(move || store.reserve(&id, &who, images, micros))
        .await
        .map_err(|_| GatewayError::Internal)??;
    Ok(ReservationGuard {
        quotas: quotas.clone(),
        reservation: Some(reservation),
        pricing,
        charge_on_drop: false,
    })
}

/// A quota reservation that is settled exactly once: explicitly, or as a full refund on drop.
pub struct ReservationGuard {
    quotas: Arc<QuotaStore>,
    reservation: Option<Reservation>,
    pricing: Pricing,
    /// Dropped unsettled: charge everything instead of refunding.
    charge_on_drop: bool,
}

impl ReservationGuard {
    /// The request is going upstream: if this guard is dropped without being settled (the
    /// forwarding task panicked), the whole reservation is charged, not refunded.
    pub fn charge_if_dropped(&mut self) {
        self.charge_on_drop = true;
    }

    /// Micro-dollars held.
    pub fn reserved_micros(&self) -> i64 {
        self.reservation.as_ref().map_or(0, |r| r.micros)
    }

    /// What `images` returned cost under this request's pricing.
    pub fn cost_of_images(&self, images: u32) -> i64 {
        match self.pricing {
            Pricing::PerImage(each) => each * i64::from(images),
            // Without usage, what was reserved is charged (B3).
            Pricing::Tokens(_) => self.reserved_micros(),
        }
    }

    /// The token prices, when the cost comes from usage.
    pub fn token_prices(&self) -> Option<&TokenPrices> {
        match &self.pricing {
            Pricing::Tokens(p) => Some(p),
            Pricing::PerImage(_) => None,
        }
    }

    /// Images held (the request's `n`).
    pub fn reserved_images(&self) -> u32 {
        self.reservation.as_ref().map_or(0, |r| r.images)
    }

    /// A full refund, committed before this returns (so the caller's next request sees the
    /// quota restored).
    pub async fn refund(self) {
        self.settle(0, 0).await;
    }

    /// Charge everything reserved (a request the upstream may have done without saying what
    /// it cost); returns the cost charged.
    pub async fn charge_all(self) -> i64 {
        let (images, micros) = (self.reserved_images(), self.reserved_micros());
        self.settle(images, micros).await
    }

    /// Settle with the images actually delivered and what they cost (0, 0: a full refund);
    /// returns the cost charged.
    pub async fn settle(mut self, images: u32, micros: i64) -> i64 {
        if let Some(r) = self.reservation.take() {
            let quotas = self.quotas.clone();
            let done =
                tokio::task::spawn_blocking(move || settle_now(&quotas, &r, images, micros)).await;
            if done.is_err() {
                settle_failed("the settling task did not run");
            }
        }
        micros
    }
}

/// Attempts to settle a reservation before giving up.
const SETTLE_ATTEMPTS: u32 = 5;
/// The wait before the second attempt; doubled before each later one (0.1 + 0.2 + 0.4 + 0.8 s
/// = 1.5 s in all).
const SETTLE_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The one place a reservation is settled (on the blocking pool: it sleeps between attempts).
fn settle_now(quotas: &QuotaStore, r: &Reservation, images: u32, micros: i64) {
    retry_settle(SETTLE_ATTEMPTS, SETTLE_FIRST_BACKOFF, || {
        quotas.settle(r, images, micros)
    });
}

/// Run `attempt` until it succeeds, at most `attempts` times, sleeping `backoff` (doubled each
/// time) between tries. A failure of every attempt is logged at error level and counted in
/// `imagegate_quota_settle_failures_total`. Returns whether it succeeded.
fn retry_settle(
    attempts: u32,
    backoff: Duration,
    mut attempt: impl FnMut() -> Result<(), String>,
) -> bool {
    let mut wait = backoff;
    for i in 1..=attempts {
        match attempt() {
            Ok(()) => return true,
            Err(e) if i < attempts => {
                tracing::warn!(error = %e, attempt = i, "settling a quota reservation failed; retrying");
                std::thread::sleep(wait);
                wait = wait.saturating_mul(2);
            }
            Err(e) => {
                settle_failed(&e);
                return false;
            }
        }
    }
    false
}

/// A settlement given up on: the quota keeps the reserved amounts.
fn settle_failed(detail: &str) {
    tracing::error!(
        error = %detail,
        "settling a quota reservation failed; the quota keeps what was reserved"
    );
    metrics::counter!("imagegate_quota_settle_failures_total").increment(1);
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let quotas = self.quotas.clone();
            let (images, micros) = if self.charge_on_drop {
                (r.images, r.micros)
            } else {
                (0, 0)
            };
            let refund = move || settle_now(&quotas, &r, images, micros);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(refund);
                }
                Err(_) => refund(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::{ClientConfig, Config, hash_key};
    use crate::limits::quota::user_scope;
    use crate::limits::spec::QuotaSpec;
    use std::time::SystemTime;

    fn store() -> Arc<QuotaStore> {
        let mut c = Config::default();
        c.quotas.per_user = QuotaSpec {
            images_per_day: Some(10),
            ..Default::default()
        };
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            ..Default::default()
        });
        Arc::new(QuotaStore::open_in_memory(Arc::new(c), Clock::manual(SystemTime::now())).unwrap())
    }

    fn rid() -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!(
            "req_{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    fn who() -> EndUser {
        EndUser {
            client: "a".into(),
            user: Some("u".into()),
        }
    }

    fn used(s: &QuotaStore) -> (u64, i64) {
        let u = s.usage(&user_scope(&who()).unwrap()).unwrap();
        (u.images_day, u.micros_day)
    }

    #[tokio::test]
    async fn settles_to_what_the_answer_cost() {
        let s = store();
        let g = reserve(&s, &rid(), &who(), 4, 80_000, Pricing::PerImage(20_000))
            .await
            .unwrap();
        assert_eq!(g.reserved_micros(), 80_000);
        assert_eq!(used(&s), (4, 80_000));
        assert_eq!(g.cost_of_images(3), 60_000);
        assert_eq!(g.settle(3, 60_000).await, 60_000);
        assert_eq!(used(&s), (3, 60_000));
    }

    #[tokio::test]
    async fn refund_restores_the_quota_before_returning() {
        let s = store();
        let g = reserve(&s, &rid(), &who(), 10, 0, Pricing::PerImage(0))
            .await
            .unwrap();
        assert!(
            reserve(&s, &rid(), &who(), 1, 0, Pricing::PerImage(0))
                .await
                .is_err()
        );
        g.refund().await;
        assert_eq!(used(&s), (0, 0));
    }

    #[tokio::test]
    async fn charge_all_charges_the_whole_reservation() {
        let s = store();
        let g = reserve(&s, &rid(), &who(), 4, 80_000, Pricing::PerImage(20_000))
            .await
            .unwrap();
        assert_eq!(g.reserved_images(), 4);
        assert_eq!(g.charge_all().await, 80_000);
        assert_eq!(used(&s), (4, 80_000));
    }

    #[test]
    fn a_failing_settlement_is_retried_then_counted() {
        let handle = crate::metrics::handle();
        let mut calls = 0;
        let ok = retry_settle(5, Duration::from_millis(1), || {
            calls += 1;
            if calls < 3 {
                Err("busy".into())
            } else {
                Ok(())
            }
        });
        assert!(ok);
        assert_eq!(calls, 3, "retried until it succeeded");

        let mut calls = 0;
        let ok = retry_settle(5, Duration::from_millis(1), || {
            calls += 1;
            Err("database is locked".into())
        });
        assert!(!ok);
        assert_eq!(calls, 5, "bounded");
        let rendered = handle.render();
        let line = rendered
            .lines()
            .find(|l| l.starts_with("imagegate_quota_settle_failures_total"))
            .unwrap_or_else(|| panic!("the failure is counted: {rendered}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{line}");
    }

    #[test]
    fn a_dropped_guard_refunds_everything() {
        let s = store();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let g = rt
            .block_on(reserve(&s, &rid(), &who(), 5, 100, Pricing::PerImage(20)))
            .unwrap();
        assert_eq!(used(&s), (5, 100));
        drop(rt);
        // Outside a runtime the refund runs at once.
        drop(g);
        assert_eq!(used(&s), (0, 0));
    }
}
