//! Per-minute rate limits, in memory, with governor's GCRA limiters.
//!
//! Per client: requests per minute, checked before the body is read. Per end user: requests per
//! minute and images per minute, where a request costs `n` images (`check_n`), checked right
//! after the form is parsed and before any PNG decoding. Every limit has a burst.
//!
//! Memory is bounded: each client tracks at most `limits.max_tracked_users_per_client` end
//! users. When a new user arrives at the cap, users idle long enough for their buckets to be
//! full again (indistinguishable from new ones) are evicted; if the cap is still reached, the
//! new user shares one overflow bucket pair with every other untracked user of that client, so
//! a client spraying distinct `user` values only limits itself.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::EndUser;
use super::spec::RateSpec;
use crate::clock::Clock;
use crate::config::Config;
use futures_util::future::BoxFuture;

mod limit;

pub use limit::{Counted, Exhausted, Limited, RateRefusal, RateStatus, Window, format_reset};
pub(crate) use limit::{LimitSpec, Refusal};

type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// One limit: a limiter and the numbers it was built from.
struct Limit {
    limiter: Direct,
    spec: LimitSpec,
}

impl Limit {
    fn new(per_minute: Option<u32>, burst: Option<u32>, clock: &Clock) -> Option<Limit> {
        let spec = LimitSpec::new(per_minute, burst)?;
        let quota = Quota::per_minute(NonZeroU32::new(spec.per_minute)?)
            .allow_burst(NonZeroU32::new(spec.burst)?);
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Some(Limit { limiter, spec })
    }

    /// Take `cost` cells. Ok: the window after; Err: why not.
    fn take(&self, cost: u32, clock: &Clock) -> Result<Window, Refusal> {
        let cells = NonZeroU32::new(cost.max(1)).expect("cost is at least 1");
        match self.limiter.check_n(cells) {
            Ok(Ok(snapshot)) => Ok(self.spec.window(snapshot.remaining_burst_capacity())),
            Ok(Err(not_until)) => Err(self.spec.refusal(
                cost,
                not_until.wait_time_from(governor::clock::Clock::now(clock)),
            )),
            Err(_) => Err(self.spec.beyond_burst()),
        }
    }
}

/// The buckets of one end user.
struct Buckets {
    /// The limits these buckets were built for: a reload that changes them rebuilds them.
    spec: RateSpec,
    requests: Option<Limit>,
    images: Option<Limit>,
    last_seen: Duration,
    /// The images window after the last successful check, for the headers of a request refused
    /// on the requests limit.
    last_images: Option<Window>,
}

impl Buckets {
    fn new(spec: &RateSpec, clock: &Clock) -> Buckets {
        Buckets {
            spec: *spec,
            requests: Limit::new(spec.requests_per_minute, spec.requests_burst, clock),
            images: Limit::new(spec.images_per_minute, spec.images_burst, clock),
            last_seen: clock.elapsed(),
            last_images: None,
        }
    }

    /// Idle this long, the buckets are full again and can be forgotten.
    fn idle_after(&self) -> Duration {
        let r = self
            .requests
            .as_ref()
            .map_or(Duration::ZERO, |l| l.spec.refill());
        let i = self
            .images
            .as_ref()
            .map_or(Duration::ZERO, |l| l.spec.refill());
        r.max(i)
    }

    fn check(
        &mut self,
        who: &EndUser,
        n: u32,
        clock: &Clock,
    ) -> Result<RateStatus, (RateRefusal, RateStatus)> {
        self.last_seen = clock.elapsed();
        let mut status = RateStatus {
            requests: None,
            images: self.last_images,
        };
        if let Some(l) = &self.requests {
            match l.take(1, clock) {
                Ok(w) => status.requests = Some(w),
                Err(refusal) => {
                    // The images bucket was not checked: its last known window stands in (it
                    // can only have refilled since).
                    status.requests = Some(refusal.window);
                    let refused = l.spec.refused(
                        Counted::Requests,
                        Limited::EndUser(who.clone()),
                        1,
                        &refusal,
                    );
                    return Err((refused, status));
                }
            }
        }
        if let Some(l) = &self.images {
            match l.take(n, clock) {
                Ok(w) => {
                    status.images = Some(w);
                    self.last_images = Some(w);
                }
                Err(refusal) => {
                    status.images = Some(refusal.window);
                    let refused =
                        l.spec
                            .refused(Counted::Images, Limited::EndUser(who.clone()), n, &refusal);
                    return Err((refused, status));
                }
            }
        }
        Ok(status)
    }
}

/// The limits of one client and its users.
///
/// After a reload ([`RateLimits::reconfigured`]) the old and the new configuration share the
/// state that did not change: the client's own limiter when its numbers are the same, and the
/// map of its users' buckets always, where each bucket remembers the numbers it was built for
/// and is rebuilt (full) on its next check when they differ from the configuration checking it.
struct ClientRates {
    own_spec: RateSpec,
    own: Option<Arc<Limit>>,
    user_spec: RateSpec,
    overrides: HashMap<String, RateSpec>,
    /// Taken back after a panic under it (`PoisonError::into_inner`): the map stays a valid
    /// map, and at worst one user's buckets miss one update.
    users: Arc<Mutex<Users>>,
}

struct Users {
    tracked: HashMap<Arc<str>, Buckets>,
    overflow: Buckets,
    /// When the last eviction at the cap ran.
    evicted_at: Option<Duration>,
}

/// What a backend answers for a per-user check.
pub type UserCheck = Result<RateStatus, (RateRefusal, RateStatus)>;

/// A rate-limit backend: in memory ([`RateLimits`], governor) or shared by several gateway
/// replicas ([`super::rate_redis::RedisRates`]). The checks are futures because a shared
/// backend answers over the network; the in-memory one answers at once.
pub trait RateBackend: Send + Sync {
    /// The per-client request limit, checked before the body is read.
    fn check_client<'a>(
        &'a self,
        client: &'a str,
    ) -> BoxFuture<'a, Result<Option<Window>, RateRefusal>>;
    /// The per-user limits: one request and `n` images.
    fn check_user<'a>(&'a self, who: &'a EndUser, n: u8) -> BoxFuture<'a, UserCheck>;
    /// End users currently tracked for a client.
    fn tracked_users(&self, client: &str) -> usize;
    /// Forget idle end users (run periodically).
    fn sweep(&self);
    /// The same backend under a new configuration (a reload): the limiters whose numbers did
    /// not change keep their state, the others start full. The backend's own settings
    /// (`limits.backend`, the Redis ones) are not reloadable and are taken from `self`.
    fn reconfigured(&self, config: &Config) -> Arc<dyn RateBackend>;
}

/// All rate limits of the gateway, in memory.
pub struct RateLimits {
    clock: Clock,
    clients: HashMap<Arc<str>, ClientRates>,
    max_users: usize,
}

/// Key under which a client-charged request (no user) is tracked.
const NO_USER: &str = "";

impl RateLimits {
    pub fn new(config: &Config, clock: Clock) -> RateLimits {
        Self::build(config, clock, None)
    }

    /// The limits of `config`, sharing with `self` the state of every limiter whose numbers
    /// did not change (see [`ClientRates`]). Clients no longer configured are forgotten.
    pub fn reconfigured(&self, config: &Config) -> RateLimits {
        Self::build(config, self.clock.clone(), Some(self))
    }

    fn build(config: &Config, clock: Clock, previous: Option<&RateLimits>) -> RateLimits {
        let l = &config.limits;
        let clients = config
            .clients
            .iter()
            .map(|c| {
                let own_spec = c.limits.over(l.per_client);
                let user_spec = c.user_limits.over(l.per_user);
                let overrides = c
                    .users
                    .iter()
                    .map(|u| (u.user.clone(), u.limits.over(user_spec)))
                    .collect();
                let before = previous.and_then(|p| p.clients.get(c.name.as_str()));
                let own = match before {
                    Some(b) if b.own_spec == own_spec => b.own.clone(),
                    _ => Limit::new(
                        own_spec.requests_per_minute,
                        own_spec.requests_burst,
                        &clock,
                    )
                    .map(Arc::new),
                };
                let users = match before {
                    Some(b) => b.users.clone(),
                    None => Arc::new(Mutex::new(Users {
                        tracked: HashMap::new(),
                        overflow: Buckets::new(&user_spec, &clock),
                        evicted_at: None,
                    })),
                };
                let rates = ClientRates {
                    own_spec,
                    own,
                    user_spec,
                    overrides,
                    users,
                };
                (Arc::<str>::from(c.name.as_str()), rates)
            })
            .collect();
        RateLimits {
            clock,
            clients,
            max_users: l.max_tracked_users_per_client,
        }
    }
}

/// Forget users idle long enough for their buckets to be full again (indistinguishable from
/// new ones).
fn evict_idle(tracked: &mut HashMap<Arc<str>, Buckets>, now: Duration) {
    tracked.retain(|_, b| now.saturating_sub(b.last_seen) < b.idle_after());
}

impl RateBackend for RateLimits {
    fn check_client<'a>(
        &'a self,
        client: &'a str,
    ) -> BoxFuture<'a, Result<Option<Window>, RateRefusal>> {
        Box::pin(std::future::ready(self.check_client_now(client)))
    }

    fn check_user<'a>(&'a self, who: &'a EndUser, n: u8) -> BoxFuture<'a, UserCheck> {
        Box::pin(std::future::ready(self.check_user_now(who, n)))
    }

    fn sweep(&self) {
        for rates in self.clients.values() {
            let mut users = rates
                .users
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            evict_idle(&mut users.tracked, self.clock.elapsed());
            users.tracked.shrink_to_fit();
        }
    }

    fn reconfigured(&self, config: &Config) -> Arc<dyn RateBackend> {
        Arc::new(RateLimits::reconfigured(self, config))
    }

    fn tracked_users(&self, client: &str) -> usize {
        self.clients.get(client).map_or(0, |r| {
            r.users
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .tracked
                .len()
        })
    }
}

impl RateLimits {
    /// The per-client check, answered at once.
    pub fn check_client_now(&self, client: &str) -> Result<Option<Window>, RateRefusal> {
        let Some(rates) = self.clients.get(client) else {
            return Ok(None);
        };
        let Some(own) = &rates.own else {
            return Ok(None);
        };
        match own.take(1, &self.clock) {
            Ok(w) => Ok(Some(w)),
            Err(refusal) => {
                let of = Limited::Client(client.into());
                Err(own.spec.refused(Counted::Requests, of, 1, &refusal))
            }
        }
    }

    /// The per-user check, answered at once.
    pub fn check_user_now(&self, who: &EndUser, n: u8) -> UserCheck {
        let Some(rates) = self.clients.get(&who.client) else {
            return Ok(RateStatus::default());
        };
        let key = who.user.as_deref().unwrap_or(NO_USER);
        let mut users = rates
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let users = &mut *users;
        if !users.tracked.contains_key(key) && users.tracked.len() >= self.max_users {
            // At most once a second: under a spray, nobody may be idle, and a scan per
            // request would make every new user cost O(cap).
            let now = self.clock.elapsed();
            if users
                .evicted_at
                .is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(1))
            {
                users.evicted_at = Some(now);
                evict_idle(&mut users.tracked, now);
            }
        }
        let spec = rates.overrides.get(key).copied().unwrap_or(rates.user_spec);
        let buckets = if let Some(b) = users.tracked.get_mut(key) {
            if b.spec != spec {
                // Its limits changed in a reload: new numbers, a full bucket.
                *b = Buckets::new(&spec, &self.clock);
            }
            b
        } else if users.tracked.len() < self.max_users {
            users
                .tracked
                .entry(Arc::from(key))
                .or_insert_with(|| Buckets::new(&spec, &self.clock))
        } else {
            tracing::warn!(client = %who.client, cap = self.max_users, "tracked-user cap reached; user shares the overflow bucket");
            if users.overflow.spec != rates.user_spec {
                users.overflow = Buckets::new(&rates.user_spec, &self.clock);
            }
            &mut users.overflow
        };
        buckets.check(who, u32::from(n), &self.clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, hash_key};
    use crate::limits::spec::UserOverride;
    use std::time::SystemTime;

    fn setup(max_users: usize) -> (RateLimits, Clock) {
        let mut c = Config::default();
        c.limits.max_tracked_users_per_client = max_users;
        c.limits.per_user = RateSpec {
            requests_per_minute: Some(6),
            requests_burst: Some(3),
            images_per_minute: Some(20),
            images_burst: Some(10),
        };
        c.limits.per_client = RateSpec {
            requests_per_minute: Some(60),
            requests_burst: Some(5),
            ..Default::default()
        };
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            users: vec![UserOverride {
                user: "vip".into(),
                limits: RateSpec {
                    requests_burst: Some(6),
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        });
        c.clients.push(ClientConfig {
            name: "b".into(),
            key_hash: hash_key("b"),
            ..Default::default()
        });
        let clock = Clock::manual(SystemTime::UNIX_EPOCH);
        (RateLimits::new(&c, clock.clone()), clock)
    }

    fn who(client: &str, user: &str) -> EndUser {
        EndUser {
            client: client.into(),
            user: Some(user.into()),
        }
    }

    fn admitted(r: &RateLimits, w: &EndUser, n: u8, tries: usize) -> usize {
        (0..tries)
            .filter(|_| r.check_user_now(w, n).is_ok())
            .count()
    }

    #[test]
    fn a_panic_under_the_lock_does_not_refuse_every_later_request() {
        let (r, _) = setup(100);
        let w = who("a", "u");
        assert!(r.check_user_now(&w, 1).is_ok());
        let poisoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = r.clients["a"].users.lock();
            panic!("a bug while the map is held");
        }));
        assert!(poisoned.is_err());
        assert!(r.clients["a"].users.is_poisoned());
        // Two more of the burst of 3 fit, then the limit still holds.
        assert_eq!(admitted(&r, &w, 1, 5), 2, "the limiter still works");
        assert_eq!(r.tracked_users("a"), 1);
        r.sweep();
    }

    #[test]
    fn burst_then_recovery() {
        let (r, clock) = setup(100);
        assert_eq!(
            admitted(&r, &who("a", "u"), 1, 10),
            3,
            "burst of 3 requests"
        );
        let (err, status) = r.check_user_now(&who("a", "u"), 1).unwrap_err();
        let RateRefusal::Exhausted(refused) = err else {
            panic!("not a spent limit")
        };
        assert_eq!(refused.of, Limited::EndUser(who("a", "u")));
        assert_eq!((refused.requested, refused.available), (1, 0));
        assert_eq!(
            refused.retry_after,
            Duration::from_secs(10),
            "6/min: one request every 10 s"
        );
        assert_eq!(status.requests.unwrap().remaining, 0);
        clock.advance(Duration::from_secs(10));
        assert_eq!(admitted(&r, &who("a", "u"), 1, 10), 1);
        clock.advance(Duration::from_secs(30));
        assert_eq!(admitted(&r, &who("a", "u"), 1, 10), 3);
    }

    #[test]
    fn images_are_weighted_by_n() {
        let (r, clock) = setup(100);
        let w = who("a", "painter");
        let s = r.check_user_now(&w, 8).unwrap();
        assert_eq!(s.images.unwrap().remaining, 2);
        assert!(r.check_user_now(&w, 3).is_err(), "8 + 3 > burst 10");
        clock.advance(Duration::from_secs(3)); // 20/min: one image every 3 s
        let s = r.check_user_now(&w, 3).unwrap();
        assert_eq!(s.images.unwrap().remaining, 0);
    }

    #[test]
    fn users_and_clients_are_isolated() {
        let (r, _) = setup(100);
        assert_eq!(admitted(&r, &who("a", "u1"), 1, 5), 3);
        assert_eq!(admitted(&r, &who("a", "u2"), 1, 5), 3);
        assert_eq!(admitted(&r, &who("b", "u1"), 1, 5), 3);
        assert_eq!(
            admitted(&r, &who("a", "vip"), 1, 10),
            6,
            "per-user override"
        );
    }

    #[test]
    fn client_limit() {
        let (r, clock) = setup(100);
        assert_eq!(
            (0..10).filter(|_| r.check_client_now("a").is_ok()).count(),
            5
        );
        assert!(r.check_client_now("b").is_ok());
        clock.advance(Duration::from_secs(1));
        assert!(r.check_client_now("a").is_ok());
    }

    #[test]
    fn tracked_users_stay_at_the_cap() {
        let (r, clock) = setup(50);
        for i in 0..1000 {
            let _ = r.check_user_now(&who("a", &format!("spray-{i}")), 1);
        }
        assert_eq!(r.tracked_users("a"), 50);
        // The overflow bucket is shared by the untracked users: its burst is long gone.
        assert!(r.check_user_now(&who("a", "spray-new"), 1).is_err());
        // A tracked user keeps its own bucket.
        assert!(r.check_user_now(&who("a", "spray-0"), 1).is_ok());
        // Once idle users' buckets are full again they are evicted and new users get their own.
        clock.advance(Duration::from_secs(60));
        assert!(r.check_user_now(&who("a", "fresh"), 1).is_ok());
        assert!(r.tracked_users("a") <= 50);
        r.sweep();
        assert_eq!(
            r.tracked_users("a"),
            1,
            "only 'fresh' was seen in the last minute"
        );
    }

    #[test]
    fn a_reconfiguration_keeps_the_state_of_unchanged_limiters() {
        let (r, _clock) = setup(100);
        assert_eq!(admitted(&r, &who("a", "u"), 1, 5), 3);
        assert_eq!(admitted(&r, &who("a", "vip"), 1, 10), 6);
        assert_eq!(
            (0..10).filter(|_| r.check_client_now("a").is_ok()).count(),
            5
        );
        // The same configuration plus a client: nothing is refilled.
        let mut c = Config {
            limits: crate::limits::spec::LimitsConfig {
                max_tracked_users_per_client: 100,
                per_user: RateSpec {
                    requests_per_minute: Some(6),
                    requests_burst: Some(3),
                    images_per_minute: Some(20),
                    images_burst: Some(10),
                },
                per_client: RateSpec {
                    requests_per_minute: Some(60),
                    requests_burst: Some(5),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Config::default()
        };
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            users: vec![UserOverride {
                user: "vip".into(),
                limits: RateSpec {
                    requests_burst: Some(6),
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        });
        c.clients.push(ClientConfig {
            name: "new".into(),
            key_hash: hash_key("new"),
            ..Default::default()
        });
        let same = r.reconfigured(&c);
        assert_eq!(
            admitted(&same, &who("a", "u"), 1, 5),
            0,
            "u kept its empty bucket"
        );
        assert_eq!(admitted(&same, &who("a", "vip"), 1, 5), 0);
        assert!(
            same.check_client_now("a").is_err(),
            "the client limiter kept"
        );
        assert_eq!(admitted(&same, &who("new", "u"), 1, 5), 3);
        assert_eq!(same.tracked_users("b"), 0, "client b is gone");
        // vip's override changes: only vip starts again, with the new numbers.
        c.clients[0].users[0].limits.requests_burst = Some(4);
        c.limits.per_client.requests_burst = Some(7);
        let changed = same.reconfigured(&c);
        assert_eq!(admitted(&changed, &who("a", "u"), 1, 5), 0);
        assert_eq!(admitted(&changed, &who("a", "vip"), 1, 10), 4);
        assert_eq!(
            (0..10)
                .filter(|_| changed.check_client_now("a").is_ok())
                .count(),
            7,
            "the client's own limit changed: a new, full limiter"
        );
    }
}
