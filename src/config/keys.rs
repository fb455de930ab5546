//! Stored key hashes (`clients[].key_hash`, `admin.key_hash`), parsed once.

use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The stored form of a gateway key (`imagegate hash-key`): `sha256:<64 hex>`.
pub fn hash_key(key: &str) -> KeyHash {
    KeyHash::of_key(key)
}

/// A stored key hash (`clients[].key_hash`, `admin.key_hash`): `sha256:<64 hex>` in the file,
/// parsed once when the configuration is read into the 32 digest bytes.
///
/// Text that is not a key hash still deserializes, holding the reason, so that every problem of
/// a file is reported together: [`Config::problems`] reports it, and a loaded configuration never
/// holds one. `Display` prints the stored form; `Debug` prints it quoted, like a string (a key
/// hash is no secret).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(Result<[u8; 32], &'static str>);

impl KeyHash {
    /// The hash of a key.
    pub fn of_key(key: &str) -> KeyHash {
        KeyHash(Ok(Sha256::digest(key.as_bytes()).into()))
    }

    /// Parse the stored form; the reason is kept when it is not one.
    pub fn parse(text: &str) -> KeyHash {
        let parsed = text
            .strip_prefix("sha256:")
            .ok_or("must start with 'sha256:' (use `imagegate hash-key`)")
            .and_then(|hex_part| {
                hex::decode(hex_part).map_err(|_| "is not valid hex after 'sha256:'")
            })
            .and_then(|bytes| {
                <[u8; 32]>::try_from(bytes).map_err(|_| "must hold 64 hex digits after 'sha256:'")
            });
        KeyHash(parsed)
    }

    /// The 32 digest bytes, or why the text was not a key hash.
    pub fn digest(&self) -> Result<[u8; 32], &'static str> {
        self.0
    }
}

impl Default for KeyHash {
    /// An absent hash: the empty text, which is not one.
    fn default() -> Self {
        KeyHash::parse("")
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Ok(digest) => write!(f, "sha256:{}", hex::encode(digest)),
            Err(why) => write!(f, "(not a key hash: {why})"),
        }
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|text| KeyHash::parse(&text))
    }
}

/// Text equals a key hash when it is the stored form of the same hash.
impl PartialEq<KeyHash> for &str {
    fn eq(&self, other: &KeyHash) -> bool {
        other.digest().is_ok() && KeyHash::parse(self) == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_round_trips() {
        let h = hash_key("ig-test").to_string();
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64);
        assert_eq!(KeyHash::parse(&h), hash_key("ig-test"));
        assert!(hash_key("ig-test").digest().is_ok());
        assert_eq!(
            KeyHash::parse("sha256:abc").digest(),
            Err("is not valid hex after 'sha256:'")
        );
    }
}
