//! The field, content-type and PNG rules of `POST /v1/images/edits`, end to end through the real
//! server (`../shared/spec/openai-behaviour.md`, "Field rules", "Image rules" and "Decisions
//! where the record is silent"): one rejection per (code, param) pair, plus the order across
//! phases, the configured limits and the accepted forms as forwarded. The rule-by-rule cases are
//! unit tests at the bottom of the file that implements each rule (`edit::form`,
//! `edit::png_check`, `limits`, `error::domain`). Each rejection asserts status, type, param,
//! code, the message (exactly where the contract words it) and that the mock upstream saw
//! nothing; every test ends with a valid request on the same gateway, so no rejection leaves
//! state behind.

mod support;

use std::time::Duration;

use imagegate::config::TransparencyPolicy;
use png::{BitDepth, ColorType};
use support::fixtures::*;
use support::gateway::*;
use support::mock_upstream::Recorded;
use support::multipart::{Multipart, edit_request};
use support::{Resp, send};

const FOUR_MIB: usize = 4 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Table machinery
// ---------------------------------------------------------------------------------------------

/// How a case's message is checked.
#[derive(Debug, Clone)]
enum Msg {
    /// The contract gives the wording: byte for byte.
    Exact(String),
    /// The contract gives the start of the wording (the gateway may add a detail).
    Prefix(String),
    /// The contract gives no wording; the message must at least name this.
    Contains(String),
}

fn exact(s: impl Into<String>) -> Msg {
    Msg::Exact(s.into())
}

fn prefix(s: impl Into<String>) -> Msg {
    Msg::Prefix(s.into())
}

fn contains(s: impl Into<String>) -> Msg {
    Msg::Contains(s.into())
}

/// What is sent.
enum Req {
    Form(Multipart),
    /// A body with a chosen `Content-Type` (`None`: no Content-Type header at all).
    Raw {
        content_type: Option<String>,
        body: Vec<u8>,
    },
}

/// One expected 400 rejection.
struct Reject {
    name: &'static str,
    req: Req,
    param: Option<&'static str>,
    code: &'static str,
    msg: Msg,
}

fn reject(
    name: &'static str,
    form: Multipart,
    param: Option<&'static str>,
    code: &'static str,
    msg: Msg,
) -> Reject {
    Reject {
        name,
        req: Req::Form(form),
        param,
        code,
        msg,
    }
}

async fn post(gw: &Gateway, req: &Req) -> Resp {
    match req {
        Req::Form(form) => gw.edit(APP_KEY, form).await,
        Req::Raw {
            content_type: Some(ct),
            body,
        } => gw.edit_raw(APP_KEY, ct, body.clone()).await,
        Req::Raw {
            content_type: None,
            body,
        } => {
            let auth = format!("Bearer {APP_KEY}");
            tokio::time::timeout(
                Duration::from_secs(60),
                send(
                    gw.addr(),
                    "POST",
                    "/v1/images/edits",
                    &[("authorization", auth.as_str())],
                    body.clone(),
                ),
            )
            .await
            .expect("the gateway answers within 60 s")
        }
    }
}

fn check_message(name: &str, got: &str, want: &Msg) {
    match want {
        Msg::Exact(m) => assert_eq!(got, m, "{name}: message"),
        Msg::Prefix(p) => assert!(
            got.starts_with(p.as_str()),
            "{name}: message {got:?} does not start with {p:?}"
        ),
        Msg::Contains(c) => assert!(
            got.contains(c.as_str()),
            "{name}: message {got:?} does not contain {c:?}"
        ),
    }
}

/// Sends every case; each must be a 400 `invalid_request_error` with the expected param, code and
/// message, and nothing may have reached the upstream. Run these before any accepted request of
/// the same gateway (the upstream count must still be zero).
async fn expect_rejections(gw: &Gateway, cases: Vec<Reject>) {
    for c in cases {
        let resp = post(gw, &c.req).await;
        assert_eq!(
            resp.status,
            400,
            "{}: status; body: {}",
            c.name,
            resp.text()
        );
        let body = resp.json();
        assert_eq!(
            (
                body["error"]["param"].as_str(),
                body["error"]["code"].as_str()
            ),
            (c.param, Some(c.code)),
            "{}: param/code; body: {body}",
            c.name
        );
        let msg = assert_error(&resp, 400, "invalid_request_error", c.param, Some(c.code));
        check_message(c.name, &msg, &c.msg);
        assert_eq!(
            gw.mock.count(),
            0,
            "{}: nothing reaches the upstream",
            c.name
        );
        assert_eq!(gw.mock.heads(), 0, "{}: not even a request head", c.name);
    }
}

/// Sends a form that must be accepted and forwarded once; returns what the upstream got.
async fn accept(gw: &Gateway, name: &str, form: &Multipart) -> Recorded {
    let before = gw.mock.count();
    let resp = gw.edit(APP_KEY, form).await;
    assert_eq!(resp.status, 200, "{name}: {}", resp.text());
    assert_eq!(
        gw.mock.count(),
        before + 1,
        "{name}: forwarded exactly once"
    );
    gw.mock.last().expect("a recorded request")
}

/// The state did not change: a plain valid request still succeeds.
async fn still_serves(gw: &Gateway) {
    let rec = accept(gw, "valid request after the rejections", &valid()).await;
    assert_eq!(rec.field("prompt").as_deref(), Some("an otter"));
}

fn valid() -> Multipart {
    edit_request(&rgba_png(32, true), "an otter")
}

fn png_part(form: Multipart, name: &str, data: &[u8]) -> Multipart {
    form.file(name, Some(&format!("{name}.png")), Some("image/png"), data)
}

/// A compatible-policy gateway.
async fn compatible() -> Gateway {
    Gateway::start_with(|c| c.validation.transparency = TransparencyPolicy::Compatible).await
}

// ---------------------------------------------------------------------------------------------
// Content type
// ---------------------------------------------------------------------------------------------

fn unsupported(ct: &str) -> String {
    format!(
        "Unsupported content type: '{ct}'. This API method only accepts 'multipart/form-data' requests, but you specified the header 'Content-Type: {ct}'. Please try again with a supported content type."
    )
}

#[tokio::test]
async fn content_type_must_be_multipart_with_a_boundary() {
    let gw = Gateway::start().await;
    // The content type is judged before the body is read: a form missing its prompt.
    expect_rejections(
        &gw,
        vec![Reject {
            name: "text/plain with a form missing its prompt",
            req: Req::Raw {
                content_type: Some("text/plain".into()),
                body: png_part(Multipart::new(), "image", &rgba_png(32, true)).body(),
            },
            param: None,
            code: "unsupported_content_type",
            msg: exact(unsupported("text/plain")),
        }],
    )
    .await;
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// prompt and image presence, prompt length
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn prompt_and_image_rules() {
    let gw = Gateway::start().await;
    let img = rgba_png(32, true);
    expect_rejections(
        &gw,
        vec![
            reject(
                "prompt missing",
                png_part(Multipart::new(), "image", &img),
                Some("prompt"),
                "missing_required_parameter",
                exact("Missing required parameter: 'prompt'."),
            ),
            reject(
                "image missing",
                Multipart::new().text("prompt", "an otter"),
                Some("image"),
                "missing_required_parameter",
                exact("Missing required parameter: 'image'."),
            ),
            reject(
                "prompt empty",
                edit_request(&img, ""),
                Some("prompt"),
                "empty_string",
                exact(
                    "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
                ),
            ),
            // Over 64 KiB: the same length error, not a framing one.
            reject(
                "prompt of 70000 ASCII chars",
                edit_request(&img, &"p".repeat(70_000)),
                Some("prompt"),
                "string_above_max_length",
                exact(
                    "Invalid 'prompt': string too long. Expected a string with maximum length 1000, but got a string with length 70000 instead.",
                ),
            ),
        ],
    )
    .await;

    // 1000 code points (2000 / 4000 bytes) are fine and forwarded as sent.
    for (name, prompt) in [
        ("1000 x é", "é".repeat(1000)),
        ("1000 x 🦦", "🦦".repeat(1000)),
        ("whitespace only", "   \t  ".to_string()),
        ("one space", " ".to_string()),
    ] {
        let rec = accept(&gw, name, &edit_request(&img, &prompt)).await;
        assert_eq!(
            rec.field("prompt").as_deref(),
            Some(prompt.as_str()),
            "{name}: forwarded unchanged"
        );
    }
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// n
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn n_rules() {
    let gw = Gateway::start().await;
    let img = rgba_png(32, true);
    let with_n = |v: &str| edit_request(&img, "p").text("n", v);
    // n=abc is a case of `order_of_checks`; the rule cases are `edit::form`'s unit tests.
    let cases = vec![
        reject(
            "n=0",
            with_n("0"),
            Some("n"),
            "integer_below_min_value",
            exact(
                "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            ),
        ),
        reject(
            "n=11",
            with_n("11"),
            Some("n"),
            "integer_above_max_value",
            exact(
                "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.",
            ),
        ),
    ];
    expect_rejections(&gw, cases).await;

    for (raw, canonical) in [
        ("03", "3"),
        ("+3", "3"),
        (" 7 ", "7"),
        ("10", "10"),
        ("1", "1"),
    ] {
        let rec = accept(&gw, &format!("n={raw:?}"), &with_n(raw)).await;
        assert_eq!(
            rec.field("n").as_deref(),
            Some(canonical),
            "n={raw:?} forwarded as canonical digits"
        );
    }
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// size, response_format, model
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn enumerated_values() {
    let gw = Gateway::start().await;
    let img = rgba_png(32, true);
    let with = |k: &str, v: &str| edit_request(&img, "p").text(k, v);
    let sizes = |v: &str| {
        format!(
            "Invalid value: '{v}'. Supported values are: '256x256', '512x512', and '1024x1024'."
        )
    };
    let cases = vec![
        reject(
            "size=1024X1024",
            with("size", "1024X1024"),
            Some("size"),
            "invalid_value",
            exact(sizes("1024X1024")),
        ),
        reject(
            "response_format=URL",
            with("response_format", "URL"),
            Some("response_format"),
            "invalid_value",
            exact("Invalid value: 'URL'. Supported values are: 'url' and 'b64_json'."),
        ),
        reject(
            "model=gpt-image-1",
            with("model", "gpt-image-1"),
            Some("model"),
            "invalid_value",
            exact("Invalid value: 'gpt-image-1'. Supported values are: 'dall-e-2'."),
        ),
    ];
    expect_rejections(&gw, cases).await;

    let rec = accept(&gw, "model=dall-e-2", &with("model", "dall-e-2")).await;
    assert_eq!(rec.field("model").as_deref(), Some("dall-e-2"));
    for size in ["256x256", "512x512", "1024x1024"] {
        let rec = accept(&gw, size, &with("size", size)).await;
        assert_eq!(rec.field("size").as_deref(), Some(size));
    }
    for rf in ["url", "b64_json"] {
        let rec = accept(&gw, rf, &with("response_format", rf)).await;
        assert_eq!(rec.field("response_format").as_deref(), Some(rf));
    }
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// user
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn user_rules() {
    let gw = Gateway::start().await;
    let img = rgba_png(32, true);
    let with_user = |u: &str| edit_request(&img, "p").text("user", u);
    let long = |len: usize| {
        format!(
            "Invalid 'user': string too long. Expected a string with maximum length 256, but got a string with length {len} instead."
        )
    };
    expect_rejections(
        &gw,
        vec![reject(
            "user of 70000 chars (over 64 KiB)",
            with_user(&"u".repeat(70_000)),
            Some("user"),
            "string_above_max_length",
            exact(long(70_000)),
        )],
    )
    .await;

    let rec = accept(&gw, "user of 256 chars", &with_user(&"ü".repeat(256))).await;
    assert_eq!(rec.field("user"), Some("ü".repeat(256)));
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// field names: unknown, duplicates, arrays
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn field_names() {
    let gw = Gateway::start().await;
    let img = rgba_png(32, true);
    let image_array = "Invalid type for 'image': expected a file, but got an array instead.";
    expect_rejections(
        &gw,
        vec![
            reject(
                "unknown field quality",
                edit_request(&img, "p").text("quality", "hd"),
                Some("quality"),
                "unknown_parameter",
                exact("Unknown parameter: 'quality'."),
            ),
            reject(
                "prompt twice",
                edit_request(&img, "a").text("prompt", "b"),
                Some("prompt"),
                "invalid_type",
                prefix("Invalid type for 'prompt': expected a string, but got an array instead."),
            ),
            reject(
                "image twice",
                png_part(edit_request(&img, "p"), "image", &img),
                Some("image"),
                "invalid_type",
                exact(image_array),
            ),
        ],
    )
    .await;
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// declared part types
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn declared_part_types() {
    let gw = Gateway::start().await;
    let img = rgba_png(32, true);
    let prompt = || Multipart::new().text("prompt", "p");
    expect_rejections(
        &gw,
        vec![
            reject(
                "mask typed text/plain",
                png_part(prompt(), "image", &img).file(
                    "mask",
                    Some("m.txt"),
                    Some("text/plain"),
                    &img,
                ),
                Some("mask"),
                "unsupported_file_mimetype",
                exact(
                    "Invalid file 'mask': unsupported mimetype ('text/plain'). Supported file formats are 'image/png'.",
                ),
            ),
        ],
    )
    .await;

    for (name, ct) in [
        ("octet-stream PNG", Some("application/octet-stream")),
        ("untyped PNG", None),
    ] {
        let form = prompt()
            .file("image", Some("upload"), ct, &img)
            .file("mask", None, ct, &img);
        let rec = accept(&gw, name, &form).await;
        for part in ["image", "mask"] {
            let p = rec.part(part).expect("part forwarded");
            assert_eq!(
                p.content_type.as_deref(),
                Some("image/png"),
                "{name}: {part} forwarded as image/png"
            );
            assert_eq!(&p.data[..], &img[..], "{name}: {part} bytes unchanged");
        }
    }
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// image bytes: size, signature, structure, dimensions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn image_bytes_and_dimensions() {
    let gw = Gateway::start().await;
    let img = |data: &[u8]| edit_request(data, "p");
    expect_rejections(
        &gw,
        vec![
            reject(
                "non-square 64x32",
                img(&rgba_png_64x32()),
                Some("image"),
                "invalid_image_dimensions",
                exact(
                    "Invalid input image - expected an image with equal width and height, got 64x32 instead.",
                ),
            ),
        ],
    )
    .await;

    // One byte below the limit is fine, and forwarded byte for byte.
    let just_below = png_of_size(FOUR_MIB - 1);
    let rec = accept(&gw, "4194303 bytes", &img(&just_below)).await;
    let part = rec.part("image").expect("image forwarded");
    assert_eq!(part.data.len(), FOUR_MIB - 1);
    assert!(part.data[..] == just_below[..], "forwarded unchanged");
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// mode check and transparency policy (image without mask)
// ---------------------------------------------------------------------------------------------

const MODE_RGB: &str = "Invalid input image - format must be in ['RGBA', 'LA', 'L'], got RGB.";

#[tokio::test]
async fn mode_and_transparency_under_strict() {
    let gw = Gateway::start().await;
    let img = |data: &[u8]| edit_request(data, "p");
    expect_rejections(
        &gw,
        vec![
            reject(
                "RGB without mask",
                img(&rgb_png(64)),
                Some("image"),
                "invalid_image_mode",
                exact(MODE_RGB),
            ),
            reject(
                "opaque RGBA",
                img(&rgba_png(64, false)),
                Some("image"),
                "image_not_transparent",
                prefix("Invalid input image"),
            ),
        ],
    )
    .await;
    // Transparent RGBA and LA pass.
    accept(&gw, "transparent RGBA", &img(&rgba_png(64, true))).await;
    accept(&gw, "transparent LA", &img(&gray_alpha_png(32))).await;
    still_serves(&gw).await;
}

#[tokio::test]
async fn mode_and_transparency_under_compatible() {
    let gw = compatible().await;
    let img = |data: &[u8]| edit_request(data, "p");
    // Only the mode check applies: nothing to edit, still forwarded, unchanged.
    for (name, data) in [
        ("opaque RGBA", rgba_png(64, false)),
        ("gray 8-bit without alpha", gray_png(32)),
    ] {
        let rec = accept(&gw, name, &img(&data)).await;
        assert!(
            rec.part("image").unwrap().data[..] == data[..],
            "{name}: forwarded unchanged"
        );
    }
    still_serves(&gw).await;
}

#[tokio::test]
async fn configured_max_image_bytes_shows_in_the_message() {
    // 1.5 MiB: "less than 1.5 MB".
    let limit = 3 * 512 * 1024;
    let gw = Gateway::start_with(move |c| c.validation.max_image_bytes = limit).await;
    let msg = "Uploaded image must be a PNG and less than 1.5 MB.";
    expect_rejections(
        &gw,
        vec![
            reject(
                "not a PNG",
                edit_request(&jfif_stub(), "p"),
                Some("image"),
                "invalid_image_format",
                exact(msg),
            ),
            reject(
                "mask at the configured limit",
                png_part(
                    edit_request(&rgba_png(64, true), "p"),
                    "mask",
                    &png_of_size(limit),
                ),
                Some("mask"),
                "invalid_image_format",
                exact("Uploaded mask must be a PNG and less than 1.5 MB."),
            ),
        ],
    )
    .await;
    accept(
        &gw,
        "one byte below",
        &edit_request(&png_of_size(limit - 1), "p"),
    )
    .await;
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// mask
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn mask_rules() {
    let gw = Gateway::start().await;
    // With a mask the image may be any type; the mask carries the alpha.
    let with_mask = |mask: &[u8]| png_part(edit_request(&rgb_png(64), "p"), "mask", mask);
    let mismatch = "Invalid mask image format - mask size does not match image size";
    let no_alpha = "Invalid mask image format - mask image missing alpha channel";
    expect_rejections(
        &gw,
        vec![
            reject(
                "mask 32x32 for a 64x64 image",
                with_mask(&rgba_png(32, true)),
                Some("mask"),
                "invalid_image_dimensions",
                prefix(mismatch),
            ),
            reject(
                "RGB mask",
                with_mask(&rgb_png(64)),
                Some("mask"),
                "invalid_image_mode",
                prefix(no_alpha),
            ),
            reject(
                "opaque RGBA mask",
                with_mask(&rgba_png(64, false)),
                Some("mask"),
                "image_not_transparent",
                prefix("Invalid mask image format"),
            ),
        ],
    )
    .await;
    let rec = accept(
        &gw,
        "RGB image + RGBA mask",
        &with_mask(&rgba_png(64, true)),
    )
    .await;
    assert_eq!(rec.field_names().last().map(String::as_str), Some("mask"));
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// order of checks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn order_of_checks() {
    // Across phases: the field rules and the end user before the image bytes. The order within
    // the form and within the PNG checks is `edit::form`'s and `edit::png_check`'s unit tests.
    let gw = Gateway::start().await;
    let cases = vec![
        reject(
            "field values before image bytes",
            edit_request(&jfif_stub(), "p").text("n", "abc"),
            Some("n"),
            "invalid_type",
            exact(
                "Invalid type for 'n': expected an integer, but got a string value that could not be converted into an integer.",
            ),
        ),
        reject(
            "user before image bytes",
            edit_request(&jfif_stub(), "p").text("user", "a\u{1}b"),
            Some("user"),
            "invalid_value",
            contains("control characters"),
        ),
        reject(
            "declared type before the bytes",
            Multipart::new().text("prompt", "p").file(
                "image",
                None,
                Some("image/jpeg"),
                &jfif_stub(),
            ),
            Some("image"),
            "unsupported_file_mimetype",
            exact(
                "Invalid file 'image': unsupported mimetype ('image/jpeg'). Supported file formats are 'image/png'.",
            ),
        ),
    ];
    expect_rejections(&gw, cases).await;
    still_serves(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// state after many rejections
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rejections_leave_no_state_behind() {
    // A per-client budget of 10 images a day. Requests refused by the field rules (before any
    // quota reservation) must not use it up.
    let gw = Gateway::start_with(|c| c.quotas.per_client.images_per_day = Some(10)).await;
    let img = rgba_png(32, true);
    let mut cases = Vec::new();
    for _ in 0..20 {
        cases.push(reject(
            "bad size",
            edit_request(&img, "p").text("size", "1X1").text("n", "10"),
            Some("size"),
            "invalid_value",
            prefix("Invalid value: '1X1'."),
        ));
        cases.push(reject(
            "bad user",
            edit_request(&img, "p")
                .text("n", "10")
                .text("user", "a\u{1}"),
            Some("user"),
            "invalid_value",
            contains("control characters"),
        ));
    }
    expect_rejections(&gw, cases).await;
    let rec = accept(&gw, "n=10 after 40 rejections", &valid().text("n", "10")).await;
    assert_eq!(rec.field("n").as_deref(), Some("10"));
    // Now the budget is really used up: the quota is live, not merely unconfigured.
    let over = gw.edit(APP_KEY, &valid()).await;
    assert_error(
        &over,
        429,
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    );
    assert_eq!(gw.mock.count(), 1);
}

/// A request refused by the PNG checks was already charged a quota reservation; the refund must
/// be complete by the time the caller has the 400, or the caller's next request is refused 429.
#[tokio::test]
async fn png_rejections_refund_their_reservation_before_answering() {
    let gw = Gateway::start_with(|c| c.quotas.per_client.images_per_day = Some(10)).await;
    let rgb = rgb_png(8);
    let cases = (0..1000)
        .map(|_| {
            reject(
                "RGB with n=10 against a budget of 10",
                edit_request(&rgb, "p").text("n", "10"),
                Some("image"),
                "invalid_image_mode",
                exact(MODE_RGB),
            )
        })
        .collect();
    // Each rejection is answered only after its refund: were one refund still pending, the
    // n=10 request below would be refused 429.
    expect_rejections(&gw, cases).await;
    accept(
        &gw,
        "n=10 after 1000 PNG rejections",
        &valid().text("n", "10"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Pillow modes of the other PNG types, tRNS normalization, 16-bit alpha
// ---------------------------------------------------------------------------------------------

/// RGB 8-bit whose tRNS colour (1, 2, 3) is used by pixel (0, 0) only.
fn rgb_trns_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Rgb,
        BitDepth::Eight,
        false,
        Some(vec![0, 1, 0, 2, 0, 3]),
        None,
        |x, y| {
            if x == 0 && y == 0 {
                vec![1, 2, 3]
            } else {
                vec![200, (x * 2) as u8, (y * 2) as u8]
            }
        },
    )
}

/// Gray 8-bit whose tRNS level 0 is used by pixel (0, 0) only.
fn gray_trns_png(side: u32) -> Vec<u8> {
    png_with(
        side,
        side,
        ColorType::Grayscale,
        BitDepth::Eight,
        false,
        Some(vec![0, 0]),
        None,
        |x, y| {
            vec![if x == 0 && y == 0 {
                0
            } else {
                100 + (x % 50) as u8
            }]
        },
    )
}

#[tokio::test]
async fn pillow_modes_and_trns_normalization() {
    let gw = Gateway::start().await;
    let img = |data: &[u8]| edit_request(data, "p");
    // 16-bit alpha below 256 counts as transparent (Pillow keeps the high byte).
    accept(&gw, "16-bit alpha 0x00FF", &img(&rgba16_alpha(16, 0x00FF))).await;

    // tRNS transparency is converted losslessly to RGBA of the same depth before forwarding.
    for (name, data, depth) in [
        ("RGB 8-bit + tRNS", rgb_trns_png(16), BitDepth::Eight),
        ("gray 8-bit + tRNS", gray_trns_png(16), BitDepth::Eight),
    ] {
        let rec = accept(&gw, name, &img(&data)).await;
        let fwd = decode(&rec.part("image").unwrap().data).expect("forwarded PNG decodes");
        assert_eq!(
            (fwd.color_type, fwd.bit_depth),
            (ColorType::Rgba, depth),
            "{name}"
        );
        assert_eq!((fwd.width, fwd.height), (16, 16), "{name}");
        let src = decode(&data).unwrap();
        let channels = src.color_type.samples();
        for (i, px) in fwd.data.chunks_exact(4).enumerate() {
            let s = &src.data[i * channels..(i + 1) * channels];
            let rgb: Vec<u8> = if channels == 1 {
                vec![s[0]; 3]
            } else {
                s.to_vec()
            };
            assert_eq!(&px[..3], &rgb[..], "{name}: pixel {i} colour kept");
            assert_eq!(
                px[3],
                if i == 0 { 0 } else { 255 },
                "{name}: pixel {i} alpha"
            );
        }
    }
    still_serves(&gw).await;
}

#[tokio::test]
async fn other_accepted_types_and_normalizations() {
    let gw = Gateway::start().await;
    let img = |data: &[u8]| edit_request(data, "p");
    // APNG: the default image is the image, later frames are ignored; forwarded as sent.
    let animated = apng(16, true, 255);
    let rec = accept(&gw, "APNG", &img(&animated)).await;
    assert!(rec.part("image").unwrap().data[..] == animated[..]);

    // Gray+alpha 16-bit (Pillow RGBA) passes the mode check.
    let la16 = png_with(
        16,
        16,
        ColorType::GrayscaleAlpha,
        BitDepth::Sixteen,
        false,
        None,
        None,
        |x, y| {
            let a: u16 = if x == 0 && y == 0 { 0 } else { 0xFFFF };
            [((x * 4000 + y) as u16), a]
                .iter()
                .flat_map(|v| v.to_be_bytes())
                .collect()
        },
    );
    accept(&gw, "gray+alpha 16-bit", &img(&la16)).await;

    // 16-bit tRNS transparency becomes 16-bit RGBA (lossless conversion keeps the depth).
    let rgb16_trns = png_with(
        16,
        16,
        ColorType::Rgb,
        BitDepth::Sixteen,
        false,
        Some(vec![0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC]),
        None,
        |x, y| {
            if x == 0 && y == 0 {
                vec![0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC]
            } else {
                [1000u16 + x as u16, 2000 + y as u16, 3000]
                    .iter()
                    .flat_map(|v| v.to_be_bytes())
                    .collect()
            }
        },
    );
    let rec = accept(&gw, "RGB 16-bit + tRNS", &img(&rgb16_trns)).await;
    let fwd = decode(&rec.part("image").unwrap().data).expect("forwarded PNG decodes");
    assert_eq!(
        (fwd.color_type, fwd.bit_depth),
        (ColorType::Rgba, BitDepth::Sixteen)
    );
    assert_eq!(
        &fwd.data[..8],
        &[0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0, 0],
        "pixel (0,0) transparent, colour kept"
    );
    assert_eq!(
        &fwd.data[8..16],
        &[0x03, 0xE9, 0x07, 0xD0, 0x0B, 0xB8, 0xFF, 0xFF],
        "pixel (1,0) opaque, colour kept"
    );

    // A palette mask whose transparency comes from tRNS is accepted and forwarded as RGBA.
    let palette_mask = png_with(
        16,
        16,
        ColorType::Indexed,
        BitDepth::Eight,
        false,
        Some(vec![0, 255]),
        Some(vec![0, 0, 0, 255, 255, 255]),
        |x, y| vec![u8::from(x > 2 || y > 2)],
    );
    let rec = accept(
        &gw,
        "RGB image + palette/tRNS mask",
        &png_part(img(&rgb_png(16)), "mask", &palette_mask),
    )
    .await;
    let mask = decode(&rec.part("mask").unwrap().data).expect("forwarded mask decodes");
    assert_eq!(
        (mask.color_type, mask.bit_depth),
        (ColorType::Rgba, BitDepth::Eight)
    );
    assert_eq!(mask.data[3], 0, "mask pixel (0,0) is transparent");
    assert_eq!(
        mask.data[16 * 4 * 15 + 4 * 15 + 3],
        255,
        "mask pixel (15,15) is kept"
    );
    still_serves(&gw).await;
}
