//! Who pays for a request, and whether they may: end-user identity, per-minute rate limits
//! (in memory with governor, or on Redis for several replicas) and daily/monthly quotas (persisted beside the ledger).
//!
//! The end user is the pair (client, `user`). `app` clients pass their own end users; a
//! `personal` client's end user is its configured person, whatever `user` says.

pub mod quota;
pub mod rate;
pub mod rate_redis;
mod refusal;
pub use crate::config::limits as spec;

use crate::config::ClientConfig;
use spec::{ClientKind, MissingUser, UserMismatch};

/// Why the end user of a request could not be resolved: the facts `refusal` words the 400
/// (param `user`) from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndUserError {
    /// The sent id holds control characters.
    ControlCharacters,
    /// The sent id, trimmed, is longer than `limits.max_user_chars` (`got` code points).
    TooLong { max: usize, got: usize },
    /// An `app` client sent no id and its policy is `missing_user = "reject"`.
    Missing,
    /// A `personal` key sent another person's id under `user_mismatch = "reject"`.
    NotTheKeysUser { own: String },
}

/// The party a request is charged to. `user` is `None` when an `app` client's request without
/// `user` is charged to the client itself (policy `missing_user = "client"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndUser {
    pub client: std::sync::Arc<str>,
    pub user: Option<String>,
}

impl EndUser {
    /// How the end user is named in messages and reports.
    pub fn label(&self) -> String {
        match &self.user {
            Some(u) => format!("user '{u}' of client '{}'", self.client),
            None => format!("client '{}' (no user)", self.client),
        }
    }
}

/// Trim, bound the length, refuse control characters. Empty after trimming is "absent".
pub fn normalize_user(raw: &str, max_chars: usize) -> Result<Option<String>, EndUserError> {
    let t = raw.trim();
    if t.is_empty() {
        return Ok(None);
    }
    if t.chars().any(char::is_control) {
        return Err(EndUserError::ControlCharacters);
    }
    let len = t.chars().count();
    if len > max_chars {
        return Err(EndUserError::TooLong {
            max: max_chars,
            got: len,
        });
    }
    Ok(Some(t.to_owned()))
}

/// Decide the end user of a request from the client's configuration and the sent `user`.
/// Returns the end user and the `user` value to forward upstream.
pub fn resolve_end_user(
    client: &ClientConfig,
    sent: Option<&str>,
    missing: MissingUser,
    mismatch: UserMismatch,
    max_chars: usize,
) -> Result<EndUser, EndUserError> {
    let sent = match sent {
        Some(s) => normalize_user(s, max_chars)?,
        None => None,
    };
    let name: std::sync::Arc<str> = client.name.as_str().into();
    match client.kind {
        ClientKind::App => match (sent, missing) {
            (Some(u), _) => Ok(EndUser {
                client: name,
                user: Some(u),
            }),
            (None, MissingUser::Client) => Ok(EndUser {
                client: name,
                user: None,
            }),
            (None, MissingUser::Reject) => Err(EndUserError::Missing),
        },
        ClientKind::Personal => {
            let own = client
                .user
                .clone()
                .expect("config validation: personal clients have a user");
            match sent {
                Some(u) if u != own && mismatch == UserMismatch::Reject => {
                    Err(EndUserError::NotTheKeysUser { own })
                }
                Some(u) if u != own => {
                    tracing::info!(sent = %u, charged = %own, "personal key sent another user; overwritten");
                    Ok(EndUser {
                        client: name,
                        user: Some(own),
                    })
                }
                _ => Ok(EndUser {
                    client: name,
                    user: Some(own),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> ClientConfig {
        ClientConfig {
            name: "web".into(),
            ..Default::default()
        }
    }

    fn personal() -> ClientConfig {
        ClientConfig {
            name: "alice-laptop".into(),
            kind: ClientKind::Personal,
            user: Some("alice".into()),
            ..Default::default()
        }
    }

    #[test]
    fn user_length_is_measured_after_trimming() {
        assert_eq!(
            normalize_user(&format!("  {} \t", "é".repeat(4)), 4).unwrap(),
            Some("éééé".into())
        );
        let e = normalize_user(&format!(" {} ", "a".repeat(5)), 4).unwrap_err();
        assert_eq!(e, EndUserError::TooLong { max: 4, got: 5 });
    }

    #[test]
    fn app_users_are_normalized() {
        let e = resolve_end_user(
            &app(),
            Some("  u-1 "),
            MissingUser::Reject,
            UserMismatch::Reject,
            256,
        )
        .unwrap();
        assert_eq!(e.user.as_deref(), Some("u-1"));
        assert_eq!(
            resolve_end_user(
                &app(),
                Some("a\u{0}b"),
                MissingUser::Reject,
                UserMismatch::Reject,
                256
            ),
            Err(EndUserError::ControlCharacters)
        );
        assert_eq!(
            resolve_end_user(
                &app(),
                Some("abc"),
                MissingUser::Reject,
                UserMismatch::Reject,
                2
            ),
            Err(EndUserError::TooLong { max: 2, got: 3 })
        );
    }

    /// The end-user cases `tests/validation.rs` leaves to this file, as the envelope words them.
    #[test]
    fn control_characters_are_refused_with_their_message() {
        for sent in ["alice\u{1}bob", "alice\u{7f}"] {
            let e = resolve_end_user(
                &app(),
                Some(sent),
                MissingUser::Reject,
                UserMismatch::Reject,
                256,
            )
            .unwrap_err();
            let p = crate::error::GatewayError::from(e).parts();
            assert_eq!(
                (p.status.as_u16(), p.kind, p.param.as_deref(), p.code),
                (
                    400,
                    "invalid_request_error",
                    Some("user"),
                    Some("invalid_value")
                ),
                "{sent:?}"
            );
            assert_eq!(
                p.message, "Invalid 'user': control characters are not allowed in an end-user id.",
                "{sent:?}"
            );
        }
    }

    #[test]
    fn missing_user_policies() {
        let err = resolve_end_user(&app(), None, MissingUser::Reject, UserMismatch::Reject, 256)
            .unwrap_err();
        assert_eq!(err, EndUserError::Missing);
        let blank = resolve_end_user(
            &app(),
            Some("   "),
            MissingUser::Reject,
            UserMismatch::Reject,
            256,
        );
        assert_eq!(
            blank,
            Err(EndUserError::Missing),
            "a blank user is a missing user"
        );
        let e =
            resolve_end_user(&app(), None, MissingUser::Client, UserMismatch::Reject, 256).unwrap();
        assert_eq!(e.user, None);
    }

    #[test]
    fn personal_keys_cannot_spend_for_others() {
        let e = resolve_end_user(
            &personal(),
            Some("bob"),
            MissingUser::Reject,
            UserMismatch::Overwrite,
            256,
        )
        .unwrap();
        assert_eq!(e.user.as_deref(), Some("alice"));
        let e = resolve_end_user(
            &personal(),
            None,
            MissingUser::Reject,
            UserMismatch::Reject,
            256,
        )
        .unwrap();
        assert_eq!(e.user.as_deref(), Some("alice"));
        let err = resolve_end_user(
            &personal(),
            Some("bob"),
            MissingUser::Reject,
            UserMismatch::Reject,
            256,
        )
        .unwrap_err();
        assert_eq!(
            err,
            EndUserError::NotTheKeysUser {
                own: "alice".into()
            }
        );
    }
}
