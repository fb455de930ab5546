//! The admin listener: its own address (`admin.listen`, off by default), every route behind the
//! admin key (`Authorization: Bearer <admin key>`, SHA-256 compared in constant time).
//!
//! - `GET /admin/usage?since=&until=&client=&user=&group_by=user|client|day|model`: the usage report
//!   as JSON (the same filters and figures as `imagegate usage`);
//! - `GET /admin/requests/{request_id}`: one ledger record as JSON, 404 when unknown;
//! - `GET /metrics`: Prometheus text.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::app::AppState;
use crate::body::{Body, full};
use crate::config::parse_key_hash;
use crate::error::{ErrorParts, error_response};
use crate::ledger::UsageFilters;
use crate::ledger::writer::LedgerReader;
use crate::middleware::auth::{bearer, key_digest};
use crate::startup::StartupError;

struct Admin {
    state: Arc<AppState>,
    reader: LedgerReader,
    key: [u8; 32],
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

/// Bind the admin listener if one is configured. Returns the bound address.
pub async fn start(
    state: Arc<AppState>,
) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>, StartupError> {
    let Some(listen) = state.config.admin.listen else {
        return Ok(None);
    };
    let key = parse_key_hash(state.config.admin.key_hash.as_deref().unwrap_or_default())
        .map_err(StartupError::AdminKeyHash)?;
    let reader = LedgerReader::open_sqlite(&state.config.ledger.path).map_err(|e| {
        StartupError::AdminLedger {
            path: state.config.ledger.path.clone(),
            detail: e.to_string(),
        }
    })?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: listen,
            admin: true,
            source,
        })?;
    let addr = listener.local_addr().map_err(StartupError::LocalAddr)?;
    let admin = Arc::new(Admin { state, reader, key });
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually out of file descriptors: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let timeout = admin.state.config.server.header_read_timeout;
            let admin = admin.clone();
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    tracing::info!(%addr, "admin listener");
    Ok(Some((addr, task)))
}

fn error(status: StatusCode, code: &'static str, message: String) -> Response<Body> {
    error_response(&ErrorParts {
        status,
        kind: "invalid_request_error",
        param: None,
        code: Some(code),
        message,
    })
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut r = Response::new(full(bytes));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not render the answer".into(),
        ),
    }
}

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        bearer(req).is_some_and(|key| bool::from(key_digest(key).ct_eq(&self.key)))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if !self.authorized(&req) {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "The admin routes need the admin key as a Bearer token.".into(),
            );
        }
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("Method {} is not allowed here.", req.method()),
            );
        }
        let path = req.uri().path().to_owned();
        if path == "/metrics" {
            metrics::gauge!("imagegate_ledger_queue_depth")
                .set(self.state.ledger.queue_depth() as f64);
            let mut r = Response::new(full(crate::metrics::handle().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return r;
        }
        if path == "/admin/usage" {
            let params: UsageParams =
                match serde_urlencoded::from_str(req.uri().query().unwrap_or("")) {
                    Ok(p) => p,
                    Err(e) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "invalid_value",
                            format!("Bad query string: {e}."),
                        );
                    }
                };
            let filters = UsageFilters {
                since: params.since,
                until: params.until,
                client: params.client,
                user: params.user,
            };
            let query = match filters.query(
                params.group_by.as_deref(),
                &self.state.config.quotas.time_zone,
            ) {
                Ok(q) => q,
                Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_value", e),
            };
            return match self.reader.usage(query).await {
                Ok(rows) => json(&rows),
                Err(e) => {
                    tracing::error!(error = %e, "admin usage query failed");
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ledger_unavailable",
                        "The ledger could not be read.".into(),
                    )
                }
            };
        }
        if let Some(id) = path
            .strip_prefix("/admin/requests/")
            .filter(|id| !id.is_empty() && !id.contains('/'))
        {
            return match self.reader.get(id.to_owned()).await {
                Ok(Some(record)) => json(&record),
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("No request '{id}' in the ledger."),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "admin record lookup failed");
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ledger_unavailable",
                        "The ledger could not be read.".into(),
                    )
                }
            };
        }
        error(
            StatusCode::NOT_FOUND,
            "unknown_url",
            format!("Invalid URL (GET {path})"),
        )
    }
}
