//! THE stack, assembled in one place, top to bottom, with the reason each layer sits where it is.
//!
//! A request to `POST /v1/images/edits` passes, in order:
//!
//! 1. `server`: accept, first-bytes deadline, hyper (HTTP/1.1 + h2), header-read timeout.
//! 2. [`RequestIdLayer`]: `x-request-id` / `x-imagegate-request-id` and the request's span.
//! 3. `SetSensitiveRequestHeaders`: the caller's `Authorization` is never logged.
//! 4. [`UsageLayer`]: opens the request's ledger record (the [`Trail`](crate::record::Trail)),
//!    writes it for every outcome that was not forwarded.
//! 5. `CatchPanic`: a panic below becomes a JSON 500.
//! 6. [`Router`]: path then method (404/405 in the JSON envelope); `/healthz` and `/readyz` are
//!    answered here, so they never reach the overload layer.
//! 7. [`OverloadLayer`]: global in-flight cap, load shed → 503 — on the edits route only.
//!    Then the request takes the configuration snapshot in force ([`Live`], swapped by a
//!    reload, `src/reload.rs`) and keeps it to its end: the layers below are those of its
//!    snapshot.
//! 8. [`AuthLayer`](crate::middleware::auth::AuthLayer): gateway key → client (401), the
//!    caller's key removed.
//! 9. [`ClientLimitLayer`](crate::middleware::client_limit::ClientLimitLayer): the per-client
//!    request rate (429), before the body is read.
//! 10. [`EditsService`](crate::edits::EditsService), the phases of `src/edits/` (see its module
//!     doc): content type → read body → parse form → resolve end user → field rules → user
//!     limits → reserve quota → check images → canonical body → forward → relay → settle and
//!     record.
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
//! - `Trail` (`crate::record`): the usage layer → auth (client), the edits phases (every field),
//!   the forwarding task (which takes the record over).
//! - `Caller` (`crate::extensions`): auth → the client limit, the edits phases.
//!
//! The edits phases import no layer: what they share with the layers (`Caller`, `Trail` and the
//! one place a finished record is written, `record::commit`) lives in neutral modules.
//!
//! Response extensions: `ErrorParts` and `CallerLeft` (set by `GatewayError::into_response`) →
//! the usage layer, which records why a request was refused.
//!
//! Files: here [`AppState`] and the stack ([`build`]); `state` the fixed and live halves of the
//! state; `router` the [`Router`].

mod router;
mod state;

use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response, header};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::body::Body;
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
use crate::edits::{Edits, EndUserRules};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::limits::quota::QuotaStore;
use crate::limits::rate::RateBackend;
use crate::middleware::BoxFuture;
use crate::middleware::overload::OverloadLayer;
use crate::middleware::request_id::RequestIdLayer;
use crate::middleware::usage::UsageLayer;
use crate::reload::ReloadReport;
use crate::startup::StartupError;
use crate::upstream::Upstream;
use tokio_util::task::TaskTracker;

pub use router::{Readiness, Router};
pub use state::{Fixed, Live};

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
            cut_through: config.upstream.cut_through,
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

pub use crate::extensions::ClientAddr;
use state::open_postgres_waiting;
