//! The gpt-image gateway's path (`edits::admit`): `Content-Type` → JSON or multipart, the
//! uncapped framing, the profile chosen by `model` (dall-e-2 rules with their 64 KiB text cap,
//! or the gpt-image rules), then the structure check of each uploaded file, mask and markup.
//! Input: the header value, `\n`, the body.
//!
//! Invariant: the canonical body built from an accepted gpt-image edit (what goes upstream, as
//! multipart or JSON like the request) is accepted again as the same edit.
#![no_main]

use bytes::Bytes;
use imagegate::edit::files::{self, ImageInfo};
use imagegate::edit::gpt::{self, Encoding, GptEdit};
use imagegate::edit::{form, gpt::multipart};
use imagegate::edits::gpt::{Body, body_kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, body) = imagegate_fuzz::split_line(data);
    let header = http::HeaderValue::from_bytes(head).ok();
    let models = imagegate_fuzz::FuzzModels::new();
    let limits = imagegate_fuzz::gpt_limits();
    let body = Bytes::copy_from_slice(body);
    let edit = match body_kind(header.as_ref()) {
        Ok(Body::Json) => gpt::json::parse_json(&body, &models, &limits).ok(),
        Ok(Body::Multipart(boundary)) => multipart_edit(&boundary, body, &models, &limits),
        // Refused content type: frame the body anyway with a fixed boundary.
        Err(_) => multipart_edit("b", body, &models, &limits),
    };
    if let Some(edit) = edit {
        round_trip(&edit, &models, &limits);
        check_files(&edit);
    }
});

fn multipart_edit(
    boundary: &str,
    body: Bytes,
    models: &imagegate_fuzz::FuzzModels,
    limits: &gpt::GptLimits,
) -> Option<GptEdit> {
    let rules = imagegate_fuzz::form_rules();
    let max = rules.max_parts.max(multipart::max_parts(limits));
    let parts = imagegate_fuzz::block_on(form::parse_parts_uncapped(boundary, body, max)).ok()?;
    if form::text_field(&parts, "model").as_deref() == Some("dall-e-2") {
        // The dall-e-2 profile: its 64 KiB text cap, then its field rules.
        if form::check_text_part_sizes(&parts).is_ok() {
            let _ = form::check(parts, &rules);
        }
        return None;
    }
    multipart::check_multipart(parts, models, limits).ok()
}

fn round_trip(edit: &GptEdit, models: &imagegate_fuzz::FuzzModels, limits: &gpt::GptLimits) {
    let again = match edit.encoding {
        Encoding::Multipart => {
            let out = gpt::canonical::multipart(edit);
            imagegate_fuzz::block_on(multipart::parse_multipart(
                &out.boundary,
                Bytes::from(out.body.to_vec()),
                models,
                limits,
            ))
        }
        Encoding::Json => gpt::json::parse_json(&gpt::canonical::json(edit), models, limits),
    }
    .unwrap_or_else(|e| panic!("the canonical body of an accepted edit is refused: {e:?}"));
    assert_eq!(edit, &again, "the canonical body changed the edit");
}

/// The check-files phase on what the gateway holds.
fn check_files(edit: &GptEdit) {
    let rules = imagegate_fuzz::file_rules();
    let count = edit.images.len();
    let mut first: Option<ImageInfo> = None;
    for (i, image) in edit.images.iter().enumerate() {
        if let (Some(bytes), Some(format)) = (image.bytes(), image.format())
            && let Ok(info) = files::check_image(i, count, bytes, format, &rules)
            && i == 0
        {
            first = Some(info);
        }
    }
    let Some(first) = first else { return };
    if let Some(bytes) = edit.mask.as_ref().and_then(|m| m.bytes()) {
        let _ = files::check_mask(bytes.clone(), &first, &rules);
    }
    if let Some(bytes) = edit.markup.as_ref().and_then(|m| m.bytes()) {
        let _ = files::check_markup(bytes, &first, &rules);
    }
}
