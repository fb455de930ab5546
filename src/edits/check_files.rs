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
use super::decode_pool;
use super::validated::{Key, Role, Validated, ValidatedCache, fingerprint};
use crate::edit::cancel::Cancel;
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

/// Run the checks on the blocking pool, at most `permits` at once. A first image, mask or
/// markup the `validated` cache knows passed under the same rules is not checked again (its
/// size is still compared with the first image's).
pub async fn check_files(
    permits: &Arc<Semaphore>,
    validated: &Arc<ValidatedCache>,
    rules: &FileRules,
    files: Files,
) -> Checked {
    let rules = rules.clone();
    let cache = validated.clone();
    decode_pool::run(permits, "file check", move |cancel| {
        run(&rules, &cache, files, cancel)
    })
    .await
    .unwrap_or_else(|| Checked {
        first_image: None,
        mask: None,
        result: Err(GatewayError::Internal),
    })
}

fn run(rules: &FileRules, cache: &ValidatedCache, files: Files, cancel: &Cancel) -> Checked {
    let mut first_image = files
        .images
        .first()
        .and_then(|i| i.bytes.as_deref())
        .map(FileDigest::of);
    let mut mask_digest = files.mask.as_deref().map(FileDigest::of);
    let tag = if cache.is_on() { fingerprint(rules) } else { 0 };
    let key = |digest: &FileDigest, role| Key::new(digest.sha256(), tag, role);
    // Recorded only when the whole request passes.
    let mut mask_dims = None;
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
            // Input images are checked by structure alone, which costs less than a SHA-256:
            // only the first, whose digest the ledger takes anyway, goes through the cache.
            let cached = match (&first_image, i) {
                (Some(d), 0) if cache.is_on() => Some(key(d, Role::GptImage(format))),
                _ => None,
            };
            let info = match cached.as_ref().and_then(|k| cache.get(k)) {
                Some(v) => ImageInfo {
                    format: v.format,
                    width: v.width,
                    height: v.height,
                },
                None => {
                    let info = files::check_image_as(&image.param, i, bytes, format, rules)?;
                    if let Some(k) = cached {
                        cache.insert(k, validated(info));
                    }
                    info
                }
            };
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
        let mask = match (files.mask, mask_digest.as_ref()) {
            (Some(m), Some(digest)) => {
                let k = key(digest, Role::GptMask);
                match cache.get(&k) {
                    Some(v) => {
                        // A fact of this request, never cached: compared on every hit.
                        files::mask_fits((v.width, v.height), &first)?;
                        mask_dims = Some((v.width, v.height));
                        Some(m)
                    }
                    None => {
                        let checked = files::check_mask_with(m.clone(), &first, rules, cancel)?;
                        if let Ok(info) = files::inspect(&checked, ImageFormat::Png) {
                            mask_dims = Some((info.width, info.height));
                            // Only a mask forwarded as sent (the same buffer: not converted)
                            // is remembered.
                            if checked.as_ptr() == m.as_ptr() && checked.len() == m.len() {
                                cache.insert(k, validated(info));
                            }
                        }
                        Some(checked)
                    }
                }
            }
            _ => None,
        };
        if let Some(markup) = &files.markup {
            let k = cache
                .is_on()
                .then(|| key(&FileDigest::of(markup), Role::GptMarkup));
            match k.as_ref().and_then(|k| cache.get(k)) {
                Some(v) => files::markup_fits((v.width, v.height), &first)?,
                None => {
                    files::check_markup_with(markup, &first, rules, cancel)?;
                    if let (Some(k), Ok(info)) = (k, files::inspect(markup, ImageFormat::Png)) {
                        cache.insert(k, validated(info));
                    }
                }
            }
        }
        Ok(CheckedFiles {
            mask,
            images: infos,
        })
    })();
    if let (Some(d), Ok(_)) = (mask_digest.as_mut(), &result) {
        d.dims = mask_dims;
    }
    Checked {
        first_image,
        mask: mask_digest,
        result,
    }
}

fn validated(info: ImageInfo) -> Validated {
    Validated {
        format: info.format,
        width: info.width,
        height: info.height,
        mode: "",
    }
}
