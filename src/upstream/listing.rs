//! `GET /models` for the live-model check: the bounded body of the answer, with the first key
//! of the pool that is loaded.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::BodyExt;

use super::{Upstream, error_chain};
use crate::body::ChunkedBody;

impl Upstream {
    /// `GET {base_url}/models` with the first key of the pool that is loaded: the body of a
    /// successful answer, for `models_check` to read the ids and shutdown dates from. The whole
    /// exchange (connect, answer, body of at most `max_bytes`) must end within `timeout`; the
    /// connect timeout of `upstream.connect_timeout` applies too. Errors are one line for the
    /// operator and never carry the key.
    pub async fn list_models(&self, timeout: Duration, max_bytes: usize) -> Result<Bytes, String> {
        use http_body_util::Limited;
        let (endpoint, auth) = self
            .endpoints
            .iter()
            .find_map(|e| Some((e, e.authorization.clone()?)))
            .ok_or_else(|| "no upstream key is configured".to_string())?;
        let mut req = Request::get(endpoint.models_uri.clone())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, self.user_agent.clone())
            .body(ChunkedBody::default())
            .expect("a request built from valid parts");
        self.identify(endpoint, &mut req, auth);
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("GET /models failed: {}", error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), max_bytes)
                .collect()
                .await
                .map_err(|e| format!("GET /models: reading the answer: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "GET /models answered {status}{}",
                    error_summary(&body)
                ));
            }
            Ok(body)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "GET /models: no complete answer within {}s",
                timeout.as_secs_f64()
            )),
        }
    }
}

/// `: <type/code>: <message>` of an OpenAI error body, for a log line; words that look like an
/// API key (even masked, as OpenAI echoes them) are replaced.
pub(super) fn error_summary(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let e = &v["error"];
    let kind = e["code"].as_str().or_else(|| e["type"].as_str());
    let message = e["message"].as_str().map(|m| {
        m.split(' ')
            .map(|w| if w.contains("sk-") { "[redacted]" } else { w })
            .collect::<Vec<_>>()
            .join(" ")
    });
    match (kind, message) {
        (Some(k), Some(m)) => format!(": {k}: {m}"),
        (Some(k), None) => format!(": {k}"),
        (None, Some(m)) => format!(": {m}"),
        (None, None) => String::new(),
    }
}
