//! The Redis rate-limit backend against a real Redis: `REDIS_URL` (default
//! `redis://127.0.0.1:6379`) and, for the fault tests, `redis-server`s started here on free
//! ports. Every test is ignored by default; run with
//! `cargo test --test limits_redis -- --include-ignored`. Each test writes under its own key
//! prefix, so runs never collide.

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use imagegate::clock::Clock;
use imagegate::config::{ClientConfig, Config, Secret, hash_key};
use imagegate::error::GatewayError;
use imagegate::limits::EndUser;
use imagegate::limits::rate::{RateBackend, RateLimits, RateRefusal, RateStatus};
use imagegate::limits::rate_redis::{RETRY_AFTER, RedisRates};
use imagegate::limits::spec::{RateBackendKind, RateSpec, RedisFailure};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique_prefix(test: &str) -> String {
    format!("imagegate-test:{test}:{}:", uuid::Uuid::new_v4().simple())
}

/// Client `app` with 6 requests/min (burst 3) and 20 images/min (burst 10) per user, 60
/// requests/min (burst 5) for the client itself.
fn config(url: &str, prefix: &str, failure: RedisFailure, timeout: Duration) -> Config {
    let mut c = Config::default();
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
    c.limits.backend = RateBackendKind::Redis;
    c.limits.redis_url = Some(Secret::new(url.to_owned()));
    c.limits.redis_prefix = prefix.to_owned();
    c.limits.redis_failure = failure;
    c.limits.redis_timeout = timeout;
    c.clients.push(ClientConfig {
        name: "app".into(),
        key_hash: hash_key("app"),
        ..Default::default()
    });
    c
}

fn redis_rates(c: &Config) -> RedisRates {
    RedisRates::new(c, Clock::system()).expect("the test configuration is valid")
}

fn who(user: &str) -> EndUser {
    EndUser {
        client: "app".into(),
        user: Some(user.into()),
    }
}

/// A port nothing listens on (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port on 127.0.0.1")
        .port()
}

/// A `redis-server` of the test's own, killed on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is on the PATH");
        let own = OwnRedis { child, port };
        own.wait_ready();
        own
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Poll PING, bounded: at most 5 s.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = redis::Client::open(self.url()).expect("a valid URL");
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} never answered PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The 429 message without its wait (which depends on the clock of each backend).
fn message_head(e: &RateRefusal) -> String {
    match GatewayError::from(e.clone()) {
        GatewayError::RateLimited { message, .. } => message
            .split(" Please try again")
            .next()
            .unwrap_or_default()
            .to_owned(),
        other => panic!("not a rate limit: {other:?}"),
    }
}

fn retry_after(e: &RateRefusal) -> Duration {
    match GatewayError::from(e.clone()) {
        GatewayError::RateLimited { retry_after, .. } => retry_after,
        other => panic!("not a rate limit: {other:?}"),
    }
}

/// Headers with the time-dependent reset of a refused window left out.
fn comparable(status: &RateStatus) -> Vec<(&'static str, String)> {
    status.headers()
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn same_answers_as_the_memory_backend() {
    let c = config(
        &redis_url(),
        &unique_prefix("same"),
        RedisFailure::FailClosed,
        Duration::from_secs(2),
    );
    let memory = RateLimits::new(&c, Clock::system());
    let redis = redis_rates(&c);
    let w = who("painter");
    // n = 8, then 3 (images refused, the request cell stays spent), then 1, then 1 (requests
    // refused, images window from the last state), then a request beyond the image burst.
    for (step, n) in [8u8, 3, 1, 1].into_iter().enumerate() {
        let m = memory.check_user(&w, n).await;
        let r = redis.check_user(&w, n).await;
        match (&m, &r) {
            (Ok(ms), Ok(rs)) => assert_eq!(comparable(ms), comparable(rs), "step {step}"),
            (Err((me, ms)), Err((re, rs))) => {
                assert_eq!(message_head(me), message_head(re), "step {step}");
                let (a, b) = (retry_after(me), retry_after(re));
                assert!(
                    a.abs_diff(b) < Duration::from_millis(500),
                    "step {step}: waits {a:?} vs {b:?}"
                );
                assert_eq!(
                    ms.requests.map(|w| (w.limit, w.remaining)),
                    rs.requests.map(|w| (w.limit, w.remaining)),
                    "step {step}"
                );
                assert_eq!(
                    ms.images.map(|w| (w.limit, w.remaining)),
                    rs.images.map(|w| (w.limit, w.remaining)),
                    "step {step}"
                );
                let names =
                    |s: &RateStatus| s.headers().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
                assert_eq!(names(ms), names(rs), "step {step}");
            }
            _ => panic!("step {step}: memory {m:?}, redis {r:?}"),
        }
    }
    // The per-client limit: burst 5, then 429 with the same message.
    for i in 0..6 {
        let m = memory.check_client("app").await;
        let r = redis.check_client("app").await;
        match (&m, &r) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "client check {i}"),
            (Err(a), Err(b)) => {
                assert_eq!(i, 5, "the sixth is refused");
                assert_eq!(message_head(a), message_head(b));
            }
            _ => panic!("client check {i}: memory {m:?}, redis {r:?}"),
        }
    }
    // A user with a fresh bucket: burst of 3 requests, then 429 with the headers.
    let fresh = who("fresh");
    for _ in 0..3 {
        assert!(redis.check_user(&fresh, 1).await.is_ok());
    }
    let (e, status) = redis.check_user(&fresh, 1).await.unwrap_err();
    assert_eq!(
        GatewayError::from(e.clone()).into_response().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let headers = status.headers();
    assert!(
        headers.contains(&("x-ratelimit-remaining-requests", "0".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-ratelimit-limit-requests", "6".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-ratelimit-remaining-images", "7".into())),
        "{headers:?}"
    );
    let wait = retry_after(&e);
    assert!(
        wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
        "{wait:?}"
    );
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn two_replicas_never_admit_more_than_the_limit_together() {
    let prefix = unique_prefix("replicas");
    let mut c = config(
        &redis_url(),
        &prefix,
        RedisFailure::FailClosed,
        Duration::from_secs(2),
    );
    // 10 at once per user, one more a minute: nothing refills during the test.
    c.limits.per_user = RateSpec {
        requests_per_minute: Some(1),
        requests_burst: Some(10),
        images_per_minute: Some(0),
        images_burst: None,
    };
    let replicas = [Arc::new(redis_rates(&c)), Arc::new(redis_rates(&c))];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let rates = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            rates.check_user(&who("shared"), 1).await.is_ok()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.expect("the check task does not panic"));
    }
    assert_eq!(admitted, 10, "a burst of 10 shared by two replicas");
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn keys_expire_on_their_own() {
    let prefix = unique_prefix("ttl");
    let c = config(
        &redis_url(),
        &prefix,
        RedisFailure::FailClosed,
        Duration::from_secs(2),
    );
    let rates = redis_rates(&c);
    for i in 0..20 {
        rates
            .check_user(&who(&format!("spray-{i}")), 2)
            .await
            .unwrap();
    }
    rates.check_client("app").await.unwrap();
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        41,
        "two keys per user, one for the client: {keys:?}"
    );
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        // Refill times: requests 3 × 10 s, images 10 × 3 s, client 5 × 1 s.
        assert!(ttl > 0 && ttl <= 30_000, "{key}: PTTL {ttl}");
    }
    assert_eq!(
        rates.tracked_users("app"),
        0,
        "nothing is kept in this process"
    );
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn unreachable_redis_fails_open_to_the_local_limiter() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let c = config(
        &url,
        &unique_prefix("open"),
        RedisFailure::FailOpen,
        Duration::from_millis(50),
    );
    let rates = redis_rates(&c);
    let started = Instant::now();
    let admitted = {
        let mut n = 0;
        for _ in 0..5 {
            n += usize::from(rates.check_user(&who("u"), 1).await.is_ok());
        }
        n
    };
    assert_eq!(admitted, 3, "the local limiter's burst applies");
    assert!(!rates.is_up());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no check waits past the timeout"
    );
    assert!(rates.check_client("app").await.is_ok());
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn unreachable_redis_fails_closed_with_503() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let c = config(
        &url,
        &unique_prefix("closed"),
        RedisFailure::FailClosed,
        Duration::from_millis(50),
    );
    let rates = redis_rates(&c);
    let started = Instant::now();
    let (e, _) = rates.check_user(&who("u"), 1).await.unwrap_err();
    assert_eq!(e, RateRefusal::Unavailable);
    let response = GatewayError::from(e).into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e = rates.check_client("app").await.unwrap_err();
    assert_eq!(e, RateRefusal::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no check waits past the timeout"
    );
}

/// Poll `check` (bounded) until it succeeds.
async fn eventually_ok(rates: &RedisRates, user: &str) -> bool {
    let deadline = Instant::now() + RETRY_AFTER * 20;
    while Instant::now() < deadline {
        if rates.check_user(&who(user), 1).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn recovers_by_itself_when_redis_returns() {
    let port = free_port();
    let mut server = OwnRedis::start(port);
    let c = config(
        &server.url(),
        &unique_prefix("recover"),
        RedisFailure::FailClosed,
        Duration::from_millis(200),
    );
    let rates = redis_rates(&c);
    assert!(rates.check_user(&who("a"), 1).await.is_ok());
    assert!(rates.is_up());

    server.stop();
    let started = Instant::now();
    let (e, _) = rates.check_user(&who("b"), 1).await.unwrap_err();
    assert_eq!(e, RateRefusal::Unavailable);
    assert!(!rates.is_up());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no check waits past the timeout"
    );

    let _server = OwnRedis::start(port);
    assert!(
        eventually_ok(&rates, "c").await,
        "checks succeed again once Redis is back"
    );
    assert!(rates.is_up());
}

/// Not an assertion: the time one per-user check takes on Redis (one EVALSHA round trip),
/// printed with `--nocapture`.
#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn round_trip_per_check() {
    let mut c = config(
        &redis_url(),
        &unique_prefix("rtt"),
        RedisFailure::FailClosed,
        Duration::from_secs(2),
    );
    c.limits.per_user = RateSpec::default();
    c.limits.per_user.requests_per_minute = Some(1_000_000);
    c.limits.per_user.images_per_minute = Some(1_000_000);
    let rates = redis_rates(&c);
    let mut took = Vec::new();
    for i in 0..2000 {
        let t = Instant::now();
        let r = rates.check_user(&who(&format!("u{}", i % 50)), 2).await;
        took.push(t.elapsed());
        assert!(r.is_ok(), "{r:?}");
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64) * q) as usize - 1];
    println!(
        "per-user check on Redis, 2000 sequential: p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        took[took.len() - 1]
    );
}

/// Through the real server: the per-user burst on Redis, then 429 with the gateway's headers.
#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn the_gateway_limits_on_redis() {
    use support::fixtures::rgba_png;
    use support::gateway::{APP_KEY, Gateway, assert_error};
    use support::multipart::edit_request;

    let prefix = unique_prefix("gateway");
    let gw = Gateway::start_with(|c| {
        c.limits.backend = RateBackendKind::Redis;
        c.limits.redis_url = Some(Secret::new(redis_url()));
        c.limits.redis_prefix = prefix.clone();
        c.limits.redis_timeout = Duration::from_secs(2);
        c.limits.redis_failure = RedisFailure::FailClosed;
        c.limits.per_user = RateSpec {
            requests_per_minute: Some(6),
            requests_burst: Some(3),
            images_per_minute: Some(1000),
            images_burst: Some(1000),
        };
    })
    .await;
    let form = edit_request(&rgba_png(16, true), "p").text("user", "u");
    for remaining in ["2", "1", "0"] {
        let ok = gw.edit(APP_KEY, &form).await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(
            ok.header("x-ratelimit-limit-requests").as_deref(),
            Some("6")
        );
        assert_eq!(
            ok.header("x-ratelimit-remaining-requests").as_deref(),
            Some(remaining)
        );
    }
    let refused = gw.edit(APP_KEY, &form).await;
    let msg = assert_error(&refused, 429, "requests", None, Some("rate_limit_exceeded"));
    assert!(msg.contains("Limit: 6/1min (burst 3)"), "{msg}");
    assert_eq!(
        refused.header("x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        gw.mock.count(),
        3,
        "the refused request never reached the upstream"
    );
}

/// Through the real server: Redis unreachable with `fail_closed` → 503 before the body is read
/// (the per-client check), within the timeout.
#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn the_gateway_answers_503_when_redis_is_down_and_fail_closed() {
    use support::fixtures::rgba_png;
    use support::gateway::{APP_KEY, Gateway, assert_error};
    use support::multipart::edit_request;

    let url = format!("redis://127.0.0.1:{}", free_port());
    let gw = Gateway::start_with(|c| {
        c.limits.backend = RateBackendKind::Redis;
        c.limits.redis_url = Some(Secret::new(url));
        c.limits.redis_failure = RedisFailure::FailClosed;
    })
    .await;
    let started = Instant::now();
    let form = edit_request(&rgba_png(16, true), "p").text("user", "u");
    let refused = gw.edit(APP_KEY, &form).await;
    let msg = assert_error(
        &refused,
        503,
        "server_error",
        None,
        Some("rate_limiter_unavailable"),
    );
    assert!(msg.contains("rate limiter"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(gw.mock.count(), 0);
}

#[tokio::test]
#[ignore = "needs Redis at REDIS_URL"]
async fn a_reload_keeps_the_limits_state_in_redis() {
    let prefix = unique_prefix("reload");
    let c = config(
        &redis_url(),
        &prefix,
        RedisFailure::FailClosed,
        Duration::from_secs(2),
    );
    let rates = redis_rates(&c);
    let u1 = who("u1");
    for _ in 0..3 {
        assert!(rates.check_user(&u1, 1).await.is_ok());
    }
    assert!(rates.check_user(&u1, 1).await.is_err(), "burst of 3 used");
    // A reload that adds a client: the same Redis keys, so u1 is still limited.
    let mut reloaded = c.clone();
    reloaded.clients.push(ClientConfig {
        name: "new".into(),
        key_hash: hash_key("new"),
        ..Default::default()
    });
    let after = rates.reconfigured(&reloaded);
    assert!(after.check_user(&u1, 1).await.is_err(), "u1 kept its state");
    let newcomer = EndUser {
        client: "new".into(),
        user: Some("u1".into()),
    };
    assert!(after.check_user(&newcomer, 1).await.is_ok());
    assert!(after.check_client("new").await.is_ok());
}
