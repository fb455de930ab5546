//! The dall-e-2 gateway's path: `Content-Type` → boundary, the capped multipart framing, then
//! the field rules. Input: the header value, `\n`, the body.
//!
//! Invariant: the canonical body built from an accepted edit (what goes upstream) is accepted
//! again as the same edit.
#![no_main]

use bytes::Bytes;
use imagegate::edit::{ImageEdit, canonical, form};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, body) = imagegate_fuzz::split_line(data);
    let header = http::HeaderValue::from_bytes(head).ok();
    // A refused content type ends the request; the body is still framed with a fixed boundary
    // so that every input reaches the parser.
    let boundary = form::boundary(header.as_ref()).unwrap_or_else(|_| "b".to_owned());
    let rules = imagegate_fuzz::form_rules();
    let body = Bytes::copy_from_slice(body);
    let Ok(edit) = imagegate_fuzz::block_on(form::parse(&boundary, body, &rules)) else {
        return;
    };
    let out = canonical::encode(
        &edit,
        edit.image.bytes.clone(),
        edit.mask.as_ref().map(|m| m.bytes.clone()),
    );
    let again = imagegate_fuzz::block_on(form::parse(
        &out.boundary,
        Bytes::from(out.body.to_vec()),
        &rules,
    ))
    .unwrap_or_else(|e| panic!("the canonical body of an accepted edit is refused: {e:?}"));
    assert_eq!(
        fields(&edit),
        fields(&again),
        "the canonical body changed the edit"
    );
});

type Fields<'a> = (
    &'a str,
    &'a str,
    u8,
    &'static str,
    &'static str,
    Option<&'a str>,
    &'a [u8],
    Option<&'a [u8]>,
);

fn fields(e: &ImageEdit) -> Fields<'_> {
    (
        &e.prompt,
        &e.model,
        e.n,
        e.size.as_str(),
        e.response_format.as_str(),
        e.user.as_deref(),
        &e.image.bytes,
        e.mask.as_ref().map(|m| &m.bytes[..]),
    )
}
