//! Per-minute rate limits on Redis, shared by every gateway replica that uses the same URL and
//! key prefix (`[limits] backend = "redis"`).
//!
//! The algorithm is the in-memory limiter's (governor's GCRA), step for step: each limit is one
//! key holding its theoretical arrival time (TAT, microseconds on the Redis server's clock). One
//! check is one `EVALSHA` of [`SCRIPT`] (loaded by `redis::Script` on `NOSCRIPT`), which for the
//! limits the check touches, in order (per user: requests, then images weighted by `n`), reads
//! the TAT, decides with `TIME` (so replicas with skewed clocks agree) and writes the new TAT
//! with an expiry of the limit's refill time. It stops at the first refusal, as the in-memory
//! limiter does (an admitted request cell stays spent when the images limit refuses), and then
//! only reads the remaining keys for the headers. Redis runs a script atomically, so two
//! replicas can never both spend the last cell. A key expires once its bucket would be full
//! again, when it is indistinguishable from a missing one: a spray of distinct users leaves no
//! state behind.
//!
//! Windows, 429 messages and `x-ratelimit-*` headers are computed by the same
//! [`LimitSpec`] code as the in-memory backend.
//!
//! Failure policy (`limits.redis_failure`): each check waits at most `limits.redis_timeout`
//! for Redis (connecting included). On an error or a timeout the connection is dropped, the
//! backend is marked down (`imagegate_rate_backend_up` 0, a warning at most every
//! [`WARN_EVERY`]) and for [`RETRY_AFTER`] checks do not wait on Redis at all; then the next
//! check tries again, so the backend recovers by itself. While down, `fail_open` answers from
//! this replica's own in-memory limiter (`imagegate_rate_backend_fallbacks_total`) and
//! `fail_closed` answers 503 `rate_limiter_unavailable`.
//!
//! Not supported: Redis Cluster (a user's two keys carry no hash tag).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use super::EndUser;
use super::rate::{
    Counted, LimitSpec, Limited, RateBackend, RateLimits, RateRefusal, RateStatus, UserCheck,
    Window,
};
use super::spec::{RedisFailure, redact_url};
use crate::clock::Clock;
use crate::config::Config;

mod script;

pub use script::SCRIPT;
use script::{Outcome, decode, micros, remaining, wait};

/// After a failure, checks skip Redis for this long (so a dead Redis costs one timeout, not one
/// per request).
pub const RETRY_AFTER: Duration = Duration::from_millis(500);
/// At most one "Redis unreachable" warning this often.
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// Every client's limits under `config`.
fn client_specs(config: &Config) -> HashMap<Arc<str>, ClientSpecs> {
    let l = &config.limits;
    config
        .clients
        .iter()
        .map(|c| {
            let own = c.limits.over(l.per_client);
            let user_spec = c.user_limits.over(l.per_user);
            let specs = ClientSpecs {
                own: LimitSpec::new(own.requests_per_minute, own.requests_burst),
                user: UserSpecs::of(user_spec),
                overrides: c
                    .users
                    .iter()
                    .map(|u| (u.user.clone(), UserSpecs::of(u.limits.over(user_spec))))
                    .collect(),
            };
            (Arc::<str>::from(c.name.as_str()), specs)
        })
        .collect()
}

/// The limits of one client, as the Redis backend needs them.
struct ClientSpecs {
    own: Option<LimitSpec>,
    user: UserSpecs,
    overrides: HashMap<String, UserSpecs>,
}

#[derive(Clone, Copy)]
struct UserSpecs {
    requests: Option<LimitSpec>,
    images: Option<LimitSpec>,
}

impl UserSpecs {
    fn of(spec: super::spec::RateSpec) -> UserSpecs {
        UserSpecs {
            requests: LimitSpec::new(spec.requests_per_minute, spec.requests_burst),
            images: LimitSpec::new(spec.images_per_minute, spec.images_burst),
        }
    }
}

/// One limit a check touches: its key, numbers and cost.
struct Touch<'a> {
    key: String,
    spec: &'a LimitSpec,
    cost: u32,
}

/// Rate limits on Redis, with this replica's in-memory limiter as the `fail_open` fallback.
pub struct RedisRates {
    client: redis::Client,
    /// The open connection (multiplexed: clones share it); `None` until connected or after a
    /// failure. The async lock makes concurrent checks wait for one connection attempt.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    failure: RedisFailure,
    shown_url: String,
    clients: HashMap<Arc<str>, ClientSpecs>,
    local: RateLimits,
    up: AtomicBool,
    /// Until when checks skip Redis after a failure.
    retry_at: Mutex<Option<Instant>>,
    warned_at: Mutex<Option<Instant>>,
}

impl RedisRates {
    /// Build the backend; nothing is connected until the first check, so a gateway starts even
    /// while Redis is down (and then follows `redis_failure`).
    pub fn new(config: &Config, clock: Clock) -> Result<RedisRates, String> {
        let l = &config.limits;
        let url = l
            .redis_url
            .as_ref()
            .ok_or("limits.redis_url: required when limits.backend = \"redis\"")?;
        let shown_url = redact_url(url.expose());
        let client = redis::Client::open(url.expose().as_str())
            .map_err(|e| format!("limits.redis_url: '{shown_url}' is not a Redis URL: {e}"))?;
        let clients = client_specs(config);
        metrics::gauge!("imagegate_rate_backend_up").set(1.0);
        Ok(RedisRates {
            client,
            conn: tokio::sync::Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            prefix: l.redis_prefix.clone(),
            timeout: l.redis_timeout,
            failure: l.redis_failure,
            shown_url,
            clients,
            local: RateLimits::new(config, clock),
            up: AtomicBool::new(true),
            retry_at: Mutex::new(None),
            warned_at: Mutex::new(None),
        })
    }

    /// The same connection, prefix and failure policy with the limits of `config` (a reload).
    /// The limits live in Redis, keyed by client and user, so they keep their state; the local
    /// fallback keeps the state of its unchanged limiters.
    fn reconfigured_with(&self, config: &Config) -> RedisRates {
        let conn = self.conn.try_lock().ok().and_then(|c| c.clone());
        RedisRates {
            client: self.client.clone(),
            conn: tokio::sync::Mutex::new(conn),
            script: self.script.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
            failure: self.failure,
            shown_url: self.shown_url.clone(),
            clients: client_specs(config),
            local: self.local.reconfigured(config),
            up: AtomicBool::new(self.is_up()),
            retry_at: Mutex::new(*self.retry_at.lock().expect("lock poisoned by a panic")),
            warned_at: Mutex::new(*self.warned_at.lock().expect("lock poisoned by a panic")),
        }
    }

    /// Whether the last attempt to reach Redis succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The Redis URL with its password hidden.
    pub fn shown_url(&self) -> &str {
        &self.shown_url
    }

    fn client_key(&self, client: &str) -> String {
        format!("{}c:{}:{client}", self.prefix, client.len())
    }

    /// `suffix` is `r` (requests) or `i` (images); the client's length makes the key unambiguous
    /// whatever `:` the names contain.
    fn user_key(&self, who: &EndUser, suffix: &str) -> String {
        format!(
            "{}u:{}:{}:{}:{suffix}",
            self.prefix,
            who.client.len(),
            who.client,
            who.user.as_deref().unwrap_or("")
        )
    }

    /// Run the script over `touches` within the timeout; `None` if Redis failed (the failure
    /// is recorded).
    async fn run(&self, touches: &[Touch<'_>]) -> Option<Vec<Outcome>> {
        if self
            .retry_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| Instant::now() < at)
        {
            return None;
        }
        let mut invocation = self.script.prepare_invoke();
        for t in touches {
            let interval = micros(t.spec.interval());
            invocation
                .key(&t.key)
                .arg(interval)
                .arg(interval * i64::from(t.spec.burst))
                .arg(t.cost);
        }
        let attempt = async {
            let mut conn = {
                let mut slot = self.conn.lock().await;
                match &*slot {
                    Some(c) => c.clone(),
                    None => {
                        let config = AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(self.timeout))
                            .set_response_timeout(Some(self.timeout));
                        let c = self
                            .client
                            .get_multiplexed_async_connection_with_config(&config)
                            .await?;
                        *slot = Some(c.clone());
                        c
                    }
                }
            };
            invocation.invoke_async::<Vec<i64>>(&mut conn).await
        };
        let failure = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(raw)) if raw.len() == 2 * touches.len() => {
                self.mark_up();
                return Some(raw.chunks_exact(2).map(decode).collect());
            }
            Ok(Ok(raw)) => format!("unexpected script answer of {} values", raw.len()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.mark_down(&failure);
        None
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            metrics::gauge!("imagegate_rate_backend_up").set(1.0);
            tracing::info!(url = %self.shown_url, "rate limits: Redis is back");
        }
    }

    fn mark_down(&self, why: &str) {
        // A broken or timed-out connection is not reused: the next attempt reconnects. If
        // another check holds the slot (connecting), it is left alone rather than waited for,
        // so no check waits much past the timeout; a broken connection fails the next check
        // fast and is cleared then.
        if let Ok(mut slot) = self.conn.try_lock() {
            *slot = None;
        }
        *self
            .retry_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Instant::now() + RETRY_AFTER);
        if self.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!("imagegate_rate_backend_up").set(0.0);
        }
        let now = Instant::now();
        let mut warned = self
            .warned_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            *warned = Some(now);
            let policy = match self.failure {
                RedisFailure::FailOpen => "fail_open: this replica's own limits apply",
                RedisFailure::FailClosed => "fail_closed: requests are refused with 503",
            };
            tracing::warn!(url = %self.shown_url, error = %why, policy, "rate limits: Redis unreachable");
        }
    }

    fn fallback_counted(&self) {
        metrics::counter!("imagegate_rate_backend_fallbacks_total").increment(1);
    }

    async fn check_client_shared(&self, client: &str) -> Result<Option<Window>, RateRefusal> {
        let Some(spec) = self.clients.get(client).and_then(|c| c.own.as_ref()) else {
            return Ok(None);
        };
        let touch = [Touch {
            key: self.client_key(client),
            spec,
            cost: 1,
        }];
        let Some(outcomes) = self.run(&touch).await else {
            return match self.failure {
                RedisFailure::FailOpen => {
                    self.fallback_counted();
                    self.local.check_client_now(client)
                }
                RedisFailure::FailClosed => Err(RateRefusal::Unavailable),
            };
        };
        let of = || Limited::Client(client.into());
        match outcomes[0] {
            Outcome::Admitted { tat_from_now } => {
                Ok(Some(spec.window(remaining(spec, tat_from_now))))
            }
            Outcome::Refused { wait_us } => {
                let refusal = spec.refusal(1, wait(wait_us));
                Err(spec.refused(Counted::Requests, of(), 1, &refusal))
            }
            // A cost of 1 is never beyond a burst of at least 1, and nothing is peeked here.
            Outcome::BeyondBurst | Outcome::Peeked { .. } | Outcome::Absent => {
                let refusal = spec.beyond_burst();
                Err(spec.refused(Counted::Requests, of(), 1, &refusal))
            }
        }
    }

    async fn check_user_shared(&self, who: &EndUser, n: u8) -> UserCheck {
        let Some(client) = self.clients.get(&who.client) else {
            return Ok(RateStatus::default());
        };
        let specs = who
            .user
            .as_deref()
            .and_then(|u| client.overrides.get(u))
            .unwrap_or(&client.user);
        let cost = u32::from(n);
        let mut touches = Vec::with_capacity(2);
        if let Some(spec) = &specs.requests {
            touches.push((
                Counted::Requests,
                Touch {
                    key: self.user_key(who, "r"),
                    spec,
                    cost: 1,
                },
            ));
        }
        if let Some(spec) = &specs.images {
            touches.push((
                Counted::Images,
                Touch {
                    key: self.user_key(who, "i"),
                    spec,
                    cost: cost.max(1),
                },
            ));
        }
        if touches.is_empty() {
            return Ok(RateStatus::default());
        }
        let keys: Vec<Touch<'_>> = touches
            .iter()
            .map(|(_, t)| Touch {
                key: t.key.clone(),
                spec: t.spec,
                cost: t.cost,
            })
            .collect();
        let Some(outcomes) = self.run(&keys).await else {
            return match self.failure {
                RedisFailure::FailOpen => {
                    self.fallback_counted();
                    self.local.check_user_now(who, n)
                }
                RedisFailure::FailClosed => Err((RateRefusal::Unavailable, RateStatus::default())),
            };
        };
        let of = || Limited::EndUser(who.clone());
        let mut status = RateStatus::default();
        let mut refused = None;
        for ((what, touch), outcome) in touches.iter().zip(outcomes) {
            let spec = touch.spec;
            let window = match outcome {
                Outcome::Admitted { tat_from_now } | Outcome::Peeked { tat_from_now } => {
                    Some(spec.window(remaining(spec, tat_from_now)))
                }
                Outcome::Absent => None,
                Outcome::Refused { wait_us } => {
                    let refusal = spec.refusal(touch.cost, wait(wait_us));
                    refused = Some(spec.refused(*what, of(), touch.cost, &refusal));
                    Some(refusal.window)
                }
                Outcome::BeyondBurst => {
                    let refusal = spec.beyond_burst();
                    refused = Some(spec.refused(*what, of(), touch.cost, &refusal));
                    Some(refusal.window)
                }
            };
            match what {
                Counted::Requests => status.requests = window,
                Counted::Images => status.images = window,
            }
        }
        match refused {
            Some(e) => Err((e, status)),
            None => Ok(status),
        }
    }
}

impl RateBackend for RedisRates {
    fn check_client<'a>(
        &'a self,
        client: &'a str,
    ) -> BoxFuture<'a, Result<Option<Window>, RateRefusal>> {
        Box::pin(self.check_client_shared(client))
    }

    fn check_user<'a>(&'a self, who: &'a EndUser, n: u8) -> BoxFuture<'a, UserCheck> {
        Box::pin(self.check_user_shared(who, n))
    }

    /// The users of the local fallback limiter: Redis keys expire on their own.
    fn tracked_users(&self, client: &str) -> usize {
        self.local.tracked_users(client)
    }

    fn sweep(&self) {
        self.local.sweep();
    }

    fn reconfigured(&self, config: &Config) -> Arc<dyn RateBackend> {
        Arc::new(self.reconfigured_with(config))
    }
}
