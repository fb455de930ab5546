//! Check-files phase of the gpt-image profile: every uploaded file (and `data:` URL) checked by
//! structure on the blocking pool (§9 I3–I5), with no pixel decode of input images, and the
//! digests the ledger records. Files given by remote URL or file id are not fetched.
//!
//! The decode permit (`server.max_concurrent_decodes`) is taken inside the blocking job, so a
//! caller that leaves cannot free it while the job still runs; the job's decodes stop at their
//! next row once the caller left (a [`CancelOnDrop`] held by this future).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::check_images::FileDigest;
use crate::edit::cancel::{Cancel, CancelOnDrop};
use crate::edit::files::{self, FileRules, ImageInfo};
use crate::edit::sniff::ImageFormat;
use crate::error::GatewayError;

/// One input image to check.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Its bytes, when the gateway has them (an upload or a `data:` URL).
    pub bytes: Option<Bytes>,
    pub format: Option<ImageFormat>,
    /// The param its errors name: `image`, `image[i]` or `images[i]`.
    pub param: String,
}

/// The files of one request.
#[derive(Debug, Clone, Default)]
pub struct Files {
    pub images: Vec<ImageFile>,
    pub mask: Option<Bytes>,
    pub markup: Option<Bytes>,
}

/// What the checks found.
#[derive(Debug)]
pub struct CheckedFiles {
    /// The mask to forward (converted to RGBA when it carried tRNS transparency).
    pub mask: Option<Bytes>,
    /// Dimensions of each checked input image.
    pub images: Vec<Option<ImageInfo>>,
}

/// The result, with the digests taken before the checks (so a refused request's record has
/// them too).
pub struct Checked {
    pub first_image: Option<FileDigest>,
    pub mask: Option<FileDigest>,
    pub result: Result<CheckedFiles, GatewayError>,
}

/// Run the checks on the blocking pool, at most `permits` at once.
pub async fn check_files(permits: &Arc<Semaphore>, rules: &FileRules, files: Files) -> Checked {
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return Checked {
            first_image: None,
            mask: None,
            result: Err(GatewayError::Internal),
        };
    };
    let rules = rules.clone();
    // Dropped with this future: cancels the decodes below.
    let cancel_on_drop = CancelOnDrop::new();
    let cancel = cancel_on_drop.handle();
    let job = tokio::task::spawn_blocking(move || {
        // Held by the job itself: released when the work ends, not when the caller leaves.
        let _permit = permit;
        run(&rules, files, &cancel)
    });
    let checked = job.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "file check task failed");
        Checked {
            first_image: None,
            mask: None,
            result: Err(GatewayError::Internal),
        }
    });
    drop(cancel_on_drop);
    checked
}

fn run(rules: &FileRules, files: Files, cancel: &Cancel) -> Checked {
    let mut first_image = files
        .images
        .first()
        .and_then(|i| i.bytes.as_deref())
        .map(FileDigest::of);
    let mut mask_digest = files.mask.as_deref().map(FileDigest::of);
    let result = (|| {
        let count = files.images.len();
        let mut infos = Vec::with_capacity(count);
        for (i, image) in files.images.iter().enumerate() {
            let (Some(bytes), Some(format)) = (&image.bytes, image.format) else {
                infos.push(None);
                continue;
            };
            if cancel.is_cancelled() {
                return Err(GatewayError::Internal);
            }
            let info = files::check_image_as(&image.param, i, bytes, format, rules)?;
            infos.push(Some(info));
        }
        if let (Some(d), Some(Some(info))) = (first_image.as_mut(), infos.first()) {
            d.dims = Some((info.width, info.height));
        }
        // Without the first image's bytes (a URL or a file id) its size is unknown: the mask
        // and markup size rules are left to upstream, as for a JPEG.
        let first = infos.first().copied().flatten().unwrap_or(ImageInfo {
            format: ImageFormat::Jpeg,
            width: 0,
            height: 0,
        });
        let mask = match files.mask {
            Some(m) => {
                let checked = files::check_mask_with(m, &first, rules, cancel)?;
                Some(checked)
            }
            None => None,
        };
        if let Some(markup) = &files.markup {
            files::check_markup_with(markup, &first, rules, cancel)?;
        }
        Ok(CheckedFiles {
            mask,
            images: infos,
        })
    })();
    if let (Some(d), Ok(c)) = (mask_digest.as_mut(), &result)
        && let Some(m) = &c.mask
        && let Ok(info) = files::inspect(m, ImageFormat::Png)
    {
        d.dims = Some((info.width, info.height));
    }
    Checked {
        first_image,
        mask: mask_digest,
        result,
    }
}
