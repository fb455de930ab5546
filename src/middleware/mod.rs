//! One layer per file. Each module doc says what the layer does, what it rejects with which
//! status, and what request data it reads and writes. The stack itself is built in `app.rs`.

pub mod auth;
pub mod client_limit;
pub mod overload;
pub mod request_id;
pub mod usage;

pub use crate::BoxFuture;

/// Take the inner service that `poll_ready` drove to readiness, leaving a fresh clone behind
/// (tower's rule: the clone that was made ready is the one to call).
pub fn take_ready<S: Clone>(inner: &mut S) -> S {
    let fresh = inner.clone();
    std::mem::replace(inner, fresh)
}

/// Helpers for the layers' unit tests: each test builds a one-layer stack over a `service_fn`.
#[cfg(test)]
mod testing {
    use std::convert::Infallible;

    use http::{Response, StatusCode};
    use http_body_util::BodyExt;

    use crate::body::{Body, full};

    /// A plain answer from the inner service: `status`, body `inner`, header `x-inner: yes`.
    pub fn answer(status: StatusCode) -> Result<Response<Body>, Infallible> {
        let mut resp = Response::new(full("inner"));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("x-inner", http::HeaderValue::from_static("yes"));
        Ok(resp)
    }

    /// The response body as text.
    pub async fn text(resp: Response<Body>) -> String {
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("test bodies do not fail")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("test bodies are UTF-8")
    }

    /// The `error` object of a JSON error envelope (status checked by the caller).
    pub async fn error_of(resp: Response<Body>) -> serde_json::Value {
        let body = text(resp).await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("an error envelope");
        v["error"].clone()
    }
}
