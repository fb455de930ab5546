//! Caller authentication: `Authorization: Bearer <gateway key>`.
//!
//! The presented key is hashed (SHA-256) and compared in constant time against every configured
//! client's stored hash (no early exit, so timing does not reveal which or how many clients
//! matched a prefix). Missing key → 401 with code null; unknown key → 401 `invalid_api_key`
//! with a masked key. On success the [`Caller`] is stored as a request extension, the span gets
//! the client's name, and the caller's `Authorization` header is removed so no later stage can
//! forward it.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, header};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::body::Body;
use crate::config::Config;
use crate::error::{GatewayError, mask_key};

pub use crate::extensions::Caller;

/// The configured clients, keyed by the SHA-256 of their gateway key.
#[derive(Debug, Clone)]
pub struct KeyTable {
    entries: Arc<Vec<([u8; 32], Caller)>>,
}

impl KeyTable {
    pub fn from_config(config: &Config) -> Result<KeyTable, crate::startup::StartupError> {
        let mut entries = Vec::new();
        for (index, c) in config.clients.iter().enumerate() {
            let hash = c.key_hash.digest().map_err(|detail| {
                crate::startup::StartupError::ClientKeyHash {
                    client: c.name.clone(),
                    detail: detail.into(),
                }
            })?;
            entries.push((
                hash,
                Caller {
                    client: c.name.as_str().into(),
                    index,
                },
            ));
        }
        Ok(KeyTable {
            entries: Arc::new(entries),
        })
    }

    /// Constant-time lookup of a presented key.
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        let digest = key_digest(key);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, (hash, _)) in self.entries.iter().enumerate() {
            let hit = hash.ct_eq(&digest);
            index = u64::conditional_select(&index, &(i as u64), hit);
            found |= hit;
        }
        bool::from(found).then(|| self.entries[index as usize].1.clone())
    }
}

/// The SHA-256 of a presented key, as the config stores it (compare with `ct_eq`).
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The bearer token of a request, if any.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: KeyTable,
}

impl AuthLayer {
    pub fn new(keys: KeyTable) -> Self {
        AuthLayer { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    keys: KeyTable,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let caller = match bearer(&req) {
            None => Err(GatewayError::MissingKey),
            Some(key) => self
                .keys
                .authenticate(key)
                .ok_or_else(|| GatewayError::InvalidKey {
                    masked: mask_key(key),
                }),
        };
        match caller {
            Err(e) => {
                tracing::info!(
                    reason = e.parts().code.unwrap_or("missing_key"),
                    "authentication failed"
                );
                Box::pin(async move { Ok(e.into_response()) })
            }
            Ok(caller) => {
                tracing::Span::current().record("client", &*caller.client);
                if let Some(trail) = req.extensions().get::<crate::middleware::usage::Trail>() {
                    trail.update(|r| r.client = Some(caller.client.to_string()));
                }
                req.headers_mut().remove(header::AUTHORIZATION);
                req.extensions_mut().insert(caller);
                let mut inner = super::take_ready(&mut self.inner);
                Box::pin(async move { inner.call(req).await })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, hash_key};

    fn table() -> KeyTable {
        let mut c = Config::default();
        for (name, key) in [("a", "key-a"), ("b", "key-b")] {
            c.clients.push(ClientConfig {
                name: name.into(),
                key_hash: hash_key(key),
                ..Default::default()
            });
        }
        KeyTable::from_config(&c).unwrap()
    }

    #[test]
    fn finds_the_right_client() {
        let t = table();
        assert_eq!(&*t.authenticate("key-a").unwrap().client, "a");
        assert_eq!(&*t.authenticate("key-b").unwrap().client, "b");
        assert!(t.authenticate("key-c").is_none());
        assert!(t.authenticate("").is_none());
    }

    #[test]
    fn bearer_parsing() {
        let r = |v: &str| {
            Request::builder()
                .header("authorization", v)
                .body(())
                .unwrap()
        };
        assert_eq!(bearer(&r("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&r("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&r("Basic abc")), None);
        assert_eq!(bearer(&r("Bearer ")), None);
    }

    // The layer, alone over an inner service that records what reached it.

    use std::sync::Mutex;

    use http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};

    use crate::middleware::testing::{answer, error_of};

    /// What the inner service saw of one request.
    #[derive(Debug, Default, Clone)]
    struct Seen {
        caller: Option<Caller>,
        authorization: Option<String>,
        other: Option<String>,
    }

    /// Sends one request (`authorization` header if given, plus `x-other: kept`) through an
    /// auth layer over [`table`]; returns the response and what the inner service saw, if it
    /// was called.
    async fn through(authorization: Option<&str>) -> (Response<Body>, Option<Seen>) {
        let seen = Arc::new(Mutex::new(None));
        let inner_seen = seen.clone();
        let svc = ServiceBuilder::new()
            .layer(AuthLayer::new(table()))
            .service_fn(move |req: Request<()>| {
                let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                *inner_seen.lock().unwrap() = Some(Seen {
                    caller: req.extensions().get::<Caller>().cloned(),
                    authorization: header("authorization"),
                    other: header("x-other"),
                });
                async { answer(StatusCode::OK) }
            });
        let mut req = Request::builder()
            .uri("/v1/images/edits")
            .header("x-other", "kept");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let Ok(resp) = svc.oneshot(req.body(()).unwrap()).await;
        let seen = seen.lock().unwrap().clone();
        (resp, seen)
    }

    #[tokio::test]
    async fn a_missing_key_is_refused_401_with_a_null_code() {
        for authorization in [None, Some("Basic a2V5LWE="), Some("Bearer ")] {
            let (resp, seen) = through(authorization).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{authorization:?}");
            assert!(
                seen.is_none(),
                "the inner service ran for {authorization:?}"
            );
            let e = error_of(resp).await;
            assert_eq!(e["type"], "invalid_request_error");
            assert_eq!(e["code"], serde_json::Value::Null);
            assert_eq!(e["param"], serde_json::Value::Null);
            assert!(
                e["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("You didn't provide an API key."),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_401_invalid_api_key_and_masked() {
        let (resp, seen) = through(Some("Bearer ig-live-0123456789")).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(seen.is_none(), "the inner service ran");
        let e = error_of(resp).await;
        assert_eq!(e["code"], "invalid_api_key");
        assert_eq!(e["type"], "invalid_request_error");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.starts_with("Incorrect API key provided: ig-***6789."),
            "{message}"
        );
        assert!(!message.contains("0123456789"), "key leaked: {message}");
    }

    #[tokio::test]
    async fn the_right_key_passes_as_a_caller_without_its_authorization() {
        let (resp, seen) = through(Some("bearer key-b")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-inner"], "yes");
        let seen = seen.expect("the inner service ran");
        assert_eq!(
            seen.caller,
            Some(Caller {
                client: "b".into(),
                index: 1
            })
        );
        assert_eq!(seen.authorization, None, "the caller's key was forwarded");
        assert_eq!(seen.other.as_deref(), Some("kept"));
    }
}
