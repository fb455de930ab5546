//! [`Secret`]: a value that never prints, and the loading of secrets from files and the
//! environment (problems name the key and the path, never the contents).

use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// The only way to read the value; grep for it to audit every use.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Read a secret from a file (trimmed); problems name `at` and the path (never the contents).
pub(super) fn read_key_file(
    file: &Path,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<Secret<String>> {
    match std::fs::read_to_string(file) {
        Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim().to_string())),
        Ok(_) => {
            problems.push(format!("{at} {}: is empty", file.display()));
            None
        }
        Err(e) => {
            problems.push(format!("{at} {}: {e}", file.display()));
            None
        }
    }
}

/// A secret from an environment variable (trimmed), when it is set and not blank.
pub(super) fn env_secret(var: &str) -> Option<Secret<String>> {
    std::env::var(var)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Secret::new(s.trim().to_string()))
}

/// Whether a key can be sent as `Authorization: Bearer <key>`.
pub(super) fn fits_bearer_header(key: &Secret<String>) -> bool {
    http::HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let s = Secret::new("sk-live-123".to_string());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
    }
}
