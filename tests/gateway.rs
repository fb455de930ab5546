//! The gateway end to end: real server on 127.0.0.1:0, mock upstream on 127.0.0.1:0.

mod support;

use std::time::Duration;

use support::fixtures::*;
use support::gateway::*;
use support::mock_upstream::Behavior;
use support::multipart::{Multipart, edit_request};
use support::send;

#[tokio::test]
async fn forwards_a_canonical_body_with_the_injected_key() {
    let gw = Gateway::start().await;
    let image = rgba_png(64, true);
    // Fields in an unusual order, a client file name, user set.
    let form = Multipart::new()
        .file(
            "image",
            Some("../../etc/passwd"),
            Some("application/octet-stream"),
            &image,
        )
        .text("n", "2")
        .text("user", "u-42")
        .text("prompt", "an otter");
    let resp = gw.edit(APP_KEY, &form).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 2);
    assert!(
        resp.header("x-request-id")
            .unwrap()
            .starts_with("req_mock_"),
        "upstream id passed back"
    );
    assert!(
        resp.header("x-imagegate-request-id")
            .unwrap()
            .starts_with("req_")
    );
    assert_eq!(resp.header("openai-version").as_deref(), Some("2020-10-01"));
    assert_eq!(resp.header("openai-processing-ms").as_deref(), Some("123"));
    assert!(
        resp.header("keep-alive").is_none() && resp.header("proxy-connection").is_none(),
        "hop-by-hop stripped"
    );

    let rec = gw.mock.last().expect("the upstream got the request");
    assert_eq!(rec.path, "/v1/images/edits");
    assert_eq!(
        rec.header("authorization").as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    let raw = String::from_utf8_lossy(&rec.body);
    assert!(
        !raw.contains(APP_KEY) && !format!("{:?}", rec.headers).contains(APP_KEY),
        "caller key never forwarded"
    );
    assert_eq!(
        rec.field_names(),
        [
            "prompt",
            "model",
            "n",
            "size",
            "response_format",
            "user",
            "image"
        ]
    );
    assert_eq!(rec.field("model").as_deref(), Some("dall-e-2"));
    assert_eq!(rec.field("size").as_deref(), Some("1024x1024"));
    assert_eq!(rec.field("response_format").as_deref(), Some("url"));
    assert_eq!(rec.field("n").as_deref(), Some("2"));
    assert_eq!(rec.field("user").as_deref(), Some("u-42"));
    let part = rec.part("image").unwrap();
    assert_eq!(part.content_type.as_deref(), Some("image/png"));
    assert_eq!(part.file_name.as_deref(), Some("image.png"));
    assert_eq!(
        &part.data[..],
        &image[..],
        "image bytes forwarded unchanged"
    );
}

#[tokio::test]
async fn success_paths() {
    let gw = Gateway::start().await;
    let cases: Vec<(&str, Multipart, usize)> = vec![
        (
            "256",
            edit_request(&rgba_png(32, true), "p").text("size", "256x256"),
            1,
        ),
        (
            "512",
            edit_request(&rgba_png(32, true), "p").text("size", "512x512"),
            1,
        ),
        (
            "1024",
            edit_request(&rgba_png(32, true), "p").text("size", "1024x1024"),
            1,
        ),
        (
            "b64",
            edit_request(&rgba_png(32, true), "p").text("response_format", "b64_json"),
            1,
        ),
        (
            "n=10",
            edit_request(&rgba_png(32, true), "p").text("n", "10"),
            10,
        ),
        (
            "mask",
            edit_request(&rgba_png(32, true), "p").file(
                "mask",
                Some("m.png"),
                Some("image/png"),
                &rgba_png(32, true),
            ),
            1,
        ),
        (
            "rgb+mask",
            edit_request(&rgb_png(32), "p").file(
                "mask",
                Some("m.png"),
                Some("image/png"),
                &rgba_png(32, true),
            ),
            1,
        ),
        ("gray+alpha", edit_request(&gray_alpha_png(32), "p"), 1),
        ("interlaced", edit_request(&interlaced_rgba_png(32), "p"), 1),
        ("rgba16", edit_request(&rgba16_png(32), "p"), 1),
        (
            "no type",
            Multipart::new()
                .text("prompt", "p")
                .file("image", None, None, &rgba_png(32, true)),
            1,
        ),
    ];
    for (i, (name, form, n)) in cases.into_iter().enumerate() {
        let resp = gw.edit(APP_KEY, &form).await;
        assert_eq!(resp.status, 200, "{name}: {}", resp.text());
        let data = resp.json()["data"].as_array().unwrap().clone();
        assert_eq!(data.len(), n, "{name}");
        if name == "b64" {
            assert!(data[0]["b64_json"].is_string(), "{name}");
        }
        assert_eq!(gw.mock.count(), i + 1, "{name} reached the upstream once");
    }
    let mask = gw.mock.received()[6]
        .part("mask")
        .cloned()
        .expect("mask forwarded");
    assert_eq!(mask.content_type.as_deref(), Some("image/png"));
    assert_eq!(
        gw.mock.received()[6]
            .field_names()
            .last()
            .map(String::as_str),
        Some("mask")
    );
}

#[tokio::test]
async fn palette_transparency_is_converted_to_rgba() {
    let gw = Gateway::start().await;
    let palette = vec![255, 0, 0, 0, 255, 0];
    let image = png_with(
        16,
        16,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        false,
        Some(vec![0]),
        Some(palette),
        |x, _| vec![u8::from(x > 3)],
    );
    let resp = gw.edit(APP_KEY, &edit_request(&image, "p")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let forwarded = gw.mock.last().unwrap().part("image").unwrap().data.clone();
    let decoded = decode(&forwarded).expect("the forwarded image is a PNG");
    assert_eq!(decoded.color_type, png::ColorType::Rgba);
    assert_eq!(decoded.bit_depth, png::BitDepth::Eight);
}

#[tokio::test]
async fn authentication() {
    let gw = Gateway::start().await;
    let form = edit_request(&rgba_png(16, true), "p");
    let none = send(
        gw.addr(),
        "POST",
        "/v1/images/edits",
        &[("content-type", &form.content_type())],
        form.body(),
    )
    .await;
    assert_error(&none, 401, "invalid_request_error", None, None);
    let wrong = gw.edit("ig-not-a-real-key-9999", &form).await;
    let msg = assert_error(
        &wrong,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    assert!(
        !msg.contains("ig-not-a-real-key-9999") && msg.contains("9999"),
        "masked: {msg}"
    );
    let basic = send(
        gw.addr(),
        "POST",
        "/v1/images/edits",
        &[("authorization", &format!("Basic {APP_KEY}"))],
        vec![],
    )
    .await;
    assert_eq!(basic.status, 401);
    assert_eq!(gw.mock.count(), 0, "nothing reached the upstream");
    assert_eq!(gw.edit(OTHER_KEY, &form).await.status, 200);
}

#[tokio::test]
async fn routes_health_and_methods() {
    let gw = Gateway::start().await;
    let r = send(gw.addr(), "GET", "/v1/images/generations", &[], vec![]).await;
    assert_error(&r, 404, "invalid_request_error", None, Some("unknown_url"));
    let r = send(gw.addr(), "GET", "/v1/images/edits", &[], vec![]).await;
    assert_error(
        &r,
        405,
        "invalid_request_error",
        None,
        Some("method_not_allowed"),
    );
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    let r = send(gw.addr(), "GET", "/healthz", &[], vec![]).await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    assert!(r.header("x-request-id").is_some());
    let r = send(gw.addr(), "GET", "/readyz", &[], vec![]).await;
    assert_eq!(r.status, 200);
    let r = send(gw.addr(), "DELETE", "/healthz", &[], vec![]).await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn readyz_without_an_upstream_key_and_503_on_forward() {
    let gw = Gateway::start_with(|c| c.upstream_key = None).await;
    let r = send(gw.addr(), "GET", "/readyz", &[], vec![]).await;
    assert_eq!(r.status, 503);
    let resp = gw
        .edit(APP_KEY, &edit_request(&rgba_png(16, true), "p"))
        .await;
    assert_error(
        &resp,
        503,
        "server_error",
        None,
        Some("upstream_key_missing"),
    );
    // Validation still answers locally.
    let bad = gw
        .edit(APP_KEY, &edit_request(&rgba_png(16, true), ""))
        .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn upstream_errors_pass_through_and_failures_map_to_502_504() {
    let gw =
        Gateway::start_with(|c| c.upstream.response_timeout = Duration::from_millis(1500)).await;
    let form = edit_request(&rgba_png(16, true), "p");
    gw.mock.set_behavior(Behavior::openai_error(
        500,
        "The server had an error",
        "server_error",
        None,
        None,
    ));
    let r = gw.edit(APP_KEY, &form).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["message"], "The server had an error");
    assert_eq!(gw.mock.count(), 1, "a POST is never retried by the gateway");

    gw.mock.set_behavior(Behavior::Hang);
    let r = gw.edit(APP_KEY, &form).await;
    assert_error(&r, 504, "server_error", None, Some("upstream_timeout"));
    assert_eq!(gw.mock.count(), 2, "sent once, not retried");

    // A port this test holds (bound, never listening, no SO_REUSEADDR): nothing else can
    // listen there while `held` lives, so a connection is refused.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap();
    let gw2 =
        Gateway::start_with(move |c| c.upstream.base_url = format!("http://{closed}/v1")).await;
    let r = gw2.edit(APP_KEY, &form).await;
    assert_error(&r, 502, "server_error", None, Some("upstream_unreachable"));
    drop(held);
}

#[tokio::test]
async fn in_flight_requests_finish_during_graceful_shutdown() {
    let gw = Gateway::start_with(|c| {
        c.upstream.response_timeout = Duration::from_secs(2);
        c.server.shutdown_grace = Duration::from_secs(20);
    })
    .await;
    gw.mock.set_behavior(Behavior::Hang);
    let addr = gw.addr();
    let form = edit_request(&rgba_png(16, true), "p");
    let ct = form.content_type();
    let body = form.body();
    let in_flight = tokio::spawn(async move { post_edit(addr, APP_KEY, &ct, body).await });
    gw.mock.wait_for(1).await;
    let Gateway { server, mock, .. } = gw;
    let shutdown = tokio::spawn(server.shutdown());
    let resp = in_flight.await.unwrap();
    assert_eq!(
        resp.status, 504,
        "the in-flight request got its answer during the drain"
    );
    tokio::time::timeout(Duration::from_secs(20), shutdown)
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    drop(mock);
}

#[tokio::test]
async fn the_bomb_is_refused_from_its_header() {
    let gw = Gateway::start().await;
    let resp = gw.edit(APP_KEY, &edit_request(&bomb_png(30000), "p")).await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("image"),
        Some("invalid_image_dimensions"),
    );
    assert!(msg.contains("30000x30000"), "{msg}");
    assert_eq!(gw.mock.count(), 0);
}

#[tokio::test]
async fn h2_prior_knowledge_is_served() {
    let gw = Gateway::start().await;
    let stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", gw.addr()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn organization_and_project_headers_are_sent_upstream() {
    let gw = Gateway::start_with(|c| {
        c.upstream.organization = Some("org-test123".into());
        c.upstream.project = Some("proj_test456".into());
    })
    .await;
    // The caller's own OpenAI headers are not forwarded: the gateway's configuration decides.
    let form = edit_request(&rgba_png(16, true), "p");
    let auth = format!("Bearer {APP_KEY}");
    let r = send(
        gw.addr(),
        "POST",
        "/v1/images/edits",
        &[
            ("authorization", auth.as_str()),
            ("content-type", &form.content_type()),
            ("openai-organization", "org-caller"),
            ("x-custom", "caller"),
        ],
        form.body(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = gw.mock.last().unwrap();
    assert_eq!(
        rec.header("openai-organization").as_deref(),
        Some("org-test123")
    );
    assert_eq!(
        rec.header("openai-project").as_deref(),
        Some("proj_test456")
    );
    assert!(
        rec.header("x-custom").is_none(),
        "caller headers are not forwarded"
    );
    assert!(rec.header("user-agent").unwrap().starts_with("imagegate/"));
}

// ---------------------------------------------------------------------------------------------
// connections: cap, idle timeout, HTTP/2 keep-alive, health under load
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 connection kept open across requests; `closed` resolves when the server closes it.
struct KeptConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    closed: tokio::task::JoinHandle<()>,
}

async fn keep_conn(addr: std::net::SocketAddr) -> KeptConn {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    KeptConn { sender, closed }
}

impl KeptConn {
    async fn get(&mut self, path: &str) -> Result<u16, hyper::Error> {
        let req = http::Request::get(path)
            .header("host", "gateway")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        use http_body_util::BodyExt;
        resp.into_body().collect().await?;
        Ok(status)
    }
}

const HEALTH_REQUEST: &[u8] =
    b"GET /healthz HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn connections_over_max_connections_are_closed_while_the_others_work() {
    let gw = Gateway::start_with(|c| {
        c.server.max_connections = 2;
        // No probe places: every connection above the cap is refused (the fault suite covers
        // the probe places).
        c.server.probe_connections = 0;
        c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.key_hash = Some(imagegate::config::hash_key("ig-admin-key-for-tests-000111"));
    })
    .await;
    let mut first = keep_conn(gw.addr()).await;
    let mut second = keep_conn(gw.addr()).await;
    assert_eq!(first.get("/healthz").await.unwrap(), 200);
    assert_eq!(second.get("/healthz").await.unwrap(), 200);

    // Both permits are held by open connections: a third is closed before it is read.
    for _ in 0..3 {
        let out =
            support::raw_exchange_for(gw.addr(), HEALTH_REQUEST, Duration::from_secs(10)).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
    // The earlier connections still work.
    assert_eq!(first.get("/healthz").await.unwrap(), 200);
    assert_eq!(second.get("/readyz").await.unwrap(), 200);
    // The admin listener counts its own connections: the API's are not in its way.
    let admin = gw.server.admin_addr.unwrap();
    let r = send(
        admin,
        "GET",
        "/metrics",
        &[("authorization", "Bearer ig-admin-key-for-tests-000111")],
        vec![],
    )
    .await;
    assert_eq!(r.status, 200);
    // The counter is process-wide (other tests' gateways share it): at least these three.
    let refused = r
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("imagegate_connections_refused_total{listener=\"api\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 3.0), "{}", r.text());

    // A closed connection gives its place back (once the server has seen it close).
    drop(first);
    let reused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let out =
                support::raw_exchange_for(gw.addr(), HEALTH_REQUEST, Duration::from_secs(5)).await;
            if support::raw_status(&out) == Some(200) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        reused.is_ok(),
        "the freed place is used by a new connection"
    );
    assert_eq!(second.get("/healthz").await.unwrap(), 200);
}

/// 24 bytes of client preface, then an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The frame types in a server's HTTP/2 byte stream (stops at a partial frame).
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

const GOAWAY: u8 = 7;
const PING: u8 = 6;

#[tokio::test]
async fn an_h2_connection_that_sends_only_its_preface_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let gw = Gateway::start_with(|c| {
        c.server.idle_timeout = idle;
        c.server.http2_keep_alive_timeout = Duration::from_millis(300);
        // Keep-alive pings out of the way: this is the idle timeout's work.
        c.server.http2_keep_alive_interval = Duration::from_secs(3600);
        c.server.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    for (what, hello) in [
        ("preface", H2_PREFACE.to_vec()),
        (
            "preface and SETTINGS",
            [H2_PREFACE, H2_EMPTY_SETTINGS].concat(),
        ),
    ] {
        let started = std::time::Instant::now();
        let out = support::raw_exchange_for(gw.addr(), &hello, Duration::from_secs(10)).await;
        let took = started.elapsed();
        eprintln!("{what}: closed after {took:?}");
        assert!(
            took >= idle,
            "{what}: not before the idle timeout ({took:?})"
        );
        assert!(
            took < Duration::from_secs(5),
            "{what}: closed within a bounded time ({took:?})"
        );
        let frames = h2_frame_types(&out);
        assert_eq!(
            frames.first(),
            Some(&4),
            "{what}: the server's SETTINGS first: {frames:?}"
        );
        assert!(frames.contains(&GOAWAY), "{what}: told goodbye: {frames:?}");
    }
    // An h2 connection that is used is not idle while its request runs.
    let stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", gw.addr()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    // ... and once it is idle, it is closed cleanly (GOAWAY, which hyper's client acknowledges).
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the idle h2 connection is closed")
        .unwrap()
        .expect("a clean close");
    eprintln!(
        "used h2 connection: closed {:?} after its answer",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_h2_peer_that_does_not_answer_pings_is_closed() {
    let gw = Gateway::start_with(|c| {
        c.server.idle_timeout = Duration::from_secs(3600);
        c.server.http2_keep_alive_interval = Duration::from_millis(200);
        c.server.http2_keep_alive_timeout = Duration::from_millis(200);
    })
    .await;
    let started = std::time::Instant::now();
    let hello = [H2_PREFACE, H2_EMPTY_SETTINGS].concat();
    let out = support::raw_exchange_for(gw.addr(), &hello, Duration::from_secs(10)).await;
    let took = started.elapsed();
    eprintln!("unanswered pings: closed after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "closed within a bounded time ({took:?})"
    );
    assert!(
        h2_frame_types(&out).contains(&PING),
        "{:?}",
        h2_frame_types(&out)
    );
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed() {
    let idle = Duration::from_millis(300);
    let gw = Gateway::start_with(|c| {
        c.server.idle_timeout = idle;
        c.server.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let mut conn = keep_conn(gw.addr()).await;
    assert_eq!(conn.get("/healthz").await.unwrap(), 200);
    // Still open for the next request.
    assert_eq!(conn.get("/healthz").await.unwrap(), 200);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), &mut conn.closed)
        .await
        .expect("the idle keep-alive connection is closed")
        .unwrap();
    let took = started.elapsed();
    eprintln!("idle HTTP/1.1 keep-alive connection: closed after {took:?}");
    assert!(took >= idle - Duration::from_millis(50), "{took:?}");
}

#[tokio::test]
async fn health_answers_while_max_in_flight_edits_are_held() {
    let gw = Gateway::start_with(|c| {
        c.server.max_in_flight = 2;
        c.upstream.response_timeout = Duration::from_secs(30);
    })
    .await;
    gw.mock.set_behavior(Behavior::Hang);
    let form = edit_request(&rgba_png(16, true), "p");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (addr, ct, body) = (gw.addr(), form.content_type(), form.body());
            tokio::spawn(async move { post_edit(addr, APP_KEY, &ct, body).await })
        })
        .collect();
    // Both reached the upstream, which holds them: every in-flight permit is taken.
    gw.mock.wait_for(2).await;

    let shed = gw.edit(APP_KEY, &form).await;
    assert_error(&shed, 503, "server_error", None, Some("overloaded"));
    for path in ["/healthz", "/readyz"] {
        let r = send(gw.addr(), "GET", path, &[], vec![]).await;
        assert_eq!(r.status, 200, "{path} while edits are shed: {}", r.text());
        assert!(r.header("x-request-id").is_some());
    }
    let r = send(gw.addr(), "HEAD", "/healthz", &[], vec![]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.mock.count(),
        2,
        "the shed edit never reached the upstream"
    );
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn a_silent_h2_peer_does_not_hold_up_the_drain() {
    let gw = Gateway::start_with(|c| {
        c.server.shutdown_grace = Duration::from_secs(20);
        c.server.idle_timeout = Duration::from_secs(3600);
        c.server.http2_keep_alive_interval = Duration::from_secs(3600);
        c.server.http2_keep_alive_timeout = Duration::from_millis(300);
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(&[H2_PREFACE, H2_EMPTY_SETTINGS].concat())
        .await
        .unwrap();
    // The server's SETTINGS: the connection is being served as h2. It will not answer the
    // GOAWAY's PING.
    let mut first = [0u8; 9];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first[3], 4, "a SETTINGS frame");
    let len = u32::from_be_bytes([0, first[0], first[1], first[2]]) as usize;
    stream.read_exact(&mut vec![0u8; len]).await.unwrap();

    let Gateway { server, mock, .. } = gw;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("the drain does not wait for the grace period");
    let took = started.elapsed();
    eprintln!("shutdown with a silent h2 peer took {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        h2_frame_types(&rest).contains(&GOAWAY),
        "{:?}",
        h2_frame_types(&rest)
    );
    drop(mock);
}

/// Forwarding tasks outlive their connections, so they hold slots of their own: with every
/// slot taken by an answer the upstream has not given, the next valid edit is refused 503
/// `overloaded` before anything is forwarded, and its reservation is not kept.
#[tokio::test]
async fn forwarding_slots_bound_the_tasks_that_outlive_connections() {
    let gw = Gateway::start_with(|c| c.server.max_forwarding = 1).await;
    gw.mock.set_behavior(Behavior::Hang);
    let addr = gw.addr();
    let form = edit_request(&rgba_png(32, true), "held");
    let (ct, body) = (form.content_type(), form.body());
    let held = tokio::spawn(async move { post_edit(addr, APP_KEY, &ct, body).await });
    gw.mock.wait_for(1).await;
    let resp = gw
        .edit(APP_KEY, &edit_request(&rgba_png(32, true), "second"))
        .await;
    assert_error(&resp, 503, "server_error", None, Some("overloaded"));
    assert_eq!(gw.mock.count(), 1, "the second edit never went upstream");
    held.abort();
}

/// One request over HTTP/2 with prior knowledge (h2c), as a hyper client sends it.
async fn send_h2c(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> support::Resp {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("an h2c handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/images/edits"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), async {
        let resp = sender.send_request(req).await.expect("an h2 answer");
        let (head, body) = resp.into_parts();
        assert_eq!(head.version, http::Version::HTTP_2);
        let body = body.collect().await.expect("the h2 body").to_bytes();
        support::Resp {
            status: head.status.as_u16(),
            headers: head.headers,
            body,
        }
    })
    .await
    .expect("answered within 60 s");
    driver.abort();
    resp
}

/// An edit POSTed over inbound HTTP/2 (h2c, prior knowledge) is validated like one over
/// HTTP/1.1, forwarded, and recorded.
#[tokio::test]
async fn an_edit_over_inbound_http2_is_validated_forwarded_and_recorded() {
    let gw = Gateway::start().await;
    let auth = format!("Bearer {APP_KEY}");

    // Validated: a bad size is refused in the envelope, nothing forwarded.
    let bad = edit_request(&rgba_png(32, true), "an otter").text("size", "1X1");
    let ct = bad.content_type();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", ct.as_str()),
    ];
    let r = send_h2c(gw.addr(), &headers, bad.body()).await;
    assert_error(
        &r,
        400,
        "invalid_request_error",
        Some("size"),
        Some("invalid_value"),
    );
    assert_eq!(gw.mock.heads(), 0, "a refused edit is not forwarded");
    let record = gw.record_of(&r);
    assert_eq!(record.outcome, imagegate::ledger::Outcome::Rejected);
    assert!(!record.forwarded);

    // Forwarded and recorded.
    let good = edit_request(&rgba_png(32, true), "an otter over h2")
        .text("n", "2")
        .text("user", "h2-user");
    let ct = good.content_type();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", ct.as_str()),
    ];
    let r = send_h2c(gw.addr(), &headers, good.body()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(gw.mock.count(), 1);
    let sent = gw.mock.last().unwrap();
    assert_eq!(
        sent.header("authorization").as_deref(),
        Some(&*format!("Bearer {UPSTREAM_KEY}"))
    );
    assert_eq!(sent.field("prompt").as_deref(), Some("an otter over h2"));
    assert_eq!(sent.field("n").as_deref(), Some("2"));
    assert_eq!(sent.field("user").as_deref(), Some("h2-user"));
    assert_eq!(
        sent.part("image").map(|p| p.data.to_vec()),
        Some(rgba_png(32, true))
    );
    let record = gw.record_of(&r);
    assert_eq!(record.outcome, imagegate::ledger::Outcome::Answered);
    assert!(record.forwarded);
    assert_eq!(record.status, Some(200));
    assert_eq!(record.upstream_status, Some(200));
    assert_eq!(record.images_returned, Some(2));
    assert_eq!(record.user.as_deref(), Some("h2-user"));
    assert_eq!(record.client.as_deref(), Some("app"));
}
