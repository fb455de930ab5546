//! Why a PNG was refused: the codes and the messages of the OpenAI answers.

use std::fmt;

/// Why a PNG was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PngRejection {
    TooLarge {
        limit: usize,
        actual: usize,
    },
    NotPng,
    /// Human-readable detail, e.g. "CRC mismatch in chunk 'IDAT'", "truncated image data".
    Corrupt(String),
    DimensionsTooLarge {
        width: u32,
        height: u32,
        max: u32,
    },
    NotSquare {
        width: u32,
        height: u32,
    },
    /// Image without mask whose (effective) mode is not RGBA/LA/L.
    Mode {
        mode: &'static str,
    },
    MaskMissingAlpha,
    /// Strict policy: no pixel with alpha exactly 0.
    NotTransparent,
    ConvertedTooLarge {
        limit: usize,
        actual: usize,
    },
    MaskSizeMismatch {
        image: (u32, u32),
        mask: (u32, u32),
    },
    /// An interlaced tRNS file whose RGBA frame (width × height × bytes per pixel) would exceed
    /// `max_conversion_bytes`; refused before decoding.
    ConversionTooLarge {
        width: u32,
        height: u32,
        needed: u64,
        limit: usize,
    },
    /// The caller left: the decode stopped at a row boundary. Nobody sees this answer.
    Cancelled,
}

impl PngRejection {
    /// The `code` of the error envelope.
    pub fn code(&self) -> &'static str {
        match self {
            PngRejection::TooLarge { .. }
            | PngRejection::NotPng
            | PngRejection::Corrupt(_)
            | PngRejection::ConvertedTooLarge { .. }
            | PngRejection::ConversionTooLarge { .. } => "invalid_image_format",
            PngRejection::DimensionsTooLarge { .. }
            | PngRejection::NotSquare { .. }
            | PngRejection::MaskSizeMismatch { .. } => "invalid_image_dimensions",
            PngRejection::Mode { .. } | PngRejection::MaskMissingAlpha => "invalid_image_mode",
            PngRejection::NotTransparent => "image_not_transparent",
            PngRejection::Cancelled => "request_cancelled",
        }
    }

    /// The `message` of the error envelope; `part` is "image" or "mask".
    ///
    /// The size limit in the format message comes from the variant where it carries one;
    /// `NotPng` and `Corrupt` do not carry it, so the caller's limit is passed through
    /// [`PngRejection::message_with_limit`]. `message` uses the default limit of 4 MiB for them.
    pub fn message(&self, part: &str) -> String {
        self.message_with_limit(part, DEFAULT_MAX_BYTES)
    }

    /// Like [`PngRejection::message`], with the configured `max_bytes` for the variants that do
    /// not carry the limit themselves (`NotPng`, `Corrupt`).
    pub fn message_with_limit(&self, part: &str, max_bytes: usize) -> String {
        match self {
            PngRejection::TooLarge { limit, .. } => format_message(part, *limit),
            PngRejection::NotPng => format_message(part, max_bytes),
            PngRejection::Corrupt(detail) => format!(
                "{} The file could not be decoded: {}.",
                format_message(part, max_bytes),
                detail.trim().trim_end_matches('.')
            ),
            PngRejection::ConvertedTooLarge { limit, actual } => format!(
                "Invalid input {part} - converting its transparency to RGBA makes it {actual} \
                 bytes, which is not less than the limit of {limit} bytes."
            ),
            PngRejection::ConversionTooLarge {
                width,
                height,
                needed,
                limit,
            } => format!(
                "Invalid input {part} - converting the transparency of an interlaced \
                 {width}x{height} image to RGBA needs {needed} bytes of memory, more than the \
                 limit of {limit} bytes. Send it non-interlaced or as RGBA."
            ),
            PngRejection::Cancelled => "The request was cancelled.".to_string(),
            PngRejection::DimensionsTooLarge { width, height, max } => format!(
                "Invalid input {part} - dimensions {width}x{height} exceed the maximum of \
                 {max}x{max}."
            ),
            PngRejection::NotSquare { width, height } => format!(
                "Invalid input {part} - expected an image with equal width and height, got \
                 {width}x{height} instead."
            ),
            PngRejection::Mode { mode } => {
                format!("Invalid input {part} - format must be in ['RGBA', 'LA', 'L'], got {mode}.")
            }
            PngRejection::MaskMissingAlpha => {
                "Invalid mask image format - mask image missing alpha channel".to_string()
            }
            PngRejection::NotTransparent => {
                if part == "mask" {
                    "Invalid mask image format - the mask has no fully transparent pixels \
                     (alpha 0), so there is nothing to edit."
                        .to_string()
                } else {
                    format!(
                        "Invalid input {part} - the image has no fully transparent pixels \
                         (alpha 0), so there is nothing to edit. Make the area to edit \
                         transparent or send a mask."
                    )
                }
            }
            PngRejection::MaskSizeMismatch { image, mask } => format!(
                "Invalid mask image format - mask size does not match image size (image {}x{}, \
                 mask {}x{}).",
                image.0, image.1, mask.0, mask.1
            ),
        }
    }
}

impl fmt::Display for PngRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PngRejection::TooLarge { limit, actual } => {
                write!(f, "file is {actual} bytes, must be below {limit}")
            }
            PngRejection::NotPng => f.write_str("not a PNG (bad signature)"),
            PngRejection::Corrupt(detail) => write!(f, "corrupt PNG: {detail}"),
            PngRejection::DimensionsTooLarge { width, height, max } => {
                write!(f, "dimensions {width}x{height} exceed {max}x{max}")
            }
            PngRejection::NotSquare { width, height } => {
                write!(f, "not square: {width}x{height}")
            }
            PngRejection::Mode { mode } => write!(f, "mode {mode} not in RGBA/LA/L"),
            PngRejection::MaskMissingAlpha => f.write_str("mask has no alpha channel"),
            PngRejection::NotTransparent => f.write_str("no pixel with alpha 0"),
            PngRejection::ConvertedTooLarge { limit, actual } => {
                write!(f, "converted RGBA is {actual} bytes, must be below {limit}")
            }
            PngRejection::ConversionTooLarge {
                width,
                height,
                needed,
                limit,
            } => write!(
                f,
                "interlaced {width}x{height} conversion needs {needed} bytes, limit {limit}"
            ),
            PngRejection::Cancelled => f.write_str("cancelled: the caller left"),
            PngRejection::MaskSizeMismatch { image, mask } => write!(
                f,
                "mask {}x{} does not match image {}x{}",
                mask.0, mask.1, image.0, image.1
            ),
        }
    }
}

impl std::error::Error for PngRejection {}

/// 4 MiB, the documented default limit.
pub(super) const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;

/// `Uploaded {part} must be a PNG and less than {N} MB.` with N = limit in MiB, no trailing zeros;
/// a limit that is not a round number of hundredths of a MiB is stated in bytes instead.
pub(super) fn format_message(part: &str, limit: usize) -> String {
    let hundredths = limit as f64 / (1024.0 * 1024.0) * 100.0;
    if (hundredths - hundredths.round()).abs() < 1e-9 {
        format!(
            "Uploaded {part} must be a PNG and less than {} MB.",
            mib(limit)
        )
    } else {
        format!("Uploaded {part} must be a PNG and less than {limit} bytes.")
    }
}

/// `limit` in MiB without trailing zeros: 4194304 -> "4", 2621440 -> "2.5". The value is printed
/// exactly (shortest round-trip form of the f64), so it never overstates the limit.
pub(crate) fn mib(limit: usize) -> String {
    let value = limit as f64 / (1024.0 * 1024.0);
    format!("{value}")
}
