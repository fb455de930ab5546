//! Figures for the shared backends (printed, never asserted). Needs Redis at `REDIS_URL` and
//! PostgreSQL at `DATABASE_URL` (see tests/replicas.rs); bounded in count (a few thousand
//! operations), loopback only:
//!
//!   cargo test --test replicas_bench -- --ignored --nocapture
//!
//! - rate check: `check_user` latency on Redis (one EVALSHA round trip) and in memory;
//! - quota reserve + settle on PostgreSQL and on SQLite: latency of one pair, and pairs per
//!   second with 8 threads;
//! - ledger: records per second through the ledger writer (begin_forwarding + finish(Complete)
//!   per request, 32 concurrent callers) on PostgreSQL and on SQLite;
//! - forwarded request: latency of a small dall-e-2 edit through the gateway (in process, mock
//!   upstream) on the embedded backends (memory + SQLite) and on the shared ones (Redis +
//!   PostgreSQL), and the difference of the medians.
//!
//! Under the test (debug) profile: absolute numbers are higher than a release build's, the
//! round trips to Redis and PostgreSQL much less so.

mod support;

use support::pg::{Schema, database_url};

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use imagegate::clock::Clock;
use imagegate::config::{ClientConfig, Config, LedgerBackend, PgUrl, Secret, hash_key};
use imagegate::ledger::{Ledger, LedgerOp, Outcome, Record};
use imagegate::limits::EndUser;
use imagegate::limits::quota::QuotaStore;
use imagegate::limits::rate::{RateBackend, RateLimits};
use imagegate::limits::rate_redis::RedisRates;
use imagegate::limits::spec::{QuotaSpec, RateBackendKind, RateSpec};

use support::fixtures::rgba_png;
use support::mock_upstream::MockUpstream;
use support::multipart::edit_request;
use support::try_send;

const KEY: &str = "ig-bench-key-0123456789abcdef";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// (p50, p99, mean) of `samples`.
fn stats(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    format!(
        "p50 {:>9.3?}  p99 {:>9.3?}  mean {:>9.3?}  (n = {})",
        at(0.5),
        at(0.99),
        mean,
        samples.len()
    )
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn base_config() -> Config {
    let mut c = Config::default();
    let generous = RateSpec {
        requests_per_minute: Some(1_000_000),
        requests_burst: Some(1_000_000),
        images_per_minute: Some(1_000_000),
        images_burst: Some(1_000_000),
    };
    c.limits.per_user = generous;
    c.limits.per_client = RateSpec {
        images_per_minute: None,
        images_burst: None,
        ..generous
    };
    c.quotas.per_client = QuotaSpec {
        images_per_day: Some(100_000_000),
        ..QuotaSpec::default()
    };
    c.clients.push(ClientConfig {
        name: "bench".into(),
        key_hash: hash_key(KEY),
        ..Default::default()
    });
    c
}

fn with_redis(mut c: Config) -> Config {
    c.limits.backend = RateBackendKind::Redis;
    c.limits.redis_url = Some(Secret::new(redis_url()));
    c.limits.redis_prefix = format!("bench-{}:", uuid::Uuid::new_v4().simple());
    c.limits.redis_timeout = Duration::from_secs(1);
    c
}

fn with_postgres(mut c: Config, schema: &Schema, replica: &str) -> Config {
    c.ledger.backend = LedgerBackend::Postgres;
    c.ledger.postgres_url = Some(PgUrl(database_url()));
    c.ledger.postgres_schema = Some(schema.name.clone());
    c.ledger.replica_id = Some(replica.into());
    c
}

fn who(i: usize) -> EndUser {
    EndUser {
        client: "bench".into(),
        user: Some(format!("user-{}", i % 50)),
    }
}

async fn rate_checks(name: &str, rates: Arc<dyn RateBackend>) {
    for i in 0..100 {
        let _ = rates.check_user(&who(i), 1).await;
    }
    let mut samples = Vec::new();
    for i in 0..2_000 {
        let started = Instant::now();
        let r = rates.check_user(&who(i), 1).await;
        samples.push(started.elapsed());
        assert!(r.is_ok(), "generous limits");
    }
    eprintln!("rate check_user, {name:<22} {}", stats(&mut samples));
}

fn quota_pairs(name: &str, store: Arc<QuotaStore>) {
    let mut samples = Vec::new();
    for i in 0..500 {
        let started = Instant::now();
        let r = store
            .reserve(&format!("req_bench_{i}"), &who(i), 1, 20_000)
            .expect("admitted");
        store.settle(&r, 1, 18_000).expect("settled");
        samples.push(started.elapsed());
    }
    eprintln!("quota reserve+settle, {name:<17} {}", stats(&mut samples));
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let r = store
                        .reserve(&format!("req_bench_{t}_{i}"), &who(t * 1000 + i), 1, 20_000)
                        .unwrap();
                    store.settle(&r, 1, 18_000).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "quota reserve+settle, {name:<17} 8 threads: {:.0} pairs/s (1600 in {took:.2?})",
        1600.0 / took.as_secs_f64()
    );
}

async fn ledger_throughput(name: &str, ledger: Ledger) {
    const CALLERS: usize = 32;
    const EACH: usize = 40;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|t| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let r = Record {
                        request_id: format!("req_{}", uuid::Uuid::new_v4().simple()),
                        received_at: jiff::Timestamp::now(),
                        client: Some("bench".into()),
                        user: Some(format!("u{t}-{i}")),
                        model: Some("dall-e-2".into()),
                        n: Some(1),
                        cost_reserved_micros: 20_000,
                        ..Record::default()
                    };
                    ledger.begin_forwarding(r.clone()).await.unwrap();
                    ledger
                        .finish(LedgerOp::Complete(Record {
                            outcome: Outcome::Answered,
                            status: Some(200),
                            images_returned: Some(1),
                            cost_settled_micros: 20_000,
                            ..r
                        }))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    let n = CALLERS * EACH;
    eprintln!(
        "ledger, {name:<31} {:.0} requests/s ({n} requests, {} chain entries, {CALLERS} callers, {took:.2?})",
        n as f64 / took.as_secs_f64(),
        2 * n
    );
    ledger.close().await.unwrap();
}

/// Sequential small edits through a gateway (in process) on `config`: latencies.
async fn forwarded(config: Config, mock: &MockUpstream) -> Vec<Duration> {
    let mut c = config;
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.upstream.base_url = mock.base_url();
    c.upstream.allow_http = true;
    c.upstream_key = Some(Secret::new("sk-bench".to_owned()));
    c.models.check_at_start = false;
    let server = imagegate::server::spawn_with_clock(c, Clock::system())
        .await
        .expect("the gateway starts");
    let image = rgba_png(64, true);
    let mut samples = Vec::new();
    for i in 0..220 {
        let form = edit_request(&image, "p").text("user", &format!("user-{}", i % 20));
        let started = Instant::now();
        let r = try_send(
            server.addr,
            "POST",
            "/v1/images/edits",
            &[
                ("authorization", &format!("Bearer {KEY}")),
                ("content-type", &form.content_type()),
            ],
            form.body(),
        )
        .await
        .expect("an answer");
        let took = started.elapsed();
        assert_eq!(r.status, 200, "{}", r.text());
        if i >= 20 {
            samples.push(took);
        }
    }
    server.shutdown().await;
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: needs Redis at REDIS_URL and PostgreSQL at DATABASE_URL; prints figures"]
async fn shared_backend_figures() {
    let clock = Clock::manual(SystemTime::now());
    let schema = tokio::task::block_in_place(Schema::new);
    let dir = tempfile::tempdir().unwrap();

    // Rate checks.
    let redis_config = with_redis(base_config());
    rate_checks(
        "Redis",
        Arc::new(RedisRates::new(&redis_config, clock.clone()).unwrap()),
    )
    .await;
    rate_checks(
        "memory",
        Arc::new(RateLimits::new(&base_config(), clock.clone())),
    )
    .await;

    // Quota reserve + settle.
    tokio::task::block_in_place(|| {
        let config = Arc::new(base_config());
        let pg =
            QuotaStore::open_postgres(schema.settings_pooled(8), config.clone(), clock.clone())
                .unwrap();
        quota_pairs("PostgreSQL", Arc::new(pg));
        let sqlite = QuotaStore::open(&dir.path().join("quota.db"), config, clock.clone()).unwrap();
        quota_pairs("SQLite", Arc::new(sqlite));
    });

    // Ledger throughput.
    let (pg_ledger, _) = tokio::task::block_in_place(|| {
        Ledger::open_postgres(schema.settings_pooled(1), "bench", 1024).unwrap()
    });
    ledger_throughput("PostgreSQL", pg_ledger).await;
    let (sqlite_ledger, _) = tokio::task::block_in_place(|| {
        Ledger::open_sqlite(&dir.path().join("ledger.db"), 1024).unwrap()
    });
    ledger_throughput("SQLite (synchronous=FULL)", sqlite_ledger).await;

    // A forwarded request, embedded versus shared backends, alternating rounds.
    let mock = MockUpstream::start().await;
    let mut embedded = Vec::new();
    let mut shared = Vec::new();
    for round in 0..2 {
        let mut c = base_config();
        c.ledger.path = dir.path().join(format!("gateway-{round}.db"));
        embedded.extend(forwarded(c, &mock).await);
        let c = with_postgres(with_redis(base_config()), &schema, &format!("gw-{round}"));
        shared.extend(forwarded(c, &mock).await);
    }
    let (e, s) = (median(&mut embedded), median(&mut shared));
    eprintln!(
        "forwarded edit, embedded (memory+SQLite)  {}",
        stats(&mut embedded)
    );
    eprintln!(
        "forwarded edit, shared (Redis+PostgreSQL) {}",
        stats(&mut shared)
    );
    eprintln!(
        "forwarded edit: the shared backends add {:.3?} at the median",
        s.saturating_sub(e)
    );
    tokio::task::block_in_place(move || drop(schema));
}
