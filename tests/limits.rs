//! Per-user rate limits and quotas, end to end through the real server with a manual clock.

mod support;

use std::time::Duration;

use imagegate::config::{ClientConfig, hash_key};
use imagegate::limits::spec::{ClientKind, MissingUser, QuotaSpec, RateSpec, UserMismatch};
use support::fixtures::rgba_png;
use support::gateway::*;
use support::mock_upstream::Behavior;
use support::multipart::{Multipart, edit_request};

const ALICE_KEY: &str = "ig-test-alice-personal-key-000";

fn form(user: Option<&str>, n: u32) -> Multipart {
    let mut f = edit_request(&rgba_png(16, true), "p").text("n", &n.to_string());
    if let Some(u) = user {
        f = f.text("user", u);
    }
    f
}

fn user_limits(rpm: u32, burst: u32, ipm: u32, iburst: u32) -> RateSpec {
    RateSpec {
        requests_per_minute: Some(rpm),
        requests_burst: Some(burst),
        images_per_minute: Some(ipm),
        images_burst: Some(iburst),
    }
}

async fn statuses(gw: &Gateway, key: &str, user: Option<&str>, n: u32, tries: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..tries {
        out.push(gw.edit(key, &form(user, n)).await.status);
    }
    out
}

#[tokio::test]
async fn burst_admission_headers_and_recovery() {
    let gw = Gateway::start_with(|c| c.limits.per_user = user_limits(6, 3, 1000, 1000)).await;
    let first = gw.edit(APP_KEY, &form(Some("u"), 1)).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("x-ratelimit-limit-requests").as_deref(),
        Some("6")
    );
    assert_eq!(
        first.header("x-ratelimit-remaining-requests").as_deref(),
        Some("2")
    );
    assert_eq!(
        first.header("x-ratelimit-reset-requests").as_deref(),
        Some("10s")
    );
    assert_eq!(
        first.header("x-ratelimit-limit-images").as_deref(),
        Some("1000")
    );
    // The upstream's own headers of the same names are kept under another name.
    assert_eq!(
        first
            .header("x-upstream-ratelimit-limit-requests")
            .as_deref(),
        Some("50")
    );
    assert_eq!(statuses(&gw, APP_KEY, Some("u"), 1, 2).await, [200, 200]);
    let refused = gw.edit(APP_KEY, &form(Some("u"), 1)).await;
    let msg = assert_error(&refused, 429, "requests", None, Some("rate_limit_exceeded"));
    assert!(
        msg.contains("requests per minute") && msg.contains("user 'u' of client 'app'"),
        "{msg}"
    );
    assert!(msg.contains("Limit: 6/1min"), "{msg}");
    assert_eq!(refused.header("retry-after").as_deref(), Some("10"));
    assert_eq!(refused.header("retry-after-ms").as_deref(), Some("10000"));
    assert_eq!(
        refused.header("x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    assert_eq!(
        gw.mock.count(),
        3,
        "the refused request never reached the upstream"
    );
    gw.clock.advance(Duration::from_secs(10));
    assert_eq!(statuses(&gw, APP_KEY, Some("u"), 1, 2).await, [200, 429]);
    gw.clock.advance(Duration::from_secs(60));
    assert_eq!(
        statuses(&gw, APP_KEY, Some("u"), 1, 4).await,
        [200, 200, 200, 429]
    );
}

#[tokio::test]
async fn images_are_counted_by_n() {
    let gw = Gateway::start_with(|c| c.limits.per_user = user_limits(1000, 1000, 20, 10)).await;
    let r = gw.edit(APP_KEY, &form(Some("u"), 7)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-remaining-images").as_deref(),
        Some("3")
    );
    let refused = gw.edit(APP_KEY, &form(Some("u"), 4)).await;
    let msg = assert_error(&refused, 429, "requests", None, Some("rate_limit_exceeded"));
    assert!(msg.contains("images per minute"), "{msg}");
    assert!(msg.contains("Requested: 4, available now: 3"), "{msg}");
    assert_eq!(
        refused.header("retry-after").as_deref(),
        Some("3"),
        "one image every 3 s"
    );
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 3)).await.status, 200);
    gw.clock.advance(Duration::from_secs(30));
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 10)).await.status, 200);
}

#[tokio::test]
async fn users_and_clients_are_isolated() {
    let gw = Gateway::start_with(|c| c.limits.per_user = user_limits(2, 2, 1000, 1000)).await;
    assert_eq!(
        statuses(&gw, APP_KEY, Some("a"), 1, 3).await,
        [200, 200, 429]
    );
    assert_eq!(
        statuses(&gw, APP_KEY, Some("b"), 1, 3).await,
        [200, 200, 429]
    );
    assert_eq!(
        statuses(&gw, OTHER_KEY, Some("a"), 1, 3).await,
        [200, 200, 429],
        "same user name, other client"
    );
}

fn with_alice(c: &mut imagegate::config::Config) {
    c.clients.push(ClientConfig {
        name: "alice-laptop".into(),
        key_hash: hash_key(ALICE_KEY),
        kind: ClientKind::Personal,
        user: Some("alice".into()),
        ..Default::default()
    });
}

#[tokio::test]
async fn personal_keys_cannot_spend_for_someone_else() {
    let gw = Gateway::start_with(|c| {
        c.limits.per_user = user_limits(2, 2, 1000, 1000);
        with_alice(c);
    })
    .await;
    // Alice pretends to be bob: charged to alice, and alice goes upstream.
    assert_eq!(gw.edit(ALICE_KEY, &form(Some("bob"), 1)).await.status, 200);
    assert_eq!(
        gw.mock.last().unwrap().field("user").as_deref(),
        Some("alice")
    );
    assert_eq!(gw.edit(ALICE_KEY, &form(None, 1)).await.status, 200);
    assert_eq!(
        gw.mock.last().unwrap().field("user").as_deref(),
        Some("alice"),
        "filled in when absent"
    );
    assert_eq!(
        gw.edit(ALICE_KEY, &form(Some("alice"), 1)).await.status,
        429,
        "alice's budget is spent"
    );
    // An app's user named alice is another end user.
    assert_eq!(gw.edit(APP_KEY, &form(Some("alice"), 1)).await.status, 200);

    let strict = Gateway::start_with(|c| {
        c.limits.personal_user_mismatch = UserMismatch::Reject;
        with_alice(c);
    })
    .await;
    let r = strict.edit(ALICE_KEY, &form(Some("bob"), 1)).await;
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("user"),
        Some("invalid_value"),
    );
    assert_eq!(strict.mock.count(), 0);
}

#[tokio::test]
async fn missing_user_policies_and_normalization() {
    let reject = Gateway::start_with(|c| c.limits.missing_user = MissingUser::Reject).await;
    let r = reject.edit(APP_KEY, &form(None, 1)).await;
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("user"),
        Some("missing_required_parameter"),
    );
    let r = reject.edit(APP_KEY, &form(Some("   "), 1)).await;
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("user"),
        Some("missing_required_parameter"),
    );
    assert_eq!(
        reject
            .edit(APP_KEY, &form(Some("  padded  "), 1))
            .await
            .status,
        200
    );
    assert_eq!(
        reject.mock.last().unwrap().field("user").as_deref(),
        Some("padded"),
        "normalized id goes upstream"
    );
    let r = reject.edit(APP_KEY, &form(Some("bad\u{7}user"), 1)).await;
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("user"),
        Some("invalid_value"),
    );

    let charge_client = Gateway::start_with(|c| {
        c.limits.missing_user = MissingUser::Client;
        c.limits.per_user = user_limits(1, 1, 1000, 1000);
    })
    .await;
    assert_eq!(
        statuses(&charge_client, APP_KEY, None, 1, 2).await,
        [200, 429],
        "charged to the client's own bucket"
    );
    assert_eq!(charge_client.mock.last().unwrap().field("user"), None);
    assert_eq!(
        charge_client
            .edit(APP_KEY, &form(Some("u"), 1))
            .await
            .status,
        200,
        "users have their own buckets"
    );
}

#[tokio::test]
async fn client_limit_is_checked_before_the_body() {
    let gw = Gateway::start_with(|c| {
        c.limits.per_client = RateSpec {
            requests_per_minute: Some(60),
            requests_burst: Some(2),
            ..Default::default()
        };
    })
    .await;
    assert_eq!(statuses(&gw, APP_KEY, Some("u"), 1, 2).await, [200, 200]);
    // Not even multipart: refused on the limit, not on the content type.
    let r = gw.edit_raw(APP_KEY, "text/plain", b"x".to_vec()).await;
    let msg = assert_error(&r, 429, "requests", None, Some("rate_limit_exceeded"));
    assert!(msg.contains("client 'app'"), "{msg}");
    assert_eq!(
        gw.edit(OTHER_KEY, &form(Some("u"), 1)).await.status,
        200,
        "other clients unaffected"
    );
}

fn quota(spec: QuotaSpec) -> impl FnOnce(&mut imagegate::config::Config) {
    move |c| c.quotas.per_user = spec
}

#[tokio::test]
async fn parallel_requests_never_overspend_a_quota() {
    let gw = std::sync::Arc::new(
        Gateway::start_with(quota(QuotaSpec {
            images_per_day: Some(10),
            ..Default::default()
        }))
        .await,
    );
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            gw.edit(APP_KEY, &form(Some("u"), 1)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                let msg = assert_error(
                    &r,
                    429,
                    "insufficient_quota",
                    None,
                    Some("insufficient_quota"),
                );
                assert!(
                    msg.contains("images per day") && msg.contains("resets at"),
                    "{msg}"
                );
                assert!(r.header("retry-after").is_some());
                assert_eq!(
                    r.header("x-should-retry").as_deref(),
                    Some("false"),
                    "SDKs must not retry a spent quota"
                );
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok, 10, "exactly the quota was admitted");
    assert_eq!(gw.mock.count(), 10);
}

#[tokio::test]
async fn spend_quota_refunds_failures_and_partial_answers() {
    // $0.06 per day = three 1024x1024 images.
    let gw = Gateway::start_with(quota(QuotaSpec {
        usd_per_day: Some(0.06),
        ..Default::default()
    }))
    .await;
    gw.mock.set_behavior(Behavior::openai_error(
        500,
        "boom",
        "server_error",
        None,
        None,
    ));
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 3)).await.status, 500);
    gw.mock.set_behavior(Behavior::FewerImages(1));
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 3)).await.status, 200); // reserved 3, charged 1
    gw.mock.set_behavior(Behavior::Success);
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 2)).await.status, 200);
    let r = gw.edit(APP_KEY, &form(Some("u"), 1)).await;
    let msg = assert_error(
        &r,
        429,
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    );
    assert!(
        msg.contains("spend per day") && msg.contains("$0.060000"),
        "{msg}"
    );
    // A PNG rejection after the reservation refunds it too.
    let mut gw = gw;
    gw.clock.advance(Duration::from_secs(86_400));
    let opaque = edit_request(&rgba_png(16, false), "p")
        .text("n", "3")
        .text("user", "u");
    assert_eq!(gw.edit(APP_KEY, &opaque).await.status, 400);
    assert_eq!(
        gw.edit(APP_KEY, &form(Some("u"), 3)).await.status,
        200,
        "the rejected request's reservation was refunded"
    );
    gw = gw.restart(|_| {}).await;
    drop(gw);
}

#[tokio::test]
async fn quotas_survive_a_restart_and_roll_over() {
    let spec = QuotaSpec {
        images_per_day: Some(4),
        ..Default::default()
    };
    let gw = Gateway::start_with(quota(spec)).await;
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 3)).await.status, 200);
    let gw = gw.restart(quota(spec)).await;
    assert_eq!(gw.edit(APP_KEY, &form(Some("u"), 1)).await.status, 200);
    assert_eq!(
        gw.edit(APP_KEY, &form(Some("u"), 1)).await.status,
        429,
        "use persisted across the restart"
    );
    gw.clock.advance(Duration::from_secs(86_400));
    assert_eq!(
        gw.edit(APP_KEY, &form(Some("u"), 4)).await.status,
        200,
        "a new day"
    );
}

#[tokio::test]
async fn tracked_users_stay_at_the_cap_under_a_spray() {
    let gw = Gateway::start_with(|c| c.limits.max_tracked_users_per_client = 20).await;
    for i in 0..60 {
        let user = format!("spray-{i}");
        let _ = gw.edit(APP_KEY, &form(Some(&user), 1)).await;
    }
    assert_eq!(gw.server.state.live().rates.tracked_users("app"), 20);
    assert_eq!(gw.server.state.live().rates.tracked_users("other"), 0);
}

/// Day use (images, micro-USD) of user `u` of client "app".
fn day_use(gw: &Gateway) -> (u64, i64) {
    let who = imagegate::limits::EndUser {
        client: "app".into(),
        user: Some("u".into()),
    };
    let scope = imagegate::limits::quota::user_scope(&who).unwrap();
    let u = gw.server.state.live().quotas.usage(&scope).unwrap();
    (u.images_day, u.micros_day)
}

fn spend_quota(c: &mut imagegate::config::Config) {
    c.quotas.per_user = QuotaSpec {
        images_per_day: Some(100),
        usd_per_day: Some(10.0),
        ..Default::default()
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_after_sending_charges_the_whole_reservation() {
    let gw = Gateway::start_with(|c| {
        spend_quota(c);
        c.upstream.response_timeout = Duration::from_millis(500);
    })
    .await;
    gw.mock.set_behavior(Behavior::Hang);
    let r = gw.edit(APP_KEY, &form(Some("u"), 3)).await;
    assert_error(&r, 504, "server_error", None, Some("upstream_timeout"));
    assert_eq!(gw.mock.count(), 1, "the upstream got the whole request");
    let record = gw.record_of(&r);
    assert_eq!(record.cost_reserved_micros, 60_000, "3 × $0.02");
    assert_eq!(record.cost_settled_micros, record.cost_reserved_micros);
    assert_eq!(
        record.cost_basis,
        Some(imagegate::ledger::CostBasis::Estimated)
    );
    assert_eq!(record.images_returned, Some(0));
    assert_eq!(
        day_use(&gw),
        (3, 60_000),
        "quota use equals the reservation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_sends_nothing_and_refunds() {
    // Port 1 on loopback: nothing listens there, the connection is refused.
    let gw = Gateway::start_with(|c| {
        spend_quota(c);
        c.upstream.base_url = "http://127.0.0.1:1/v1".into();
    })
    .await;
    let r = gw.edit(APP_KEY, &form(Some("u"), 3)).await;
    assert_error(&r, 502, "server_error", None, Some("upstream_unreachable"));
    let record = gw.record_of(&r);
    assert_eq!(record.cost_settled_micros, 0);
    assert_eq!(record.cost_basis, None);
    assert_eq!(day_use(&gw), (0, 0), "nothing was sent: refunded");
}

#[tokio::test]
async fn an_upstream_answering_more_images_than_n_is_charged_n() {
    let gw = Gateway::start_with(spend_quota).await;
    gw.mock.set_behavior(Behavior::FewerImages(5));
    let r = gw.edit(APP_KEY, &form(Some("u"), 2)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["data"].as_array().map(Vec::len),
        Some(5),
        "the answer is relayed as it came"
    );
    let record = gw.record_of(&r);
    assert_eq!(record.images_returned, Some(2), "capped at n");
    assert_eq!(record.cost_settled_micros, 40_000);
    assert_eq!(day_use(&gw), (2, 40_000));
}

#[tokio::test]
async fn the_user_length_is_checked_after_trimming() {
    let gw = Gateway::start().await;
    // 256 characters (the default maximum) with whitespace around them.
    let padded = format!("   {}\t ", "u".repeat(256));
    let r = gw.edit(APP_KEY, &form(Some(&padded), 1)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        gw.mock.last().unwrap().field("user"),
        Some("u".repeat(256)),
        "the trimmed id goes upstream"
    );
    let r = gw
        .edit(APP_KEY, &form(Some(&format!(" {} ", "u".repeat(257))), 1))
        .await;
    let msg = assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("user"),
        Some("string_above_max_length"),
    );
    assert!(msg.contains("got a string with length 257"), "{msg}");
}
