//! Check-images phase: the PNG checks of the dall-e-2 profile on the blocking pool, at most
//! `server.max_concurrent_decodes` at once, and the digests the ledger records of the files as
//! received.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Semaphore, oneshot};

use super::validated::{Key, Role, Validated, ValidatedCache, fingerprint};

use super::decode_pool;
use crate::edit::ImageEdit;
use crate::edit::png_check::{self, CheckedPng, PngRejection, PngRules};
use crate::edit::sniff::ImageFormat;
use crate::error::GatewayError;
use crate::ledger::Record;

/// What the ledger keeps of an uploaded file: digest and size always, dimensions once known.
#[derive(Debug, Clone)]
pub struct FileDigest {
    sha256: [u8; 32],
    bytes: u64,
    pub dims: Option<(u32, u32)>,
}

impl FileDigest {
    pub fn of(data: &[u8]) -> FileDigest {
        use sha2::Digest;
        FileDigest {
            sha256: sha2::Sha256::digest(data).into(),
            bytes: data.len() as u64,
            dims: None,
        }
    }

    /// The SHA-256 of the file.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// The record's (sha256, bytes, width, height) for this file.
    pub fn fields(&self) -> (Option<String>, Option<u64>, Option<u32>, Option<u32>) {
        let (w, h) = self.dims.unzip();
        (Some(hex::encode(self.sha256)), Some(self.bytes), w, h)
    }
}

/// The record's file fields (digest, size, dimensions) of the image and mask: the one place
/// both profiles and cut-through write them.
pub fn note_files(r: &mut Record, image: Option<&FileDigest>, mask: Option<&FileDigest>) {
    if let Some(image) = image {
        (r.image_sha256, r.image_bytes, r.image_width, r.image_height) = image.fields();
    }
    if let Some(mask) = mask {
        (r.mask_sha256, r.mask_bytes, r.mask_width, r.mask_height) = mask.fields();
    }
}

pub struct Checked {
    /// `None` when the check could not run at all.
    pub digests: Option<(FileDigest, Option<FileDigest>)>,
    pub result: Result<(CheckedPng, Option<CheckedPng>), GatewayError>,
}

/// Run the PNG checks on the blocking pool, at most `server.max_concurrent_decodes` at once,
/// and take the digests the ledger records (of the bytes as received). A file the `validated`
/// cache knows passed under the same rules is not decoded again (the mask's size is still
/// compared with the image's). When the caller leaves (this future is dropped) the running
/// decode stops at its next row.
pub async fn check_images(
    permits: &Arc<Semaphore>,
    validated: &Arc<ValidatedCache>,
    rules: &PngRules,
    edit: &ImageEdit,
) -> Checked {
    start_check_images(permits, validated, rules, edit, None).await
}

/// What the check says once it took the digests, before any decode (cut-through).
#[derive(Debug)]
pub enum Early {
    /// Its result cannot change the canonical body (no file can be converted) and it still has
    /// a file to decode: the body may go upstream now. The digests, for the `forwarding` record.
    Overlap(FileDigest, Option<FileDigest>),
    /// A file may be converted, or the validated cache knows every file: wait for the result.
    Wait,
}

/// [`check_images`] as a future that owns what it needs; with `early`, it also says right after
/// the digests whether the body may go upstream while it decodes ([`Early`]).
pub fn start_check_images(
    permits: &Arc<Semaphore>,
    validated: &Arc<ValidatedCache>,
    rules: &PngRules,
    edit: &ImageEdit,
    early: Option<oneshot::Sender<Early>>,
) -> impl Future<Output = Checked> + Send + 'static {
    let image = edit.image.bytes.clone();
    let mask = edit.mask.as_ref().map(|m| m.bytes.clone());
    let rules = rules.clone();
    let cache = validated.clone();
    let permits = permits.clone();
    let max_bytes = rules.max_bytes;
    #[cfg(any(test, feature = "testkit"))]
    let user = edit.user.clone();
    async move {
        decode_pool::run(&permits, "PNG check", move |cancel| {
            let mut image_digest = FileDigest::of(&image);
            let mut mask_digest = mask.as_deref().map(FileDigest::of);
            let tag = if cache.is_on() {
                fingerprint(&rules)
            } else {
                0
            };
            if let Some(early) = early {
                let verdict = early_verdict(
                    &cache,
                    tag,
                    (&image, &image_digest),
                    mask.as_ref().zip(mask_digest.as_ref()),
                );
                #[cfg(any(test, feature = "testkit"))]
                let overlap = matches!(verdict, Early::Overlap(..));
                let _ = early.send(verdict);
                #[cfg(any(test, feature = "testkit"))]
                if overlap {
                    crate::testkit::hold_check(user.as_deref(), cancel);
                }
            }
            let png_error = |part| {
                move |rejection| GatewayError::Png {
                    part,
                    rejection,
                    max_bytes,
                }
            };
            let result = (|| {
                let role = Role::DallE2Image {
                    has_mask: mask.is_some(),
                };
                let image = cached_check(&cache, &image_digest, tag, role, image, |bytes| {
                    png_check::check_image_with(bytes, mask.is_some(), &rules, cancel)
                })
                .map_err(png_error("image"))?;
                image_digest.dims = Some((image.width, image.height));
                let mask = match (mask, mask_digest.as_mut()) {
                    (Some(m), Some(digest)) => {
                        let image_dims = (image.width, image.height);
                        let m = cached_check(&cache, digest, tag, Role::DallE2Mask, m, |bytes| {
                            png_check::check_mask_with(bytes, image_dims, &rules, cancel)
                        })
                        .and_then(|m| {
                            // A fact of this request, never cached: compared on every hit too.
                            png_check::mask_fits((m.width, m.height), image_dims)?;
                            Ok(m)
                        })
                        .map_err(png_error("mask"))?;
                        digest.dims = Some((m.width, m.height));
                        Some(m)
                    }
                    _ => None,
                };
                Ok((image, mask))
            })();
            Checked {
                digests: Some((image_digest, mask_digest)),
                result,
            }
        })
        .await
        .unwrap_or_else(|| Checked {
            digests: None,
            result: Err(GatewayError::Internal),
        })
    }
}

/// [`Early`] from what is known before decoding: the IHDR and the chunks before IDAT (may a
/// file be converted?) and the validated cache (is every file known?).
fn early_verdict(
    cache: &ValidatedCache,
    tag: u64,
    (image, image_digest): (&Bytes, &FileDigest),
    mask: Option<(&Bytes, &FileDigest)>,
) -> Early {
    // An image sent with a mask is never converted; a mask, or an image alone, may be.
    let may_convert = match mask {
        Some((m, _)) => png_check::may_convert(m),
        None => png_check::may_convert(image),
    };
    let known = |digest: &FileDigest, role| cache.contains(&Key::new(digest.sha256(), tag, role));
    let all_known = cache.is_on()
        && known(
            image_digest,
            Role::DallE2Image {
                has_mask: mask.is_some(),
            },
        )
        && mask.is_none_or(|(_, d)| known(d, Role::DallE2Mask));
    if may_convert || all_known {
        return Early::Wait;
    }
    Early::Overlap(image_digest.clone(), mask.map(|(_, d)| d.clone()))
}

/// `check` of one file, or its cached success: a file that passed unchanged is stored (one that
/// was converted is not: the converted bytes would have to be kept), a refusal never is.
fn cached_check(
    cache: &ValidatedCache,
    digest: &FileDigest,
    rules: u64,
    role: Role,
    bytes: Bytes,
    check: impl FnOnce(Bytes) -> Result<CheckedPng, PngRejection>,
) -> Result<CheckedPng, PngRejection> {
    if !cache.is_on() {
        return check(bytes);
    }
    let key = Key::new(digest.sha256(), rules, role);
    if let Some(v) = cache.get(&key) {
        return Ok(CheckedPng {
            bytes,
            converted: false,
            width: v.width,
            height: v.height,
            mode: v.mode,
        });
    }
    let checked = check(bytes)?;
    if !checked.converted {
        cache.insert(
            key,
            Validated {
                format: ImageFormat::Png,
                width: checked.width,
                height: checked.height,
                mode: checked.mode,
            },
        );
    }
    Ok(checked)
}
