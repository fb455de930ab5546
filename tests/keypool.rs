//! The pool of upstream keys end to end: the real gateway on 127.0.0.1:0, two mock upstreams
//! on 127.0.0.1:0 standing for two keys (each key's `base_url` points at its mock). The gateway
//! runs on a manual clock, so cool-downs and rate-limit benches end when the test advances it.

mod support;

use std::time::Duration;

use imagegate::config::{Config, KeyPin, UpstreamKeyConfig};
use support::Resp;
use support::fixtures::rgba_png;
use support::gateway::*;
use support::mock_upstream::{Behavior, MockUpstream, openai_error_body};
use support::multipart::edit_request;

/// Two keys named `<prefix>-a` (on `gw.mock`) and `<prefix>-b` (on the returned mock), with
/// these weights; names are unique per test because the metrics recorder is process-wide.
async fn two_keys(
    prefix: &str,
    weights: (u32, u32),
    tweak: impl FnOnce(&mut Config),
) -> (Gateway, MockUpstream) {
    let b = MockUpstream::start().await;
    let b_url = b.base_url();
    let prefix = prefix.to_owned();
    let gw = Gateway::start_with(move |c| {
        let mut ka = UpstreamKeyConfig::new(&format!("{prefix}-a"), &format!("sk-{prefix}-a"));
        ka.base_url = Some(c.upstream.base_url.clone());
        ka.weight = weights.0;
        let mut kb = UpstreamKeyConfig::new(&format!("{prefix}-b"), &format!("sk-{prefix}-b"));
        kb.base_url = Some(b_url);
        kb.weight = weights.1;
        kb.project = Some(format!("proj_{prefix}_b"));
        c.upstream_key = None;
        c.upstream.keys = vec![ka, kb];
        c.upstream.breaker.failures = 3;
        c.upstream.breaker.cool_down = Duration::from_secs(30);
        tweak(c);
    })
    .await;
    (gw, b)
}

async fn edit(gw: &Gateway, key: &str) -> Resp {
    gw.edit(key, &edit_request(&rgba_png(16, true), "an otter"))
        .await
}

fn auth_of(mock: &MockUpstream) -> Vec<String> {
    mock.received()
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default())
        .collect()
}

/// The `imagegate_upstream_key_state` gauge of `key` (0 healthy, 1 benched, 2 trial).
fn key_state(key: &str) -> Option<f64> {
    let text = imagegate::metrics::handle().render();
    let prefix = format!("imagegate_upstream_key_state{{key=\"{key}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// The number of records in the gateway's ledger.
fn ledger_len(gw: &Gateway) -> usize {
    use imagegate::ledger::sqlite::SqliteStore;
    use imagegate::ledger::store::{LedgerStore, UsageQuery};
    let store = SqliteStore::open_reader(&gw.dir.path().join("imagegate.db")).unwrap();
    let mut n = 0;
    store
        .export(&UsageQuery::default(), &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
    n
}

#[tokio::test]
async fn requests_are_spread_by_weight_with_each_keys_headers() {
    let (gw, b) = two_keys("spread", (3, 1), |_| {}).await;
    let total = 40;
    let mut recorded_a = 0;
    for _ in 0..total {
        let resp = edit(&gw, APP_KEY).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        if gw.record_of(&resp).upstream_key.as_deref() == Some("spread-a") {
            recorded_a += 1;
        }
    }
    let (a_n, b_n) = (gw.mock.count(), b.count());
    eprintln!("weights 3:1 over {total} requests: key a {a_n}, key b {b_n}");
    assert_eq!(
        a_n + b_n,
        total,
        "every request reached exactly one key once"
    );
    // Smooth weighted round-robin: the shares are exact within one request.
    assert!((29..=31).contains(&a_n), "key a got {a_n} of {total}");
    assert_eq!(
        recorded_a, a_n,
        "the ledger names the key each request used"
    );
    // Each mock saw only its own key and project.
    assert!(auth_of(&gw.mock).iter().all(|a| a == "Bearer sk-spread-a"));
    assert!(auth_of(&b).iter().all(|a| a == "Bearer sk-spread-b"));
    assert!(
        b.received()
            .iter()
            .all(|r| r.header("openai-project").as_deref() == Some("proj_spread_b"))
    );
    assert!(
        gw.mock
            .received()
            .iter()
            .all(|r| r.header("openai-project").is_none())
    );
}

#[tokio::test]
async fn a_failing_key_is_benched_and_comes_back_after_the_cool_down() {
    let (gw, b) = two_keys("bench", (1, 1), |_| {}).await;
    gw.mock.set_behavior(Behavior::openai_error(
        500,
        "The server had an error while processing your request.",
        "server_error",
        None,
        None,
    ));
    // Equal weights alternate a, b, a, b, a: the third 500 of key a benches it. Each 500 is
    // passed on to its caller, never sent to the other key (the body had gone out).
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(edit(&gw, APP_KEY).await.status);
    }
    assert_eq!(statuses, [500, 200, 500, 200, 500]);
    assert_eq!((gw.mock.count(), b.count()), (3, 2));
    assert_eq!(key_state("bench-a"), Some(1.0), "benched on /metrics");
    assert_eq!(key_state("bench-b"), Some(0.0));

    // Benched: all traffic moves to key b.
    for _ in 0..6 {
        let resp = edit(&gw, APP_KEY).await;
        assert_eq!(resp.status, 200);
        assert_eq!(gw.record_of(&resp).upstream_key.as_deref(), Some("bench-b"));
    }
    assert_eq!((gw.mock.count(), b.count()), (3, 8));

    // Key a recovers; nothing reaches it until the cool-down ends.
    gw.mock.set_behavior(Behavior::Success);
    gw.clock.advance(Duration::from_secs(29));
    assert_eq!(edit(&gw, APP_KEY).await.status, 200);
    assert_eq!(gw.mock.count(), 3);
    gw.clock.advance(Duration::from_secs(1));
    // The trial request goes to key a within a bounded number of requests.
    let mut sent = 0;
    while gw.mock.count() == 3 {
        assert!(sent < 4, "key a got no trial request after its cool-down");
        assert_eq!(edit(&gw, APP_KEY).await.status, 200);
        sent += 1;
    }
    assert_eq!(key_state("bench-a"), Some(0.0), "healthy again");
    // Healthy: the traffic is shared again.
    let (a0, b0) = (gw.mock.count(), b.count());
    for _ in 0..10 {
        assert_eq!(edit(&gw, APP_KEY).await.status, 200);
    }
    let (a1, b1) = (gw.mock.count() - a0, b.count() - b0);
    assert!((4..=6).contains(&a1) && a1 + b1 == 10, "a {a1}, b {b1}");
}

#[tokio::test]
async fn a_rate_limited_request_is_answered_by_the_other_key_and_sent_once_to_each() {
    let (gw, b) = two_keys("ratelimit", (1, 1), |_| {}).await;
    gw.mock.set_behavior(Behavior::Custom {
        status: 429,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "20".into()),
        ],
        body: openai_error_body(
            "Rate limit reached for images per minute (IPM): Limit 5, Used 5, Requested 1.",
            "requests",
            None,
            Some("rate_limit_exceeded"),
        ),
    });
    // Equal weights: the first request picks key a, which refuses it.
    let resp = edit(&gw, APP_KEY).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!((gw.mock.count(), b.count()), (1, 1));
    assert_eq!(
        gw.mock.received()[0].body,
        b.received()[0].body,
        "the same body went to the second key"
    );
    assert_eq!(gw.mock.heads(), 1, "key a never saw the request twice");
    let rec = gw.record_of(&resp);
    assert_eq!(rec.upstream_key.as_deref(), Some("ratelimit-b"));
    assert_eq!(rec.upstream_status, Some(200));
    assert_eq!(ledger_len(&gw), 1, "one request, one record");
    assert_eq!(key_state("ratelimit-a"), Some(1.0));

    // Benched for the 20 s it asked: everything goes to key b meanwhile.
    for _ in 0..4 {
        assert_eq!(edit(&gw, APP_KEY).await.status, 200);
    }
    assert_eq!((gw.mock.count(), b.count()), (1, 5));
    gw.mock.set_behavior(Behavior::Success);
    gw.clock.advance(Duration::from_secs(20));
    let mut sent = 0;
    while gw.mock.count() == 1 {
        assert!(
            sent < 4,
            "key a got no trial request after its rate-limit bench"
        );
        assert_eq!(edit(&gw, APP_KEY).await.status, 200);
        sent += 1;
    }
    assert_eq!(key_state("ratelimit-a"), Some(0.0));
}

#[tokio::test]
async fn insufficient_quota_and_a_429_on_every_key_are_passed_on() {
    let (gw, b) = two_keys("quota", (1, 1), |_| {}).await;
    let quota = openai_error_body(
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    );
    gw.mock.set_behavior(Behavior::Status {
        status: 429,
        body: quota.clone(),
    });
    // insufficient_quota is not a rate limit: not retried, not benched.
    let resp = edit(&gw, APP_KEY).await;
    assert_error(
        &resp,
        429,
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    );
    assert_eq!((gw.mock.count(), b.count()), (1, 0));
    assert_eq!(key_state("quota-a"), Some(0.0));

    // Both keys rate limited: each is tried once, the last refusal reaches the caller.
    let limited = Behavior::openai_error(
        429,
        "Rate limit reached",
        "requests",
        None,
        Some("rate_limit_exceeded"),
    );
    gw.mock.set_behavior(limited.clone());
    b.set_behavior(limited);
    let resp = edit(&gw, APP_KEY).await;
    assert_error(&resp, 429, "requests", None, Some("rate_limit_exceeded"));
    assert_eq!((gw.mock.count(), b.count()), (2, 1));
    assert_eq!(ledger_len(&gw), 2);
}

#[tokio::test]
async fn a_request_whose_body_was_sent_is_never_resent() {
    // A short response timeout (real time) for the unanswered request below.
    let (gw, b) = two_keys("noresend", (1, 1), |c| {
        c.upstream.response_timeout = Duration::from_secs(1);
    })
    .await;
    gw.mock.set_behavior(Behavior::openai_error(
        502,
        "Bad gateway.",
        "server_error",
        None,
        None,
    ));
    let resp = edit(&gw, APP_KEY).await;
    assert_eq!(resp.status, 502);
    assert_eq!(
        (gw.mock.count(), gw.mock.heads(), b.count(), b.heads()),
        (1, 1, 0, 0),
        "the 5xx is the answer: the other key never saw the request"
    );
    assert_eq!(
        gw.record_of(&resp).upstream_key.as_deref(),
        Some("noresend-a")
    );
    // Nor after a request that got no answer in time once its body was read (504): key b
    // answers the next request (round-robin), then key a keeps the one after unanswered.
    assert_eq!(edit(&gw, APP_KEY).await.status, 200);
    gw.mock.set_behavior(Behavior::Hang);
    let before = (gw.mock.count(), b.heads());
    let resp = edit(&gw, APP_KEY).await;
    assert_error(&resp, 504, "server_error", None, Some("upstream_timeout"));
    assert_eq!(
        (gw.mock.count() - before.0, b.heads() - before.1),
        (1, 0),
        "a request that reached key a is not sent to key b"
    );
    assert_eq!(
        gw.record_of(&resp).upstream_key.as_deref(),
        Some("noresend-a")
    );
}

#[tokio::test]
async fn a_key_that_cannot_be_connected_to_hands_the_request_to_the_next() {
    // A port with nothing listening: bound, then released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", dead.local_addr().unwrap());
    drop(dead);
    let (gw, b) = two_keys("connect", (1, 1), move |c| {
        c.upstream.keys[0].base_url = Some(dead_url);
    })
    .await;
    // Key a is tried by every other request while it is healthy (nothing was sent: key b gets
    // the request); its third connect failure benches it.
    for _ in 0..6 {
        let resp = edit(&gw, APP_KEY).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            gw.record_of(&resp).upstream_key.as_deref(),
            Some("connect-b")
        );
    }
    assert_eq!(b.count(), 6);
    assert_eq!(b.heads(), 6, "each request reached key b exactly once");
    assert_eq!(key_state("connect-a"), Some(1.0));
}

#[tokio::test]
async fn pinned_clients_use_only_their_keys() {
    let (gw, b) = two_keys("pin", (1, 0), |c| {
        // "app" is pinned to the team key b (weight 0: nobody else uses it).
        c.clients[0].upstream_key = Some(KeyPin::One("pin-b".into()));
    })
    .await;
    for _ in 0..6 {
        let resp = edit(&gw, APP_KEY).await;
        assert_eq!(resp.status, 200);
        assert_eq!(gw.record_of(&resp).upstream_key.as_deref(), Some("pin-b"));
    }
    for _ in 0..6 {
        let resp = edit(&gw, OTHER_KEY).await;
        assert_eq!(resp.status, 200);
        assert_eq!(gw.record_of(&resp).upstream_key.as_deref(), Some("pin-a"));
    }
    assert_eq!((gw.mock.count(), b.count()), (6, 6));
    assert!(auth_of(&b).iter().all(|a| a == "Bearer sk-pin-b"));
}

#[tokio::test]
async fn the_single_key_config_is_a_pool_of_one_named_default() {
    let gw = Gateway::start().await;
    let resp = edit(&gw, APP_KEY).await;
    assert_eq!(resp.status, 200);
    assert_eq!(gw.record_of(&resp).upstream_key.as_deref(), Some("default"));
    assert_eq!(
        gw.mock.last().unwrap().header("authorization").as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
}

#[tokio::test]
async fn the_admin_listener_shows_each_keys_health_and_state() {
    const ADMIN_KEY: &str = "ig-admin-key-for-keypool-0001";
    let (gw, b) = two_keys("admin", (1, 1), |c| {
        c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.key_hash = Some(imagegate::config::hash_key(ADMIN_KEY));
        c.upstream.breaker.failures = 1;
    })
    .await;
    let admin = gw.server.admin_addr.expect("admin listener bound");
    let get = |path: &'static str| async move {
        let auth = format!("Bearer {ADMIN_KEY}");
        support::send(
            admin,
            "GET",
            path,
            &[("authorization", auth.as_str())],
            vec![],
        )
        .await
    };
    // One 503 from key a benches it (failures = 1).
    gw.mock.set_behavior(Behavior::openai_error(
        503,
        "The engine is currently overloaded.",
        "server_error",
        None,
        None,
    ));
    assert_eq!(edit(&gw, APP_KEY).await.status, 503);
    let keys = get("/admin/upstream/keys").await;
    assert_eq!(keys.status, 200, "{}", keys.text());
    assert_eq!(
        keys.json(),
        serde_json::json!([
            {"name": "admin-a", "weight": 1, "state": "benched", "failures": 0, "benched_ms": 30000},
            {"name": "admin-b", "weight": 1, "state": "healthy", "failures": 0, "benched_ms": null}
        ])
    );
    assert!(!keys.text().contains("sk-"), "no key in the answer");
    let metrics = get("/metrics").await.text();
    for line in [
        "imagegate_upstream_key_state{key=\"admin-a\"} 1",
        "imagegate_upstream_key_state{key=\"admin-b\"} 0",
        "imagegate_upstream_key_benched_total{key=\"admin-a\",reason=\"failures\"} 1",
        "imagegate_upstream_key_failures_total{key=\"admin-a\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    assert!(!metrics.contains("sk-admin"), "no key on /metrics");
    assert_eq!(b.count(), 0);
    // Without the admin key: nothing.
    let anon = support::send(admin, "GET", "/admin/upstream/keys", &[], vec![]).await;
    assert_eq!(anon.status, 401);
}
