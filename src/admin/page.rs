//! The operator's page on the admin listener, and the admin API routes it adds.
//!
//! - `GET /admin/` (and `/admin`, redirected): the page, three files compiled into the binary
//!   (`assets/index.html`, `page.js`, `page.css`; no framework, no build step). The page holds
//!   no data, so it and its two assets are served without the admin key; it asks for the key
//!   (kept in the tab's `sessionStorage`) and sends it as `Authorization: Bearer` on every API
//!   call. A strict Content-Security-Policy (`'self'` only, no inline script or style) rides on
//!   every page answer.
//! - `GET /admin/requests?client=&user=&outcome=&since=&until=&limit=&before=`: records, newest
//!   first, at most `limit` (default 50, at most [`MAX_LIMIT`]); `before` is the paging cursor
//!   (a request id: only older records), `next_before` in the answer the cursor of the next page.
//! - `GET /admin/quotas`: each client's and each end user's (those with use this month) quota
//!   use of the current day and month against the configured limits.
//! - `GET /admin/chain`: the chain head(s) and row counts (cheap); `?verify=1` runs the full
//!   `audit verify` on a reader of its own (one at a time: a second one meanwhile is answered
//!   409 `verify_in_progress`), on the blocking pool like every ledger query.
//! - `GET /admin/upstream`: the upstream keys of the pool and their breaker state, never a key.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use crate::app::AppState;
use crate::body::{Body, full};
use crate::error::{ErrorParts, GatewayError, error_response};
use crate::ledger::writer::LedgerReader;
use crate::ledger::{Outcome, RecentQuery, parse_time_bound};
use crate::limits::EndUser;
use crate::limits::quota::{QuotaStore, ScopeLimits, client_scope, user_scope};
use crate::startup::StartupError;

/// Most records one `/admin/requests` answer holds.
pub const MAX_LIMIT: u32 = 200;
/// Records per page when `limit` is not given.
const DEFAULT_LIMIT: u32 = 50;
/// Most scopes one `/admin/quotas` answer holds (clients first, then users by client).
pub const MAX_QUOTA_SCOPES: usize = 1000;

const INDEX_HTML: &str = include_str!("assets/index.html");
const PAGE_JS: &str = include_str!("assets/page.js");
const PAGE_CSS: &str = include_str!("assets/page.css");

/// Everything from this origin only; no inline script or style, no framing, no plug-ins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The page's API routes (all behind the admin key).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Api {
    Requests,
    Quotas,
    Chain,
    Upstream,
}

impl Api {
    pub fn of(path: &str) -> Option<Api> {
        match path {
            "/admin/requests" => Some(Api::Requests),
            "/admin/quotas" => Some(Api::Quotas),
            "/admin/chain" => Some(Api::Chain),
            "/admin/upstream" => Some(Api::Upstream),
            _ => None,
        }
    }
}

/// The page's own state: a second ledger reader for full verifies (so a long one never holds
/// up the page's other queries) and the permit that keeps them one at a time.
pub struct Page {
    verifier: LedgerReader,
    verifying: Arc<Semaphore>,
}

impl Page {
    pub fn open(state: &AppState) -> Result<Page, StartupError> {
        let verifier =
            LedgerReader::open(&state.config().ledger).map_err(|e| StartupError::AdminLedger {
                path: state.config().ledger.location(),
                detail: e.to_string(),
            })?;
        Ok(Page {
            verifier,
            verifying: Arc::new(Semaphore::new(1)),
        })
    }

    pub async fn handle(
        &self,
        api: Api,
        query: &str,
        state: &Arc<AppState>,
        reader: &LedgerReader,
    ) -> Result<Response<Body>, GatewayError> {
        match api {
            Api::Requests => requests(query, state, reader).await,
            Api::Quotas => quotas(state).await,
            Api::Chain => self.chain(query, reader).await,
            Api::Upstream => upstream(state),
        }
    }

    async fn chain(
        &self,
        query: &str,
        reader: &LedgerReader,
    ) -> Result<Response<Body>, GatewayError> {
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Params {
            verify: Option<String>,
        }
        let p: Params = parse_query(query)?;
        let verify = match p.verify.as_deref() {
            None | Some("0" | "false" | "") => false,
            Some("1" | "true") => true,
            Some(other) => {
                return Err(GatewayError::InvalidQuery {
                    message: format!("verify must be 1 or 0, not {other:?}."),
                });
            }
        };
        if !verify {
            let status = reader.chain_status().await.map_err(unreadable)?;
            return json(&status);
        }
        let Ok(_permit) = self.verifying.clone().try_acquire_owned() else {
            return Ok(error_response(&ErrorParts {
                status: StatusCode::CONFLICT,
                kind: "invalid_request_error",
                param: None,
                code: Some("verify_in_progress"),
                message: "A verification of the ledger is already running; ask again when it \
                          has finished."
                    .into(),
            }));
        };
        let started = Instant::now();
        let report = self.verifier.verify().await.map_err(unreadable)?;
        let mut value = serde_json::to_value(&report).map_err(|_| GatewayError::Internal)?;
        value["ok"] = report.is_ok().into();
        value["took_ms"] = (started.elapsed().as_millis() as u64).into();
        json(&value)
    }
}

fn unreadable(e: crate::ledger::LedgerError) -> GatewayError {
    tracing::error!(error = %e, "admin ledger query failed");
    GatewayError::LedgerUnreadable
}

fn parse_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, GatewayError> {
    serde_urlencoded::from_str(query).map_err(|e| GatewayError::InvalidQuery {
        message: format!("Bad query string: {e}."),
    })
}

/// A JSON answer (the admin layer adds `Cache-Control: no-store`).
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

async fn requests(
    query: &str,
    state: &AppState,
    reader: &LedgerReader,
) -> Result<Response<Body>, GatewayError> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Params {
        client: Option<String>,
        user: Option<String>,
        outcome: Option<String>,
        since: Option<String>,
        until: Option<String>,
        limit: Option<u32>,
        before: Option<String>,
    }
    let p: Params = parse_query(query)?;
    let bad = |message: String| GatewayError::InvalidQuery { message };
    let tz = jiff::tz::TimeZone::get(&state.config().quotas.time_zone)
        .map_err(|e| bad(format!("quotas.time_zone: {e}")))?;
    let bound = |v: Option<String>, name: &str| {
        v.filter(|s| !s.is_empty())
            .map(|s| parse_time_bound(&s, &tz).map_err(|e| bad(format!("{name}: {e}"))))
            .transpose()
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {limit}."
        )));
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let q = RecentQuery {
        since: bound(p.since, "since")?,
        until: bound(p.until, "until")?,
        client: nonempty(p.client),
        user: nonempty(p.user),
        outcome: nonempty(p.outcome)
            .map(|o| {
                o.parse::<Outcome>()
                    .map_err(|e| bad(format!("outcome: {e}")))
            })
            .transpose()?,
        before: nonempty(p.before),
        limit,
    };
    let records = reader.recent(q).await.map_err(unreadable)?;
    let next_before = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.request_id.clone()))
        .flatten();
    json(&serde_json::json!({ "requests": records, "next_before": next_before }))
}

/// Use and limits of one scope in one period.
#[derive(serde::Serialize, Debug)]
struct PeriodUse {
    period: String,
    images: u64,
    images_limit: Option<u64>,
    micros: i64,
    micros_limit: Option<i64>,
}

#[derive(serde::Serialize, Debug)]
struct ScopeQuota {
    client: String,
    /// `None`: the client itself.
    user: Option<String>,
    day: PeriodUse,
    month: PeriodUse,
}

#[derive(serde::Serialize, Debug)]
struct QuotaAnswer {
    time_zone: String,
    /// Today in the quota time zone, `YYYY-MM-DD` (the page's default period ends here).
    day: String,
    /// This month, `YYYY-MM`.
    month: String,
    scopes: Vec<ScopeQuota>,
    /// More scopes had use than [`MAX_QUOTA_SCOPES`].
    truncated: bool,
}

async fn quotas(state: &Arc<AppState>) -> Result<Response<Body>, GatewayError> {
    let state = state.clone();
    let answer = tokio::task::spawn_blocking(move || quota_answer(&state.live().quotas, &state))
        .await
        .map_err(|_| GatewayError::Internal)?
        .map_err(|e| {
            tracing::error!(error = %e, "admin quota query failed");
            GatewayError::LedgerUnreadable
        })?;
    json(&answer)
}

/// Blocking: reads the quota store.
fn quota_answer(store: &QuotaStore, state: &AppState) -> Result<QuotaAnswer, String> {
    let mut scopes = Vec::new();
    let mut truncated = false;
    let (mut day, mut month) = (String::new(), String::new());
    let mut whos: Vec<EndUser> = Vec::new();
    for c in &state.config().clients {
        whos.push(EndUser {
            client: c.name.as_str().into(),
            user: None,
        });
    }
    for c in &state.config().clients {
        for scope in store.users_of(&c.name)? {
            if whos.len() >= MAX_QUOTA_SCOPES {
                truncated = true;
                break;
            }
            if let Some((_, user)) = scope.split_once('\u{1f}') {
                whos.push(EndUser {
                    client: c.name.as_str().into(),
                    user: Some(user.to_owned()),
                });
            }
        }
    }
    for who in whos {
        let (client_limits, user_limits) = store.limits_for(&who);
        let (scope, limits): (String, ScopeLimits) = match user_scope(&who) {
            Some(s) => (s, user_limits),
            None => (client_scope(&who.client), client_limits),
        };
        let u = store.usage(&scope)?;
        let strip = |p: &str| p.split_once(':').map_or(p, |(_, v)| v).to_owned();
        day = strip(&u.day);
        month = strip(&u.month);
        scopes.push(ScopeQuota {
            client: who.client.to_string(),
            user: who.user,
            day: PeriodUse {
                period: day.clone(),
                images: u.images_day,
                images_limit: limits.images_day,
                micros: u.micros_day,
                micros_limit: limits.micros_day,
            },
            month: PeriodUse {
                period: month.clone(),
                images: u.images_month,
                images_limit: limits.images_month,
                micros: u.micros_month,
                micros_limit: limits.micros_month,
            },
        });
    }
    if day.is_empty() {
        // No client configured: still say what today is.
        let u = store.usage("client:")?;
        day = u.day.trim_start_matches("day:").to_owned();
        month = u.month.trim_start_matches("month:").to_owned();
    }
    Ok(QuotaAnswer {
        time_zone: state.config().quotas.time_zone.clone(),
        day,
        month,
        scopes,
        truncated,
    })
}

/// The upstream keys of the pool in force, with their breaker state (`healthy`, `benched`,
/// `trial`; `no_key` when the key is not set): never a key itself.
fn upstream(state: &AppState) -> Result<Response<Body>, GatewayError> {
    let live = state.live();
    let u = &live.config.upstream;
    let host = |url: &str| {
        url.parse::<http::Uri>()
            .ok()
            .and_then(|uri| {
                uri.authority()
                    .map(|a| format!("{}://{}", uri.scheme_str().unwrap_or("https"), a))
            })
            .unwrap_or_default()
    };
    let keys: Vec<serde_json::Value> = live
        .upstream
        .pool()
        .health()
        .into_iter()
        .map(|h| {
            let conf = u.keys.iter().find(|k| k.name == h.name);
            let key_set = conf.map_or(live.upstream.has_key(), |k| k.secret.is_some());
            serde_json::json!({
                "name": h.name,
                "state": if key_set { h.state } else { "no_key" },
                "base_url": host(conf.and_then(|k| k.base_url.as_deref()).unwrap_or(&u.base_url)),
                "key_set": key_set,
                "organization_set": conf.map_or(u.organization.is_some(), |k| k.organization.is_some()),
                "project_set": conf.map_or(u.project.is_some(), |k| k.project.is_some()),
                "weight": h.weight,
                "failures": h.failures,
                "benched_ms": h.benched_ms,
            })
        })
        .collect();
    json(&serde_json::json!({ "keys": keys }))
}

/// The page and its assets, for `GET`/`HEAD` of their paths (no key needed: they hold no
/// data). `None` for anything else.
pub fn asset(req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    let (body, content_type) = match req.uri().path() {
        "/admin" => {
            let mut r = Response::new(full(Vec::new()));
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/admin/"));
            return Some(r);
        }
        "/admin/" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/admin/page.js" => (PAGE_JS, "text/javascript; charset=utf-8"),
        "/admin/page.css" => (PAGE_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = Response::new(full(body.as_bytes().to_vec()));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_routes() {
        assert_eq!(Api::of("/admin/requests"), Some(Api::Requests));
        assert_eq!(Api::of("/admin/quotas"), Some(Api::Quotas));
        assert_eq!(Api::of("/admin/chain"), Some(Api::Chain));
        assert_eq!(Api::of("/admin/upstream"), Some(Api::Upstream));
        assert_eq!(Api::of("/admin/requests/"), None);
        assert_eq!(Api::of("/admin/"), None);
    }

    #[tokio::test]
    async fn one_verify_at_a_time() {
        let reader = || {
            LedgerReader::new(Box::new(
                crate::ledger::SqliteStore::open_in_memory().unwrap(),
            ))
        };
        let page = Page {
            verifier: reader(),
            verifying: Arc::new(Semaphore::new(1)),
        };
        let running = page.verifying.clone().try_acquire_owned().unwrap();
        let busy = page.chain("verify=1", &reader()).await.unwrap();
        assert_eq!(busy.status(), StatusCode::CONFLICT);
        // The cheap status is not held up by a running verify.
        let status = page.chain("", &reader()).await.unwrap();
        assert_eq!(status.status(), StatusCode::OK);
        drop(running);
        let done = page.chain("verify=1", &reader()).await.unwrap();
        assert_eq!(done.status(), StatusCode::OK);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for text in [INDEX_HTML, PAGE_JS, PAGE_CSS] {
            // The SVG namespace is a name, not a place the page loads from.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("style="));
    }
}
