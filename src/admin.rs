//! The admin listener: its own address (`admin.listen`, off by default), every route behind the
//! admin key (`Authorization: Bearer <admin key>`, SHA-256 compared in constant time).
//!
//! - `GET /admin/usage?since=&until=&client=&user=&group_by=user|client|day|model`: the usage report
//!   as JSON (the same filters and figures as `imagegate usage`);
//! - `GET /admin/requests/{request_id}`: one ledger record as JSON, 404 when unknown;
//! - `GET /admin/upstream/keys`: the upstream keys' health (name, weight, state, failures in a
//!   row, milliseconds left on the bench) as JSON, never the keys themselves;
//! - `GET /metrics`: Prometheus text;
//! - `POST /admin/reload`: read the configuration file again and apply it (`src/reload.rs`);
//!   200 with the [`ReloadReport`](crate::reload::ReloadReport) when applied, 422 with the same
//!   shape (`status: "rejected"`, `problems`) when the new configuration has a problem (nothing
//!   changed then).
//!
//! - the operator's page (`/admin/`, served without the key: it holds no data) and its API
//!   (`/admin/requests`, `/admin/quotas`, `/admin/chain`, `/admin/upstream`): see [`page`].
//!
//! Every answer but the page's files carries `Cache-Control: no-store`. The admin key is that
//! of the configuration in force (a reload may change it).
//!
//! Served by the API's accept path (`server.rs`): the same connection cap, first-bytes deadline,
//! header-read and idle timeouts, and graceful drain. Errors are [`GatewayError`]s in the same
//! envelope as the API's, with `x-request-id` (the request-id layer) and `Authorization` marked
//! sensitive. The admin key is checked before anything else, so an unauthenticated
//! caller learns nothing about which paths exist; then the path picks the route (404
//! `unknown_url` for others) and the method must be the route's (`GET`, or `POST` for the
//! reload; 405 with `Allow`).

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, header};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::app::{AppService, AppState};
use crate::body::{Body, full};
use crate::config::MetricsAuth;
use crate::error::GatewayError;
use crate::ledger::UsageFilters;
use crate::ledger::writer::LedgerReader;
use crate::middleware::auth::{bearer, key_digest};
use crate::middleware::request_id::RequestIdLayer;
use crate::startup::StartupError;

pub mod page;

struct Admin {
    state: Arc<AppState>,
    reader: LedgerReader,
    page: page::Page,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct UsageParams {
    since: Option<String>,
    until: Option<String>,
    client: Option<String>,
    user: Option<String>,
    group_by: Option<String>,
}

/// The admin routes.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Metrics,
    Usage,
    Record(&'a str),
    UpstreamKeys,
    Reload,
    Page(page::Api),
}

impl<'a> Route<'a> {
    fn of(path: &'a str) -> Option<Route<'a>> {
        match path {
            "/metrics" => Some(Route::Metrics),
            "/admin/usage" => Some(Route::Usage),
            "/admin/upstream/keys" => Some(Route::UpstreamKeys),
            "/admin/reload" => Some(Route::Reload),
            _ => page::Api::of(path).map(Route::Page).or_else(|| {
                path.strip_prefix("/admin/requests/")
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                    .map(Route::Record)
            }),
        }
    }
}

/// The admin service, when `admin.listen` is set (the server binds the address and serves it
/// like the API listener).
pub fn build(state: Arc<AppState>) -> Result<Option<AppService>, StartupError> {
    let config = state.config();
    if config.admin.listen.is_none() {
        return Ok(None);
    }
    config
        .admin
        .key_hash
        .unwrap_or_default()
        .digest()
        .map_err(|e| StartupError::AdminKeyHash(e.into()))?;
    let reader = LedgerReader::open(&config.ledger).map_err(|e| StartupError::AdminLedger {
        path: config.ledger.location(),
        detail: e.to_string(),
    })?;
    let page = page::Page::open(&state)?;
    let admin = Arc::new(Admin {
        state,
        reader,
        page,
    });
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let admin = admin.clone();
        async move {
            let mut resp = match admin.handle(req).await {
                Ok(resp) => resp,
                Err(e) => e.into_response(),
            };
            resp.headers_mut()
                .entry(header::CACHE_CONTROL)
                .or_insert(HeaderValue::from_static("no-store"));
            Ok::<_, Infallible>(resp)
        }
    });
    let stack = ServiceBuilder::new()
        // As on the API: every answer carries `x-request-id`, every log line below has it.
        .layer(RequestIdLayer)
        // The admin key is a secret like any other.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .map_response(|r: Response<_>| r.map(Body::new))
        .service(svc);
    Ok(Some(BoxCloneSyncService::new(stack)))
}

fn json(value: &impl serde::Serialize) -> Result<Response<Body>, GatewayError> {
    let bytes = serde_json::to_vec(value).map_err(|e| {
        tracing::error!(error = %e, "admin answer could not be rendered");
        GatewayError::Internal
    })?;
    let mut r = Response::new(full(bytes));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(admin_key) = self.state.live().admin_key else {
            return false;
        };
        bearer(req).is_some_and(|key| bool::from(key_digest(key).ct_eq(&admin_key)))
    }

    /// `/metrics` under `admin.metrics_auth` of the configuration in force (a reload may
    /// change it and the token): the admin key, or the metrics token too, or anyone.
    fn may_read_metrics(&self, req: &Request<Incoming>) -> bool {
        let live = self.state.live();
        match live.config.admin.metrics_auth {
            MetricsAuth::None => true,
            MetricsAuth::AdminKey => self.authorized(req),
            MetricsAuth::Token => {
                self.authorized(req)
                    || bearer(req)
                        .zip(live.metrics_token)
                        .is_some_and(|(key, token)| bool::from(key_digest(key).ct_eq(&token)))
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        if let Some(resp) = page::asset(&req) {
            return Ok(resp);
        }
        let metrics = req.uri().path() == "/metrics";
        if !(self.authorized(&req) || metrics && self.may_read_metrics(&req)) {
            return Err(GatewayError::AdminKeyRequired);
        }
        let path = req.uri().path();
        let Some(route) = Route::of(path) else {
            return Err(GatewayError::UnknownUrl {
                method: req.method().to_string(),
                path: path.to_owned(),
            });
        };
        let allowed = match route {
            Route::Reload => Method::POST,
            _ => Method::GET,
        };
        if req.method() != allowed {
            return Err(GatewayError::MethodNotAllowed {
                method: req.method().to_string(),
                path: path.to_owned(),
                allowed: if allowed == Method::POST {
                    "POST"
                } else {
                    "GET"
                },
            });
        }
        match route {
            Route::Metrics => Ok(self.metrics()),
            Route::Usage => self.usage(req.uri().query().unwrap_or("")).await,
            Route::Record(id) => self.record(id).await,
            Route::UpstreamKeys => json(&self.state.live().upstream.pool().health()),
            Route::Reload => self.reload().await,
            Route::Page(api) => {
                let query = req.uri().query().unwrap_or("");
                self.page
                    .handle(api, query, &self.state, &self.reader)
                    .await
            }
        }
    }

    fn metrics(&self) -> Response<Body> {
        metrics::gauge!("imagegate_ledger_queue_depth").set(self.state.ledger.queue_depth() as f64);
        let mut text = crate::metrics::handle().render();
        text.push_str(&crate::metrics::chain_head_lines(
            self.state.ledger.chain_head().as_ref(),
        ));
        let mut r = Response::new(full(text));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    async fn usage(&self, query: &str) -> Result<Response<Body>, GatewayError> {
        let params: UsageParams =
            serde_urlencoded::from_str(query).map_err(|e| GatewayError::InvalidQuery {
                message: format!("Bad query string: {e}."),
            })?;
        let filters = UsageFilters {
            since: params.since,
            until: params.until,
            client: params.client,
            user: params.user,
        };
        let query = filters
            .query(
                params.group_by.as_deref(),
                &self.state.config().quotas.time_zone,
            )
            .map_err(|message| GatewayError::InvalidQuery { message })?;
        let rows = self.reader.usage(query).await.map_err(|e| {
            tracing::error!(error = %e, "admin usage query failed");
            GatewayError::LedgerUnreadable
        })?;
        json(&rows)
    }

    async fn reload(&self) -> Result<Response<Body>, GatewayError> {
        let state = self.state.clone();
        let report = tokio::task::spawn_blocking(move || state.reload("admin"))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "the reload task failed");
                GatewayError::Internal
            })?;
        let mut resp = json(&report)?;
        if !report.applied() {
            *resp.status_mut() = http::StatusCode::UNPROCESSABLE_ENTITY;
        }
        Ok(resp)
    }

    async fn record(&self, id: &str) -> Result<Response<Body>, GatewayError> {
        match self.reader.get(id.to_owned()).await {
            Ok(Some(record)) => json(&record),
            Ok(None) => Err(GatewayError::RecordNotFound { id: id.to_owned() }),
            Err(e) => {
                tracing::error!(error = %e, "admin record lookup failed");
                Err(GatewayError::LedgerUnreadable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn routes_by_path() {
        assert_eq!(Route::of("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::of("/admin/usage"), Some(Route::Usage));
        assert_eq!(Route::of("/admin/upstream/keys"), Some(Route::UpstreamKeys));
        assert_eq!(Route::of("/admin/reload"), Some(Route::Reload));
        assert_eq!(
            Route::of("/admin/requests/req_1"),
            Some(Route::Record("req_1"))
        );
        for unknown in [
            "/admin/requests/",
            "/admin/requests/a/b",
            "/admin/usage/",
            "/",
            "/healthz",
        ] {
            assert_eq!(Route::of(unknown), None, "{unknown}");
        }
    }
}
