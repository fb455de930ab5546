//! The canonical form of a forwarded edit: a fresh multipart body with the text fields first in a
//! fixed order (`prompt`, `model`, `n`, `size`, `response_format`, `user`), defaults written out,
//! then `image`, then `mask`, file parts typed `image/png` with a fixed safe file name.
//!
//! The image and mask bytes are the same `Bytes` that were checked: the body is a list of chunks,
//! so nothing is copied.

use bytes::Bytes;

use super::ImageEdit;
use crate::body::ChunkedBody;

/// What goes upstream: a multipart body with its boundary, or (boundary empty) a JSON body.
#[derive(Debug, Clone)]
pub struct CanonicalBody {
    pub boundary: String,
    pub body: ChunkedBody,
}

impl CanonicalBody {
    /// A JSON body.
    pub fn json(bytes: Bytes) -> CanonicalBody {
        CanonicalBody {
            boundary: String::new(),
            body: ChunkedBody::new(vec![bytes]),
        }
    }

    pub fn content_type(&self) -> String {
        if self.boundary.is_empty() {
            "application/json".into()
        } else {
            format!("multipart/form-data; boundary={}", self.boundary)
        }
    }
}

fn fresh_boundary() -> String {
    format!("imagegate-{}", uuid::Uuid::new_v4().simple())
}

/// Build the canonical body. `image` and `mask` are the checked (possibly converted) bytes.
pub fn encode(edit: &ImageEdit, image: Bytes, mask: Option<Bytes>) -> CanonicalBody {
    let n = edit.n.to_string();
    let mut texts: Vec<(&str, &str)> = vec![
        ("prompt", edit.prompt.as_str()),
        ("model", edit.model.as_str()),
        ("n", n.as_str()),
        ("size", edit.size.as_str()),
        ("response_format", edit.response_format.as_str()),
    ];
    if let Some(user) = &edit.user {
        texts.push(("user", user.as_str()));
    }
    let mut files = vec![("image", "image.png", image)];
    if let Some(mask) = mask {
        files.push(("mask", "mask.png", mask));
    }
    // A random 128-bit boundary practically never occurs in the content; check anyway, because
    // a collision would silently corrupt the forwarded request.
    let boundary = loop {
        let b = fresh_boundary();
        let needle = format!("--{b}");
        let collides = texts.iter().any(|(_, v)| v.contains(&needle))
            || files
                .iter()
                .any(|(_, _, d)| memchr::memmem::find(d, needle.as_bytes()).is_some());
        if !collides {
            break b;
        }
    };
    let mut chunks = Vec::with_capacity(2 * (texts.len() + files.len()) + 1);
    let mut head = String::new();
    for (name, value) in &texts {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    for (name, file_name, data) in files {
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\nContent-Type: image/png\r\n\r\n"
        ));
        chunks.push(Bytes::from(std::mem::take(&mut head)));
        chunks.push(data);
        head.push_str("\r\n");
    }
    head.push_str(&format!("--{boundary}--\r\n"));
    chunks.push(Bytes::from(head));
    CanonicalBody {
        boundary,
        body: ChunkedBody::new(chunks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::{FilePart, ResponseFormat, Size};

    fn edit(user: Option<&str>) -> ImageEdit {
        ImageEdit {
            prompt: "a \"quoted\" otter".into(),
            model: "dall-e-2".into(),
            n: 3,
            size: Size::S512,
            response_format: ResponseFormat::B64Json,
            user: user.map(str::to_owned),
            image: FilePart {
                bytes: Bytes::from_static(b"IMG"),
                file_name: None,
                declared_type: None,
            },
            mask: None,
        }
    }

    #[test]
    fn fields_in_fixed_order_then_files() {
        let image = Bytes::from_static(b"\x89PNG-image");
        let mask = Bytes::from_static(b"\x89PNG-mask");
        let c = encode(&edit(Some("u-1")), image.clone(), Some(mask));
        let b = c.boundary.clone();
        let text = String::from_utf8_lossy(&c.body.to_vec()).into_owned();
        let expected = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na \"quoted\" otter\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ndall-e-2\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n3\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\n512x512\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\nb64_json\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nu-1\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"image.png\"\r\nContent-Type: image/png\r\n\r\n\u{FFFD}PNG-image\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"mask\"; filename=\"mask.png\"\r\nContent-Type: image/png\r\n\r\n\u{FFFD}PNG-mask\r\n\
             --{b}--\r\n"
        );
        assert_eq!(text, expected);
        assert_eq!(c.body.len() as usize, c.body.to_vec().len());
    }

    #[test]
    fn image_bytes_are_not_copied() {
        let image = Bytes::from(vec![7u8; 1000]);
        let c = encode(&edit(None), image.clone(), None);
        let mut body = c.body.clone();
        let mut found = false;
        use http_body::Body as _;
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        while let std::task::Poll::Ready(Some(Ok(frame))) =
            std::pin::Pin::new(&mut body).poll_frame(&mut cx)
        {
            if let Ok(data) = frame.into_data()
                && data.as_ptr() == image.as_ptr()
            {
                found = true;
            }
        }
        assert!(found, "the image chunk must be the caller's allocation");
    }
}
