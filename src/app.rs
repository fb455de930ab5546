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
//!    Then the request takes the configuration snapshot in force ([`Live`], swapped by a
//!    reload, `src/reload.rs`) and keeps it to its end: the layers below are those of its
//!    snapshot.
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
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::body::{Body, full};
use crate::clock::Clock;
use crate::config::{Config, parse_key_hash};
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
use crate::reload::ReloadReport;
use crate::startup::StartupError;
use crate::upstream::Upstream;
use tokio_rustls::TlsAcceptor;
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

/// Open the PostgreSQL ledger, trying again while the server cannot be reached (a database
/// that starts with the gateway, e.g. in compose) for at most `ledger.startup_wait`.
/// Blocking: runs off the runtime's workers.
fn open_postgres_waiting(
    config: &Config,
    settings: crate::ledger::PgSettings,
) -> Result<(Ledger, usize), crate::ledger::LedgerError> {
    let l = &config.ledger;
    let deadline = std::time::Instant::now() + l.startup_wait;
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match Ledger::open_postgres_probed(
            settings.clone(),
            &l.replica(),
            l.queue,
            l.health_interval,
        ) {
            Err(e) if e.is_transient() && std::time::Instant::now() + pause < deadline => {
                tracing::warn!(error = %e, retry_in = ?pause, "ledger: PostgreSQL not reachable yet; waiting (ledger.startup_wait)");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// What does not change while the gateway runs: bound to the listeners, the ledger, and the
/// process-wide budgets (read from the configuration at start; a reload names them as needing
/// a restart). [`AppState`] derefs to it.
pub struct Fixed {
    pub decode_permits: Arc<Semaphore>,
    /// Files that passed the checks recently (`[cache]`), shared by both profiles and every
    /// configuration (entries are keyed by the rules that judged them).
    pub validated: Arc<ValidatedCache>,
    /// The overload layer's permits (`server.max_in_flight`): one per edit being handled.
    pub in_flight: Arc<Semaphore>,
    /// Forwarding tasks that may run at once.
    pub forwarding_slots: Arc<Semaphore>,
    /// Request bytes held in memory across all requests.
    pub buffer_budget: BufferBudget,
    pub clock: Clock,
    pub ledger: Ledger,
    /// Forwarding tasks, which outlive their connections; shutdown waits for them.
    pub tasks: TaskTracker,
}

/// What a reload may change, built from one configuration and swapped as a whole
/// (`src/reload.rs`). A request takes the snapshot in force when it reaches the edits route and
/// keeps it to its end.
pub struct Live {
    /// The configuration in force (its restart-only settings are those of the start).
    pub config: Arc<Config>,
    pub keys: KeyTable,
    /// The upstream client with its key(s): swapped as a whole.
    pub upstream: Arc<Upstream>,
    pub rates: Arc<dyn RateBackend>,
    pub quotas: Arc<QuotaStore>,
    /// The accepted gpt-image models with their rules and prices.
    pub models: Arc<ModelTable>,
    /// The digest of the admin key, when the admin listener is on.
    pub admin_key: Option<[u8; 32]>,
    /// TLS of the API listener (`server.tls`), for the connections accepted under it.
    pub api_tls: Option<TlsAcceptor>,
    /// TLS of the admin listener (`admin.tls`).
    pub admin_tls: Option<TlsAcceptor>,
    /// 1 at start, +1 per applied reload.
    pub generation: u64,
    /// Authentication, the client limit and the edits phases under this configuration.
    edits: AppService,
}

impl Live {
    /// Build the snapshot of `config`. With `previous` (a reload), the state that survives is
    /// taken from it: the rate limiters whose numbers did not change, the quota store (its use),
    /// the upstream client when `[upstream]` and the key are the same.
    fn build(
        fixed: &Fixed,
        config: Arc<Config>,
        previous: Option<&Live>,
    ) -> Result<Live, StartupError> {
        let rates = match previous {
            Some(p) => p.rates.reconfigured(&config),
            None => rate_backend(&config, &fixed.clock)?,
        };
        let quotas = Arc::new(match previous {
            Some(p) => p
                .quotas
                .reconfigured(config.clone())
                .map_err(|e| StartupError::Config(vec![e]))?,
            None => QuotaStore::open_configured(config.clone(), fixed.clock.clone())?
                .with_ledger_writer(&fixed.ledger),
        });
        let upstream = match previous {
            Some(p) if same_upstream(&p.config, &config) => p.upstream.clone(),
            Some(p) => {
                // A new pool keeps the breaker state of the keys it shares with the old one.
                let new = Upstream::with_clock(&config, fixed.clock.clone())?;
                new.pool().inherit(p.upstream.pool());
                Arc::new(new)
            }
            None => Arc::new(Upstream::with_clock(&config, fixed.clock.clone())?),
        };
        let admin_key = match (&config.admin.listen, &config.admin.key_hash) {
            (Some(_), Some(h)) => Some(parse_key_hash(h).map_err(StartupError::AdminKeyHash)?),
            _ => None,
        };
        let tls = |files: &Option<crate::tls::TlsFiles>, at: &str| {
            files
                .as_ref()
                .map(|f| crate::tls::acceptor(f, at))
                .transpose()
                .map_err(StartupError::Tls)
        };
        let keys = KeyTable::from_config(&config)?;
        let models = Arc::new(ModelTable::new(&config.models, &config.validation.models)?);
        let phases = edits(fixed, &config, &rates, &quotas, &models, &upstream);
        let edits = BoxCloneSyncService::new(
            ServiceBuilder::new()
                // Authentication is cheap and needs only headers: it runs before the body is read.
                .layer(AuthLayer::new(keys.clone()))
                // The per-client limit needs only the caller: also before the body is read.
                .layer(ClientLimitLayer::new(rates.clone()))
                .service(EditsService::new(Arc::new(phases))),
        );
        Ok(Live {
            keys,
            upstream,
            rates,
            quotas,
            models,
            admin_key,
            api_tls: tls(&config.server.tls, "server.tls")?,
            admin_tls: tls(&config.admin.tls, "admin.tls")?,
            generation: previous.map_or(1, |p| p.generation + 1),
            edits,
            config,
        })
    }
}

/// The upstream client can be kept: same `[upstream]` (the pool's keys included, their
/// values compared: `Debug` redacts them), same single key, no CA file to read again.
fn same_upstream(old: &Config, new: &Config) -> bool {
    let secrets = |c: &Config| {
        c.upstream
            .keys
            .iter()
            .map(|k| k.secret.as_ref().map(|s| s.expose().to_owned()))
            .collect::<Vec<_>>()
    };
    format!("{:?}", old.upstream) == format!("{:?}", new.upstream)
        && old.upstream_key.as_ref().map(|k| k.expose())
            == new.upstream_key.as_ref().map(|k| k.expose())
        && secrets(old) == secrets(new)
        && new.upstream.ca_file.is_none()
}

/// Everything a request may need: the fixed part (`Deref`) and the snapshot in force
/// ([`AppState::live`]).
pub struct AppState {
    fixed: Fixed,
    live: RwLock<Arc<Live>>,
    /// Held while a reload runs: one at a time.
    reloading: Mutex<()>,
    /// Where a reload reads the configuration (set by `serve`); none: reloads are refused.
    source: Mutex<Option<ConfigSource>>,
}

/// Loads the configuration again for a reload (the file, its key files, the environment and
/// the command-line overrides), or every problem found.
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, Vec<String>> + Send + Sync>;

impl std::ops::Deref for AppState {
    type Target = Fixed;
    fn deref(&self) -> &Fixed {
        &self.fixed
    }
}

impl AppState {
    /// Build the state, opening the SQLite ledger at `ledger.path` (recovering what a crash
    /// left `forwarding`).
    pub fn new(config: Config, clock: Clock) -> Result<AppState, StartupError> {
        let opened = match config.ledger.postgres() {
            Some(settings) => open_postgres_waiting(&config, settings),
            None => Ledger::open_sqlite_with(
                &config.ledger.path,
                config.ledger.queue,
                config.ledger.sqlite_synchronous,
            ),
        };
        let (ledger, recovered) = opened.map_err(|e| StartupError::LedgerOpen {
            path: config.ledger.location(),
            detail: e.to_string(),
        })?;
        ledger.set_stall_timeout(config.ledger.stall_timeout);
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "ledger: requests left 'forwarding' by a crash are now 'unknown'"
            );
        }
        let state = Self::with_ledger(config, clock, ledger)?;
        // The ledger is recovered: make the quota agree with it (holds a crash left).
        let holds = state
            .live()
            .quotas
            .recover()
            .map_err(|detail| StartupError::QuotaStore {
                path: state.config().ledger.location(),
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
        let validated = Arc::new(ValidatedCache::new(
            CacheLimits {
                max_entries: config.cache.validated_images_max_entries,
                max_bytes: config.cache.validated_images_max_bytes,
                ttl: config.cache.validated_images_ttl,
            },
            clock.clone(),
        ));
        let fixed = Fixed {
            clock,
            ledger,
            tasks: TaskTracker::new(),
            decode_permits: Arc::new(Semaphore::new(config.server.max_concurrent_decodes)),
            validated,
            in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
            forwarding_slots: Arc::new(Semaphore::new(config.server.max_forwarding)),
            buffer_budget: BufferBudget::new(
                config.server.max_buffered_bytes,
                config.server.buffer_wait,
            ),
        };
        let live = Live::build(&fixed, config, None)?;
        crate::reload::mark_success(live.generation);
        Ok(AppState {
            fixed,
            live: RwLock::new(Arc::new(live)),
            reloading: Mutex::new(()),
            source: Mutex::new(None),
        })
    }

    /// The snapshot in force: take it once and keep it for the whole of a piece of work.
    pub fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .expect("the snapshot lock is never held across a panic")
            .clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.live().config.clone()
    }

    /// Where [`AppState::reload`] reads the configuration.
    pub fn set_source(&self, source: ConfigSource) {
        *self.source.lock().expect("source lock poisoned by a panic") = Some(source);
    }

    /// Read the configuration again from the source and apply it (see `src/reload.rs`).
    /// Blocking (files, possibly the network for a PostgreSQL quota store): call it off the
    /// runtime's workers (`spawn_blocking`). `trigger` is logged (`SIGHUP`, `admin`).
    pub fn reload(&self, trigger: &str) -> ReloadReport {
        let started = Instant::now();
        let source = self
            .source
            .lock()
            .expect("source lock poisoned by a panic")
            .clone();
        let mut report = match source {
            None => ReloadReport::rejected(
                self.live().generation,
                vec![
                    "this gateway was not started from a configuration file: nothing to reload"
                        .into(),
                ],
            ),
            Some(load) => match load() {
                Ok(config) => self.apply(config),
                Err(problems) => ReloadReport::rejected(self.live().generation, problems),
            },
        };
        report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        report.publish(trigger);
        if report.applied()
            && report
                .changed
                .iter()
                .any(|c| c == "models" || c == "validation" || c == "upstream")
            && tokio::runtime::Handle::try_current().is_ok()
        {
            // The model gauges (and warnings) follow the models now served.
            let live = self.live();
            crate::models_check::at_start(
                live.config.clone(),
                live.upstream.clone(),
                self.clock.clone(),
            );
        }
        report
    }

    /// Apply a loaded configuration: all of it that may change live, or nothing.
    pub fn apply(&self, mut config: Config) -> ReloadReport {
        let _one_at_a_time = self
            .reloading
            .lock()
            .expect("reload lock poisoned by a panic");
        let current = self.live();
        let restart_required = crate::reload::pin_restart_only(&current.config, &mut config);
        if !restart_required.is_empty() {
            // Settings put back may not fit the new ones (the buffer budget and a larger body
            // cap): check the configuration that would be in force.
            let problems = config.problems();
            if !problems.is_empty() {
                return ReloadReport::rejected(current.generation, problems);
            }
        }
        let live = match Live::build(&self.fixed, Arc::new(config), Some(&current)) {
            Ok(live) => live,
            Err(e) => return ReloadReport::rejected(current.generation, e.lines()),
        };
        let changed = crate::reload::changes(&current.config, &live.config);
        let generation = live.generation;
        *self
            .live
            .write()
            .expect("the snapshot lock is never held across a panic") = Arc::new(live);
        ReloadReport {
            status: "applied",
            generation,
            changed,
            restart_required,
            problems: Vec::new(),
            duration_ms: 0.0,
        }
    }
}

/// The service handed to hyper for every connection. `Error = Infallible`: every failure is a
/// response, because an error reaching hyper closes the connection without an answer.
pub type AppService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// The pieces the edits phases need, from the fixed state and one configuration.
fn edits(
    fixed: &Fixed,
    config: &Config,
    rates: &Arc<dyn RateBackend>,
    quotas: &Arc<QuotaStore>,
    models: &Arc<ModelTable>,
    upstream: &Arc<Upstream>,
) -> Edits {
    let v = &config.validation;
    Edits {
        body: BodyLimits {
            // One cap for the route: the larger of the two profiles' bodies.
            cap: if config.models.serves_gpt_image() {
                v.body_cap().max(config.models.limits.body_cap())
            } else {
                v.body_cap()
            },
            timeout: config.server.body_read_timeout,
            min_rate: config.server.min_body_rate,
            rate_grace: config.server.body_rate_grace,
        },
        budget: fixed.buffer_budget.clone(),
        form: FormRules {
            max_prompt_chars: v.max_prompt_chars,
            max_user_chars: v.max_user_chars,
            models: v.models.clone(),
            max_parts: v.max_parts,
        },
        end_user: EndUserRules {
            clients: config.clients.clone().into(),
            missing_user: config.limits.missing_user,
            mismatch: config.limits.personal_user_mismatch,
            max_user_chars: v.max_user_chars,
        },
        prompt_policy: config.ledger.prompt,
        rates: rates.clone(),
        quotas: quotas.clone(),
        png: PngRules {
            max_bytes: v.max_image_bytes,
            max_dimension: v.max_dimension,
            transparency: v.transparency.into(),
            max_conversion_bytes: v.max_conversion_bytes,
        },
        models: models.clone(),
        files: {
            let mut rules = FileRules {
                max_pixels: config.models.limits.max_input_pixels,
                ..FileRules::default()
            };
            // One memory budget for the shared interlaced tRNS conversion.
            rules.png.max_conversion_bytes = v.max_conversion_bytes;
            rules
        },
        clock: fixed.clock.clone(),
        decode_permits: fixed.decode_permits.clone(),
        validated: fixed.validated.clone(),
        forwarder: Forwarder {
            upstream: upstream.clone(),
            timeouts: RelayTimeouts {
                upstream_idle: config.upstream.idle_timeout,
                caller_idle: config.server.caller_idle_timeout,
            },
            slots: fixed.forwarding_slots.clone(),
            ledger: fixed.ledger.clone(),
            tasks: fixed.tasks.clone(),
        },
    }
}

/// The edits route's service: takes the snapshot in force and hands the request to its stack
/// (authentication, client limit, edits phases), which it keeps to the end.
#[derive(Clone)]
struct Snapshot(Arc<AppState>);

impl Service<Request<Incoming>> for Snapshot {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let edits = self.0.live().edits.clone();
        Box::pin(edits.oneshot(req))
    }
}

pub fn build(state: Arc<AppState>) -> AppService {
    let edits = ServiceBuilder::new()
        // Shed load before doing any work for an edit. Below the router, so the health routes
        // answer however busy the gateway is.
        .layer(OverloadLayer::with_permits(state.in_flight.clone()))
        // Then one snapshot of the configuration for the whole request.
        .service(Snapshot(state.clone()));
    let readiness = {
        let state = state.clone();
        move || state.live().upstream.has_key() && state.ledger.healthy()
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
