//! The dall-e-2 gateway's path: `Content-Type` → boundary, the capped multipart framing, then
//! the field rules. Input: the header value, `\n`, the body.
#![no_main]

use bytes::Bytes;
use imagegate::edit::form;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, body) = imagegate_fuzz::split_line(data);
    let header = http::HeaderValue::from_bytes(head).ok();
    // A refused content type ends the request; the body is still framed with a fixed boundary
    // so that every input reaches the parser.
    let boundary = form::boundary(header.as_ref()).unwrap_or_else(|_| "b".to_owned());
    let rules = imagegate_fuzz::form_rules();
    let body = Bytes::copy_from_slice(body);
    let _ = imagegate_fuzz::block_on(form::parse(&boundary, body, &rules));
});
