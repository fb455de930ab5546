//! The two halves of the state: [`Fixed`] (made once at start) and [`Live`] (the snapshot a
//! reload swaps), and how each is opened.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use super::{AppService, edits};
use crate::clock::Clock;
use crate::config::Config;
use crate::edits::EditsService;
use crate::edits::gpt::ModelTable;
use crate::edits::read_body::BufferBudget;
use crate::edits::validated::ValidatedCache;
use crate::ledger::Ledger;
use crate::limits::quota::QuotaStore;
use crate::limits::rate::{RateBackend, RateLimits};
use crate::limits::rate_redis::RedisRates;
use crate::limits::spec::RateBackendKind;
use crate::middleware::auth::{AuthLayer, KeyTable, key_digest};
use crate::middleware::client_limit::ClientLimitLayer;
use crate::startup::StartupError;
use crate::upstream::Upstream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// The rate-limit backend `[limits] backend` names.
pub(super) fn rate_backend(
    config: &Config,
    clock: &Clock,
) -> Result<Arc<dyn RateBackend>, StartupError> {
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
pub(super) fn open_postgres_waiting(
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
    /// The digest of the metrics token (`admin.metrics_auth = "token"`), hashed once here.
    pub metrics_token: Option<[u8; 32]>,
    /// TLS of the API listener (`server.tls`), for the connections accepted under it.
    pub api_tls: Option<TlsAcceptor>,
    /// TLS of the admin listener (`admin.tls`).
    pub admin_tls: Option<TlsAcceptor>,
    /// 1 at start, +1 per applied reload.
    pub generation: u64,
    /// Authentication, the client limit and the edits phases under this configuration.
    pub(super) edits: AppService,
}

impl Live {
    /// Build the snapshot of `config`. With `previous` (a reload), the state that survives is
    /// taken from it: the rate limiters whose numbers did not change, the quota store (its use),
    /// the upstream client when `[upstream]` and the key are the same.
    pub(super) fn build(
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
            (Some(_), Some(h)) => Some(
                h.digest()
                    .map_err(|e| StartupError::AdminKeyHash(e.into()))?,
            ),
            _ => None,
        };
        let metrics_token = config
            .admin
            .metrics_token
            .as_ref()
            .map(|token| key_digest(token.expose()));
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
            metrics_token,
            api_tls: tls(&config.server.tls, "server.tls")?,
            admin_tls: tls(&config.admin.tls, "admin.tls")?,
            generation: previous.map_or(1, |p| p.generation + 1),
            edits,
            config,
        })
    }
}

/// The upstream client can be kept: same `[upstream]` (the pool's keys included, their
/// values compared: `Debug` redacts them; `cut_through` aside, which the forwarder reads), same
/// single key, no CA file to read again.
pub(super) fn same_upstream(old: &Config, new: &Config) -> bool {
    let client = |c: &Config| {
        let mut u = c.upstream.clone();
        u.cut_through = false;
        format!("{u:?}")
    };
    let secrets = |c: &Config| {
        c.upstream
            .keys
            .iter()
            .map(|k| k.secret.as_ref().map(|s| s.expose().to_owned()))
            .collect::<Vec<_>>()
    };
    client(old) == client(new)
        && old.upstream_key.as_ref().map(|k| k.expose())
            == new.upstream_key.as_ref().map(|k| k.expose())
        && secrets(old) == secrets(new)
        && new.upstream.ca_file.is_none()
}
