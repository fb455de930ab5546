//! The usage ledger end to end: one record per request for every outcome, through the real
//! server (127.0.0.1:0) and the mock upstream; a ledger whose disk fills up; usage figures.
//!
//! Records are read after `server.shutdown()` (which drains and flushes the ledger), or, for a
//! record written after its caller left, by polling a read-only store in a bounded loop: that
//! waits for an asynchronous write, not for readiness.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use imagegate::app::AppState;
use imagegate::clock::Clock;
use imagegate::config::Config;
use imagegate::ledger::sqlite::SqliteStore;
use imagegate::ledger::{
    GroupBy, Ledger, LedgerError, LedgerOp, LedgerStore, Outcome, PromptPolicy, Record, UsageQuery,
    UsageRow, VerifyReport,
};
use imagegate::limits::spec::{QuotaSpec, RateSpec};
use imagegate::server::{RunningServer, spawn_state};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::fixtures::rgba_png;
use support::gateway::*;
use support::mock_upstream::{Behavior, MockUpstream};
use support::multipart::{Multipart, edit_request};
use support::{Resp, send};

/// Price of one dall-e-2 1024x1024 image in micro-dollars.
const PRICE_1024: i64 = 20_000;
/// Upper bound of every wait for an asynchronous ledger write.
const WRITE_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("imagegate.db")
}

/// The gateway's id of a request, from its answer.
fn gateway_id(resp: &Resp) -> String {
    resp.header("x-imagegate-request-id")
        .expect("every answer carries x-imagegate-request-id")
}

/// Every record of the ledger at `path`, by request id.
fn read_records(path: &Path) -> HashMap<String, Record> {
    let store = SqliteStore::open_reader(path).expect("the ledger opens for reading");
    let mut out = HashMap::new();
    store
        .export(&UsageQuery::default(), &mut |r| {
            out.insert(r.request_id.clone(), r.clone());
            Ok(())
        })
        .expect("the ledger exports");
    out
}

/// Verify the hash chain of the ledger at `path`; panics with the report when broken.
fn verify(path: &Path) -> VerifyReport {
    let store = SqliteStore::open_reader(path).expect("the ledger opens for reading");
    let report = store.verify().expect("verify runs");
    assert!(report.is_ok(), "the ledger chain verifies: {report:?}");
    report
}

/// A gateway after shutdown: its records (the ledger is flushed and closed), mock and files.
struct Closed {
    records: HashMap<String, Record>,
    mock: MockUpstream,
    dir: tempfile::TempDir,
}

impl Closed {
    fn get(&self, id: &str) -> &Record {
        self.records
            .get(id)
            .unwrap_or_else(|| panic!("no ledger record for {id}; have {:?}", self.records))
    }
}

/// Shut the gateway down (drains requests, waits for forwarding tasks, closes the ledger),
/// check the chain and that there is exactly one record per request sent.
async fn close(gw: Gateway, requests_sent: usize) -> Closed {
    let Gateway {
        server, mock, dir, ..
    } = gw;
    tokio::time::timeout(Duration::from_secs(30), server.shutdown())
        .await
        .expect("the gateway shuts down within 30 s");
    let path = db_path(dir.path());
    let records = read_records(&path);
    assert_eq!(
        records.len(),
        requests_sent,
        "one record per request: {records:#?}"
    );
    let report = verify(&path);
    assert_eq!(report.records, requests_sent as u64);
    Closed { records, mock, dir }
}

/// Poll the ledger at `path` (bounded: [`WRITE_WAIT`]) until a record satisfies `want`.
async fn wait_for_record(path: &Path, what: &str, want: impl Fn(&Record) -> bool) -> Record {
    let deadline = Instant::now() + WRITE_WAIT;
    let mut last = HashMap::new();
    for _ in 0..2_000 {
        if path.exists() {
            last = read_records(path);
            if let Some(r) = last.values().find(|r| want(r)) {
                return r.clone();
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no ledger record {what} within {WRITE_WAIT:?}; records: {last:#?}");
}

/// The raw HTTP/1.1 bytes of a POST to the edits route with a gateway key.
fn raw_request(addr: SocketAddr, key: &str, form: &Multipart) -> (Vec<u8>, Vec<u8>) {
    let body = form.body();
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
         content-type: {}\r\ncontent-length: {}\r\n\r\n",
        form.content_type(),
        body.len()
    );
    (head.into_bytes(), body)
}

/// Read a response head (up to the blank line) from `stream`, within 10 s.
async fn read_head(stream: &mut TcpStream) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("a response head within 10 s")
            .expect("reading the response head");
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A header of a raw response head, by name (case-insensitive).
fn head_header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Poll `GET path` until it answers `status` (bounded: [`WRITE_WAIT`]).
async fn wait_for_status(addr: SocketAddr, path: &str, status: u16) {
    let deadline = Instant::now() + WRITE_WAIT;
    let mut last = 0;
    for _ in 0..2_000 {
        last = send(addr, "GET", path, &[], vec![]).await.status;
        if last == status || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, status, "GET {path} within {WRITE_WAIT:?}");
}

fn assert_not_forwarded(r: &Record) {
    assert!(!r.forwarded, "not forwarded: {r:?}");
    assert_eq!(r.upstream_status, None, "{r:?}");
    assert_eq!(r.upstream_request_id, None, "{r:?}");
    assert_eq!(r.upstream_ms, None, "{r:?}");
    assert_eq!(r.cost_settled_micros, 0, "{r:?}");
}

// ---------------------------------------------------------------------------------------
// 1. One record per request, for each outcome class
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_request_record_has_every_field() {
    let gw = Gateway::start().await;
    let received_at = gw.clock.now_wall();
    let image = rgba_png(32, true);
    let mask = rgba_png(32, true);
    let prompt = "an otter wearing a hat";
    let form = edit_request(&image, prompt)
        .text("n", "2")
        .text("user", "u-1")
        .text("response_format", "b64_json")
        .file("mask", Some("m.png"), Some("image/png"), &mask);
    let resp = gw.edit(APP_KEY, &form).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 2);
    let id = gateway_id(&resp);
    let upstream_id = resp.header("x-request-id").unwrap();

    let closed = close(gw, 1).await;
    assert_eq!(closed.mock.count(), 1);
    let r = closed.get(&id);
    assert_eq!(r.request_id, id);
    assert!(
        id.starts_with("req_") && id.len() == 36,
        "gateway id format: {id}"
    );
    assert_eq!(
        r.received_at,
        imagegate::ledger::record::truncate_to_micros(received_at),
        "received_at is the gateway clock's time (manual clock)"
    );
    assert_eq!(r.outcome, Outcome::Answered);
    assert_eq!(r.client.as_deref(), Some("app"));
    assert_eq!(r.user.as_deref(), Some("u-1"));
    let addr = r.client_addr.as_deref().expect("client_addr set");
    assert!(
        addr.parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback()),
        "{addr}"
    );
    assert_eq!(r.status, Some(200));
    assert_eq!(r.upstream_status, Some(200));
    assert_eq!(r.upstream_request_id.as_deref(), Some(upstream_id.as_str()));
    assert!(upstream_id.starts_with("req_mock_"), "{upstream_id}");
    assert_eq!(r.model.as_deref(), Some("dall-e-2"));
    assert_eq!(r.n, Some(2));
    assert_eq!(r.size.as_deref(), Some("1024x1024"));
    assert_eq!(r.response_format.as_deref(), Some("b64_json"));
    assert_eq!(r.images_returned, Some(2));
    assert_eq!(r.cost_reserved_micros, 2 * PRICE_1024);
    assert_eq!(r.cost_settled_micros, 2 * PRICE_1024);
    assert_eq!(r.image_sha256.as_deref(), Some(sha256_hex(&image).as_str()));
    assert_eq!(r.image_bytes, Some(image.len() as u64));
    assert_eq!((r.image_width, r.image_height), (Some(32), Some(32)));
    assert_eq!(r.mask_sha256.as_deref(), Some(sha256_hex(&mask).as_str()));
    assert_eq!(r.mask_bytes, Some(mask.len() as u64));
    assert_eq!((r.mask_width, r.mask_height), (Some(32), Some(32)));
    assert_eq!(
        r.prompt.as_deref(),
        Some(format!("sha256:{}", sha256_hex(prompt.as_bytes())).as_str()),
        "the prompt is kept as its digest by default"
    );
    let (total, upstream) = (r.total_ms.unwrap(), r.upstream_ms.unwrap());
    assert!(
        upstream <= total,
        "upstream {upstream} ms within total {total} ms"
    );
    assert!(r.forwarded);
    assert_eq!(
        (&r.reason_code, &r.reason_param, &r.reason_message),
        (&None, &None, &None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_policy_full_and_none() {
    for (policy, expected) in [
        (PromptPolicy::Full, Some("a cat in a box")),
        (PromptPolicy::None, None),
        (PromptPolicy::Sha256, None),
    ] {
        let gw = Gateway::start_with(|c| c.ledger.prompt = policy).await;
        let resp = gw
            .edit(
                APP_KEY,
                &edit_request(&rgba_png(16, true), "a cat in a box"),
            )
            .await;
        assert_eq!(resp.status, 200, "{policy:?}: {}", resp.text());
        let id = gateway_id(&resp);
        let closed = close(gw, 1).await;
        let stored = closed.get(&id).prompt.clone();
        match policy {
            PromptPolicy::Sha256 => assert_eq!(
                stored,
                Some(format!("sha256:{}", sha256_hex(b"a cat in a box")))
            ),
            _ => assert_eq!(stored.as_deref(), expected, "{policy:?}"),
        }
        // Whatever the policy, the forwarded prompt is the original one.
        assert_eq!(
            closed.mock.last().unwrap().field("prompt").as_deref(),
            Some("a cat in a box")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_rejections_are_recorded_without_a_client() {
    let gw = Gateway::start().await;
    let form = edit_request(&rgba_png(16, true), "p").text("user", "u");
    let wrong = gw.edit("ig-not-a-real-key-9999", &form).await;
    assert_error(
        &wrong,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    let missing = send(
        gw.addr(),
        "POST",
        "/v1/images/edits",
        &[("content-type", &form.content_type())],
        form.body(),
    )
    .await;
    assert_eq!(missing.status, 401);
    let (wrong_id, missing_id) = (gateway_id(&wrong), gateway_id(&missing));

    let closed = close(gw, 2).await;
    assert_eq!(closed.mock.heads(), 0, "nothing reached the upstream");
    let r = closed.get(&wrong_id);
    assert_eq!(r.outcome, Outcome::Rejected);
    assert_eq!(r.status, Some(401));
    assert_eq!(r.client, None);
    assert_eq!(r.user, None, "the body is never read before authentication");
    assert_eq!(r.reason_code.as_deref(), Some("invalid_api_key"));
    assert_eq!(r.reason_param, None);
    let msg = r.reason_message.as_deref().unwrap();
    assert!(
        msg.contains("9999") && !msg.contains("ig-not-a-real-key-9999"),
        "the key is masked in the ledger too: {msg}"
    );
    assert!(r.client_addr.is_some() && r.total_ms.is_some());
    assert_eq!(
        (r.model.as_ref(), r.n, r.prompt.as_ref()),
        (None, None, None)
    );
    assert_eq!(r.cost_reserved_micros, 0);
    assert_not_forwarded(r);
    // No key at all: the envelope has no code, the ledger keeps its type.
    let r = closed.get(&missing_id);
    assert_eq!((r.outcome, r.status), (Outcome::Rejected, Some(401)));
    assert_eq!(r.client, None);
    assert_eq!(r.reason_code.as_deref(), Some("invalid_request_error"));
    assert_not_forwarded(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_rejections_are_recorded_with_reason_and_param() {
    let gw = Gateway::start().await;
    // Refused by the form rules: nothing of the request is known but who sent it.
    let empty = gw
        .edit(
            APP_KEY,
            &edit_request(&rgba_png(16, true), "").text("user", "u"),
        )
        .await;
    assert_error(
        &empty,
        400,
        "invalid_request_error",
        Some("prompt"),
        Some("empty_string"),
    );
    // Refused by the PNG checks, after the fields were read and the cost reserved.
    let opaque = rgba_png(16, false);
    let png = gw
        .edit(
            APP_KEY,
            &edit_request(&opaque, "p").text("user", "u").text("n", "3"),
        )
        .await;
    assert_error(
        &png,
        400,
        "invalid_request_error",
        Some("image"),
        Some("image_not_transparent"),
    );
    let (empty_id, png_id) = (gateway_id(&empty), gateway_id(&png));

    let closed = close(gw, 2).await;
    assert_eq!(closed.mock.heads(), 0);
    let r = closed.get(&empty_id);
    assert_eq!((r.outcome, r.status), (Outcome::Rejected, Some(400)));
    assert_eq!(r.client.as_deref(), Some("app"));
    assert_eq!(
        r.user.as_deref(),
        Some("u"),
        "a refusal by the field rules still names the end user"
    );
    assert_eq!((r.model.as_ref(), r.n), (None, None));
    assert_eq!(r.reason_code.as_deref(), Some("empty_string"));
    assert_eq!(r.reason_param.as_deref(), Some("prompt"));
    assert!(r.reason_message.as_deref().unwrap().contains("'prompt'"));
    assert_eq!(r.cost_reserved_micros, 0);
    assert_not_forwarded(r);

    let r = closed.get(&png_id);
    assert_eq!((r.outcome, r.status), (Outcome::Rejected, Some(400)));
    assert_eq!(r.client.as_deref(), Some("app"));
    assert_eq!(r.user.as_deref(), Some("u"));
    assert_eq!(r.reason_code.as_deref(), Some("image_not_transparent"));
    assert_eq!(r.reason_param.as_deref(), Some("image"));
    assert_eq!(r.n, Some(3));
    assert_eq!(r.model.as_deref(), Some("dall-e-2"));
    assert_eq!(
        r.image_sha256.as_deref(),
        Some(sha256_hex(&opaque).as_str())
    );
    assert_eq!(r.image_bytes, Some(opaque.len() as u64));
    assert_eq!(r.mask_sha256, None);
    assert_eq!(
        r.cost_reserved_micros,
        3 * PRICE_1024,
        "the reservation made before the PNG check is recorded"
    );
    assert_not_forwarded(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_quota_rejections_are_recorded() {
    let gw = Gateway::start_with(|c| {
        c.limits.per_user = RateSpec {
            requests_per_minute: Some(60),
            requests_burst: Some(1),
            images_per_minute: Some(1000),
            images_burst: Some(1000),
        };
        c.quotas.per_user = QuotaSpec {
            images_per_day: Some(1),
            ..Default::default()
        };
    })
    .await;
    let form = |user: &str| edit_request(&rgba_png(16, true), "p").text("user", user);
    let ok = gw.edit(APP_KEY, &form("rate")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let limited = gw.edit(APP_KEY, &form("rate")).await;
    assert_error(&limited, 429, "requests", None, Some("rate_limit_exceeded"));
    // Another user: the rate limit lets it through, the one-image daily quota does not, after
    // one image.
    gw.clock.advance(Duration::from_secs(60));
    assert_eq!(gw.edit(APP_KEY, &form("quota")).await.status, 200);
    gw.clock.advance(Duration::from_secs(60));
    let quota = gw.edit(APP_KEY, &form("quota")).await;
    assert_error(
        &quota,
        429,
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    );
    let (ok_id, limited_id, quota_id) = (gateway_id(&ok), gateway_id(&limited), gateway_id(&quota));

    let closed = close(gw, 4).await;
    assert_eq!(closed.mock.count(), 2);
    assert_eq!(closed.get(&ok_id).outcome, Outcome::Answered);
    for (id, code) in [
        (&limited_id, "rate_limit_exceeded"),
        (&quota_id, "insufficient_quota"),
    ] {
        let r = closed.get(id);
        assert_eq!(
            (r.outcome, r.status),
            (Outcome::Rejected, Some(429)),
            "{r:?}"
        );
        assert_eq!(r.reason_code.as_deref(), Some(code));
        assert_eq!(r.reason_param, None);
        assert_eq!(r.client.as_deref(), Some("app"));
        assert!(r.user.is_some(), "the user is known: {r:?}");
        assert_eq!(r.cost_reserved_micros, 0, "nothing was reserved for {code}");
        assert_not_forwarded(r);
    }
    assert_eq!(closed.get(&limited_id).user.as_deref(), Some("rate"));
    assert_eq!(closed.get(&quota_id).user.as_deref(), Some("quota"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_status_is_recorded_as_answered() {
    let gw = Gateway::start().await;
    gw.mock.set_behavior(Behavior::openai_error(
        500,
        "The server had an error",
        "server_error",
        None,
        None,
    ));
    let resp = gw
        .edit(
            APP_KEY,
            &edit_request(&rgba_png(16, true), "p").text("n", "2"),
        )
        .await;
    assert_eq!(resp.status, 500);
    let id = gateway_id(&resp);
    let upstream_id = resp.header("x-request-id").unwrap();

    let closed = close(gw, 1).await;
    assert_eq!(closed.mock.count(), 1);
    let r = closed.get(&id);
    // The upstream answered (with an error) and the answer was relayed: `answered`, nothing
    // charged.
    assert_eq!(r.outcome, Outcome::Answered);
    assert_eq!(r.status, Some(500));
    assert_eq!(r.upstream_status, Some(500));
    assert_eq!(r.upstream_request_id.as_deref(), Some(upstream_id.as_str()));
    assert_eq!(r.images_returned, Some(0));
    assert_eq!(r.cost_reserved_micros, 2 * PRICE_1024);
    assert_eq!(r.cost_settled_micros, 0);
    assert!(r.forwarded && r.upstream_ms.is_some() && r.total_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_recorded_as_upstream_error() {
    // A port with nothing listening.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gateway::start_with(move |c| c.upstream.base_url = format!("http://{free}/v1")).await;
    let resp = gw
        .edit(APP_KEY, &edit_request(&rgba_png(16, true), "p"))
        .await;
    assert_error(
        &resp,
        502,
        "server_error",
        None,
        Some("upstream_unreachable"),
    );
    let id = gateway_id(&resp);

    let closed = close(gw, 1).await;
    let r = closed.get(&id);
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert_eq!(r.status, Some(502));
    assert_eq!(r.upstream_status, None);
    assert_eq!(r.reason_code.as_deref(), Some("upstream_unreachable"));
    assert_eq!(r.images_returned, Some(0));
    assert_eq!(r.cost_reserved_micros, PRICE_1024);
    assert_eq!(r.cost_settled_micros, 0);
    assert!(
        r.forwarded,
        "the forwarding record was committed before trying"
    );
    assert!(r.upstream_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_recorded_as_upstream_timeout() {
    let gw = Gateway::start_with(|c| c.upstream.response_timeout = Duration::from_secs(1)).await;
    gw.mock.set_behavior(Behavior::Hang);
    let resp = gw
        .edit(APP_KEY, &edit_request(&rgba_png(16, true), "p"))
        .await;
    assert_error(&resp, 504, "server_error", None, Some("upstream_timeout"));
    let id = gateway_id(&resp);

    let closed = close(gw, 1).await;
    assert_eq!(closed.mock.count(), 1, "the upstream got the request");
    let r = closed.get(&id);
    assert_eq!(r.outcome, Outcome::UpstreamTimeout);
    assert_eq!(r.status, Some(504));
    assert_eq!(r.upstream_status, None);
    assert_eq!(r.reason_code.as_deref(), Some("upstream_timeout"));
    assert_eq!(r.images_returned, Some(0));
    // The upstream may have done the work: the reservation is charged.
    assert_eq!(r.cost_settled_micros, r.cost_reserved_micros);
    assert_eq!(r.cost_basis, Some(imagegate::ledger::CostBasis::Estimated));
    assert!(r.forwarded);
    let (upstream_ms, total_ms) = (r.upstream_ms.unwrap(), r.total_ms.unwrap());
    assert!(
        upstream_ms <= total_ms,
        "the upstream time is part of the total: {r:?}"
    );
}

/// Send the head and half the body of an edit request on a raw socket, then close it.
async fn leave_mid_upload(gw: &Gateway) {
    let form = edit_request(&rgba_png(64, true), "p").text("user", "leaver");
    let (head, body) = raw_request(gw.addr(), APP_KEY, &form);
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(&head).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    stream.flush().await.unwrap();
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_upload_is_one_final_record_and_nothing_forwarded() {
    let gw = Gateway::start().await;
    leave_mid_upload(&gw).await;

    let path = db_path(gw.dir.path());
    let r = wait_for_record(&path, "for the request whose caller left", |_| true).await;
    assert!(r.outcome.is_final(), "{r:?}");
    assert_eq!(r.client.as_deref(), Some("app"));
    assert!(r.total_ms.is_some() && r.client_addr.is_some());
    assert_not_forwarded(&r);
    assert_eq!(r.cost_reserved_micros, 0);
    assert_eq!(gw.mock.heads(), 0, "nothing was forwarded");

    let closed = close(gw, 1).await;
    assert_eq!(closed.get(&r.request_id), &r, "the record is final");
    assert_eq!(closed.mock.heads(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_upload_is_recorded_as_client_gone() {
    let gw = Gateway::start().await;
    leave_mid_upload(&gw).await;
    let path = db_path(gw.dir.path());
    let r = wait_for_record(&path, "for the request whose caller left", |_| true).await;
    assert_eq!(
        r.outcome,
        Outcome::ClientGone,
        "a caller that left mid-upload got no answer: {r:?}"
    );
    assert_eq!(r.status, None, "no answer was sent: {r:?}");
    assert_eq!(
        r.reason_code.as_deref(),
        Some("incomplete_body"),
        "why: the body broke off: {r:?}"
    );
    assert!(!r.forwarded, "{r:?}");
    let closed = close(gw, 1).await;
    assert_eq!(closed.get(&r.request_id).outcome, Outcome::ClientGone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_answer_records_what_the_upstream_returned() {
    let gw = Gateway::start().await;
    // An answer much larger than every buffer between the gateway and a caller that does not
    // read (a small receive buffer, the gateway's send buffer, its relay channel), with one image
    // item before the padding and one after: counting both proves the gateway read the answer
    // to its end after the caller left.
    let padding = "x".repeat(24 << 20);
    let body = format!(
        r#"{{"created":1,"data":[{{"url":"https://example.invalid/a.png","revised_prompt":"{padding}"}},{{"url":"https://example.invalid/b.png"}}]}}"#
    );
    gw.mock.set_behavior(Behavior::Custom {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-request-id".into(), "req_mock_big".into()),
        ],
        body,
    });
    let form = edit_request(&rgba_png(16, true), "p")
        .text("n", "2")
        .text("user", "reader");
    let (head, req_body) = raw_request(gw.addr(), APP_KEY, &form);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(gw.addr()).await.unwrap();
    stream.write_all(&head).await.unwrap();
    stream.write_all(&req_body).await.unwrap();
    stream.flush().await.unwrap();
    let response_head = read_head(&mut stream).await;
    assert!(response_head.starts_with("HTTP/1.1 200"), "{response_head}");
    let id = head_header(&response_head, "x-imagegate-request-id").expect("gateway id");
    // Leave with most of the answer unread.
    drop(stream);

    let path = db_path(gw.dir.path());
    let r = wait_for_record(&path, "completed after the caller left", |r| {
        r.request_id == id && r.outcome != Outcome::Forwarding
    })
    .await;
    assert_eq!(r.outcome, Outcome::ClientGone, "{r:?}");
    assert_eq!(gw.mock.count(), 1, "the upstream received the request");
    assert_eq!(r.status, Some(200));
    assert_eq!(r.upstream_status, Some(200));
    assert_eq!(r.upstream_request_id.as_deref(), Some("req_mock_big"));
    assert_eq!(
        r.images_returned,
        Some(2),
        "the answer was read to its end: {r:?}"
    );
    assert_eq!(r.cost_reserved_micros, 2 * PRICE_1024);
    assert_eq!(
        r.cost_settled_micros,
        2 * PRICE_1024,
        "the upstream charged for both"
    );
    assert_eq!(r.user.as_deref(), Some("reader"));
    assert!(r.forwarded && r.upstream_ms.is_some() && r.total_ms.is_some());

    let closed = close(gw, 1).await;
    assert_eq!(closed.get(&id), &r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_in_one_ledger_one_record_each() {
    let gw = Gateway::start_with(|c| c.upstream.response_timeout = Duration::from_secs(1)).await;
    let ok = |u: &str| edit_request(&rgba_png(16, true), "p").text("user", u);
    let mut sent = Vec::new();
    let r = gw.edit(APP_KEY, &ok("a")).await;
    assert_eq!(r.status, 200);
    sent.push((gateway_id(&r), Outcome::Answered));
    let r = gw.edit("ig-wrong-key-0000000000", &ok("a")).await;
    assert_eq!(r.status, 401);
    sent.push((gateway_id(&r), Outcome::Rejected));
    let r = gw
        .edit(APP_KEY, &edit_request(&rgba_png(16, true), ""))
        .await;
    assert_eq!(r.status, 400);
    sent.push((gateway_id(&r), Outcome::Rejected));
    gw.mock.set_behavior(Behavior::openai_error(
        400,
        "bad",
        "invalid_request_error",
        None,
        None,
    ));
    let r = gw.edit(APP_KEY, &ok("a")).await;
    assert_eq!(r.status, 400);
    sent.push((gateway_id(&r), Outcome::Answered));
    gw.mock.set_behavior(Behavior::Hang);
    let r = gw.edit(APP_KEY, &ok("a")).await;
    assert_eq!(r.status, 504);
    sent.push((gateway_id(&r), Outcome::UpstreamTimeout));
    gw.mock.set_behavior(Behavior::Success);
    let r = gw.edit(APP_KEY, &ok("b")).await;
    assert_eq!(r.status, 200);
    sent.push((gateway_id(&r), Outcome::Answered));

    let closed = close(gw, sent.len()).await;
    for (id, outcome) in &sent {
        assert_eq!(closed.get(id).outcome, *outcome, "{id}");
    }
    let forwarded = closed.records.values().filter(|r| r.forwarded).count();
    assert_eq!(forwarded, closed.mock.count());
    assert_eq!(forwarded, 4);
}

// ---------------------------------------------------------------------------------------
// An injected ledger store: a SQLite store whose size can be capped at run time (disk full)
// and whose `Begin` writes can be held (a slow disk).
// ---------------------------------------------------------------------------------------

/// What a test can change while the gateway runs.
#[derive(Default)]
struct Knobs {
    /// `max_page_count` to apply before the next write; 0 = leave as is.
    max_pages: AtomicU64,
    /// Hold every batch holding a `Begin` until released.
    hold_begins: AtomicBool,
}

struct TestStore {
    inner: SqliteStore,
    knobs: Arc<Knobs>,
    applied_pages: u64,
    /// Told when a held batch starts waiting.
    held: tokio::sync::mpsc::UnboundedSender<()>,
    /// Releases a held batch.
    release: std::sync::mpsc::Receiver<()>,
}

impl LedgerStore for TestStore {
    fn recover(&mut self) -> Result<usize, LedgerError> {
        self.inner.recover()
    }

    fn write_batch(
        &mut self,
        ops: &[LedgerOp],
    ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
        let want = self.knobs.max_pages.load(Ordering::SeqCst);
        if want != 0 && want != self.applied_pages {
            self.inner.set_max_page_count(want)?;
            self.applied_pages = want;
        }
        if self.knobs.hold_begins.load(Ordering::SeqCst) && ops.iter().any(LedgerOp::is_begin) {
            let _ = self.held.send(());
            // Bounded: a test that forgets to release does not hang the writer forever.
            let _ = self.release.recv_timeout(Duration::from_secs(30));
        }
        self.inner.write_batch(ops)
    }

    fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        self.inner.get(request_id)
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        self.inner.usage(q)
    }

    fn export(
        &self,
        q: &UsageQuery,
        out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        self.inner.export(q, out)
    }

    fn verify(&self) -> Result<VerifyReport, LedgerError> {
        self.inner.verify()
    }
}

/// A gateway over a [`TestStore`].
struct Injected {
    server: RunningServer,
    mock: MockUpstream,
    dir: tempfile::TempDir,
    knobs: Arc<Knobs>,
    held: tokio::sync::mpsc::UnboundedReceiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

impl Injected {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Injected {
        let mock = MockUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&mock, dir.path());
        tweak(&mut config);
        let mut inner = SqliteStore::open(&config.ledger.path).expect("the ledger opens");
        inner.recover().unwrap();
        let knobs = Arc::new(Knobs::default());
        let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let store = TestStore {
            inner,
            knobs: knobs.clone(),
            applied_pages: 0,
            held: held_tx,
            release: release_rx,
        };
        let ledger = Ledger::start(Box::new(store), 64).expect("the ledger starts");
        let state = AppState::with_ledger(config, Clock::manual(SystemTime::now()), ledger)
            .expect("the state builds");
        let server = spawn_state(state).await.expect("the gateway starts");
        Injected {
            server,
            mock,
            dir,
            knobs,
            held,
            release,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn path(&self) -> PathBuf {
        db_path(self.dir.path())
    }

    async fn edit(&self, user: &str) -> Resp {
        let form = edit_request(&rgba_png(16, true), "p").text("user", user);
        post_edit(self.addr(), APP_KEY, &form.content_type(), form.body()).await
    }

    async fn close(self, requests_sent: usize) -> (HashMap<String, Record>, MockUpstream) {
        let Injected {
            server,
            mock,
            dir,
            release,
            ..
        } = self;
        drop(release);
        tokio::time::timeout(Duration::from_secs(30), server.shutdown())
            .await
            .expect("the gateway shuts down within 30 s");
        let path = db_path(dir.path());
        let records = read_records(&path);
        assert_eq!(
            records.len(),
            requests_sent,
            "one record per request: {records:#?}"
        );
        verify(&path);
        (records, mock)
    }
}

// ---------------------------------------------------------------------------------------
// 3. Disk full
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_forwarding_until_space_returns() {
    let gw = Injected::start(|_| {}).await;
    let first = gw.edit("before").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        send(gw.addr(), "GET", "/readyz", &[], vec![]).await.status,
        200
    );
    let mut sent = 1;

    // Cap the database just above its current size: the next writes that need a page fail
    // with SQLITE_FULL, as on a full disk.
    let pages = SqliteStore::open_reader(&gw.path())
        .unwrap()
        .page_count()
        .unwrap();
    gw.knobs.max_pages.store(pages + 1, Ordering::SeqCst);
    let mut refused = None;
    for i in 0..50 {
        let before = gw.mock.heads();
        let r = gw.edit(&format!("full-{i}")).await;
        sent += 1;
        match r.status {
            200 => continue,
            503 => {
                assert_error(&r, 503, "server_error", None, Some("ledger_unavailable"));
                assert_eq!(
                    gw.mock.heads(),
                    before,
                    "a request the ledger could not record is not forwarded"
                );
                refused = Some(gateway_id(&r));
                break;
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    let refused =
        refused.expect("the capped ledger refuses a forwarding record within 50 requests");
    let forwarded_while_full = gw.mock.heads();
    assert_eq!(
        send(gw.addr(), "GET", "/readyz", &[], vec![]).await.status,
        503,
        "not ready while the ledger cannot be written"
    );
    // Still full: still refused, still nothing forwarded.
    let again = gw.edit("still-full").await;
    sent += 1;
    assert_error(
        &again,
        503,
        "server_error",
        None,
        Some("ledger_unavailable"),
    );
    assert_eq!(gw.mock.heads(), forwarded_while_full);

    // Space returns: the next request goes through, and the gateway is ready again.
    gw.knobs.max_pages.store(1 << 30, Ordering::SeqCst);
    let after = gw.edit("after").await;
    sent += 1;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(gw.mock.heads(), forwarded_while_full + 1);
    wait_for_status(gw.addr(), "/readyz", 200).await;

    // Nothing was lost: the refusals written while the disk was full were kept and retried.
    let refused_again = gateway_id(&again);
    let answered = gateway_id(&after);
    let (records, mock) = gw.close(sent).await;
    for id in [&refused, &refused_again] {
        let r = &records[id];
        assert_eq!(
            (r.outcome, r.status),
            (Outcome::Rejected, Some(503)),
            "{r:?}"
        );
        assert_eq!(r.reason_code.as_deref(), Some("ledger_unavailable"));
        assert_not_forwarded(r);
    }
    assert_eq!(records[&answered].outcome, Outcome::Answered);
    assert_eq!(
        records.values().filter(|r| r.forwarded).count(),
        mock.count(),
        "every forwarded request has its forwarding record"
    );
    assert!(
        records.values().all(|r| r.outcome.is_final()),
        "{records:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// A caller leaving while its forwarding record commits
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_while_the_forwarding_record_commits() {
    // One request at a time: the overload layer's only permit is taken for as long as the edit
    // request's handler is alive (health routes are not shed, so they cannot show it).
    let mut gw = Injected::start(|c| c.server.max_in_flight = 1).await;
    gw.knobs.hold_begins.store(true, Ordering::SeqCst);
    let form = edit_request(&rgba_png(16, true), "p").text("user", "leaver");
    let (head, body) = raw_request(gw.addr(), APP_KEY, &form);
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(&head).await.unwrap();
    stream.write_all(&body).await.unwrap();
    stream.flush().await.unwrap();
    // The `forwarding` record is being written...
    tokio::time::timeout(WRITE_WAIT, gw.held.recv())
        .await
        .expect("the forwarding record reaches the store")
        .unwrap();
    let in_flight = gw.server.state.in_flight.clone();
    assert_eq!(in_flight.available_permits(), 0, "the request is in flight");
    // ... when the caller leaves.
    drop(stream);
    // The handler is gone once its permit is back.
    drop(
        tokio::time::timeout(WRITE_WAIT, in_flight.acquire())
            .await
            .expect("the handler ends when its caller leaves")
            .expect("the semaphore is never closed"),
    );
    // The handler is gone; now the write completes.
    gw.knobs.hold_begins.store(false, Ordering::SeqCst);
    gw.release.send(()).unwrap();

    let (records, mock) = gw.close(1).await;
    let r = records.values().next().unwrap();
    assert_eq!(mock.heads(), 0, "nothing was forwarded");
    assert!(
        r.outcome.is_final(),
        "the record of a request whose caller left is completed: {r:?}"
    );
    assert_eq!(r.outcome, Outcome::ClientGone, "{r:?}");
    assert_eq!(r.cost_settled_micros, 0, "{r:?}");
}

// ---------------------------------------------------------------------------------------
// 4. Usage figures
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_figures_match_what_was_sent() {
    let gw = Gateway::start().await;
    let form = |user: &str, n: u8| {
        edit_request(&rgba_png(16, true), "p")
            .text("user", user)
            .text("n", &n.to_string())
    };
    for _ in 0..3 {
        assert_eq!(gw.edit(APP_KEY, &form("a", 2)).await.status, 200);
    }
    assert_eq!(gw.edit(OTHER_KEY, &form("b", 1)).await.status, 200);
    // Validation: one without a user (charged to the client, no end user), one by user a (an
    // opaque image).
    let empty = edit_request(&rgba_png(16, true), "");
    assert_eq!(gw.edit(APP_KEY, &empty).await.status, 400);
    let opaque = edit_request(&rgba_png(16, false), "p")
        .text("user", "a")
        .text("n", "2");
    assert_eq!(gw.edit(APP_KEY, &opaque).await.status, 400);
    assert_eq!(
        gw.edit("ig-wrong-key-0000000000", &form("a", 1))
            .await
            .status,
        401
    );
    let closed = close(gw, 7).await;
    assert_eq!(closed.mock.count(), 4);

    let store = SqliteStore::open_reader(&db_path(closed.dir.path())).unwrap();
    let usage = |q: UsageQuery| -> BTreeMap<String, UsageRow> {
        store
            .usage(&q)
            .expect("usage")
            .into_iter()
            .map(|r| (r.key.clone(), r))
            .collect()
    };
    let reasons = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };

    let by_user = usage(UsageQuery {
        group_by: GroupBy::User,
        ..Default::default()
    });
    assert_eq!(
        by_user.keys().map(String::as_str).collect::<Vec<_>>(),
        ["-/-", "app/-", "app/a", "other/b"],
        "{by_user:#?}"
    );
    let a = &by_user["app/a"];
    assert_eq!(
        (a.requests, a.forwarded, a.images, a.spend_micros),
        (4, 3, 6, 6 * PRICE_1024),
        "{a:?}"
    );
    assert_eq!(a.rejections, reasons(&[("image_not_transparent", 1)]));
    let b = &by_user["other/b"];
    assert_eq!(
        (b.requests, b.forwarded, b.images, b.spend_micros),
        (1, 1, 1, PRICE_1024)
    );
    assert!(b.rejections.is_empty());
    let anon = &by_user["app/-"];
    assert_eq!(
        (
            anon.requests,
            anon.forwarded,
            anon.images,
            anon.spend_micros
        ),
        (1, 0, 0, 0)
    );
    assert_eq!(anon.rejections, reasons(&[("empty_string", 1)]));
    let unauth = &by_user["-/-"];
    assert_eq!((unauth.requests, unauth.forwarded), (1, 0));
    assert_eq!(unauth.rejections, reasons(&[("invalid_api_key", 1)]));

    let total = usage(UsageQuery::default());
    let t = &total["total"];
    assert_eq!(
        (
            t.requests,
            t.forwarded,
            t.images,
            t.spend_micros,
            t.rejected()
        ),
        (7, 4, 7, 7 * PRICE_1024, 3)
    );
    assert_eq!(
        t.rejections,
        reasons(&[
            ("empty_string", 1),
            ("image_not_transparent", 1),
            ("invalid_api_key", 1)
        ])
    );

    let by_client = usage(UsageQuery {
        group_by: GroupBy::Client,
        ..Default::default()
    });
    assert_eq!(
        by_client
            .iter()
            .map(|(k, r)| (k.as_str(), r.requests, r.images, r.spend_micros))
            .collect::<Vec<_>>(),
        [
            ("-", 1, 0, 0),
            ("app", 5, 6, 6 * PRICE_1024),
            ("other", 1, 1, PRICE_1024)
        ]
    );

    // Filters: one user, one client.
    let only_a = usage(UsageQuery {
        user: Some("a".into()),
        ..Default::default()
    });
    assert_eq!(
        (only_a["total"].requests, only_a["total"].images),
        (4, 6),
        "the 401 carries no user"
    );
    let only_other = usage(UsageQuery {
        client: Some("other".into()),
        group_by: GroupBy::User,
        ..Default::default()
    });
    assert_eq!(
        only_other.keys().map(String::as_str).collect::<Vec<_>>(),
        ["other/b"]
    );

    // The async reader gives the same figures.
    let reader = imagegate::ledger::LedgerReader::open_sqlite(&db_path(closed.dir.path()))
        .expect("the reader opens");
    let rows = reader
        .usage(UsageQuery {
            group_by: GroupBy::User,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows, by_user.into_values().collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------
// Shed and wrong-method requests to the edits route are recorded too
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_and_wrong_method_requests_are_recorded() {
    let gw = Gateway::start_with(|c| {
        c.server.max_in_flight = 1;
        c.upstream.response_timeout = Duration::from_secs(1);
    })
    .await;
    gw.mock.set_behavior(Behavior::Hang);
    let addr = gw.addr();
    let form = edit_request(&rgba_png(16, true), "p");
    let (ct, body) = (form.content_type(), form.body());
    let first = tokio::spawn(async move { post_edit(addr, APP_KEY, &ct, body).await });
    gw.mock.wait_for(1).await;
    let shed = gw.edit(APP_KEY, &form).await;
    assert_error(&shed, 503, "server_error", None, Some("overloaded"));
    assert_eq!(first.await.unwrap().status, 504);
    let get = send(addr, "GET", "/v1/images/edits", &[], vec![]).await;
    assert_eq!(get.status, 405);
    let shed_id = shed.header("x-imagegate-request-id").unwrap();
    let get_id = get.header("x-imagegate-request-id").unwrap();
    let closed = close(gw, 3).await;
    let r = closed.get(&shed_id);
    assert_eq!(
        (r.outcome, r.status, r.reason_code.as_deref()),
        (Outcome::Rejected, Some(503), Some("overloaded"))
    );
    let r = closed.get(&get_id);
    assert_eq!(
        (r.outcome, r.status, r.reason_code.as_deref()),
        (Outcome::Rejected, Some(405), Some("method_not_allowed"))
    );
    assert_eq!(
        closed
            .records
            .values()
            .filter(|r| r.outcome == Outcome::UpstreamTimeout)
            .count(),
        1
    );
}

// ---------------------------------------------------------------------------------------
// A ledger of the first release (schema version 1) is upgraded in place
// ---------------------------------------------------------------------------------------

/// The first release's records: one answered (begin + complete), one rejected (final), one
/// left forwarding by a crash (begin only).
fn v1_ledger(path: &Path) -> Vec<String> {
    use support::ledger_v1::{V1Ledger, V1Record};
    let answered = V1Record {
        request_id: "req_old_answered",
        received_at: "2026-10-01T08:00:00Z",
        received_at_us: 1_790_841_600_000_000,
        client: "app",
        outcome: "forwarding",
        model: Some("dall-e-2"),
        images_returned: None,
        cost_reserved_micros: PRICE_1024,
        cost_settled_micros: 0,
        forwarded: true,
    };
    let rejected = V1Record {
        request_id: "req_old_rejected",
        received_at: "2026-10-01T08:00:01Z",
        received_at_us: 1_790_841_601_000_000,
        outcome: "rejected",
        model: None,
        cost_reserved_micros: 0,
        forwarded: false,
        ..answered.clone()
    };
    let stuck = V1Record {
        request_id: "req_old_stuck",
        received_at: "2026-10-01T08:00:02Z",
        received_at_us: 1_790_841_602_000_000,
        ..answered.clone()
    };
    let mut v1 = V1Ledger::create(path);
    vec![
        v1.append("begin", &answered),
        v1.append(
            "complete",
            &V1Record {
                outcome: "answered",
                images_returned: Some(1),
                cost_settled_micros: PRICE_1024,
                ..answered.clone()
            },
        ),
        v1.append("final", &rejected),
        v1.append("begin", &stuck),
    ]
}

/// A record of today's models, every new field set.
fn gpt_image_record(id: &str) -> Record {
    Record {
        client: Some("app".into()),
        user: Some("a".into()),
        outcome: Outcome::Answered,
        status: Some(200),
        upstream_status: Some(200),
        model: Some("gpt-image-2".into()),
        n: Some(1),
        size: Some("1536x864".into()),
        images_returned: Some(1),
        cost_reserved_micros: 400_000,
        cost_settled_micros: 68_300,
        quality: Some("medium".into()),
        output_format: Some("png".into()),
        input_images: Some(2),
        stream: Some(false),
        input_tokens: Some(1_060),
        input_text_tokens: Some(60),
        input_image_tokens: Some(1_000),
        output_tokens: Some(2_000),
        total_tokens: Some(3_060),
        usage_extra: Some(r#"{"input_tokens_details":{"cached_tokens_details":{}}}"#.into()),
        cost_basis: Some(imagegate::ledger::CostBasis::Usage),
        upstream_key: Some("team-a".into()),
        ..Record::new(id, "2026-11-05T09:00:00Z".parse().unwrap())
    }
}

#[test]
fn a_version_1_ledger_is_upgraded_and_its_chain_still_verifies() {
    use support::ledger_v1::{records_columns, schema_version};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let old_entries = v1_ledger(&path);
    assert_eq!(schema_version(&path), "1");

    // A reader opens it as it is (no upgrade): the new fields read as None, the chain verifies.
    {
        let reader = SqliteStore::open_reader(&path).expect("a reader opens a version 1 ledger");
        let v = reader.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!((v.entries, v.records), (4, 3));
        let r = reader.get("req_old_answered").unwrap().unwrap();
        assert_eq!(
            (r.outcome, r.cost_settled_micros),
            (Outcome::Answered, PRICE_1024)
        );
        assert_eq!((r.input_tokens, r.cost_basis), (None, None));
        let rows = reader
            .usage(&UsageQuery {
                group_by: GroupBy::Model,
                ..Default::default()
            })
            .unwrap();
        let keys: Vec<(&str, u64, i64)> = rows
            .iter()
            .map(|r| (r.key.as_str(), r.requests, r.spend_micros))
            .collect();
        assert_eq!(keys, [("-", 1, 0), ("dall-e-2", 2, PRICE_1024)]);
    }
    assert_eq!(schema_version(&path), "1", "a reader does not upgrade");

    // The writer upgrades it: version 3, the same columns as a new ledger.
    let mut store = SqliteStore::open(&path).expect("a version 1 ledger opens for writing");
    assert_eq!(schema_version(&path), "3");
    let fresh = dir.path().join("fresh.db");
    drop(SqliteStore::open(&fresh).unwrap());
    assert_eq!(schema_version(&fresh), "3");
    assert_eq!(records_columns(&path), records_columns(&fresh));

    // The old records read back unchanged, the new fields None.
    let old = store.get("req_old_answered").unwrap().unwrap();
    assert_eq!(
        old,
        Record {
            client: Some("app".into()),
            outcome: Outcome::Answered,
            model: Some("dall-e-2".into()),
            images_returned: Some(1),
            cost_reserved_micros: PRICE_1024,
            cost_settled_micros: PRICE_1024,
            forwarded: true,
            ..Record::new("req_old_answered", "2026-10-01T08:00:00Z".parse().unwrap())
        }
    );
    let v = store.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!(v.entries, 4);

    // Recovery completes the request a crash of the old release left forwarding, and new
    // records with every new field link onto the old chain.
    assert_eq!(store.recover().unwrap(), 1);
    let new = gpt_image_record("req_new");
    for r in store
        .write_batch(&[
            LedgerOp::Begin(new.clone()),
            LedgerOp::Complete(new.clone()),
        ])
        .unwrap()
    {
        r.unwrap();
    }
    assert_eq!(
        store.get("req_new").unwrap().unwrap(),
        Record {
            forwarded: true,
            ..new.clone()
        }
    );
    assert_eq!(
        store.get("req_old_stuck").unwrap().unwrap().outcome,
        Outcome::Unknown
    );
    let v = store.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.entries, v.records), (7, 4));
    drop(store);

    // The entries written before the upgrade are still there, byte for byte.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let stored: Vec<String> = conn
        .prepare("SELECT entry_json FROM ledger_chain WHERE seq <= 4 ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored, old_entries);
    drop(conn);

    // Opened again (already version 2), read and verified across old and new entries.
    drop(SqliteStore::open(&path).unwrap());
    let v = verify(&path);
    assert_eq!(v.head.unwrap().seq, 7);
    let records = read_records(&path);
    assert_eq!(records.len(), 4);
    assert_eq!(records["req_new"].output_tokens, Some(2_000));
    assert_eq!(records["req_old_rejected"].quality, None);
    let reader = SqliteStore::open_reader(&path).unwrap();
    let by_model = reader
        .usage(&UsageQuery {
            group_by: GroupBy::Model,
            ..Default::default()
        })
        .unwrap();
    let gpt = by_model.iter().find(|r| r.key == "gpt-image-2").unwrap();
    assert_eq!(
        (
            gpt.requests,
            gpt.images,
            gpt.spend_micros,
            gpt.input_tokens,
            gpt.output_tokens
        ),
        (1, 1, 68_300, 1_060, 2_000)
    );

    // A tampered pre-upgrade entry is still caught after the upgrade.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("DROP TRIGGER ledger_chain_no_update;")
        .unwrap();
    conn.execute(
        "UPDATE ledger_chain SET entry_json = replace(entry_json, '\"images_returned\":1', '\"images_returned\":9') WHERE seq = 2",
        [],
    )
    .unwrap();
    let b = SqliteStore::open_reader(&path)
        .unwrap()
        .verify()
        .unwrap()
        .first_broken
        .expect("the tampered entry is found");
    assert_eq!((b.seq, b.request_id.as_str()), (2, "req_old_answered"));
}

#[test]
fn an_unknown_schema_version_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    v1_ledger(&path);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE ledger_meta SET value = '4' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(e.to_string().contains("version 4"), "{e}");
    let e = SqliteStore::open_reader(&path).unwrap_err();
    assert!(e.to_string().contains("version 4"), "{e}");
    assert_eq!(support::ledger_v1::schema_version(&path), "4");
    assert_eq!(
        support::ledger_v1::records_columns(&path).len(),
        32,
        "no column was added"
    );
}

#[test]
fn a_version_2_ledger_gains_upstream_key() {
    use support::ledger_v1::{records_columns, schema_version};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    // A version 2 ledger: a record written before the key pool (no upstream_key), then the
    // column dropped and the version set back, as the previous release left its files.
    let old = Record {
        upstream_key: None,
        ..gpt_image_record("req_v2")
    };
    {
        let mut store = SqliteStore::open(&path).unwrap();
        for r in store
            .write_batch(&[
                LedgerOp::Begin(old.clone()),
                LedgerOp::Complete(old.clone()),
            ])
            .unwrap()
        {
            r.unwrap();
        }
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "ALTER TABLE records DROP COLUMN upstream_key;
         UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(conn);
    assert!(!records_columns(&path).contains(&"upstream_key".to_string()));

    // A reader reads it as it is.
    let reader = SqliteStore::open_reader(&path).unwrap();
    assert_eq!(reader.get("req_v2").unwrap().unwrap().upstream_key, None);
    assert!(reader.verify().unwrap().is_ok());
    drop(reader);
    assert_eq!(schema_version(&path), "2");

    // A writer upgrades it; a keyed record goes in next to the old one and the chain verifies.
    let mut store = SqliteStore::open(&path).unwrap();
    assert_eq!(schema_version(&path), "3");
    assert!(records_columns(&path).contains(&"upstream_key".to_string()));
    let new = gpt_image_record("req_v3");
    for r in store
        .write_batch(&[
            LedgerOp::Begin(new.clone()),
            LedgerOp::Complete(new.clone()),
        ])
        .unwrap()
    {
        r.unwrap();
    }
    assert_eq!(store.get("req_v2").unwrap().unwrap().upstream_key, None);
    assert_eq!(
        store
            .get("req_v3")
            .unwrap()
            .unwrap()
            .upstream_key
            .as_deref(),
        Some("team-a")
    );
    let v = store.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
}

/// Day use (images, µ$) of end user `user` of client "app".
fn user_day_use(gw: &Gateway, user: &str) -> (u64, i64) {
    let who = imagegate::limits::EndUser {
        client: "app".into(),
        user: Some(user.into()),
    };
    let scope = imagegate::limits::quota::user_scope(&who).unwrap();
    let u = gw.server.state.live().quotas.usage(&scope).unwrap();
    (u.images_day, u.micros_day)
}

/// Poll `probe` (bounded: [`WRITE_WAIT`]) until it returns `want`.
async fn wait_until<T: PartialEq + std::fmt::Debug>(what: &str, want: T, probe: impl Fn() -> T) {
    let deadline = Instant::now() + WRITE_WAIT;
    loop {
        let now = probe();
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {now:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `DisconnectGuard` path: a caller that sent its whole request and leaves while it waits in
/// the decode phase (every decode permit is held by this test, so the request stays there) gets
/// one final `client_gone` record, nothing is forwarded, and its quota reservation is refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_during_the_decode_phase_is_client_gone_and_refunded() {
    let gw = Gateway::start_with(|c| {
        c.quotas.per_user = QuotaSpec {
            images_per_day: Some(100),
            usd_per_day: Some(10.0),
            ..Default::default()
        };
    })
    .await;
    let permits = gw.server.state.decode_permits.clone();
    let all = gw.server.state.config().server.max_concurrent_decodes as u32;
    let held = permits.acquire_many_owned(all).await.unwrap();

    let form = edit_request(&rgba_png(32, true), "p")
        .text("n", "2")
        .text("user", "leaver");
    let (head, body) = raw_request(gw.addr(), APP_KEY, &form);
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(&head).await.unwrap();
    stream.write_all(&body).await.unwrap();
    stream.flush().await.unwrap();
    // The whole upload was read and the reservation taken: the request now waits for a decode.
    wait_until("the reservation", (2, 2 * PRICE_1024), || {
        user_day_use(&gw, "leaver")
    })
    .await;
    drop(stream);

    let path = db_path(gw.dir.path());
    let r = wait_for_record(&path, "for the caller that left", |_| true).await;
    assert_eq!(r.outcome, Outcome::ClientGone, "{r:?}");
    assert_eq!(r.status, None, "no answer was sent: {r:?}");
    assert_eq!(
        r.reason_message.as_deref(),
        Some("the caller disconnected before an answer was sent"),
        "{r:?}"
    );
    assert_eq!(r.user.as_deref(), Some("leaver"));
    assert_eq!(r.cost_reserved_micros, 2 * PRICE_1024, "{r:?}");
    assert_eq!(r.cost_settled_micros, 0, "{r:?}");
    assert_not_forwarded(&r);
    wait_until("the refund", (0, 0), || user_day_use(&gw, "leaver")).await;
    assert_eq!(gw.mock.heads(), 0, "nothing was forwarded");

    // The permits back, the gateway serves and the quota is whole again.
    drop(held);
    let ok = gw
        .edit(
            APP_KEY,
            &edit_request(&rgba_png(32, true), "p")
                .text("n", "2")
                .text("user", "leaver"),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(user_day_use(&gw, "leaver"), (2, 2 * PRICE_1024));
    let closed = close(gw, 2).await;
    assert_eq!(closed.get(&r.request_id), &r, "the record is final");
}

/// The same on the gpt-image profile: the file checks wait for a decode permit (all held by this
/// test), the caller leaves, and the record is `client_gone` with its reservation refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpt_image_caller_leaving_during_the_file_checks_is_client_gone_and_refunded() {
    let gw = Gateway::start_with(|c| {
        gpt(c);
        c.quotas.per_user = QuotaSpec {
            images_per_day: Some(100),
            usd_per_day: Some(10.0),
            ..Default::default()
        };
    })
    .await;
    let permits = gw.server.state.decode_permits.clone();
    let all = gw.server.state.config().server.max_concurrent_decodes as u32;
    let held = permits.acquire_many_owned(all).await.unwrap();

    let form = Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", "a hat on the cat")
        .text("user", "gpt-leaver")
        .file(
            "image",
            Some("cat.png"),
            Some("image/png"),
            &rgba_png(64, true),
        );
    let (head, body) = raw_request(gw.addr(), APP_KEY, &form);
    let mut stream = TcpStream::connect(gw.addr()).await.unwrap();
    stream.write_all(&head).await.unwrap();
    stream.write_all(&body).await.unwrap();
    stream.flush().await.unwrap();
    // Reserved (the §7 bound of one image): the request now waits for its file checks.
    let deadline = Instant::now() + WRITE_WAIT;
    let reserved = loop {
        let used = user_day_use(&gw, "gpt-leaver");
        if used.0 > 0 {
            break used;
        }
        assert!(
            Instant::now() < deadline,
            "no reservation within {WRITE_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(reserved.0, 1, "one image reserved");
    drop(stream);

    let path = db_path(gw.dir.path());
    let r = wait_for_record(&path, "for the caller that left", |_| true).await;
    assert_eq!(r.outcome, Outcome::ClientGone, "{r:?}");
    assert_eq!(r.status, None, "{r:?}");
    assert_eq!(r.model.as_deref(), Some("gpt-image-2"));
    assert_eq!(r.cost_reserved_micros, reserved.1, "{r:?}");
    assert_not_forwarded(&r);
    wait_until("the refund", (0, 0), || user_day_use(&gw, "gpt-leaver")).await;
    assert_eq!(gw.mock.heads(), 0, "nothing was forwarded");
    drop(held);
    let closed = close(gw, 1).await;
    assert_eq!(closed.get(&r.request_id), &r, "the record is final");
}
