//! The domain: a typed image-edit request, its multipart form rules, the PNG checks and the
//! canonical re-encoding. Pure functions, no tower types.

pub mod cancel;
pub mod canonical;
pub mod files;
pub mod form;
pub mod gpt;
pub mod png_check;
pub mod sniff;

use bytes::Bytes;

pub use crate::config::Size;

/// `response_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    Url,
    B64Json,
}

impl ResponseFormat {
    pub fn parse(s: &str) -> Option<ResponseFormat> {
        match s {
            "url" => Some(ResponseFormat::Url),
            "b64_json" => Some(ResponseFormat::B64Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFormat::Url => "url",
            ResponseFormat::B64Json => "b64_json",
        }
    }
}

/// A file part as received.
#[derive(Debug, Clone)]
pub struct FilePart {
    pub bytes: Bytes,
    pub file_name: Option<String>,
    pub declared_type: Option<String>,
}

/// A request that passed the field rules, defaults filled in.
#[derive(Debug, Clone)]
pub struct ImageEdit {
    pub prompt: String,
    pub model: String,
    pub n: u8,
    pub size: Size,
    pub response_format: ResponseFormat,
    pub user: Option<String>,
    pub image: FilePart,
    pub mask: Option<FilePart>,
}
