//! The gpt-image profile end to end: real server on 127.0.0.1:0, mock upstream answering as the
//! GPT image models do (JSON with `usage`, or an event stream).

mod support;

use support::fixtures::*;
use support::gateway::*;
use support::mock_upstream::{Behavior, gpt_json_cost_micros};
use support::multipart::Multipart;

fn form(image: &[u8]) -> Multipart {
    Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", "a hat on the cat")
        .file("image", Some("cat.png"), Some("image/png"), image)
}

#[tokio::test]
async fn a_png_edit_is_forwarded_and_charged_its_usage() {
    let gw = Gateway::start_with(gpt).await;
    let resp = gw
        .edit(APP_KEY, &form(&rgba_png(64, true)).text("user", "u-1"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 1);
    let sent = gw.mock.last().expect("forwarded");
    assert_eq!(sent.field("model").as_deref(), Some("gpt-image-2"));
    let image = sent.part("image").expect("image part");
    assert_eq!(image.content_type.as_deref(), Some("image/png"));
    assert_eq!(
        sent.header("authorization").as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    let r = gw.record_of(&resp);
    assert_eq!(r.outcome.as_str(), "answered");
    assert_eq!(r.model.as_deref(), Some("gpt-image-2"));
    assert_eq!(r.input_images, Some(1));
    assert_eq!(r.images_returned, Some(1));
    assert_eq!(r.cost_basis, Some(imagegate::ledger::CostBasis::Usage));
    assert_eq!(r.cost_settled_micros, gpt_json_cost_micros(1) as i64);
    assert!(r.cost_reserved_micros >= r.cost_settled_micros, "{r:?}");
    assert_eq!(r.input_tokens, Some(1060));
}

#[tokio::test]
async fn a_missing_model_is_written_as_the_default() {
    let gw = Gateway::start_with(gpt).await;
    let f = Multipart::new().text("prompt", "p").file(
        "image",
        Some("x.png"),
        None,
        &rgba_png(32, false),
    );
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        gw.mock.last().unwrap().field("model").as_deref(),
        Some("gpt-image-2")
    );
}

#[tokio::test]
async fn a_retired_model_is_answered_locally() {
    let gw = Gateway::start_with(gpt).await;
    for model in ["dall-e-2", "gpt-image-1", "gpt-image-1.5"] {
        let f = Multipart::new()
            .text("model", model)
            .text("prompt", "p")
            .file(
                "image",
                Some("x.png"),
                Some("image/png"),
                &rgba_png(32, true),
            );
        let resp = gw.edit(APP_KEY, &f).await;
        let msg = assert_error(
            &resp,
            400,
            "image_generation_user_error",
            Some("model"),
            Some("invalid_value"),
        );
        assert_eq!(msg, format!("The model '{model}' does not exist."));
    }
    assert_eq!(gw.mock.count(), 0, "nothing went upstream");
}

#[tokio::test]
async fn raw_jpeg_and_webp_bytes_are_retyped_and_sixteen_images_pass() {
    let gw = Gateway::start_with(gpt).await;
    let mut f = Multipart::new()
        .text("model", "gpt-image-2.5-flare")
        .text("prompt", "collage");
    for i in 0..16 {
        let bytes = match i % 3 {
            0 => jpeg(48, 32),
            1 => webp_lossless(40, 40),
            _ => rgba_png(24, false),
        };
        f = f.file(
            "image[]",
            Some("upload"),
            Some("application/octet-stream"),
            &bytes,
        );
    }
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let sent = gw.mock.last().unwrap();
    let types: Vec<_> = sent
        .parts
        .iter()
        .filter(|p| p.name == "image[]")
        .map(|p| p.content_type.clone().unwrap_or_default())
        .collect();
    assert_eq!(types.len(), 16);
    assert_eq!(types[0], "image/jpeg");
    assert_eq!(types[1], "image/webp");
    assert_eq!(types[2], "image/png");

    let resp = gw
        .edit(
            APP_KEY,
            &f.file("image[]", Some("upload"), None, &jpeg(16, 16)),
        )
        .await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("image"),
        Some("array_above_max_length"),
    );
    assert!(msg.contains("maximum length 16"), "{msg}");
}

#[tokio::test]
async fn a_truncated_jpeg_is_refused_before_any_upstream_call() {
    let gw = Gateway::start_with(gpt).await;
    let mut bytes = jpeg(64, 64);
    bytes.truncate(bytes.len() - 10);
    let f = Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", "p")
        .file("image", Some("a.jpg"), Some("image/jpeg"), &bytes);
    let resp = gw.edit(APP_KEY, &f).await;
    let msg = assert_error(
        &resp,
        400,
        "image_generation_user_error",
        Some("image"),
        Some("invalid_image_file"),
    );
    assert!(
        msg.starts_with("Invalid image file or mode for image 1"),
        "{msg}"
    );
    assert_eq!(gw.mock.count(), 0);
    let r = gw.record_of(&resp);
    assert_eq!(r.outcome.as_str(), "rejected");
    assert_eq!(r.cost_settled_micros, 0);
}

#[tokio::test]
async fn response_format_is_an_unknown_parameter() {
    let gw = Gateway::start_with(gpt).await;
    let resp = gw
        .edit(
            APP_KEY,
            &form(&rgba_png(32, true)).text("response_format", "url"),
        )
        .await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("response_format"),
        Some("unknown_parameter"),
    );
    assert_eq!(msg, "Unknown parameter: 'response_format'.");
}

#[tokio::test]
async fn a_stream_is_relayed_event_by_event_and_charged_its_usage() {
    let gw = Gateway::start_with(gpt).await;
    let f = form(&rgba_png(32, true))
        .text("stream", "true")
        .text("partial_images", "2");
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text();
    assert_eq!(
        text.matches("event: image_edit.partial_image").count(),
        2,
        "{text}"
    );
    assert_eq!(
        text.matches("event: image_edit.completed").count(),
        1,
        "{text}"
    );
    assert!(!text.contains("event: error"), "{text}");
    let r = gw.record_of(&resp);
    assert_eq!(r.outcome.as_str(), "answered");
    assert_eq!(r.stream, Some(true));
    assert_eq!(r.cost_basis, Some(imagegate::ledger::CostBasis::Usage));
    assert_eq!(
        r.cost_settled_micros,
        support::mock_upstream::GPT_STREAM_EVENT_COST_MICROS as i64
    );
}

#[tokio::test]
async fn a_stream_that_breaks_ends_with_an_error_event_and_is_charged_the_reservation() {
    let gw = Gateway::start_with(gpt).await;
    gw.mock.set_behavior(Behavior::GptStreamBroken);
    let f = form(&rgba_png(32, true)).text("stream", "true");
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200);
    let text = resp.text();
    assert!(
        text.ends_with("event: error\ndata: {\"type\":\"error\",\"error\":{\"message\":\"The upstream stream ended before the image was completed.\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_incomplete\"}}\n\n"),
        "{text}"
    );
    let r = gw.record_of(&resp);
    assert_eq!(r.outcome.as_str(), "upstream_error");
    assert_eq!(r.cost_basis, Some(imagegate::ledger::CostBasis::Estimated));
    assert_eq!(r.cost_settled_micros, r.cost_reserved_micros);
}

#[tokio::test]
async fn a_json_body_with_a_data_url_and_a_file_id_is_forwarded_as_json() {
    let gw = Gateway::start_with(gpt).await;
    let png = rgba_png(32, true);
    let data_url = format!(
        "data:image/png;base64,{}",
        support::mock_upstream::base64(&png)
    );
    let body = serde_json::json!({
        "model": "gpt-image-2.6-sunburst",
        "prompt": "p",
        "images": [{"image_url": data_url}, {"file_id": "file-abc123"}],
        "quality": "max",
        "size": "1536x1024",
    });
    let resp = gw
        .edit_raw(
            APP_KEY,
            "application/json",
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let sent = gw.mock.last().unwrap();
    let json = sent.json.expect("a JSON body went upstream");
    assert_eq!(json["model"], "gpt-image-2.6-sunburst");
    assert_eq!(json["images"][1]["file_id"], "file-abc123");
    assert_eq!(json["images"][0]["image_url"], data_url.as_str());
    assert_eq!(gw.record_of(&resp).input_images, Some(2));
}

#[tokio::test]
async fn a_mask_of_another_size_is_refused() {
    let gw = Gateway::start_with(gpt).await;
    let f = form(&rgba_png(64, false)).file(
        "mask",
        Some("m.png"),
        Some("image/png"),
        &rgba_png(32, true),
    );
    let resp = gw.edit(APP_KEY, &f).await;
    let msg = assert_error(
        &resp,
        400,
        "image_generation_user_error",
        Some("mask"),
        Some("invalid_mask_image_format"),
    );
    assert_eq!(
        msg,
        "Invalid mask image format - mask size does not match image size"
    );
}

#[tokio::test]
async fn every_live_model_is_served() {
    let gw = Gateway::start_with(gpt).await;
    for model in [
        "gpt-image-2",
        "gpt-image-2-2026-04-21",
        "gpt-image-2.5-flare",
        "gpt-image-2.5-flare-2026-09-08",
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-sunburst-2026-09-08",
        "gpt-image-2.6-flare",
        "gpt-image-2.6-sunburst",
    ] {
        let f = Multipart::new()
            .text("model", model)
            .text("prompt", "p")
            .file(
                "image",
                Some("x.png"),
                Some("image/png"),
                &rgba_png(32, true),
            );
        let resp = gw.edit(APP_KEY, &f).await;
        assert_eq!(resp.status, 200, "{model}: {}", resp.text());
        assert_eq!(
            gw.mock.last().unwrap().field("model").as_deref(),
            Some(model)
        );
        assert_eq!(gw.record_of(&resp).model.as_deref(), Some(model));
    }
}

#[tokio::test]
async fn quality_values_follow_the_family() {
    let gw = Gateway::start_with(gpt).await;
    let with = |model: &str, quality: &str| {
        Multipart::new()
            .text("model", model)
            .text("prompt", "p")
            .text("quality", quality)
            .file(
                "image",
                Some("x.png"),
                Some("image/png"),
                &rgba_png(32, true),
            )
    };
    let resp = gw.edit(APP_KEY, &with("gpt-image-2", "max")).await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("quality"),
        Some("invalid_value"),
    );
    assert_eq!(
        msg,
        "Invalid value: 'max'. Supported values are: 'low', 'medium', 'high', and 'auto'."
    );
    let resp = gw.edit(APP_KEY, &with("gpt-image-2.5-flare", "max")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test]
async fn sizes_at_each_bound() {
    let gw = Gateway::start_with(gpt).await;
    let with = |size: &str| form(&rgba_png(32, true)).text("size", size);
    for ok in ["auto", "1024x640", "3840x2160", "2160x3840", "3840x1280"] {
        let resp = gw.edit(APP_KEY, &with(ok)).await;
        assert_eq!(resp.status, 200, "{ok}: {}", resp.text());
        assert_eq!(gw.mock.last().unwrap().field("size").as_deref(), Some(ok));
    }
    for (bad, message) in [
        (
            "bogus",
            "Invalid size 'bogus'. Expected WIDTHxHEIGHT, for example '1824x1024'.",
        ),
        (
            "1792x936",
            "Invalid size '1792x936'. Width and height must both be divisible by 16.",
        ),
        (
            "4096x1024",
            "Invalid size '4096x1024'. Width and height must be at most 3840 pixels.",
        ),
        (
            "3840x1024",
            "Invalid size '3840x1024'. The aspect ratio must be between 1:3 and 3:1.",
        ),
        (
            "768x768",
            "Requested resolution is below the current minimum pixel budget.",
        ),
    ] {
        let resp = gw.edit(APP_KEY, &with(bad)).await;
        let msg = assert_error(
            &resp,
            400,
            "image_generation_user_error",
            Some("size"),
            Some("invalid_value"),
        );
        assert_eq!(msg, message, "{bad}");
    }
}

#[tokio::test]
async fn a_mask_and_a_markup_pass_and_their_faults_are_named() {
    let gw = Gateway::start_with(gpt).await;
    // A mask of the first image's size, with alpha.
    let f = form(&rgba_png(64, false)).file("mask", Some("m.png"), None, &rgba_png(64, true));
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let sent = gw.mock.last().unwrap();
    assert_eq!(
        sent.part("mask").unwrap().content_type.as_deref(),
        Some("image/png")
    );
    let r = gw.record_of(&resp);
    assert!(r.mask_sha256.is_some() && r.mask_width == Some(64), "{r:?}");

    // A markup with transparent pixels, then a fully opaque one.
    let f = form(&rgba_png(64, false)).file("markup", Some("k.png"), None, &rgba_png(64, true));
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(gw.mock.last().unwrap().part("markup").is_some());
    let f = form(&rgba_png(64, false)).file("markup", Some("k.png"), None, &rgba_png(64, false));
    let resp = gw.edit(APP_KEY, &f).await;
    let msg = assert_error(
        &resp,
        400,
        "image_generation_user_error",
        Some("markup"),
        Some("invalid_markup_image_format"),
    );
    assert_eq!(
        msg,
        "Invalid markup image - markup image must contain transparent pixels"
    );

    // A mask without alpha.
    let f = form(&rgba_png(64, false)).file("mask", Some("m.png"), None, &rgb_png(64));
    let resp = gw.edit(APP_KEY, &f).await;
    let msg = assert_error(
        &resp,
        400,
        "image_generation_user_error",
        Some("mask"),
        Some("invalid_mask_image_format"),
    );
    assert_eq!(
        msg,
        "Invalid mask image format - mask image missing alpha channel"
    );
}

#[tokio::test]
async fn a_gif_is_refused_naming_its_real_type() {
    let gw = Gateway::start_with(gpt).await;
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let f = Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", "p")
        .file("image", Some("a.png"), Some("image/png"), &gif);
    let resp = gw.edit(APP_KEY, &f).await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("image"),
        Some("unsupported_file_mimetype"),
    );
    assert_eq!(
        msg,
        "Invalid file 'image': unsupported mimetype ('image/gif'). Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'."
    );
    assert_eq!(gw.mock.count(), 0);
}

#[tokio::test]
async fn the_dall_e_2_profile_still_serves_its_ids_next_to_gpt_image() {
    let gw = Gateway::start_with(|c| {
        gpt(c);
        c.validation.models = vec!["dall-e-2".into()];
    })
    .await;
    let f = Multipart::new()
        .text("model", "dall-e-2")
        .text("prompt", "p")
        .file("image", Some("x.png"), None, &rgba_png(64, true));
    let resp = gw.edit(APP_KEY, &f).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let sent = gw.mock.last().unwrap();
    assert_eq!(
        sent.field("response_format").as_deref(),
        Some("url"),
        "dall-e-2 defaults written"
    );
    assert_eq!(
        gw.record_of(&resp).cost_basis,
        Some(imagegate::ledger::CostBasis::PerImage)
    );
}

/// A `prompt` or `user` over 64 KiB gets the field's own length error, as a long value under
/// 64 KiB does (not a framing error), and nothing is forwarded.
#[tokio::test]
async fn a_prompt_or_user_over_64_kib_gets_its_length_error() {
    let gw = Gateway::start_with(gpt).await;
    let img = rgba_png(32, true);
    let long_prompt = Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", &"p".repeat(70_000))
        .file("image", Some("x.png"), Some("image/png"), &img);
    let resp = gw.edit(APP_KEY, &long_prompt).await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("prompt"),
        Some("string_above_max_length"),
    );
    assert!(msg.contains("but got a string with length 70000"), "{msg}");
    let resp = gw
        .edit(APP_KEY, &form(&img).text("user", &"u".repeat(70_000)))
        .await;
    let msg = assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("user"),
        Some("string_above_max_length"),
    );
    assert!(msg.contains("length 70000"), "{msg}");
    assert_eq!(gw.mock.count(), 0, "nothing forwarded");
}
