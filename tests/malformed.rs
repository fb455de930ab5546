//! Bad input never yields a 5xx, a hang or a crash: malformed multipart bodies, bodies over the
//! cap (declared or streamed), slow clients, a stalled request head, and malformed PNGs. Every
//! exchange is bounded (`raw_exchange` stops after 10 s; `try_send` runs under a timeout), and
//! every test ends with a valid request on the same gateway. The bounds only keep a test from
//! hanging: what is asserted is the answer, or that the gateway ended the connection (times to
//! close are measured by `tests/faults.rs`).

mod support;

use std::time::Duration;

use png::ColorType;
use support::fixtures::*;
use support::gateway::*;
use support::multipart::{DEFAULT_BOUNDARY, Multipart, edit_request};
use support::{Ended, Resp, raw_exchange, raw_exchange_until_end, raw_status, try_send};

/// Longest any single exchange in this file may take.
const LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// POST to the edits route with the app key, under [`LIMIT`]; a hang or a transport error fails.
async fn post(gw: &Gateway, name: &str, content_type: Option<&str>, body: Vec<u8>) -> Resp {
    let auth = format!("Bearer {APP_KEY}");
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(ct) = content_type {
        headers.push(("content-type", ct));
    }
    match tokio::time::timeout(
        LIMIT,
        try_send(gw.addr(), "POST", "/v1/images/edits", &headers, body),
    )
    .await
    {
        Err(_) => panic!("{name}: no answer within {LIMIT:?}"),
        Ok(Err(e)) => panic!("{name}: transport error instead of an answer: {e}"),
        Ok(Ok(resp)) => resp,
    }
}

/// A 400 `invalid_request_error` in the JSON envelope with exactly this `code`.
fn assert_client_error(name: &str, resp: &Resp, code: &str) -> String {
    assert_eq!(
        (resp.status, resp.json()["error"]["code"].as_str()),
        (400, Some(code)),
        "{name}: body: {}",
        resp.text()
    );
    let param = resp.json()["error"]["param"].as_str().map(str::to_owned);
    assert_error(
        resp,
        400,
        "invalid_request_error",
        param.as_deref(),
        Some(code),
    )
}

/// A valid request still succeeds on this gateway.
async fn still_serves(gw: &Gateway) {
    let before = gw.mock.count();
    let form = edit_request(&rgba_png(32, true), "an otter");
    let resp = post(gw, "valid request", Some(&form.content_type()), form.body()).await;
    assert_eq!(
        resp.status,
        200,
        "valid request afterwards: {}",
        resp.text()
    );
    assert_eq!(gw.mock.count(), before + 1);
}

/// The head of a raw HTTP/1.1 POST to the edits route (with `Connection: close`), ending with
/// the blank line; `extra` lines are added as given.
fn raw_head(gw: &Gateway, content_type: &str, extra: &[String]) -> Vec<u8> {
    let mut head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {APP_KEY}\r\nContent-Type: {content_type}\r\nConnection: close\r\n",
        gw.addr()
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// The body of a raw response (by its Content-Length), as JSON.
fn raw_json(response: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(response);
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head: {text}"));
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("a numeric content-length"))
        .unwrap_or_else(|| panic!("no content-length: {text}"));
    let body = &response[end + 4..];
    assert!(body.len() >= len, "response body cut short: {text}");
    serde_json::from_slice(&body[..len]).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// malformed multipart
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_multipart_bodies_are_400_in_the_envelope() {
    let gw = Gateway::start().await;
    let form = edit_request(&rgba_png(32, true), "an otter");
    let ct = form.content_type();
    let body = form.body();
    let huge_line = "a".repeat(2 * 1024 * 1024);
    let two_mb_header = Multipart::new()
        .raw_part(&[&format!("X-Padding: {huge_line}")], b"p")
        .text("prompt", "an otter")
        .file("image", None, Some("image/png"), &rgba_png(32, true))
        .body();
    let two_mb_header_line_no_colon = Multipart::new()
        .raw_part(&[huge_line.as_str()], b"p")
        .text("prompt", "an otter")
        .body();
    let two_mb_name = Multipart::new()
        .text("prompt", "p")
        .raw_part(
            &[&format!(
                "Content-Disposition: form-data; name=\"{huge_line}\""
            )],
            b"x",
        )
        .body();
    let mut tiny = Multipart::new();
    for i in 0..5000 {
        tiny = tiny.text(&format!("f{i}"), "x");
    }
    let tiny = tiny.body();
    let mut tiny_prompts = Multipart::new();
    for _ in 0..5000 {
        tiny_prompts = tiny_prompts.text("prompt", "x");
    }
    let tiny_prompts = tiny_prompts.body();

    let multipart = "invalid_multipart";
    let ct_codes = "unsupported_content_type";
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "no boundary in the header",
            "multipart/form-data".into(),
            body.clone(),
            ct_codes,
        ),
        (
            "boundary of 300 characters",
            format!("multipart/form-data; boundary={}", "b".repeat(300)),
            body.clone(),
            ct_codes,
        ),
        (
            "truncated body",
            ct.clone(),
            body[..body.len() / 2].to_vec(),
            multipart,
        ),
        (
            "truncated inside a part header",
            ct.clone(),
            body[..DEFAULT_BOUNDARY.len() + 20].to_vec(),
            multipart,
        ),
        (
            "no final boundary",
            ct.clone(),
            form.body_without_final_boundary(),
            multipart,
        ),
        (
            "a 2 MB part header line",
            ct.clone(),
            two_mb_header,
            multipart,
        ),
        (
            "a 2 MB part header line without a colon",
            ct.clone(),
            two_mb_header_line_no_colon,
            multipart,
        ),
        (
            "a 2 MB field name",
            ct.clone(),
            two_mb_name,
            "unknown_parameter",
        ),
        ("5000 tiny parts", ct.clone(), tiny, multipart),
        (
            "5000 tiny prompt parts",
            ct.clone(),
            tiny_prompts,
            // More parts than `validation.max_parts` (before any field is looked at).
            multipart,
        ),
        (
            "garbage bytes",
            ct.clone(),
            noise(64 * 1024, 7),
            multipart,
        ),
        ("empty body", ct.clone(), Vec::new(), multipart),
        (
            "only the closing delimiter",
            ct.clone(),
            format!("--{DEFAULT_BOUNDARY}--\r\n").into_bytes(),
            multipart,
        ),
        (
            "a boundary that never appears",
            "multipart/form-data; boundary=NeverSentBoundary123".into(),
            body.clone(),
            multipart,
        ),
        (
            "a part without Content-Disposition",
            ct.clone(),
            Multipart::new()
                .raw_part(&["Content-Type: text/plain"], b"an otter")
                .body(),
            multipart,
        ),
        (
            "a part with an empty name",
            ct.clone(),
            Multipart::new().text("", "an otter").body(),
            multipart,
        ),
        (
            "a part header with no blank line before the data",
            ct.clone(),
            format!(
                "--{DEFAULT_BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\nan otter\r\n--{DEFAULT_BOUNDARY}--\r\n"
            )
            .into_bytes(),
            multipart,
        ),
        (
            "a prompt over 64 KiB",
            ct.clone(),
            edit_request(&rgba_png(32, true), &"p".repeat(100 * 1024)).body(),
            // Issue 9 item 8: the field's own length error, as for any too-long prompt.
            "string_above_max_length",
        ),
        (
            "an enum field over 64 KiB",
            ct.clone(),
            edit_request(&rgba_png(32, true), "p")
                .text("size", &"x".repeat(100 * 1024))
                .body(),
            // README "Errors": model, n, size and response_format stay capped at 64 KiB.
            multipart,
        ),
        (
            "a prompt that is not UTF-8",
            ct.clone(),
            Multipart::new()
                .raw_part(
                    &["Content-Disposition: form-data; name=\"prompt\""],
                    &[0xFF, 0xFE, 0xC3],
                )
                .file("image", None, Some("image/png"), &rgba_png(32, true))
                .body(),
            "invalid_type",
        ),
    ];
    for (name, content_type, body, codes) in cases {
        let resp = post(&gw, name, Some(&content_type), body).await;
        let msg = assert_client_error(name, &resp, codes);
        assert!(!msg.is_empty(), "{name}: a message");
        assert_eq!(gw.mock.heads(), 0, "{name}: nothing forwarded");
    }
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// body over the cap
// ---------------------------------------------------------------------------------------------

/// A 200 000-byte body cap (images must then be smaller than that too).
async fn capped() -> Gateway {
    Gateway::start_with(|c| {
        c.validation.max_image_bytes = 100_000;
        c.validation.max_body_bytes = Some(200_000);
    })
    .await
}

#[tokio::test]
async fn declared_length_over_the_cap_is_refused_before_the_body() {
    let gw = capped().await;
    let ct = edit_request(&[], "p").content_type();
    for (name, extra) in [
        (
            "one byte over the cap",
            vec!["Content-Length: 200001".to_string()],
        ),
        ("a gigabyte", vec!["Content-Length: 1000000000".to_string()]),
        (
            "with Expect: 100-continue",
            vec![
                "Content-Length: 300000".to_string(),
                "Expect: 100-continue".to_string(),
            ],
        ),
    ] {
        // Only the head is sent; the body never is: a 413 proves it was not waited for.
        let (out, ended) =
            raw_exchange_until_end(gw.addr(), &raw_head(&gw, &ct, &extra), LIMIT).await;
        assert_eq!(
            (raw_status(&out), ended),
            (Some(413), Ended::Closed),
            "{name}: answered and closed (Connection: close); {}",
            String::from_utf8_lossy(&out)
        );
        assert!(
            !String::from_utf8_lossy(&out).contains(" 100 Continue"),
            "{name}: no 100 Continue for a body that will be refused"
        );
        let j = raw_json(&out);
        assert_eq!(j["error"]["code"], "request_too_large", "{name}: {j}");
        assert_eq!(j["error"]["type"], "invalid_request_error", "{name}: {j}");
        assert!(j["error"]["param"].is_null(), "{name}: {j}");
        assert!(
            j["error"]["message"].as_str().unwrap().contains("200000"),
            "{name}: {j}"
        );
    }
    // At the cap exactly, the body is read (and rejected for what it is, not for its size).
    let at_cap = vec![b'x'; 200_000];
    let resp = post(&gw, "at the cap", Some(&ct), at_cap).await;
    assert_client_error("at the cap", &resp, "invalid_multipart");
    assert_eq!(gw.mock.heads(), 0);
    still_serves(&gw).await;
}

#[tokio::test]
async fn chunked_body_growing_over_the_cap_is_413() {
    let gw = capped().await;
    let ct = edit_request(&[], "p").content_type();
    let mut req = raw_head(&gw, &ct, &["Transfer-Encoding: chunked".to_string()]);
    let piece = vec![b'z'; 16 * 1024];
    for _ in 0..20 {
        // 320 KiB in all
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(&piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let out = raw_exchange(gw.addr(), &req).await;
    assert_eq!(
        raw_status(&out),
        Some(413),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let j = raw_json(&out);
    assert_eq!(j["error"]["code"], "request_too_large", "{j}");
    assert_eq!(gw.mock.heads(), 0);

    // Under the cap, chunked is fine.
    let form = edit_request(&rgba_png(32, true), "an otter");
    let body = form.body();
    let mut req = raw_head(
        &gw,
        &form.content_type(),
        &["Transfer-Encoding: chunked".to_string()],
    );
    for piece in body.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let out = raw_exchange(gw.addr(), &req).await;
    assert_eq!(
        raw_status(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// slow clients
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_body_that_stops_arriving_is_408() {
    let gw = Gateway::start_with(|c| c.server.body_read_timeout = Duration::from_secs(1)).await;
    let form = edit_request(&rgba_png(32, true), "an otter");
    let body = form.body();
    let mut req = raw_head(
        &gw,
        &form.content_type(),
        &[format!("Content-Length: {}", body.len())],
    );
    req.extend_from_slice(&body[..body.len() / 2]);
    let (out, ended) = raw_exchange_until_end(gw.addr(), &req, LIMIT).await;
    assert_eq!(
        (raw_status(&out), ended),
        (Some(408), Ended::Closed),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let j = raw_json(&out);
    assert_eq!(j["error"]["code"], "request_timeout", "{j}");
    assert_eq!(j["error"]["type"], "invalid_request_error", "{j}");
    assert!(j["error"]["param"].is_null(), "{j}");
    assert_eq!(gw.mock.heads(), 0);
    still_serves(&gw).await;
}

#[tokio::test]
async fn a_stalled_request_line_is_dropped() {
    let gw = Gateway::start_with(|c| c.server.header_read_timeout = Duration::from_secs(1)).await;
    for partial in [
        &b"POST /v1/images/ed"[..],
        &b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"[..],
    ] {
        let (out, ended) = raw_exchange_until_end(gw.addr(), partial, LIMIT).await;
        // hyper answers nothing on its header-read timeout: it closes the connection.
        assert_ne!(
            ended,
            Ended::Limit,
            "{:?}: the gateway ended the connection",
            String::from_utf8_lossy(partial)
        );
        assert!(
            out.is_empty(),
            "{:?}: closed without an answer: {}",
            String::from_utf8_lossy(partial),
            String::from_utf8_lossy(&out)
        );
    }
    still_serves(&gw).await;
}

/// A connection that sends nothing, or only the first bytes of the HTTP/2 preface, must be closed
/// after the header-read timeout like any other stalled head.
#[tokio::test]
async fn a_silent_connection_is_dropped() {
    let gw = Gateway::start_with(|c| c.server.header_read_timeout = Duration::from_secs(1)).await;
    for partial in [&b""[..], &b"P"[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let (out, ended) = raw_exchange_until_end(gw.addr(), partial, LIMIT).await;
        // The first-bytes deadline fails the connection: closed without an answer.
        assert_ne!(
            ended,
            Ended::Limit,
            "{:?}: the gateway ended the connection",
            String::from_utf8_lossy(partial)
        );
        assert!(out.is_empty(), "{out:?}");
    }
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// malformed PNGs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_pngs_are_400() {
    let gw = Gateway::start().await;
    let good = rgba_png(64, true);
    let mut random_after_signature = PNG_SIGNATURE.to_vec();
    random_after_signature.extend(noise(8, 99));
    let idat = || chunk(b"IDAT", &zlib(&[0u8; 257]));
    let iend = || chunk(b"IEND", &[]);
    let format = "invalid_image_format";
    let dims = "invalid_image_dimensions";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad CRC", with_bad_crc(&good), format),
        ("truncated IDAT", truncated_idat(&good), format),
        ("bomb dimensions 30000x30000", bomb_png(30000), dims),
        (
            "bomb dimensions 2^31-1",
            assemble(&[ihdr(0x7FFF_FFFF, 0x7FFF_FFFF, 8, 6, 0), idat(), iend()]),
            // Over max_dimension, taken from IHDR before any decoding.
            dims,
        ),
        (
            "width 2^32-1",
            assemble(&[ihdr(u32::MAX, u32::MAX, 8, 6, 0), idat(), iend()]),
            format,
        ),
        (
            "zero width",
            assemble(&[ihdr(0, 64, 8, 6, 0), idat(), iend()]),
            format,
        ),
        (
            "zero width and height",
            assemble(&[ihdr(0, 0, 8, 6, 0), idat(), iend()]),
            format,
        ),
        (
            "8 random bytes after the signature",
            random_after_signature,
            format,
        ),
        ("signature only", PNG_SIGNATURE.to_vec(), format),
        (
            "no IDAT",
            assemble(&[ihdr(64, 64, 8, 6, 0), iend()]),
            format,
        ),
        (
            "no IEND",
            assemble(&[
                ihdr(64, 64, 8, 6, 0),
                chunk(b"IDAT", &zlib(&vec![0; 64 * 257])),
            ]),
            format,
        ),
        (
            "a chunk claiming 4 GB",
            {
                let mut v = assemble(&[ihdr(64, 64, 8, 6, 0)]);
                v.extend_from_slice(&u32::MAX.to_be_bytes());
                v.extend_from_slice(b"IDAT");
                v.extend_from_slice(&[0; 64]);
                v
            },
            format,
        ),
        (
            "IDAT that is not zlib",
            assemble(&[
                ihdr(64, 64, 8, 6, 0),
                chunk(b"IDAT", &noise(4000, 3)),
                iend(),
            ]),
            format,
        ),
        (
            "bad filter type bytes",
            assemble(&[
                ihdr(16, 16, 8, 6, 0),
                chunk(b"IDAT", &zlib(&vec![9u8; 16 * 65])),
                iend(),
            ]),
            format,
        ),
        (
            "invalid color type 5",
            assemble(&[ihdr(64, 64, 8, 5, 0), idat(), iend()]),
            format,
        ),
        (
            "invalid bit depth 3",
            assemble(&[ihdr(64, 64, 3, 0, 0), idat(), iend()]),
            format,
        ),
        (
            "palette image without PLTE",
            assemble(&[ihdr(16, 16, 8, ColorType::Indexed as u8, 0), idat(), iend()]),
            format,
        ),
        (
            "trailing data after IEND",
            {
                let mut v = good.clone();
                v.extend_from_slice(b"trailing");
                v
            },
            format,
        ),
        (
            "IHDR of the wrong length",
            assemble(&[chunk(b"IHDR", &[0; 5]), idat(), iend()]),
            format,
        ),
        (
            "interlaced bomb",
            assemble(&[ihdr(20000, 20000, 16, 6, 1), idat(), iend()]),
            dims,
        ),
    ];
    for (name, data, codes) in cases {
        let form = edit_request(&data, "an otter");
        let resp = post(&gw, name, Some(&form.content_type()), form.body()).await;
        assert_eq!(resp.status, 400, "{name}: {}", resp.text());
        assert_client_error(name, &resp, codes);
        assert_eq!(
            resp.json()["error"]["param"],
            "image",
            "{name}: {}",
            resp.text()
        );
        // The same file as the mask of a good image is refused with param mask.
        let form = edit_request(&good, "an otter").file("mask", None, Some("image/png"), &data);
        let resp = post(&gw, name, Some(&form.content_type()), form.body()).await;
        assert_client_error(name, &resp, codes);
        assert_eq!(
            resp.json()["error"]["param"],
            "mask",
            "{name} as mask: {}",
            resp.text()
        );
        assert_eq!(gw.mock.heads(), 0, "{name}: nothing forwarded");
    }
    still_serves(&gw).await;
}
