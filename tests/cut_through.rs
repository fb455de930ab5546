//! Cut-through (`upstream.cut_through`), over real sockets: the body goes upstream while the
//! images are checked, its last bytes held back until the check passed.
//!
//! The checks of users named `imagegate::testkit::HOLD_CHECK_PREFIX...` wait, once they said the
//! body may go, until the test releases them: the upload is then in flight before the check
//! ends on any machine, with no timing involved.

mod support;

use imagegate::limits::spec::QuotaSpec;
use imagegate::testkit::{HOLD_CHECK_PREFIX, release_check};
use support::Resp;
use support::fixtures::*;
use support::gateway::*;
use support::mock_upstream::{Behavior, Recorded};
use support::multipart::{Multipart, edit_request};

fn spend_quota(c: &mut imagegate::config::Config) {
    c.quotas.per_user = QuotaSpec {
        images_per_day: Some(100),
        usd_per_day: Some(10.0),
        ..Default::default()
    };
}

fn cut_through(c: &mut imagegate::config::Config) {
    spend_quota(c);
    c.upstream.cut_through = true;
}

/// A 1024x1024 RGBA edit from `user`.
fn form(image: &[u8], user: &str) -> Multipart {
    edit_request(image, "a lighthouse at dusk")
        .text("n", "2")
        .text("user", user)
}

/// Day use (images, micro-USD) of `user` of client "app".
fn day_use(gw: &Gateway, user: &str) -> (u64, i64) {
    let who = imagegate::limits::EndUser {
        client: "app".into(),
        user: Some(user.into()),
    };
    let scope = imagegate::limits::quota::user_scope(&who).unwrap();
    let u = gw.server.state.live().quotas.usage(&scope).unwrap();
    (u.images_day, u.micros_day)
}

/// `f`, which must end within 60 s (a wait that would hang fails the test instead).
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} within 60 s"))
}

/// Wait until the mock saw a request body break off; fails as soon as it received a complete
/// request instead.
async fn cut_short(gw: &Gateway) {
    within("the upload is cut short", async {
        tokio::select! {
            _ = gw.mock.wait_for_aborted(1) => {}
            _ = gw.mock.wait_for(1) => panic!("the upstream received a complete request"),
        }
    })
    .await;
}

/// The last chunk of a canonical body, which waits for the check: `\r\n--<42-character
/// boundary>--\r\n`.
const TAIL: usize = 2 + 2 + 42 + 2 + 2;

/// Post `form` in a task of its own (its check may be held).
fn post(gw: &Gateway, form: &Multipart) -> tokio::task::JoinHandle<Resp> {
    let (addr, ct, body) = (gw.addr(), form.content_type(), form.body());
    tokio::spawn(async move { post_edit(addr, APP_KEY, &ct, body).await })
}

/// `hay` with every `needle` replaced by `with`.
fn replace(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// A forwarded body with its (random) boundary replaced by a fixed one.
fn unbounded(rec: &Recorded) -> Vec<u8> {
    let ct = rec.header("content-type").expect("a content type");
    let boundary = ct.split("boundary=").nth(1).expect("a boundary");
    assert!(
        rec.body.starts_with(format!("--{boundary}\r\n").as_bytes()),
        "{ct}"
    );
    replace(&rec.body, boundary.as_bytes(), b"BOUNDARY")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_image_never_completes_an_upstream_request() {
    // Well framed, valid CRCs: only the decode finds that the pixel data stops halfway.
    let bad = truncated_idat(&rgba_png_noisy(1024));
    assert!(
        bad.len() > 700_000,
        "{} bytes: the upload takes a while",
        bad.len()
    );

    // Without cut-through: the answer the caller must get either way.
    let plain = Gateway::start_with(spend_quota).await;
    let user = format!("{HOLD_CHECK_PREFIX}invalid-plain");
    let expected = plain.edit(APP_KEY, &form(&bad, &user)).await;
    assert_error(
        &expected,
        400,
        "invalid_request_error",
        Some("image"),
        Some("invalid_image_format"),
    );
    assert_eq!(plain.mock.heads(), 0, "nothing went upstream");

    let gw = Gateway::start_with(|c| {
        cut_through(c);
        // One key that a single failure would bench.
        c.upstream.breaker.failures = 1;
    })
    .await;
    let user = format!("{HOLD_CHECK_PREFIX}invalid");
    let answer = post(&gw, &form(&bad, &user));
    // The upload is in flight while the check is held...
    within("the upload begins", gw.mock.wait_for_heads(1)).await;
    assert_eq!(gw.mock.count(), 0, "no complete body while the check runs");
    assert_eq!(day_use(&gw, &user), (2, 40_000), "reserved meanwhile");
    // ... and the check fails.
    release_check(&user);
    let r = within("the answer", answer).await.unwrap();
    assert_eq!(r.status, expected.status);
    assert_eq!(
        r.json(),
        expected.json(),
        "the same error as without cut-through"
    );
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("image"),
        Some("invalid_image_format"),
    );

    // The upstream saw a body that broke off before its end, never a complete one.
    cut_short(&gw).await;
    let aborted = gw.mock.aborted();
    assert_eq!(aborted.len(), 1, "{aborted:?}");
    let length = aborted[0].content_length.expect("a content-length");
    assert!(
        aborted[0].received <= length - TAIL,
        "cut short before the last chunk: {} of {length} bytes",
        aborted[0].received
    );
    assert_eq!(gw.mock.count(), 0, "no complete request upstream");

    assert!(
        cut_through_count("refused") >= 1,
        "counted: {}",
        imagegate::metrics::handle().render()
    );

    // One record: rejected with the check's error, nothing spent.
    let record = gw.record_of(&r);
    let plain_record = plain.record_of(&expected);
    assert_eq!(record.outcome, imagegate::ledger::Outcome::Rejected);
    assert_eq!(record.status, Some(400));
    assert_eq!(record.reason_code.as_deref(), Some("invalid_image_format"));
    assert_eq!(record.reason_param.as_deref(), Some("image"));
    assert_eq!(record.reason_message, plain_record.reason_message);
    assert_eq!(record.cost_settled_micros, 0);
    assert_eq!(record.image_sha256, plain_record.image_sha256);
    assert_eq!(record.image_bytes, Some(bad.len() as u64));
    assert_eq!(day_use(&gw, &user), (0, 0), "the reservation is refunded");

    // The key was not blamed: still healthy, no failure counted (read once every forwarding
    // task, the aborted upload's included, has ended).
    let state = gw.server.state.clone();
    gw.server.shutdown().await;
    let health = state.live().upstream.pool().health();
    assert_eq!(
        (health[0].state, health[0].failures),
        ("healthy", 0),
        "{:?}",
        health[0].name
    );
    plain.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_request_goes_byte_for_byte_as_without_cut_through() {
    let png = rgba_png_noisy(1024);
    let plain = Gateway::start_with(spend_quota).await;
    let user = format!("{HOLD_CHECK_PREFIX}valid-1");
    let expected = plain.edit(APP_KEY, &form(&png, &user)).await;
    assert_eq!(expected.status, 200, "{}", expected.text());

    let gw = Gateway::start_with(cut_through).await;
    let user = format!("{HOLD_CHECK_PREFIX}valid-2");
    let answer = post(&gw, &form(&png, &user));
    // Everything but the last chunk arrives while the check is held.
    let length = plain.mock.last().unwrap().body.len();
    within(
        "the body but its tail",
        gw.mock.wait_for_body_bytes(length - TAIL),
    )
    .await;
    assert_eq!(gw.mock.count(), 0, "the last bytes wait for the check");
    release_check(&user);
    let r = within("the answer", answer).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    assert!(gw.mock.aborted().is_empty());
    assert!(cut_through_count("passed") >= 1);

    let (sent, plain_sent) = (gw.mock.last().unwrap(), plain.mock.last().unwrap());
    assert_eq!(sent.body.len(), plain_sent.body.len());
    // The users differ in their last character only.
    let plain_body = replace(&unbounded(&plain_sent), b"valid-1", b"valid-2");
    assert!(unbounded(&sent) == plain_body, "the same canonical body");
    assert_eq!(
        sent.part("image").unwrap().data,
        png,
        "the image as sent by the caller"
    );

    let record = gw.record_of(&r);
    assert_eq!(record.outcome, imagegate::ledger::Outcome::Answered);
    assert_eq!(record.images_returned, Some(2));
    assert_eq!(record.cost_settled_micros, 40_000);
    assert_eq!(
        (record.image_width, record.image_height),
        (Some(1024), Some(1024))
    );
    assert_eq!(record.image_sha256, plain.record_of(&expected).image_sha256);
    assert_eq!(day_use(&gw, &user), (2, 40_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mask_that_needs_converting_takes_the_normal_path() {
    let gw = Gateway::start_with(cut_through).await;
    // A palette mask whose transparency comes from tRNS: forwarded converted to RGBA, so the
    // body depends on the check. A held user: were cut-through taken, the check would wait for
    // a release that never comes.
    let mask = png_with(
        16,
        16,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        false,
        Some(vec![0, 255]),
        Some(vec![0, 0, 0, 255, 255, 255]),
        |x, y| vec![u8::from(x > 2 || y > 2)],
    );
    let user = format!("{HOLD_CHECK_PREFIX}never-released");
    let f = form(&rgb_png(16), &user).file("mask", Some("mask.png"), Some("image/png"), &mask);
    let r = gw.edit(APP_KEY, &f).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let forwarded = decode(&gw.mock.last().unwrap().part("mask").unwrap().data).unwrap();
    assert_eq!(
        forwarded.color_type,
        png::ColorType::Rgba,
        "converted, as checked"
    );
    assert!(gw.mock.aborted().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_during_the_check_aborts_the_upload_and_spends_nothing() {
    let gw = Gateway::start_with(cut_through).await;
    let user = format!("{HOLD_CHECK_PREFIX}leaves");
    let answer = post(&gw, &form(&rgba_png_noisy(1024), &user));
    within("the upload begins", gw.mock.wait_for_heads(1)).await;
    // The caller disconnects (its connection is dropped with the task); the check is never
    // released: its cancellation ends it.
    answer.abort();
    let _ = answer.await;
    cut_short(&gw).await;
    assert_eq!(gw.mock.count(), 0, "no complete request upstream");
    let state = gw.server.state.clone();
    let dir = gw.dir;
    gw.server.shutdown().await;
    let records = records_of(&dir.path().join("imagegate.db"));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, imagegate::ledger::Outcome::ClientGone);
    assert_eq!(records[0].cost_settled_micros, 0);
    let who = imagegate::limits::EndUser {
        client: "app".into(),
        user: Some(user.clone()),
    };
    let scope = imagegate::limits::quota::user_scope(&who).unwrap();
    let u = state.live().quotas.usage(&scope).unwrap();
    assert_eq!((u.images_day, u.micros_day), (0, 0), "refunded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_before_the_check_ended_waits_for_it() {
    let gw = Gateway::start_with(cut_through).await;
    let refusal = support::mock_upstream::openai_error_body(
        "Incorrect API key provided.",
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    gw.mock.set_behavior(Behavior::AnswerUnread {
        status: 401,
        body: refusal.clone(),
    });

    // The check fails after the upstream refused: the check's error wins.
    let bad = truncated_idat(&rgba_png_noisy(1024));
    let user = format!("{HOLD_CHECK_PREFIX}early-bad");
    let answer = post(&gw, &form(&bad, &user));
    within("the upload begins", gw.mock.wait_for_heads(1)).await;
    release_check(&user);
    let r = within("the answer", answer).await.unwrap();
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("image"),
        Some("invalid_image_format"),
    );
    let record = gw.record_of(&r);
    assert_eq!(record.outcome, imagegate::ledger::Outcome::Rejected);
    assert_eq!(record.reason_code.as_deref(), Some("invalid_image_format"));
    assert_eq!(record.cost_settled_micros, 0);
    assert_eq!(day_use(&gw, &user), (0, 0));

    // The check passes after the upstream refused: its answer is relayed, nothing charged.
    let user = format!("{HOLD_CHECK_PREFIX}early-good");
    let answer = post(&gw, &form(&rgba_png_noisy(1024), &user));
    within("the upload begins", gw.mock.wait_for_heads(2)).await;
    release_check(&user);
    let r = within("the answer", answer).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::from_str::<serde_json::Value>(&refusal).unwrap()
    );
    let record = gw.record_of(&r);
    assert_eq!(record.outcome, imagegate::ledger::Outcome::Answered);
    assert_eq!(record.upstream_status, Some(401));
    assert_eq!(record.cost_settled_micros, 0);
    assert_eq!(day_use(&gw, &user), (0, 0));
    assert_eq!(gw.mock.count(), 0, "no complete request upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_through_follows_a_reload_and_keeps_the_upstream_client() {
    let gw = Gateway::start_with(spend_quota).await;
    let before = gw.server.state.live().upstream.clone();
    let mut config = test_config(&gw.mock, gw.dir.path());
    cut_through(&mut config);
    gw.server
        .state
        .set_source(std::sync::Arc::new(move || Ok(config.clone())));
    let state = gw.server.state.clone();
    let report = tokio::task::spawn_blocking(move || state.reload("test"))
        .await
        .unwrap();
    assert_eq!(report.status, "applied", "{report:?}");
    assert!(report.restart_required.is_empty(), "{report:?}");
    assert!(
        std::sync::Arc::ptr_eq(&before, &gw.server.state.live().upstream),
        "the upstream client and its connections are kept"
    );
    // The next request goes while its check runs, and is cut short when it fails.
    let user = format!("{HOLD_CHECK_PREFIX}after-reload");
    let answer = post(&gw, &form(&truncated_idat(&rgba_png_noisy(256)), &user));
    within("the upload begins", gw.mock.wait_for_heads(1)).await;
    release_check(&user);
    let r = within("the answer", answer).await.unwrap();
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("image"),
        Some("invalid_image_format"),
    );
    cut_short(&gw).await;
    assert_eq!(gw.mock.count(), 0);
}

/// `imagegate_cut_through_total{result}` of this process (every test of this file shares it).
fn cut_through_count(result: &str) -> u64 {
    let text = imagegate::metrics::handle().render();
    let series = format!("imagegate_cut_through_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

/// Every record of the ledger file at `path`.
fn records_of(path: &std::path::Path) -> Vec<imagegate::ledger::Record> {
    use imagegate::ledger::sqlite::SqliteStore;
    use imagegate::ledger::store::{LedgerStore, UsageQuery};
    let store = SqliteStore::open_reader(path).expect("the ledger opens for reading");
    let mut all = Vec::new();
    store
        .export(&UsageQuery::default(), &mut |r| {
            all.push(r.clone());
            Ok(())
        })
        .expect("the ledger exports");
    all
}
