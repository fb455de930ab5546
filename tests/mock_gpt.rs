//! The mock upstream's GPT-image answers (§4 JSON, §5 SSE), read back with imagegate's own
//! answer scanners and priced with its §7 prices.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use imagegate::answer::{JsonAnswerScanner, SseScanner, StreamEnd};
use imagegate::pricing::{TokenPrices, cost_micros, cost_micros_sum};
use support::mock_upstream::{
    Behavior, GPT_STREAM_EVENT_COST_MICROS, MockUpstream, gpt_json_cost_micros,
};
use support::multipart::{Multipart, edit_request};
use tokio::net::TcpStream;

/// What a raw client got: status, content type, the body chunks as they came, and whether the
/// body ended with an error.
struct Got {
    status: u16,
    content_type: String,
    chunks: Vec<Bytes>,
    broken: bool,
}

impl Got {
    fn body(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

async fn post(mock: &MockUpstream, content_type: &str, body: Vec<u8>) -> Got {
    let stream = TcpStream::connect(mock.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post("/v1/images/edits")
        .header("host", mock.addr().to_string())
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    let mut broken = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    chunks.push(d);
                }
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    driver.abort();
    Got {
        status,
        content_type,
        chunks,
        broken,
    }
}

async fn post_form(mock: &MockUpstream, form: &Multipart) -> Got {
    post(mock, &form.content_type(), form.body()).await
}

fn gpt_form(extra: &[(&str, &str)]) -> Multipart {
    let mut form =
        edit_request(&support::fixtures::rgba_png(4, true), "a hat").text("model", "gpt-image-2");
    for (k, v) in extra {
        form = form.text(k, v);
    }
    form
}

fn scan_sse(got: &Got) -> imagegate::answer::SseOutcome {
    let mut s = SseScanner::default();
    for c in &got.chunks {
        s.feed(c);
    }
    s.finish()
}

#[tokio::test]
async fn default_answers_gpt_models_with_json_and_usage() {
    let mock = MockUpstream::start().await;
    let got = post_form(&mock, &gpt_form(&[("n", "3"), ("quality", "low")])).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.content_type, "application/json");
    let v: serde_json::Value = serde_json::from_slice(&got.body()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert!(v["data"][0]["b64_json"].is_string());
    assert_eq!(v["quality"], "low");
    assert_eq!(v["size"], "1536x1024");
    assert_eq!(v["background"], "opaque");
    assert_eq!(v["output_format"], "png");
    assert!(v.get("url").is_none());

    let mut s = JsonAnswerScanner::new();
    for c in &got.chunks {
        s.feed(c);
    }
    let a = s.finish();
    assert_eq!(a.items, 3);
    assert!(a.complete);
    let usage = a.usage.unwrap().unwrap();
    assert_eq!(
        cost_micros(&usage, &TokenPrices::gpt_image_2()).unwrap(),
        gpt_json_cost_micros(3)
    );
    assert_eq!(gpt_json_cost_micros(1), 68_300);
    // The request was recorded as multipart.
    assert_eq!(
        mock.last().unwrap().param("model").as_deref(),
        Some("gpt-image-2")
    );
}

#[tokio::test]
async fn default_still_answers_dalle_as_before() {
    let mock = MockUpstream::start().await;
    let form = edit_request(&support::fixtures::rgba_png(4, true), "a hat").text("n", "2");
    let got = post_form(&mock, &form).await;
    let v: serde_json::Value = serde_json::from_slice(&got.body()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(v["data"][0]["url"].is_string());
    assert!(v.get("usage").is_none());
}

#[tokio::test]
async fn json_requests_are_recorded_and_answered() {
    let mock = MockUpstream::start().await;
    let body = serde_json::json!({
        "model": "gpt-image-2.6-flare", "prompt": "hat", "n": 2, "stream": true,
        "partial_images": 2, "quality": "high", "user": "u-1",
        "images": [{"image_url": "https://example.com/cat.png"}]
    });
    let got = post(&mock, "application/json", body.to_string().into_bytes()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.content_type, "text/event-stream");
    assert!(got.chunks.len() > 4, "sent in pieces: {}", got.chunks.len());
    let rec = mock.last().unwrap();
    assert!(rec.parts.is_empty());
    assert_eq!(
        rec.json.as_ref().unwrap()["images"][0]["image_url"],
        "https://example.com/cat.png"
    );
    assert_eq!(rec.param("n").as_deref(), Some("2"));
    assert_eq!(rec.param("stream").as_deref(), Some("true"));

    let o = scan_sse(&got);
    assert_eq!(o.end, StreamEnd::Complete);
    assert_eq!(o.summary.partial_images, 2);
    assert_eq!(o.summary.completed, 2);
    assert_eq!(
        cost_micros_sum(&o.summary.usages, &TokenPrices::gpt_image_2_6()).unwrap(),
        2 * GPT_STREAM_EVENT_COST_MICROS
    );
    let text = String::from_utf8(got.body()).unwrap();
    assert!(text.contains("\"safety_identifier\":\"u-1\""), "{text}");
    assert!(!text.contains("[DONE]"));

    // Not JSON at all: recorded all the same, answered as dall-e-2.
    let got = post(&mock, "application/json", b"{nope".to_vec()).await;
    assert_eq!(got.status, 200);
    let rec = mock.last().unwrap();
    assert!(rec.json.is_none());
    assert_eq!(&rec.body[..], b"{nope");
}

#[tokio::test]
async fn stream_field_in_multipart_chooses_sse() {
    let mock = MockUpstream::start().await;
    let got = post_form(
        &mock,
        &gpt_form(&[("stream", "true"), ("partial_images", "3")]),
    )
    .await;
    assert_eq!(got.content_type, "text/event-stream");
    let o = scan_sse(&got);
    assert_eq!(o.end, StreamEnd::Complete);
    assert_eq!((o.summary.partial_images, o.summary.completed), (3, 1));
    assert_eq!(o.summary.usages.len(), 1);
}

#[tokio::test]
async fn explicit_gpt_behaviours() {
    let mock = MockUpstream::start().await;
    let plain = edit_request(&support::fixtures::rgba_png(4, true), "a hat");

    mock.set_behavior(Behavior::GptJsonNoUsage);
    let got = post_form(&mock, &plain).await;
    let mut s = JsonAnswerScanner::new();
    s.feed(&got.body());
    let a = s.finish();
    assert_eq!((a.items, a.usage.is_none(), a.complete), (1, true, true));

    mock.set_behavior(Behavior::GptStreamNoUsage);
    let got = post_form(&mock, &plain.clone().text("n", "2")).await;
    let o = scan_sse(&got);
    assert_eq!(o.end, StreamEnd::Complete);
    assert_eq!(o.summary.completed, 2);
    assert_eq!(o.summary.completed_without_usage, 2);

    mock.set_behavior(Behavior::GptStreamBroken);
    let got = post_form(&mock, &plain.clone().text("partial_images", "1")).await;
    assert_eq!(got.status, 200);
    assert!(got.broken, "the body must fail");
    let o = scan_sse(&got);
    assert_eq!(o.end, StreamEnd::MidEvent);
    assert!(o.end.needs_error_event());
    assert_eq!((o.summary.partial_images, o.summary.completed), (1, 0));

    mock.set_behavior(Behavior::GptJson);
    let got = post_form(
        &mock,
        &plain
            .clone()
            .text("size", "1024x1024")
            .text("background", "transparent")
            .text("output_format", "webp")
            .text("safety_identifier", "sid"),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&got.body()).unwrap();
    assert_eq!(v["size"], "1024x1024");
    assert_eq!(v["background"], "transparent");
    assert_eq!(v["output_format"], "webp");
    assert_eq!(v["quality"], "high");
    assert_eq!(v["safety_identifier"], "sid");
    assert_eq!(v["usage"]["output_tokens"], 2000);
}
