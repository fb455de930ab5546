//! Benchmarks reported in the issue notes (never asserted by tests). Loopback only, bounded.
//!
//!   cargo bench --bench gateway                 # all
//!   cargo bench --bench gateway -- latency      # one: latency | stages | load | bomb | ledger |
//!                                               # limits | gpt | gpt-memory | gpt-stream
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
//! gpt:     gpt-image-2 edits (the shipped model table): added median and p99 latency of the
//!          gateway for a 1024x1024 noisy PNG, a 1024x1024 JPEG and a 4-image request (2 PNG +
//!          2 JPEG), 200 requests each straight to the mock and through it, in alternating
//!          blocks of 20; and the gateway's CPU time per request: process CPU (/proc/self/stat)
//!          during the gateway blocks minus during the direct blocks, over the requests.
//! gpt-memory: peak RSS growth (VmHWM, reset through /proc/self/clear_refs) of one request of
//!          16 x 49 MiB PNGs (~784 MiB) through the gateway minus the same request sent straight
//!          to the mock, its ratio to the body size, and the time to validate + forward.
//! gpt-stream: per-event delay the SSE relay adds: the mock (Behavior::GptStreamTimed) stamps
//!          each event when handing it to hyper, the client notes its arrival; through the
//!          gateway vs straight to the mock, small events and ~1.4 MB events.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::fixtures::{bomb_png, jpeg, rgba_png, rgba_png_noisy};
use support::gateway::{APP_KEY, Gateway, post_edit};
use support::mock_upstream::Behavior;
use support::multipart::{Multipart, edit_request};
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
    use imagegate::limits::rate::RateLimits;
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
        let _ = rates.check_user_now(&who, 3);
    }
    let per_check = t.elapsed() / iterations as u32;

    let rss0 = vm_rss_kib();
    let names: Vec<String> = (0..users).map(|i| format!("user-{i:08}")).collect();
    let rss_names = vm_rss_kib();
    for name in &names {
        let _ = rates.check_user_now(
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
    for i in 0..q_iter {
        let r = store.reserve(&format!("req_{i}"), &who, 2, 40_000).unwrap();
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

// ---------------------------------------------------------------------------------------
// gpt-image benchmarks: gpt, gpt-memory, gpt-stream
// ---------------------------------------------------------------------------------------

/// Process CPU time (user + system, every thread, exited ones included) from
/// `/proc/self/stat` fields 14 and 15, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Resets VmHWM to the current RSS (`5` to `/proc/self/clear_refs`); false when not allowed.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn signed_us(a: Duration, b: Duration) -> f64 {
    us(a) - us(b)
}

fn gpt_form() -> Multipart {
    Multipart::new()
        .text("model", "gpt-image-2")
        .text("prompt", "bench")
        .text("user", "bench")
}

struct GptRow {
    name: &'static str,
    body: usize,
    n: usize,
    direct: Vec<Duration>,
    via: Vec<Duration>,
    cpu_direct_ticks: u64,
    cpu_via_ticks: u64,
}

/// Direct and gateway requests of one body in alternating blocks of `block`, `n` each at most
/// (stops at `limit`); process CPU read around each block, 20 ms after its last answer.
async fn gpt_case(
    gw: &Gateway,
    name: &'static str,
    form: Multipart,
    n: usize,
    limit: Duration,
) -> GptRow {
    let (ct, body) = (form.content_type(), form.body());
    let mock = gw.mock.addr();
    let direct_once = |body: Vec<u8>| {
        let ct = ct.clone();
        async move {
            let r = send(
                mock,
                "POST",
                "/v1/images/edits",
                &[("content-type", &ct)],
                body,
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    for _ in 0..5 {
        direct_once(body.clone()).await;
        let r = post_edit(gw.addr(), APP_KEY, &ct, body.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    gw.mock.clear_received();
    let settle = || tokio::time::sleep(Duration::from_millis(20));
    let mut row = GptRow {
        name,
        body: body.len(),
        n: 0,
        direct: Vec::with_capacity(n),
        via: Vec::with_capacity(n),
        cpu_direct_ticks: 0,
        cpu_via_ticks: 0,
    };
    let block = 20;
    let deadline = Instant::now() + limit;
    while row.n < n && Instant::now() < deadline {
        let k = block.min(n - row.n);
        settle().await;
        let c0 = cpu_ticks();
        for _ in 0..k {
            let b = body.clone();
            let t = Instant::now();
            direct_once(b).await;
            row.direct.push(t.elapsed());
        }
        settle().await;
        let c1 = cpu_ticks();
        for _ in 0..k {
            let b = body.clone();
            let t = Instant::now();
            let r = post_edit(gw.addr(), APP_KEY, &ct, b).await;
            row.via.push(t.elapsed());
            assert_eq!(r.status, 200, "{}", r.text());
        }
        settle().await;
        let c2 = cpu_ticks();
        row.cpu_direct_ticks += c1 - c0;
        row.cpu_via_ticks += c2 - c1;
        row.n += k;
        gw.mock.clear_received();
    }
    row.direct.sort();
    row.via.sort();
    row
}

async fn gpt_latency(n: usize) {
    let gw = Gateway::start_with(support::gateway::gpt).await;
    let png = rgba_png_noisy(1024);
    let jpg = jpeg(1024, 1024);
    let png_form = gpt_form().file("image", Some("a.png"), Some("image/png"), &png);
    let jpg_form = gpt_form().file("image", Some("a.jpg"), Some("image/jpeg"), &jpg);
    let mut four = gpt_form();
    for i in 0..4 {
        four = if i % 2 == 0 {
            four.file("image[]", Some("a.png"), Some("image/png"), &png)
        } else {
            four.file("image[]", Some("a.jpg"), Some("image/jpeg"), &jpg)
        };
    }
    let limit = Duration::from_secs(120);
    let rows = [
        gpt_case(&gw, "1024x1024 PNG (noisy RGBA)", png_form, n, limit).await,
        gpt_case(&gw, "1024x1024 JPEG (q85)", jpg_form, n, limit).await,
        gpt_case(&gw, "4 images (2 PNG + 2 JPEG)", four, n, limit).await,
    ];
    let tck = clk_tck();
    println!(
        "gpt: gpt-image-2 edits (JSON answer with usage), each request on a fresh connection; PNG {} bytes, JPEG {} bytes",
        png.len(),
        jpg.len()
    );
    println!(
        "  method: per case, blocks of 20 requests straight to the mock then 20 through the gateway (same body, same client), alternating; added = gateway - direct percentile;"
    );
    println!(
        "          CPU = process user+system time from /proc/self/stat (CLK_TCK {tck}, read 20 ms after each block's last answer), (gateway blocks - direct blocks) / requests"
    );
    println!(
        "  {:<28} {:>9} {:>4} | {:>9} {:>9} | {:>9} {:>9} | {:>11} {:>11} | {:>12}",
        "case",
        "body B",
        "n",
        "direct p50",
        "p99",
        "gw p50",
        "p99",
        "added p50",
        "added p99",
        "gw CPU/req"
    );
    for r in &rows {
        let (d50, d99) = (pct(&r.direct, 0.5), pct(&r.direct, 0.99));
        let (v50, v99) = (pct(&r.via, 0.5), pct(&r.via, 0.99));
        let cpu_us =
            (r.cpu_via_ticks as f64 - r.cpu_direct_ticks as f64) * 1e6 / tck as f64 / r.n as f64;
        println!(
            "  {:<28} {:>9} {:>4} | {:>7.0}µs {:>7.0}µs | {:>7.0}µs {:>7.0}µs | {:>9.0}µs {:>9.0}µs | {:>10.0}µs",
            r.name,
            r.body,
            r.n,
            us(d50),
            us(d99),
            us(v50),
            us(v99),
            signed_us(v50, d50),
            signed_us(v99, d99),
            cpu_us
        );
    }
}

/// A valid RGBA PNG of about `bytes` bytes: deflate stored blocks (no compression), no filter.
fn stored_png(bytes: usize) -> Vec<u8> {
    let width = 3584u32;
    let row = 1 + 4 * width as usize;
    let height = (bytes * 9999 / 10000 / row) as u32;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = vec![0u8; width as usize * 4 * height as usize];
    for px in data.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        px.copy_from_slice(&state.to_le_bytes());
    }
    for a in data.iter_mut().skip(3).step_by(4) {
        *a = 255;
    }
    let mut out = Vec::with_capacity(bytes);
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::NoCompression);
        enc.set_filter(png::Filter::NoFilter);
        let mut w = enc.write_header().expect("png header");
        w.write_image_data(&data).expect("png image data");
        w.finish().expect("png finish");
    }
    out
}

struct MemRun {
    rss_before: u64,
    hwm_after: u64,
    rss_after: u64,
    elapsed: Duration,
}

impl MemRun {
    fn growth(&self) -> u64 {
        self.hwm_after.saturating_sub(self.rss_before)
    }
}

async fn gpt_memory() {
    let gw = Gateway::start_with(support::gateway::gpt).await;
    let image = stored_png(49 << 20);
    let mut form = gpt_form();
    for _ in 0..16 {
        form = form.file("image[]", Some("big.png"), Some("image/png"), &image);
    }
    let ct = form.content_type();
    let body = form.body();
    drop(form);
    let body_len = body.len();
    // Warm both paths (connections, ledger, allocator) with a small gpt edit.
    let small = gpt_form().file(
        "image",
        Some("s.png"),
        Some("image/png"),
        &rgba_png(64, true),
    );
    assert_eq!(gw.edit(APP_KEY, &small).await.status, 200);
    let r = send(
        gw.mock.addr(),
        "POST",
        "/v1/images/edits",
        &[("content-type", &small.content_type())],
        small.body(),
    )
    .await;
    assert_eq!(r.status, 200);
    gw.mock.clear_received();
    let mut resets = true;
    let mut run = |via: bool, body: Vec<u8>| {
        let (gw, ct) = (&gw, &ct);
        resets &= reset_hwm();
        async move {
            let rss_before = vm_rss_kib();
            let t = Instant::now();
            let r = if via {
                post_edit(gw.addr(), APP_KEY, ct, body).await
            } else {
                send(
                    gw.mock.addr(),
                    "POST",
                    "/v1/images/edits",
                    &[("content-type", ct)],
                    body,
                )
                .await
            };
            let elapsed = t.elapsed();
            assert_eq!(r.status, 200, "{}", r.text());
            let got = gw.mock.last().expect("the mock got the request");
            assert_eq!(got.parts.iter().filter(|p| p.name == "image[]").count(), 16);
            drop(got);
            let m = MemRun {
                rss_before,
                hwm_after: vm_hwm_kib(),
                rss_after: vm_rss_kib(),
                elapsed,
            };
            gw.mock.clear_received();
            m
        }
    };
    let direct = run(false, body.clone()).await;
    let via = run(true, body).await;
    let body_kib = body_len as f64 / 1024.0;
    println!(
        "gpt-memory: one gpt-image-2 edit of 16 x {} byte PNGs (RGBA 3584 wide, stored deflate blocks), body {} bytes ({:.0} MiB)",
        image.len(),
        body_len,
        body_kib / 1024.0
    );
    println!(
        "  method: VmHWM/VmRSS of this process (client, gateway and mock share it); {}; growth = VmHWM after - VmRSS before the request; the same body is sent once straight to the mock, then once through the gateway",
        if resets {
            "VmHWM reset before each request by writing 5 to /proc/self/clear_refs"
        } else {
            "/proc/self/clear_refs NOT writable: VmHWM is the process lifetime peak"
        }
    );
    for (name, m) in [("direct to mock", &direct), ("via gateway", &via)] {
        println!(
            "  {name:<15}: {:>5.1} s, VmRSS before {:>8} KiB, VmHWM after {:>8} KiB, VmRSS after {:>8} KiB, growth {:>8} KiB ({:.2} x body)",
            m.elapsed.as_secs_f64(),
            m.rss_before,
            m.hwm_after,
            m.rss_after,
            m.growth(),
            m.growth() as f64 / body_kib
        );
    }
    let added = via.growth() as i64 - direct.growth() as i64;
    println!(
        "  gateway peak memory (growth via - growth direct): {} KiB = {:.2} x body; validate+forward time added: {:.2} s (via {:.2} s, direct {:.2} s)",
        added,
        added as f64 / body_kib,
        via.elapsed.as_secs_f64() - direct.elapsed.as_secs_f64(),
        via.elapsed.as_secs_f64(),
        direct.elapsed.as_secs_f64()
    );
}

/// Reads an SSE answer as it comes; for every event carrying `mock_sent_us`, the delay from
/// the mock's stamp to the arrival of the chunk that completed the event, in µs.
async fn sse_delays(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Vec<u64> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/v1/images/edits")
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(bytes::Bytes::from(body))).unwrap();
    let resp = sender.send_request(req).await.expect("send_request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut scanned: usize = 0;
    let mut delays = Vec::new();
    const KEY: &[u8] = b"\"mock_sent_us\":";
    while let Some(frame) = body.frame().await {
        let now = support::mock_upstream::mock_clock_us();
        let Ok(data) = frame.expect("body frame").into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = memchr::memmem::find(&buf[scanned.saturating_sub(1)..], b"\n\n")
            .map(|i| i + scanned.saturating_sub(1) + 2)
        {
            let event = &buf[..end];
            if let Some(k) = memchr::memmem::rfind(event, KEY) {
                let digits: String = event[k + KEY.len()..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .map(|&b| b as char)
                    .collect();
                let sent: u64 = digits.parse().expect("a stamp");
                delays.push(now.saturating_sub(sent));
            }
            buf.drain(..end);
            scanned = 0;
        }
        scanned = buf.len();
    }
    driver.abort();
    delays
}

async fn gpt_stream(runs: usize, pause_ms: u64) {
    let gw = Gateway::start_with(support::gateway::gpt).await;
    let form = gpt_form()
        .text("stream", "true")
        .text("partial_images", "3")
        .file(
            "image",
            Some("a.png"),
            Some("image/png"),
            &rgba_png(64, true),
        );
    let (ct, body) = (form.content_type(), form.body());
    let auth = format!("Bearer {APP_KEY}");
    let via_headers = [("authorization", auth.as_str()), ("content-type", &ct)];
    let direct_headers = [("content-type", ct.as_str())];
    println!(
        "gpt-stream: gpt-image-2 edit with stream=true; the mock sends 3 partial_image events and 1 completed event, {pause_ms} ms apart, each one chunk stamped (monotonic µs) when handed to hyper;"
    );
    println!(
        "  delay = arrival at the client of the chunk completing the event - stamp; streams alternate direct / via gateway; added = gateway - direct percentile"
    );
    println!(
        "  {:<24} {:>7} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10}",
        "event b64_json", "events", "direct p50", "p99", "gw p50", "p99", "added p50", "added p99"
    );
    for b64_len in [64usize, 1_400_000] {
        gw.mock.set_behavior(Behavior::GptStreamTimed {
            partials: 3,
            pause_ms,
            b64_len,
        });
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..runs + 2 {
            if Instant::now() > deadline {
                break;
            }
            let d = sse_delays(gw.mock.addr(), &direct_headers, body.clone()).await;
            let v = tokio::time::timeout(
                Duration::from_secs(30),
                sse_delays(gw.addr(), &via_headers, body.clone()),
            )
            .await
            .expect("the gateway streams within 30 s");
            assert_eq!(d.len(), 4, "direct events");
            assert_eq!(v.len(), 4, "relayed events");
            if i >= 2 {
                // The first two streams warm up.
                direct.extend(d);
                via.extend(v);
            }
            gw.mock.clear_received();
        }
        direct.sort();
        via.sort();
        let p = |v: &[u64], q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize] as i64;
        println!(
            "  {:<24} {:>7} | {:>8}µs {:>8}µs | {:>8}µs {:>8}µs | {:>8}µs {:>8}µs",
            format!("{b64_len} chars"),
            via.len(),
            p(&direct, 0.5),
            p(&direct, 0.99),
            p(&via, 0.5),
            p(&via, 0.99),
            p(&via, 0.5) - p(&direct, 0.5),
            p(&via, 0.99) - p(&direct, 0.99)
        );
    }
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
    if want("gpt") {
        rt.block_on(gpt_latency(200));
    }
    if want("gpt-memory") {
        rt.block_on(gpt_memory());
    }
    if want("gpt-stream") {
        rt.block_on(gpt_stream(50, 20));
    }
}
