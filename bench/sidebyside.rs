//! Side-by-side benchmark of the gateway (`bench/run` builds and runs it; see `bench/README.md`).
//!
//! One run, one machine, loopback only: a fast mock upstream in this process, the release
//! `imagegate` binary as a separate process (so its CPU time and peak memory are its own, read
//! from `/proc/PID`), and the same load sent straight to the mock and through the gateway:
//!
//! - bodies: a 256x256 and a 1024x1024 RGBA PNG edit (dall-e-2 profile: every row decoded) and a
//!   4-image gpt-image-2 edit (2 PNG + 2 JPEG at 1024x1024: structure walks, no pixel decode);
//! - images `unique` (a counter in an ancillary chunk / comment segment: every request's files
//!   differ, so no cache helps) or `repeated` (the same files every time: the validated-image
//!   cache may skip the checks);
//! - 1 caller and 32 callers (each sending its next request when its answer has arrived).
//!
//! Per row: requests/s, median and p99 latency, added p50/p99 against the direct row with the
//! same body and callers, the gateway's CPU per request (utime + stime over the row / requests),
//! its peak RSS (VmHWM, reset through `/proc/PID/clear_refs` before each row) and, in the same
//! run, the time of the library's own check of the same files on one core (`check`), the floor
//! the contract requires. Every load loop is bounded by a request count and a time limit.

use std::fmt::Write as _;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use imagegate::testkit::{chunk, jpeg, rgba_png_noisy};

const KEY: &str = "ig_bench_side_by_side_key_0123456789";

struct Args {
    gateway: PathBuf,
    requests_1: usize,
    requests_32: usize,
    row_limit: Duration,
    only: Option<String>,
    oha: Option<PathBuf>,
    callers: Vec<usize>,
    wrap: Vec<String>,
    sqlite_synchronous: String,
    /// The mock reads each request body at this many Mbit/s (an emulated slow link).
    slow_upstream: Option<f64>,
    /// The gateway's `upstream.cut_through`.
    cut_through: bool,
}

fn args() -> Args {
    let mut a = Args {
        gateway: PathBuf::from("target/release/imagegate"),
        requests_1: 200,
        requests_32: 1_000,
        row_limit: Duration::from_secs(20),
        only: None,
        oha: None,
        callers: vec![1, 32],
        wrap: Vec::new(),
        sqlite_synchronous: "full".into(),
        slow_upstream: None,
        cut_through: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--gateway" => a.gateway = PathBuf::from(value()),
            "--requests-1" => a.requests_1 = value().parse().expect("a count"),
            "--requests-32" => a.requests_32 = value().parse().expect("a count"),
            "--row-limit" => a.row_limit = Duration::from_secs(value().parse().expect("seconds")),
            "--only" => a.only = Some(value()),
            "--oha" => a.oha = Some(PathBuf::from(value())),
            "--callers" => {
                a.callers = value()
                    .split(',')
                    .map(|c| c.parse().expect("a caller count"))
                    .collect()
            }
            // A command the gateway runs under (a profiler): `--wrap "valgrind --tool=callgrind"`.
            "--wrap" => a.wrap = value().split_whitespace().map(str::to_owned).collect(),
            // `ledger.sqlite_synchronous` of the gateway: full (default) or normal.
            "--sqlite-synchronous" => a.sqlite_synchronous = value(),
            // The mock reads request bodies at this many Mbit/s: `--slow-upstream 50`.
            "--slow-upstream" => a.slow_upstream = Some(value().parse().expect("Mbit/s")),
            // The gateway sends the body while the images are checked (`upstream.cut_through`).
            "--cut-through" => a.cut_through = true,
            "--quick" => {
                a.requests_1 = 40;
                a.requests_32 = 200;
                a.row_limit = Duration::from_secs(8);
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Png,
    Jpeg,
}

struct Case {
    name: &'static str,
    model: &'static str,
    files: Vec<(Kind, Vec<u8>)>,
}

/// `png` with a `tEXt` chunk holding `tag` right after IHDR: the same pixels, other bytes.
fn png_tagged(png: &[u8], tag: u64) -> Vec<u8> {
    let ihdr_end = 8 + 8 + 13 + 4;
    let text = chunk(b"tEXt", format!("bench\0{tag:016x}").as_bytes());
    let mut out = Vec::with_capacity(png.len() + text.len());
    out.extend_from_slice(&png[..ihdr_end]);
    out.extend_from_slice(&text);
    out.extend_from_slice(&png[ihdr_end..]);
    out
}

/// `jpg` with a comment segment holding `tag` right after SOI.
fn jpeg_tagged(jpg: &[u8], tag: u64) -> Vec<u8> {
    let text = format!("bench {tag:016x}");
    let len = (text.len() + 2) as u16;
    let mut out = Vec::with_capacity(jpg.len() + text.len() + 4);
    out.extend_from_slice(&jpg[..2]);
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&jpg[2..]);
    out
}

const BOUNDARY: &str = "----imagegate-bench-boundary-7d9f3a";

/// The multipart body of `case`, its files tagged with `tag` when given.
fn body(case: &Case, tag: Option<u64>) -> Bytes {
    let mut out = Vec::new();
    let text = |out: &mut Vec<u8>, name: &str, value: &str| {
        let _ = write!(
            StrBuf(out),
            "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        );
    };
    text(&mut out, "model", case.model);
    text(&mut out, "prompt", "a lighthouse at dusk");
    text(&mut out, "user", "bench");
    let many = case.files.len() > 1;
    for (i, (kind, bytes)) in case.files.iter().enumerate() {
        let (mime, ext) = match kind {
            Kind::Png => ("image/png", "png"),
            Kind::Jpeg => ("image/jpeg", "jpg"),
        };
        let name = if many { "image[]" } else { "image" };
        let _ = write!(
            StrBuf(&mut out),
            "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"{name}\"; filename=\"{i}.{ext}\"\r\ncontent-type: {mime}\r\n\r\n"
        );
        match (tag, kind) {
            (None, _) => out.extend_from_slice(bytes),
            (Some(t), Kind::Png) => out.extend_from_slice(&png_tagged(bytes, t)),
            (Some(t), Kind::Jpeg) => out.extend_from_slice(&jpeg_tagged(bytes, t)),
        }
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(StrBuf(&mut out), "--{BOUNDARY}--\r\n");
    Bytes::from(out)
}

struct StrBuf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StrBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Median time of the library's own check of `case`'s files (one core, 15 runs): the full row
/// decode of the dall-e-2 profile, the structure walks of the gpt-image profile.
fn check_time(case: &Case) -> Duration {
    use imagegate::edit::png_check::{PngRules, Transparency, check_image};
    use imagegate::edit::sniff::ImageFormat;
    let rules = PngRules {
        max_bytes: 4 << 20,
        max_dimension: 4096,
        transparency: Transparency::Strict,
        max_conversion_bytes: PngRules::DEFAULT_MAX_CONVERSION_BYTES,
    };
    let files: Vec<(Kind, Bytes)> = case
        .files
        .iter()
        .map(|(k, b)| (*k, Bytes::from(b.clone())))
        .collect();
    let mut times: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for (kind, bytes) in &files {
                if case.model == "dall-e-2" {
                    check_image(bytes.clone(), false, &rules).expect("a valid image");
                } else {
                    let format = match kind {
                        Kind::Png => ImageFormat::Png,
                        Kind::Jpeg => ImageFormat::Jpeg,
                    };
                    imagegate::edit::files::inspect(bytes, format).expect("a valid file");
                }
            }
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// The mock upstream
// ---------------------------------------------------------------------------------------------

/// A fast upstream: reads each body to its end, answers a fixed success (a URL for dall-e-2,
/// one tiny `b64_json` image and usage for gpt-image). Keeps nothing. With `mbit`, it reads
/// each body no faster than that many Mbit/s (an emulated slow link: it stops reading, so TCP
/// holds the sender back once the socket buffers are full).
async fn mock(mbit: Option<f64>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dalle: Bytes = Bytes::from_static(
        br#"{"created":1700000000,"data":[{"url":"https://example.invalid/bench.png"}]}"#,
    );
    let gpt: Bytes = Bytes::from(
        serde_json::json!({
            "created": 1700000000,
            "data": [{"b64_json": "iVBORw0KGgo="}],
            "usage": {
                "input_tokens": 1060,
                "input_tokens_details": {"text_tokens": 60, "image_tokens": 1000},
                "output_tokens": 2000,
                "output_tokens_details": {"image_tokens": 2000, "text_tokens": 0},
                "total_tokens": 3060
            }
        })
        .to_string(),
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (dalle, gpt) = (dalle.clone(), gpt.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (dalle, gpt) = (dalle.clone(), gpt.clone());
                    async move {
                        let body = read_body(req.into_body(), mbit).await?;
                        // The model field is near the start of every body this bench sends.
                        let head = &body[..body.len().min(400)];
                        let is_gpt = memchr::memmem::find(head, b"gpt-image").is_some();
                        let answer = if is_gpt { gpt } else { dalle };
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(answer))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A request body, read no faster than `mbit` Mbit/s when given.
async fn read_body(mut body: Incoming, mbit: Option<f64>) -> Result<Bytes, hyper::Error> {
    let Some(mbit) = mbit else {
        return Ok(body.collect().await?.to_bytes());
    };
    let bytes_per_second = mbit * 1e6 / 8.0;
    let start = tokio::time::Instant::now();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
            let due = start + Duration::from_secs_f64(out.len() as f64 / bytes_per_second);
            tokio::time::sleep_until(due).await;
        }
    }
    Ok(Bytes::from(out))
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

struct Gateway {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    /// SIGTERM (a profiler wrapping the gateway writes its output at exit), SIGKILL after 60 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(
    bin: &Path,
    wrap: &[String],
    sync: &str,
    cut_through: bool,
    mock: SocketAddr,
) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("imagegate.db");
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_in_flight = 1024

[upstream]
base_url = "http://{mock}"
allow_http = true
cut_through = {cut_through}

[ledger]
path = {db:?}
sqlite_synchronous = {sync:?}

[validation]
models = ["dall-e-2"]

[models]
check_at_start = false

[log]
format = "json"
level = "warn,imagegate::cli::serve=info"

[limits.per_user]
requests_per_minute = 10000000
requests_burst = 1000000
images_per_minute = 10000000
images_burst = 1000000

[limits.per_client]
requests_per_minute = 10000000
requests_burst = 1000000
images_per_minute = 10000000
images_burst = 1000000

[[clients]]
name = "bench"
key_hash = "{hash}"
"#,
        db = db.to_str().unwrap(),
        hash = imagegate::config::hash_key(KEY),
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env("OPENAI_API_KEY", "sk-bench-not-a-real-key")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} does not start: {e}", bin.display()));
    // The address is in the "imagegate listening" log line (JSON, stdout or stderr).
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("imagegate listening") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let addr = v["fields"]["addr"].as_str().or(v["addr"].as_str());
                    if let Some(a) = addr.and_then(|a| a.parse::<SocketAddr>().ok()) {
                        let _ = tx.send(a);
                    }
                }
            }
        });
    }
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the gateway logs its address within 120 s");
    Gateway {
        child,
        addr,
        _dir: dir,
    }
}

fn proc_stat_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

struct Run {
    done: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// `callers` callers, `total` requests at most, within `limit`; each request's body from
/// `make(i)`. Panics on any answer but 200 (a benchmark of failures measures nothing).
async fn load(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: SocketAddr,
    auth: bool,
    callers: usize,
    total: usize,
    limit: Duration,
    make: Arc<dyn Fn(usize) -> Bytes + Send + Sync>,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + limit;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (client, next, make) = (client.clone(), next.clone(), make.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    return lat;
                }
                let body = make(i);
                let mut req = Request::post(format!("http://{target}/v1/images/edits")).header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                );
                if auth {
                    req = req.header("authorization", format!("Bearer {KEY}"));
                }
                let req = req.body(Full::new(body)).unwrap();
                let t = Instant::now();
                let resp = client.request(req).await.expect("an answer");
                let status = resp.status();
                let text = resp.into_body().collect().await.expect("a body").to_bytes();
                assert!(
                    status.is_success(),
                    "{status}: {}",
                    String::from_utf8_lossy(&text)
                );
                lat.push(t.elapsed());
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        latencies.extend(r.expect("a caller"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Run {
        done: latencies.len(),
        elapsed,
        latencies,
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn signed_ms(a: Duration, b: Duration) -> String {
    format!("{:+.2}", ms(a) - ms(b))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let png256 = rgba_png_noisy(256);
    let png1024 = rgba_png_noisy(1024);
    let jpg1024 = jpeg(1024, 1024);
    let cases = vec![
        Case {
            name: "256 PNG (dall-e-2)",
            model: "dall-e-2",
            files: vec![(Kind::Png, png256)],
        },
        Case {
            name: "1024 PNG (dall-e-2)",
            model: "dall-e-2",
            files: vec![(Kind::Png, png1024.clone())],
        },
        Case {
            name: "4 images (gpt-image-2)",
            model: "gpt-image-2",
            files: vec![
                (Kind::Png, png1024.clone()),
                (Kind::Jpeg, jpg1024.clone()),
                (Kind::Png, rgba_png_noisy(1023)),
                (Kind::Jpeg, jpeg(1000, 1000)),
            ],
        },
    ];
    let mock = mock(args.slow_upstream).await;
    let gw = start_gateway(
        &args.gateway,
        &args.wrap,
        &args.sqlite_synchronous,
        args.cut_through,
        mock,
    );
    let pid = gw.child.id();
    let tck = clk_tck();
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let base_rss = vm_hwm_kib(pid);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| body | images | callers | requests | req/s direct | req/s gateway | p50 direct | p50 gateway | added p50 | added p99 | gateway CPU/req | check (1 core) | CPU/req - check | peak RSS |"
    );
    let _ = writeln!(
        table,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for case in &cases {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !case.name.contains(o.as_str()))
        {
            continue;
        }
        let check = check_time(case);
        let bytes = body(case, None).len();
        let case = Arc::new(Case {
            name: case.name,
            model: case.model,
            files: case.files.clone(),
        });
        for &callers in &args.callers {
            let total = if callers == 1 {
                args.requests_1
            } else {
                args.requests_32
            };
            let unique: Arc<dyn Fn(usize) -> Bytes + Send + Sync> = {
                let case = case.clone();
                // A distinct tag per row and request: no two requests of the run share a file.
                let salt = (callers as u64) << 40;
                Arc::new(move |i| body(&case, Some(salt | i as u64)))
            };
            let fixed = body(&case, None);
            let repeated: Arc<dyn Fn(usize) -> Bytes + Send + Sync> =
                Arc::new(move |_| fixed.clone());
            // Warm-up: connections and allocators on both paths.
            load(
                &client,
                mock,
                false,
                callers,
                callers * 2,
                args.row_limit,
                unique.clone(),
            )
            .await;
            load(
                &client,
                gw.addr,
                true,
                callers,
                callers * 2,
                args.row_limit,
                repeated.clone(),
            )
            .await;
            let direct = load(
                &client,
                mock,
                false,
                callers,
                total,
                args.row_limit,
                unique.clone(),
            )
            .await;
            for (label, make) in [("unique", unique.clone()), ("repeated", repeated.clone())] {
                reset_hwm(pid);
                let c0 = proc_stat_ticks(pid);
                let via = load(&client, gw.addr, true, callers, total, args.row_limit, make).await;
                let c1 = proc_stat_ticks(pid);
                let cpu =
                    Duration::from_secs_f64((c1 - c0) as f64 / tck as f64 / via.done.max(1) as f64);
                let rps = |r: &Run| r.done as f64 / r.elapsed.as_secs_f64();
                let _ = writeln!(
                    table,
                    "| {} ({} B) | {label} | {callers} | {} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {} ms | {} ms | {:.2} ms | {:.2} ms | {} ms | {} MiB |",
                    case.name,
                    bytes,
                    via.done,
                    rps(&direct),
                    rps(&via),
                    ms(pct(&direct.latencies, 0.5)),
                    ms(pct(&via.latencies, 0.5)),
                    signed_ms(pct(&via.latencies, 0.5), pct(&direct.latencies, 0.5)),
                    signed_ms(pct(&via.latencies, 0.99), pct(&direct.latencies, 0.99)),
                    ms(cpu),
                    ms(check),
                    signed_ms(cpu, check),
                    vm_hwm_kib(pid) / 1024,
                );
                eprintln!("done: {} {label} {callers} callers", case.name);
            }
        }
    }
    println!(
        "gateway {} (pid {pid}, ledger.sqlite_synchronous = {}, upstream.cut_through = {}), mock in this process reading {}; CPU ticks of {} per second; gateway RSS at start {} MiB\n",
        args.gateway.display(),
        args.sqlite_synchronous,
        args.cut_through,
        args.slow_upstream
            .map_or("at full speed".to_string(), |m| format!("at {m} Mbit/s")),
        tck,
        base_rss / 1024
    );
    print!("{table}");
    if let Some(oha) = &args.oha {
        let one = cases
            .iter()
            .find(|c| c.name.starts_with("1024"))
            .expect("the 1024 case");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), body(one, None)).unwrap();
        println!(
            "\noha, the repeated 1024 body, 32 callers, {} requests:",
            args.requests_32
        );
        for (label, target, auth) in [("direct", mock, false), ("gateway", gw.addr, true)] {
            println!(
                "  {label}: {}",
                run_oha(oha, file.path(), target, auth, args.requests_32)
            );
        }
    }
}

/// One oha run (`-n requests -c 32`, the body from `file`); its requests/s, p50, p99 and the
/// count of each status.
fn run_oha(oha: &Path, file: &Path, target: SocketAddr, auth: bool, requests: usize) -> String {
    let mut cmd = Command::new(oha);
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-c",
        "32",
        "-m",
        "POST",
    ])
    .args(["-n", &requests.to_string()])
    .args(["-T", &format!("multipart/form-data; boundary={BOUNDARY}")])
    .arg("-D")
    .arg(file);
    if auth {
        cmd.args(["-H", &format!("authorization: Bearer {KEY}")]);
    }
    let out = cmd
        .arg(format!("http://{target}/v1/images/edits"))
        .output()
        .expect("oha runs");
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => return format!("oha failed: {}", String::from_utf8_lossy(&out.stderr)),
    };
    format!(
        "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, statuses {}",
        v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        v["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1e3,
        v["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1e3,
        v["statusCodeDistribution"],
    )
}
