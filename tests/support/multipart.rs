//! A multipart/form-data body builder that can also produce malformed bodies.
//!
//! Names, file names and content types are inserted verbatim (no quoting or escaping), so a
//! test can put anything on the wire; keep `"` and CR/LF out of them for well-formed bodies.

/// The boundary used by [`Multipart::new`].
pub const DEFAULT_BOUNDARY: &str = "----imagegateTestBoundary7MA4YWxkTrZu0gW";

#[derive(Clone, Debug)]
enum PartSpec {
    Text {
        name: String,
        value: String,
    },
    File {
        name: String,
        file_name: Option<String>,
        content_type: Option<String>,
        data: Vec<u8>,
    },
    /// Arbitrary header lines (without CRLF) and data.
    Raw {
        headers: Vec<String>,
        data: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
pub struct Multipart {
    boundary: String,
    parts: Vec<PartSpec>,
}

impl Default for Multipart {
    fn default() -> Self {
        Self::new()
    }
}

impl Multipart {
    /// Empty body with [`DEFAULT_BOUNDARY`].
    pub fn new() -> Self {
        Self::with_boundary(DEFAULT_BOUNDARY)
    }

    /// Empty body with a chosen boundary.
    pub fn with_boundary(boundary: &str) -> Self {
        Multipart {
            boundary: boundary.to_string(),
            parts: Vec::new(),
        }
    }

    pub fn boundary(&self) -> &str {
        &self.boundary
    }

    /// A text field: `Content-Disposition: form-data; name="NAME"`, no Content-Type.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.parts.push(PartSpec::Text {
            name: name.to_string(),
            value: value.to_string(),
        });
        self
    }

    /// A file field; `filename=` and `Content-Type:` are written only when given.
    pub fn file(
        mut self,
        name: &str,
        file_name: Option<&str>,
        content_type: Option<&str>,
        data: &[u8],
    ) -> Self {
        self.parts.push(PartSpec::File {
            name: name.to_string(),
            file_name: file_name.map(str::to_string),
            content_type: content_type.map(str::to_string),
            data: data.to_vec(),
        });
        self
    }

    /// A part with arbitrary header lines (each without CRLF, e.g.
    /// `"Content-Disposition: form-data"` with no name) followed by `data`.
    pub fn raw_part(mut self, header_lines: &[&str], data: &[u8]) -> Self {
        self.parts.push(PartSpec::Raw {
            headers: header_lines.iter().map(|h| h.to_string()).collect(),
            data: data.to_vec(),
        });
        self
    }

    /// Number of parts added so far.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// `multipart/form-data; boundary=...`
    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// Every part (each as `--boundary CRLF headers CRLF CRLF data CRLF`), no close delimiter.
    fn parts_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.parts {
            out.extend_from_slice(b"--");
            out.extend_from_slice(self.boundary.as_bytes());
            out.extend_from_slice(b"\r\n");
            let (headers, data): (Vec<String>, &[u8]) = match p {
                PartSpec::Text { name, value } => (
                    vec![format!("Content-Disposition: form-data; name=\"{name}\"")],
                    value.as_bytes(),
                ),
                PartSpec::File {
                    name,
                    file_name,
                    content_type,
                    data,
                } => {
                    let mut cd = format!("Content-Disposition: form-data; name=\"{name}\"");
                    if let Some(f) = file_name {
                        cd.push_str(&format!("; filename=\"{f}\""));
                    }
                    let mut h = vec![cd];
                    if let Some(ct) = content_type {
                        h.push(format!("Content-Type: {ct}"));
                    }
                    (h, data.as_slice())
                }
                PartSpec::Raw { headers, data } => (headers.clone(), data.as_slice()),
            };
            for h in headers {
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Well-formed body ending with `--boundary--\r\n`.
    pub fn body(&self) -> Vec<u8> {
        let mut out = self.parts_bytes();
        out.extend_from_slice(b"--");
        out.extend_from_slice(self.boundary.as_bytes());
        out.extend_from_slice(b"--\r\n");
        out
    }

    /// Same parts as [`Multipart::body`] (each still followed by its CRLF) but without the
    /// closing `--boundary--` delimiter.
    pub fn body_without_final_boundary(&self) -> Vec<u8> {
        self.parts_bytes()
    }
}

/// `prompt` text field, then `image` (file name `image.png`, `image/png`).
pub fn edit_request(image: &[u8], prompt: &str) -> Multipart {
    Multipart::new().text("prompt", prompt).file(
        "image",
        Some("image.png"),
        Some("image/png"),
        image,
    )
}
