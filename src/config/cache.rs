//! `[cache]`: the validated-image cache.

use std::time::Duration;

use serde::Deserialize;

/// The validated-image cache (`edits::validated`): a file whose SHA-256 passed the checks
/// recently under the same rules is not decoded again. Any of the three at 0 turns it off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CacheConfig {
    /// Files remembered at once.
    pub validated_images_max_entries: usize,
    /// Bytes the entries may hold (keys, values and bookkeeping, a fixed size per entry: no
    /// image bytes are ever stored).
    pub validated_images_max_bytes: usize,
    /// How long a validation is trusted, from the check that made it.
    #[serde(with = "humantime_serde")]
    pub validated_images_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            validated_images_max_entries: 10_000,
            validated_images_max_bytes: 4 * 1024 * 1024,
            validated_images_ttl: Duration::from_secs(600),
        }
    }
}
