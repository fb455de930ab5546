//! THE stack, assembled in one place, top to bottom, with the reason each layer sits where it is.
//!
//! A request to `POST /v1/images/edits` passes, in order:
//!
//! 1. `server`: accept, first-bytes deadline, hyper (HTTP/1.1 + h2), header-read timeout.
//! 2. [`RequestIdLayer`]: `x-request-id` / `x-imagegate-request-id` and the request's span.
//! 3. `SetSensitiveRequestHeaders`: the caller's `Authorization` is never logged.
//! 4. [`UsageLayer`]: opens the request's ledger record (the [`Trail`](crate::middleware::usage::Trail)),
//!    writes it for every outcome that was not forwarded.
//! 5. `CatchPanic`: a panic below becomes a JSON 500.
//! 6. [`Router`]: path then method (404/405 in the JSON envelope); `/healthz` and `/readyz` are
//!    answered here, so they never reach the overload layer.
//! 7. [`OverloadLayer`]: global in-flight cap, load shed → 503 — on the edits route only.
//! 8. [`AuthLayer`]: gateway key → client (401), the caller's key removed.
//! 9. [`ClientLimitLayer`]: the per-client request rate (429), before the body is read.
//! 10. [`EditsService`], the phases of `src/edits/` (see its module doc): content type → read
//!     body → parse form → resolve end user → field rules → user limits → reserve quota →
//!     check images → canonical body → forward → relay → settle and record.
//!
//! Why the router sits above the overload layer: load shedding refuses everything below it, and
//! a gateway at `max_in_flight` is busy, not broken. Were the health routes below it, a load
//! balancer or Kubernetes would see failing probes exactly when the gateway is busiest, take it
//! out of rotation (or restart it, dropping the requests in flight), and push its load onto the
//! others. Routing first costs nothing (a string match) and lets the 404/405 answers skip the
//! shedding as well; only requests that do real work take an in-flight permit.
//!
//! The admin listener (`src/admin.rs`) has its own small service, served by the same accept path.
//!
//! Request extensions (who inserts → who reads):
//! - [`ClientAddr`]: `server` → the usage layer.
//! - `RequestId`: the request-id layer → the usage layer.
//! - `Trail`: the usage layer → auth (client), the edits phases (every field), the forwarding
//!   task (which takes the record over).
//! - `Caller`: auth → the client limit, the edits phases.
//!
//! Response extensions: `ErrorParts` and `CallerLeft` (set by `GatewayError::into_response`) →
//! the usage layer, which records why a request was refused.
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::body::{Body, full};
use crate::clock::Clock;
use crate::config::Config;
use crate::edit::files::FileRules;
use crate::edit::form::FormRules;
use crate::edit::png_check::PngRules;
use crate::edits::forward::Forwarder;
use crate::edits::gpt::ModelTable;
use crate::edits::read_body::{BodyLimits, BufferBudget};
use crate::edits::relay::RelayTimeouts;
use crate::edits::validated::{CacheLimits, ValidatedCache};
use crate::edits::{Edits, EditsService, EndUserRules};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::limits::quota::QuotaStore;
use crate::limits::rate::{RateBackend, RateLimits};
use crate::limits::rate_redis::RedisRates;
use crate::limits::spec::RateBackendKind;
use crate::middleware::BoxFuture;
use crate::middleware::auth::{AuthLayer, KeyTable};
use crate::middleware::client_limit::ClientLimitLayer;
use crate::middleware::overload::OverloadLayer;
use crate::middleware::request_id::RequestIdLayer;
use crate::middleware::usage::UsageLayer;
use crate::startup::StartupError;
use crate::upstream::Upstream;
use tokio_util::task::TaskTracker;

/// The rate-limit backend `[limits] backend` names.
fn rate_backend(config: &Config, clock: &Clock) -> Result<Arc<dyn RateBackend>, StartupError> {
    Ok(match config.limits.backend {
        RateBackendKind::Memory => Arc::new(RateLimits::new(config, clock.clone())),
        RateBackendKind::Redis => {
            let rates = RedisRates::new(config, clock.clone())
                .map_err(|e| StartupError::Config(vec![e]))?;
            tracing::info!(url = %rates.shown_url(), prefix = %config.limits.redis_prefix, failure = ?config.limits.redis_failure, "rate limits on Redis");
            Arc::new(rates)
        }
    })
}

/// Everything a request may need, built once at start.
pub struct AppState {
    pub config: Arc<Config>,
    pub keys: KeyTable,
    pub upstream: Arc<Upstream>,
    pub form_rules: FormRules,
    pub png_rules: PngRules,
    /// The accepted gpt-image models with their rules and prices.
    pub models: Arc<ModelTable>,
    /// Byte-level checks of gpt-image files.
    pub file_rules: FileRules,
    pub decode_permits: Arc<Semaphore>,
    /// Files that passed the checks recently (`[cache]`), shared by both profiles.
    pub validated: Arc<ValidatedCache>,
    /// The overload layer's permits (`server.max_in_flight`): one per edit being handled.
    pub in_flight: Arc<Semaphore>,
    pub body_cap: usize,
    pub body_timeout: Duration,
    /// Forwarding tasks that may run at once.
    pub forwarding_slots: Arc<Semaphore>,
    /// Request bytes held in memory across all requests.
    pub buffer_budget: BufferBudget,
    pub clock: Clock,
    pub rates: Arc<dyn RateBackend>,
    pub quotas: Arc<QuotaStore>,
    pub ledger: Ledger,
    /// Forwarding tasks, which outlive their connections; shutdown waits for them.
    pub tasks: TaskTracker,
}

impl AppState {
    /// Build the state, opening the SQLite ledger at `ledger.path` (recovering what a crash
    /// left `forwarding`).
    pub fn new(config: Config, clock: Clock) -> Result<AppState, StartupError> {
        let opened = match config.ledger.postgres() {
            Some(settings) => {
                Ledger::open_postgres(settings, &config.ledger.replica(), config.ledger.queue)
            }
            None => Ledger::open_sqlite(&config.ledger.path, config.ledger.queue),
        };
        let (ledger, recovered) = opened.map_err(|e| StartupError::LedgerOpen {
            path: config.ledger.location(),
            detail: e.to_string(),
        })?;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "ledger: requests left 'forwarding' by a crash are now 'unknown'"
            );
        }
        let state = Self::with_ledger(config, clock, ledger)?;
        // The ledger is recovered: make the quota agree with it (holds a crash left).
        let holds = state
            .quotas
            .recover()
            .map_err(|detail| StartupError::QuotaStore {
                path: state.config.ledger.location(),
                detail,
            })?;
        if !holds.is_empty() {
            tracing::warn!(
                refunded = holds.refunded,
                reconciled = holds.reconciled,
                micros_delta = holds.micros_delta,
                left = holds.left,
                "quota: reservations left by a crash now match the ledger"
            );
        }
        Ok(state)
    }

    /// Build the state around a ledger that is already running.
    pub fn with_ledger(
        config: Config,
        clock: Clock,
        ledger: Ledger,
    ) -> Result<AppState, StartupError> {
        crate::metrics::handle();
        let config = Arc::new(config);
        let v = &config.validation;
        let validated = Arc::new(ValidatedCache::new(
            CacheLimits {
                max_entries: config.cache.validated_images_max_entries,
                max_bytes: config.cache.validated_images_max_bytes,
                ttl: config.cache.validated_images_ttl,
            },
            clock.clone(),
        ));
        Ok(AppState {
            rates: rate_backend(&config, &clock)?,
            quotas: Arc::new(QuotaStore::open_configured(config.clone(), clock.clone())?),
            clock,
            ledger,
            tasks: TaskTracker::new(),
            keys: KeyTable::from_config(&config)?,
            upstream: Arc::new(Upstream::new(&config)?),
            form_rules: FormRules {
                max_prompt_chars: v.max_prompt_chars,
                max_user_chars: v.max_user_chars,
                models: v.models.clone(),
                max_parts: v.max_parts,
            },
            png_rules: PngRules {
                max_bytes: v.max_image_bytes,
                max_dimension: v.max_dimension,
                transparency: v.transparency.into(),
                max_conversion_bytes: v.max_conversion_bytes,
            },
            decode_permits: Arc::new(Semaphore::new(config.server.max_concurrent_decodes)),
            validated,
            in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
            // One cap for the route: the larger of the two profiles' bodies.
            body_cap: if config.models.serves_gpt_image() {
                v.body_cap().max(config.models.limits.body_cap())
            } else {
                v.body_cap()
            },
            models: Arc::new(ModelTable::new(&config.models, &v.models)?),
            file_rules: {
                let mut rules = FileRules {
                    max_pixels: config.models.limits.max_input_pixels,
                    ..FileRules::default()
                };
                // One memory budget for the shared interlaced tRNS conversion.
                rules.png.max_conversion_bytes = v.max_conversion_bytes;
                rules
            },
            body_timeout: config.server.body_read_timeout,
            forwarding_slots: Arc::new(Semaphore::new(config.server.max_forwarding)),
            buffer_budget: BufferBudget::new(
                config.server.max_buffered_bytes,
                config.server.buffer_wait,
            ),
            config,
        })
    }
}

/// The service handed to hyper for every connection. `Error = Infallible`: every failure is a
/// response, because an error reaching hyper closes the connection without an answer.
pub type AppService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// The pieces the edits phases need, taken from the state.
fn edits(state: &AppState) -> Edits {
    let config = &state.config;
    Edits {
        body: BodyLimits {
            cap: state.body_cap,
            timeout: state.body_timeout,
            min_rate: config.server.min_body_rate,
            rate_grace: config.server.body_rate_grace,
        },
        budget: state.buffer_budget.clone(),
        form: state.form_rules.clone(),
        end_user: EndUserRules {
            clients: config.clients.clone().into(),
            missing_user: config.limits.missing_user,
            mismatch: config.limits.personal_user_mismatch,
            max_user_chars: config.validation.max_user_chars,
        },
        prompt_policy: config.ledger.prompt,
        rates: state.rates.clone(),
        quotas: state.quotas.clone(),
        png: state.png_rules.clone(),
        models: state.models.clone(),
        files: state.file_rules.clone(),
        clock: state.clock.clone(),
        decode_permits: state.decode_permits.clone(),
        validated: state.validated.clone(),
        forwarder: Forwarder {
            upstream: state.upstream.clone(),
            timeouts: RelayTimeouts {
                upstream_idle: config.upstream.idle_timeout,
                caller_idle: config.server.caller_idle_timeout,
            },
            slots: state.forwarding_slots.clone(),
            ledger: state.ledger.clone(),
            tasks: state.tasks.clone(),
        },
    }
}

pub fn build(state: Arc<AppState>) -> AppService {
    let edits = ServiceBuilder::new()
        // Shed load before doing any work for an edit. Below the router, so the health routes
        // answer however busy the gateway is.
        .layer(OverloadLayer::with_permits(state.in_flight.clone()))
        // Authentication is cheap and needs only headers: it runs before the body is read.
        .layer(AuthLayer::new(state.keys.clone()))
        // The per-client limit needs only the caller: also before the body is read.
        .layer(ClientLimitLayer::new(state.rates.clone()))
        .service(EditsService::new(Arc::new(edits(&state))));
    let readiness = {
        let state = state.clone();
        move || state.upstream.has_key() && state.ledger.healthy()
    };
    let router = Router::new(BoxCloneSyncService::new(edits), readiness);
    let stack = ServiceBuilder::new()
        // Outermost: ids and the span, so every response (panics and shedding included) carries
        // `x-request-id` and every log line below has the request id.
        .layer(RequestIdLayer)
        // Mark the caller's key sensitive before anything below could log headers.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        // Opens the usage record of every request to the edits route before anything can refuse
        // it, so every outcome below (shedding, panics, authentication and limit refusals
        // included) is written to the ledger exactly once.
        .layer(UsageLayer::new(state.ledger.clone(), state.clock.clone()))
        // tower-http boxes bodies in its own type; box them back into ours.
        .map_response(|r: Response<_>| r.map(Body::new))
        // A panic anywhere below becomes a JSON 500 instead of a dropped connection.
        .layer(CatchPanicLayer::custom(
            |_panic: Box<dyn std::any::Any + Send>| {
                tracing::error!("a request handler panicked");
                GatewayError::Internal.into_response()
            },
        ))
        .service(router);
    BoxCloneSyncService::new(stack)
}

/// Ready to serve: an upstream key is configured and the ledger can be written.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Routes by path, then method: `POST /v1/images/edits` to the edits stack (overload layer
/// included), `GET`/`HEAD` `/healthz` and `/readyz` answered here; other paths 404 and other
/// methods 405, both in the JSON envelope. Generic over the edits service and the request body,
/// so it can be tested without a connection.
#[derive(Clone)]
pub struct Router<E> {
    edits: E,
    ready: Readiness,
}

impl<E> Router<E> {
    pub fn new(edits: E, ready: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Router {
            edits,
            ready: Arc::new(ready),
        }
    }
}

impl<E, B> Service<Request<B>> for Router<E>
where
    E: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    E::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each route's readiness is awaited in its own call (a clone, `oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        let method = req.method();
        let refuse =
            |e: GatewayError| -> Self::Future { Box::pin(async move { Ok(e.into_response()) }) };
        let not_allowed = |allowed: &'static str| GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allowed,
        };
        let health = method == Method::GET || method == Method::HEAD;
        match path {
            p if crate::middleware::usage::is_edits_route(p) => {
                if method == Method::POST {
                    let edits = self.edits.clone();
                    Box::pin(edits.oneshot(req))
                } else {
                    refuse(not_allowed("POST"))
                }
            }
            "/healthz" | "/readyz" if !health => refuse(not_allowed("GET, HEAD")),
            "/healthz" => Box::pin(async { Ok(json(StatusCode::OK, r#"{"status":"ok"}"#)) }),
            "/readyz" => {
                let ready = (self.ready)();
                Box::pin(async move {
                    Ok(if ready {
                        json(StatusCode::OK, r#"{"status":"ready"}"#)
                    } else {
                        json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"status":"not ready","reason":"no upstream key configured, or the ledger cannot be written"}"#,
                        )
                    })
                })
            }
            _ => refuse(GatewayError::UnknownUrl {
                method: method.to_string(),
                path: path.to_owned(),
            }),
        }
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

pub use crate::extensions::ClientAddr;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::service_fn;

    /// A router whose edits service answers 200 "edited".
    fn router(
        ready: Arc<AtomicBool>,
    ) -> Router<BoxCloneSyncService<Request<()>, Response<Body>, Infallible>> {
        let edits = service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(full("edited")))
        });
        Router::new(BoxCloneSyncService::new(edits), move || {
            ready.load(Ordering::SeqCst)
        })
    }

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    async fn call<S>(
        svc: &S,
        method: Method,
        path: &str,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value)
    where
        S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone,
    {
        let resp = svc.clone().oneshot(request(method, path)).await.unwrap();
        let (head, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (head.status, head.headers, json)
    }

    fn assert_envelope(json: &serde_json::Value, code: &str) {
        let e = &json["error"];
        assert_eq!(e["type"], "invalid_request_error", "{json}");
        assert_eq!(e["code"], code, "{json}");
        assert!(e["param"].is_null(), "{json}");
        assert!(e["message"].is_string(), "{json}");
    }

    #[tokio::test]
    async fn unknown_paths_are_404_in_the_envelope() {
        let r = router(Arc::new(AtomicBool::new(true)));
        for path in ["/", "/v1/images/generations", "/metrics", "/healthz/x"] {
            let (status, headers, json) = call(&r, Method::GET, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            assert_envelope(&json, "unknown_url");
            assert_eq!(
                json["error"]["message"],
                format!("Invalid URL (GET {path})")
            );
        }
    }

    #[tokio::test]
    async fn wrong_methods_are_405_with_allow() {
        let r = router(Arc::new(AtomicBool::new(true)));
        for (method, path, allow) in [
            (Method::GET, "/v1/images/edits", "POST"),
            (Method::PUT, "/v1/images/edits/", "POST"),
            (Method::POST, "/healthz", "GET, HEAD"),
            (Method::DELETE, "/readyz", "GET, HEAD"),
        ] {
            let (status, headers, json) = call(&r, method.clone(), path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(headers[header::ALLOW], allow);
            assert_envelope(&json, "method_not_allowed");
        }
    }

    #[tokio::test]
    async fn health_routes_and_the_edits_route() {
        let ready = Arc::new(AtomicBool::new(true));
        let r = router(ready.clone());
        for method in [Method::GET, Method::HEAD] {
            let (status, _, json) = call(&r, method, "/healthz").await;
            assert_eq!((status, &json["status"]), (StatusCode::OK, &"ok".into()));
        }
        let (status, _, json) = call(&r, Method::GET, "/readyz").await;
        assert_eq!((status, &json["status"]), (StatusCode::OK, &"ready".into()));
        ready.store(false, Ordering::SeqCst);
        let (status, _, json) = call(&r, Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["status"], "not ready");
        let (status, _, _) = call(&r, Method::GET, "/healthz").await;
        assert_eq!(status, StatusCode::OK, "alive even when not ready");
        for path in ["/v1/images/edits", "/v1/images/edits/"] {
            let (status, _, body) = call(&r, Method::POST, path).await;
            assert_eq!((status, body), (StatusCode::OK, "edited".into()), "{path}");
        }
    }

    /// The order `build` uses: router above the overload layer, which wraps only the edits
    /// service. With every in-flight permit taken by an edit that does not finish, the next edit
    /// is shed and the health routes still answer.
    #[tokio::test]
    async fn health_answers_while_edits_are_shed() {
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::new(tokio::sync::Notify::new());
        let hanging = {
            let held = held.clone();
            service_fn(move |_req: Request<()>| {
                let (entered_tx, held) = (entered_tx.clone(), held.clone());
                async move {
                    // Registered before saying "entered", so the release cannot be missed.
                    let released = held.notified();
                    let _ = entered_tx.send(());
                    released.await;
                    Ok::<_, Infallible>(Response::new(full("edited")))
                }
            })
        };
        let edits = ServiceBuilder::new()
            .layer(OverloadLayer::new(2))
            .service(hanging);
        let r = Router::new(BoxCloneSyncService::new(edits), || true);
        let in_flight: Vec<_> = (0..2)
            .map(|_| tokio::spawn(r.clone().oneshot(request(Method::POST, "/v1/images/edits"))))
            .collect();
        for _ in 0..2 {
            entered.recv().await.unwrap();
        }
        let (status, _, json) = call(&r, Method::POST, "/v1/images/edits").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["error"]["code"], "overloaded");
        for path in ["/healthz", "/readyz"] {
            let (status, _, _) = call(&r, Method::GET, path).await;
            assert_eq!(status, StatusCode::OK, "{path} under load");
        }
        let (status, _, _) = call(&r, Method::GET, "/nope").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "routing answers are not shed either"
        );
        held.notify_waiters();
        for t in in_flight {
            assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
        }
    }
}
