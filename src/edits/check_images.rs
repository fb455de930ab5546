//! Check-images phase: the PNG checks of the dall-e-2 profile on the blocking pool, at most
//! `server.max_concurrent_decodes` at once, and the digests the ledger records of the files as
//! received.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::edit::ImageEdit;
use crate::edit::cancel::CancelOnDrop;
use crate::edit::png_check::{self, CheckedPng, PngRules};
use crate::error::GatewayError;

/// What the ledger keeps of an uploaded file: digest and size always, dimensions once known.
#[derive(Debug, Clone)]
pub struct FileDigest {
    sha256: String,
    bytes: u64,
    pub dims: Option<(u32, u32)>,
}

impl FileDigest {
    pub fn of(data: &[u8]) -> FileDigest {
        use sha2::Digest;
        FileDigest {
            sha256: hex::encode(sha2::Sha256::digest(data)),
            bytes: data.len() as u64,
            dims: None,
        }
    }

    /// The record's (sha256, bytes, width, height) for this file.
    pub fn fields(&self) -> (Option<String>, Option<u64>, Option<u32>, Option<u32>) {
        let (w, h) = self.dims.unzip();
        (Some(self.sha256.clone()), Some(self.bytes), w, h)
    }
}

pub struct Checked {
    /// `None` when the check could not run at all.
    pub digests: Option<(FileDigest, Option<FileDigest>)>,
    pub result: Result<(CheckedPng, Option<CheckedPng>), GatewayError>,
}

/// Run the PNG checks on the blocking pool, at most `server.max_concurrent_decodes` at once,
/// and take the digests the ledger records (of the bytes as received). When the caller leaves
/// (this future is dropped) the running decode stops at its next row.
pub async fn check_images(permits: &Arc<Semaphore>, rules: &PngRules, edit: &ImageEdit) -> Checked {
    let image = edit.image.bytes.clone();
    let mask = edit.mask.as_ref().map(|m| m.bytes.clone());
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return Checked {
            digests: None,
            result: Err(GatewayError::Internal),
        };
    };
    let rules = rules.clone();
    let max_bytes = rules.max_bytes;
    // Dropped with this future: cancels the decode below.
    let cancel_on_drop = CancelOnDrop::new();
    let cancel = cancel_on_drop.handle();
    let job = tokio::task::spawn_blocking(move || {
        // Held by the job itself: released when the decode ends, not when the caller leaves.
        let _permit = permit;
        let mut image_digest = FileDigest::of(&image);
        let mut mask_digest = mask.as_deref().map(FileDigest::of);
        let result = (|| {
            let image = png_check::check_image_with(image, mask.is_some(), &rules, &cancel)
                .map_err(|rejection| GatewayError::Png {
                    part: "image",
                    rejection,
                    max_bytes,
                })?;
            image_digest.dims = Some((image.width, image.height));
            let mask = match mask {
                Some(m) => {
                    let m =
                        png_check::check_mask_with(m, (image.width, image.height), &rules, &cancel)
                            .map_err(|rejection| GatewayError::Png {
                                part: "mask",
                                rejection,
                                max_bytes,
                            })?;
                    if let Some(d) = mask_digest.as_mut() {
                        d.dims = Some((m.width, m.height));
                    }
                    Some(m)
                }
                None => None,
            };
            Ok((image, mask))
        })();
        Checked {
            digests: Some((image_digest, mask_digest)),
            result,
        }
    });
    let checked = job.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "PNG check task failed");
        Checked {
            digests: None,
            result: Err(GatewayError::Internal),
        }
    });
    drop(cancel_on_drop);
    checked
}
