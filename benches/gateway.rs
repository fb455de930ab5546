//! Benchmarks reported in the issue notes (never asserted by tests). Loopback only, bounded.
//!
//!   cargo bench --bench gateway                 # all
//!   cargo bench --bench gateway -- latency      # one: latency | bomb | limits
//!
//! latency: median added latency of the gateway for a valid 1024x1024 RGBA edit (~1.5 MB):
//!          the same request sent N times straight to the mock upstream and N times through
//!          the gateway, interleaved; added = median(gateway) - median(direct).
//! load:    throughput with 16 concurrent callers sending small valid edits (64x64), 1,600
//!          requests in all: requests/s and latency percentiles, every request recorded.
//! bomb:    peak RSS (VmHWM) of this process while the gateway refuses a 30000x30000 PNG.
//! stages:  time of each request-path stage on the same 1024x1024 image: multipart parse, SHA-256,
//!          the PNG checks (complete decode).
//! ledger:  records per second through the ledger (queue, one writer thread, SQLite on disk),
//!          each request = begin_forwarding + finish(Complete), N concurrent writers, and
//!          the latency begin_forwarding adds (the commit awaited before forwarding).
//! limits:  cost of the per-user rate-limit check and of a quota reserve+settle, and memory per
//!          tracked end user.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::fixtures::{bomb_png, rgba_png_noisy};
use support::gateway::{APP_KEY, Gateway, post_edit};
use support::multipart::edit_request;
use support::send;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn latency(n: usize) {
    let gw = Gateway::start().await;
    let image = rgba_png_noisy(1024);
    let form = edit_request(&image, "bench").text("user", "bench");
    let ct = form.content_type();
    let body = form.body();
    let mock = gw.mock.addr();
    // Warm up both paths (connection setup, allocator).
    for _ in 0..5 {
        send(
            mock,
            "POST",
            "/v1/images/edits",
            &[("content-type", &ct)],
            body.clone(),
        )
        .await;
        post_edit(gw.addr(), APP_KEY, &ct, body.clone()).await;
    }
    let mut direct = Vec::with_capacity(n);
    let mut via = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(300);
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        let r = send(
            mock,
            "POST",
            "/v1/images/edits",
            &[("content-type", &ct)],
            body.clone(),
        )
        .await;
        direct.push(t.elapsed());
        assert_eq!(r.status, 200);
        let t = Instant::now();
        let r = post_edit(gw.addr(), APP_KEY, &ct, body.clone()).await;
        via.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (md, mv) = (median(&mut direct), median(&mut via));
    println!(
        "latency: {} requests, body {} bytes (image {} bytes)\n  direct to mock: median {:?} p90 {:?}\n  via gateway:    median {:?} p90 {:?}\n  added (median difference): {:?}",
        via.len(),
        body.len(),
        image.len(),
        md,
        pct(&direct, 0.9),
        mv,
        pct(&via, 0.9),
        mv.saturating_sub(md)
    );
}

async fn load(callers: usize, per_caller: usize) {
    let gw = std::sync::Arc::new(Gateway::start().await);
    let form = edit_request(&support::fixtures::rgba_png(64, true), "load").text("user", "load");
    let (ct, body) = (form.content_type(), form.body());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (gw, ct, body) = (gw.clone(), ct.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(per_caller);
            for _ in 0..per_caller {
                let t = Instant::now();
                let r = post_edit(gw.addr(), APP_KEY, &ct, body.clone()).await;
                assert_eq!(r.status, 200, "{}", r.text());
                times.push(t.elapsed());
            }
            times
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    println!(
        "load: {} callers x {} requests of a 64x64 edit: {:.0} requests/s; latency p50 {:?} p90 {:?} p99 {:?}; upstream received {}",
        callers,
        per_caller,
        all.len() as f64 / secs,
        pct(&all, 0.5),
        pct(&all, 0.9),
        pct(&all, 0.99),
        gw.mock.count()
    );
}

async fn bomb(n: usize) {
    let gw = Gateway::start().await;
    let bomb = edit_request(&bomb_png(30000), "bench").text("user", "bench");
    // Baseline: the gateway started and served one small valid request.
    let small = edit_request(&support::fixtures::rgba_png(64, true), "warm").text("user", "bench");
    assert_eq!(gw.edit(APP_KEY, &small).await.status, 200);
    let before = vm_hwm_kib();
    for _ in 0..n {
        let r = gw.edit(APP_KEY, &bomb).await;
        assert_eq!(r.status, 400);
    }
    let after = vm_hwm_kib();
    println!(
        "bomb: {n} refusals of a {}-byte 30000x30000 PNG; peak RSS before {} KiB, after {} KiB (+{} KiB); a decoded frame would be {} MiB",
        bomb_png(30000).len(),
        before,
        after,
        after - before,
        30000u64 * 30000 * 4 / 1024 / 1024
    );
}

fn limits(users: usize, iterations: usize) {
    use imagegate::clock::Clock;
    use imagegate::config::{ClientConfig, Config, hash_key};
    use imagegate::limits::EndUser;
    use imagegate::limits::quota::QuotaStore;
    use imagegate::limits::rate::{RateBackend, RateLimits};
    use imagegate::limits::spec::QuotaSpec;

    let mut c = Config::default();
    c.limits.max_tracked_users_per_client = users + 10;
    c.limits.per_user.requests_per_minute = Some(1_000_000_000);
    c.limits.per_user.requests_burst = Some(1_000_000_000);
    c.limits.per_user.images_per_minute = Some(1_000_000_000);
    c.limits.per_user.images_burst = Some(1_000_000_000);
    c.quotas.per_user = QuotaSpec {
        images_per_day: Some(u64::MAX / 4),
        usd_per_month: Some(1e9),
        ..Default::default()
    };
    c.clients.push(ClientConfig {
        name: "app".into(),
        key_hash: hash_key("k"),
        ..Default::default()
    });
    let rates = RateLimits::new(&c, Clock::system());
    let who = EndUser {
        client: "app".into(),
        user: Some("hot".into()),
    };
    let t = Instant::now();
    for _ in 0..iterations {
        let _ = rates.check_user(&who, 3);
    }
    let per_check = t.elapsed() / iterations as u32;

    let rss0 = vm_rss_kib();
    let names: Vec<String> = (0..users).map(|i| format!("user-{i:08}")).collect();
    let rss_names = vm_rss_kib();
    for name in &names {
        let _ = rates.check_user(
            &EndUser {
                client: "app".into(),
                user: Some(name.clone()),
            },
            1,
        );
    }
    let rss1 = vm_rss_kib();
    let per_user = (rss1.saturating_sub(rss_names)) as f64 * 1024.0 / users as f64;

    let dir = tempfile::tempdir().unwrap();
    let store = QuotaStore::open(
        &dir.path().join("q.db"),
        std::sync::Arc::new(c),
        Clock::system(),
    )
    .unwrap();
    let q_iter = iterations.min(5000);
    let t = Instant::now();
    for _ in 0..q_iter {
        let r = store.reserve(&who, 2, 40_000).unwrap();
        store.settle(&r, 1, 20_000).unwrap();
    }
    let per_quota = t.elapsed() / q_iter as u32;
    println!(
        "limits: per-user rate check {per_check:?} (mean of {iterations}); quota reserve+settle {per_quota:?} (mean of {q_iter}, SQLite WAL on {}); memory per tracked user {per_user:.0} B ({users} users, RSS {rss0} -> {rss1} KiB)",
        dir.path().display()
    );
}

fn ledger(requests: usize) {
    use imagegate::ledger::sqlite::{SqliteStore, Synchronous};
    use imagegate::ledger::store::{LedgerOp, LedgerStore};
    use imagegate::ledger::{Ledger, Outcome, Record};

    let record = |id: String| {
        let mut r = Record::new(id, jiff::Timestamp::now());
        r.client = Some("bench".into());
        r.user = Some("user-1".into());
        r.model = Some("dall-e-2".into());
        r.n = Some(1);
        r.size = Some("1024x1024".into());
        r.image_sha256 = Some("0".repeat(64));
        r.prompt = Some(format!("sha256:{}", "0".repeat(64)));
        r.cost_reserved_micros = 20_000;
        r
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    println!(
        "ledger: {requests} requests per row (begin + complete = 2 chain entries each), queue 1024"
    );
    for sync in [Synchronous::Full, Synchronous::Normal] {
        for writers in [1usize, 8, 64] {
            let dir = tempfile::tempdir_in(&base).unwrap();
            let path = dir.path().join("bench.db");
            let store = SqliteStore::open(&path).unwrap();
            store.set_synchronous(sync).unwrap();
            let ledger = Ledger::start(Box::new(store), 1024).unwrap();
            let per = requests / writers;
            let started = Instant::now();
            let begins = rt.block_on(async {
                let mut tasks = Vec::new();
                for w in 0..writers {
                    let ledger = ledger.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut waits = Vec::with_capacity(per);
                        for i in 0..per {
                            let id = format!("req_{w:04}_{i:08}");
                            let t = Instant::now();
                            ledger.begin_forwarding(record(id.clone())).await.unwrap();
                            waits.push(t.elapsed());
                            let mut done = record(id);
                            done.outcome = Outcome::Answered;
                            ledger.finish(LedgerOp::Complete(done)).await.unwrap();
                        }
                        waits
                    }));
                }
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                all
            });
            let secs = started.elapsed().as_secs_f64();
            rt.block_on(ledger.close()).unwrap();
            let mut begins = begins;
            let p50 = median(&mut begins);
            let done = (per * writers) as f64;
            println!(
                "  {sync:?} writers {writers:>3}: {:>7.0} requests/s ({:>7.0} records/s), begin_forwarding p50 {:?} p90 {:?}",
                done / secs,
                2.0 * done / secs,
                p50,
                pct(&begins, 0.9)
            );
            if writers == 1 && sync == Synchronous::Full {
                let t = Instant::now();
                let v = SqliteStore::open_reader(&path).unwrap().verify().unwrap();
                assert!(v.is_ok());
                println!(
                    "  (audit verify of {} entries: {:?})",
                    v.entries,
                    t.elapsed()
                );
            }
        }
    }
}

async fn stages(n: u32) {
    let image = rgba_png_noisy(1024);
    let form = edit_request(&image, "p").text("user", "u");
    let body = bytes::Bytes::from(form.body());
    let boundary = form.boundary().to_string();
    let rules = imagegate::edit::form::FormRules {
        max_prompt_chars: 1000,
        max_user_chars: 256,
        models: vec!["dall-e-2".into()],
        max_parts: 16,
    };
    let t = Instant::now();
    for _ in 0..n {
        imagegate::edit::form::parse(&boundary, body.clone(), &rules)
            .await
            .unwrap();
    }
    let parse = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        use sha2::Digest;
        std::hint::black_box(sha2::Sha256::digest(&image));
    }
    let sha = t.elapsed() / n;
    let png_rules = imagegate::edit::png_check::PngRules {
        max_bytes: 4 << 20,
        max_dimension: 4096,
        transparency: imagegate::edit::png_check::Transparency::Strict,
        max_conversion_bytes: imagegate::edit::png_check::PngRules::DEFAULT_MAX_CONVERSION_BYTES,
    };
    let bytes = bytes::Bytes::from(image.clone());
    let t = Instant::now();
    for _ in 0..n {
        imagegate::edit::png_check::check_image(bytes.clone(), false, &png_rules).unwrap();
    }
    let png = t.elapsed() / n;
    println!(
        "stages ({} byte image, mean of {n}): multipart parse {parse:?}, sha256 {sha:?}, PNG checks {png:?}",
        image.len()
    );
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if want("latency") {
        rt.block_on(latency(300));
    }
    if want("stages") {
        rt.block_on(stages(20));
    }
    if want("load") {
        rt.block_on(load(16, 100));
    }
    if want("bomb") {
        rt.block_on(bomb(50));
    }
    if want("ledger") {
        ledger(10_000);
    }
    if want("limits") {
        limits(100_000, 200_000);
    }
}
