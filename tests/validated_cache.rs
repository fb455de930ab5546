//! The validated-image cache end to end (`[cache]`): the same file sent again is accepted
//! without a second check (counted as a hit), a refused file is checked again every time, the
//! mask's size is compared with each request's image even when the mask is known, and 0 turns
//! the cache off.

mod support;

use support::fixtures::*;
use support::gateway::*;
use support::multipart::{Multipart, edit_request};

fn with_mask(image: &[u8], mask: &[u8]) -> Multipart {
    edit_request(image, "a hat").file("mask", Some("mask.png"), Some("image/png"), mask)
}

fn hits_misses(gw: &Gateway) -> (u64, u64) {
    let c = &gw.server.state.validated;
    (c.hits(), c.misses())
}

#[tokio::test]
async fn the_same_image_sent_twice_is_accepted_twice_and_checked_once() {
    let gw = Gateway::start().await;
    let image = rgba_png_noisy(256);
    for (i, prompt) in ["a hat", "a scarf"].into_iter().enumerate() {
        let resp = gw.edit(APP_KEY, &edit_request(&image, prompt)).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert_eq!(hits_misses(&gw), (1, 1));
    assert_eq!(gw.mock.count(), 2);
    // The ledger still records the digest and the dimensions on a hit.
    let last = gw.mock.received().len();
    assert_eq!(last, 2);
    let resp = gw.edit(APP_KEY, &edit_request(&image, "a cap")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = gw.record_of(&resp);
    assert_eq!((r.image_width, r.image_height), (Some(256), Some(256)));
    assert_eq!(r.image_sha256.map(|s| s.len()), Some(64));
    assert_eq!(hits_misses(&gw), (2, 1));
}

#[tokio::test]
async fn a_corrupt_image_is_refused_every_time_and_never_cached() {
    let gw = Gateway::start().await;
    let corrupt = with_bad_crc(&rgba_png(64, true));
    for i in 0..3 {
        let resp = gw.edit(APP_KEY, &edit_request(&corrupt, "p")).await;
        assert_eq!(resp.status, 400, "request {i}: {}", resp.text());
    }
    assert_eq!(hits_misses(&gw), (0, 3));
    assert!(gw.server.state.validated.is_empty());
    assert_eq!(gw.mock.count(), 0);
}

#[tokio::test]
async fn a_known_mask_is_still_compared_with_each_image() {
    let gw = Gateway::start().await;
    let mask = rgba_png(64, true);
    let resp = gw
        .edit(APP_KEY, &with_mask(&rgba_png(64, false), &mask))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(hits_misses(&gw), (0, 2));
    // The mask is a hit, but this image is 32x32.
    let resp = gw
        .edit(APP_KEY, &with_mask(&rgba_png(32, false), &mask))
        .await;
    assert_error(
        &resp,
        400,
        "invalid_request_error",
        Some("mask"),
        Some("invalid_image_dimensions"),
    );
    assert_eq!(hits_misses(&gw), (1, 3));
    assert_eq!(gw.mock.count(), 1);
}

#[tokio::test]
async fn other_rules_do_not_share_entries() {
    // An image checked with a mask (fewer rules) is not known valid without one.
    let gw = Gateway::start().await;
    let image = rgba_png(64, false);
    let resp = gw
        .edit(APP_KEY, &with_mask(&image, &rgba_png(64, true)))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = gw.edit(APP_KEY, &edit_request(&image, "p")).await;
    assert_eq!(resp.status, 400, "no transparent pixel: {}", resp.text());
    assert_eq!(hits_misses(&gw).0, 0);
}

#[tokio::test]
async fn zero_entries_turn_the_cache_off() {
    let gw = Gateway::start_with(|c| c.cache.validated_images_max_entries = 0).await;
    let image = rgba_png(64, true);
    for _ in 0..2 {
        let resp = gw.edit(APP_KEY, &edit_request(&image, "p")).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(hits_misses(&gw), (0, 0));
    assert!(!gw.server.state.validated.is_on());
}

#[tokio::test]
async fn gpt_image_first_image_and_mask_are_cached() {
    let gw = Gateway::start_with(gpt).await;
    let form = || {
        Multipart::new()
            .text("model", "gpt-image-2")
            .text("prompt", "a hat on the cat")
            .file(
                "image",
                Some("cat.png"),
                Some("image/png"),
                &rgba_png(64, false),
            )
            .file(
                "mask",
                Some("m.png"),
                Some("image/png"),
                &rgba_png(64, true),
            )
    };
    for i in 0..2 {
        let resp = gw.edit(APP_KEY, &form()).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert_eq!(hits_misses(&gw), (2, 2));
    let r = gw.record_of(&gw.edit(APP_KEY, &form()).await);
    assert_eq!((r.mask_width, r.mask_height), (Some(64), Some(64)));
    // The cached mask against an image of another size: refused.
    let f = Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", "p")
        .file(
            "image",
            Some("cat.png"),
            Some("image/png"),
            &rgba_png(32, false),
        )
        .file(
            "mask",
            Some("m.png"),
            Some("image/png"),
            &rgba_png(64, true),
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
