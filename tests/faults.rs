//! The fault suite: the real binary (`imagegate serve`, its own process, ports chosen by the
//! gateway and read from its JSON log) on loopback, in front of the in-process mock upstream,
//! with small timeouts so every case ends in seconds. Each case asserts the documented
//! behaviour (README "Limits and failure behaviour") and prints its figure on stderr
//! (`cargo test --test faults -- --nocapture`, lines starting with `FIGURE`). Every wait is
//! bounded; the bounds only keep a case from hanging, they are never what is asserted.
//!
//! SIGKILL under load and an unwritable database are in `tests/crash.rs`.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use imagegate::config::hash_key;
use imagegate::ledger::sqlite::SqliteStore;
use imagegate::ledger::{CostBasis, LedgerStore, Outcome, Record, UsageQuery};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::fixtures::rgba_png;
use support::mock_upstream::{Behavior, MockUpstream};
use support::multipart::{Multipart, edit_request};
use support::process::{START_WITHIN, Served, metric_value};
use support::{Ended, Resp, raw_exchange_until_end, raw_status, try_send};

const KEY: &str = "ig-faults-test-key-0123456789";
const ADMIN_KEY: &str = "ig-faults-admin-key-0123456789";
const UPSTREAM_KEY: &str = "sk-faults-test-upstream-key";
/// The longest any single wait of this suite may last (never reached when the gateway behaves).
const BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

/// The config of one gateway process, section by section (`key = TOML value`).
struct Conf {
    sections: BTreeMap<&'static str, BTreeMap<&'static str, String>>,
}

impl Conf {
    /// Small timeouts everywhere, one client, the admin listener on, no model check.
    fn fast() -> Conf {
        let mut c = Conf {
            sections: BTreeMap::new(),
        };
        for (k, v) in [
            ("listen", "\"127.0.0.1:0\""),
            ("shutdown_grace", "\"2s\""),
            ("header_read_timeout", "\"1s\""),
            ("body_read_timeout", "\"30s\""),
            ("min_body_rate", "1024"),
            ("body_rate_grace", "\"1s\""),
            ("idle_timeout", "\"1s\""),
            ("http2_keep_alive_interval", "\"20s\""),
            ("http2_keep_alive_timeout", "\"1s\""),
            ("caller_idle_timeout", "\"1s\""),
        ] {
            c.set("server", k, v);
        }
        for (k, v) in [
            ("allow_http", "true"),
            ("connect_timeout", "\"1s\""),
            ("response_timeout", "\"2s\""),
            ("idle_timeout", "\"1s\""),
        ] {
            c.set("upstream", k, v);
        }
        c.set("validation", "models", "[\"dall-e-2\"]");
        c.set("models", "default", "\"dall-e-2\"");
        c.set("models", "accepted", "{}");
        c.set("models", "check_at_start", "false");
        c.set("log", "format", "\"json\"");
        c.set("log", "level", "\"info\"");
        for section in ["limits.per_user", "limits.per_client"] {
            c.set(section, "requests_per_minute", "100000");
            c.set(section, "requests_burst", "100000");
            c.set(section, "images_per_minute", "1000000");
            c.set(section, "images_burst", "1000000");
        }
        c.set("admin", "listen", "\"127.0.0.1:0\"");
        c.set("admin", "key_hash", &format!("{:?}", hash_key(ADMIN_KEY)));
        c
    }

    fn set(&mut self, section: &'static str, key: &'static str, value: &str) -> &mut Conf {
        self.sections
            .entry(section)
            .or_default()
            .insert(key, value.to_string());
        self
    }

    fn render(&self, mock: &MockUpstream, db: &Path) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
            if *section == "upstream" {
                out.push_str(&format!("base_url = {:?}\n", mock.base_url()));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "[ledger]\npath = {:?}\n\n[[clients]]\nname = \"faults\"\nkey_hash = {:?}\n",
            db.to_str().expect("a UTF-8 temporary path"),
            hash_key(KEY)
        ));
        out
    }
}

/// `imagegate serve` in its own process (`support::process`, killed on drop), with its
/// temporary directory (configuration and ledger) and its admin listener.
struct Proc {
    served: Served,
    admin: SocketAddr,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Proc {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.served
    }
}

impl Proc {
    /// Write the config, start the binary, and wait (bounded) for both listeners' addresses.
    async fn start(conf: &Conf, mock: &MockUpstream) -> Proc {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = dir.path().join("imagegate.db");
        let config = dir.path().join("imagegate.toml");
        std::fs::write(&config, conf.render(mock, &db)).unwrap();
        let served = Served::start(&config, UPSTREAM_KEY).await;
        let admin = served.listener("admin listener", START_WITHIN).await;
        Proc {
            served,
            admin,
            db,
            _dir: dir,
        }
    }

    /// `/metrics` from the admin listener.
    async fn metrics(&self) -> String {
        self.served.metrics(self.admin, ADMIN_KEY).await
    }

    /// One series of `/metrics` (`name` or `name{labels}` exactly as rendered); 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// The process's peak resident set (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        self.served.proc_status_kib("VmHWM:")
    }

    fn current_rss_kib(&self) -> u64 {
        self.served.proc_status_kib("VmRSS:")
    }

    /// POST an edit with the client key (bounded).
    async fn edit(&self, form: &Multipart) -> Result<Resp, String> {
        post(self.addr, form).await
    }

    /// Poll the ledger (bounded) until a record satisfies `want`.
    async fn record(&self, what: &str, want: impl Fn(&Record) -> bool) -> Record {
        let mut last = Vec::new();
        let started = Instant::now();
        while started.elapsed() < BOUND {
            if self.db.exists() {
                last = read_records(&self.db);
                if let Some(r) = last.iter().find(|r| want(r)) {
                    return r.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "no record {what} within {BOUND:?}: {last:#?}\n{}",
            self.log_text()
        );
    }
}

fn read_records(path: &Path) -> Vec<Record> {
    let Ok(store) = SqliteStore::open_reader(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let _ = store.export(&UsageQuery::default(), &mut |r| {
        out.push(r.clone());
        Ok(())
    });
    out
}

/// Run `fut` under [`BOUND`]; panics (naming `what`) when it does not finish.
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}"))
}

/// Poll `probe` every 5 ms (bounded) until it returns `Some`.
async fn poll<T, F: Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> T {
    bounded(what, async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

async fn post(addr: SocketAddr, form: &Multipart) -> Result<Resp, String> {
    let auth = format!("Bearer {KEY}");
    let ct = form.content_type();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", ct.as_str()),
    ];
    bounded(
        "an edit",
        try_send(addr, "POST", "/v1/images/edits", &headers, form.body()),
    )
    .await
}

/// The raw HTTP/1.1 head of an edit (with its content-length) and its body.
fn raw_edit(addr: SocketAddr, form: &Multipart) -> (Vec<u8>, Vec<u8>) {
    let body = form.body();
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {KEY}\r\n\
         content-type: {}\r\ncontent-length: {}\r\n\r\n",
        form.content_type(),
        body.len()
    );
    (head.into_bytes(), body)
}

async fn healthz(addr: SocketAddr) -> u16 {
    bounded(
        "GET /healthz",
        try_send(addr, "GET", "/healthz", &[], Vec::new()),
    )
    .await
    .map(|r| r.status)
    .unwrap_or_else(|e| panic!("/healthz: {e}"))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

// ---------------------------------------------------------------------------------------------
// Slow and idle callers
// ---------------------------------------------------------------------------------------------

/// A request head trickled a byte every 100 ms (and a connection that sends nothing) is closed
/// by the header-read timeout / first-bytes deadline (1 s here) without an answer, long before
/// the head could complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_closed() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nHost: {}\r\nX-Padding: {}\r\n",
        gw.addr,
        "a".repeat(300)
    );
    let started = Instant::now();
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head_len = head.len();
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for b in head.into_bytes() {
                if wr.write_all(&[b]).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut got = Vec::new();
    let ended = bounded("the slow head's connection to end", async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ended::Closed,
                Err(_) => return Ended::Reset,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let closed_after = started.elapsed();
    writer.abort();
    let sent = sent.load(Ordering::SeqCst);
    assert!(
        got.is_empty(),
        "closed without an answer: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        sent < head_len,
        "closed before the head was complete ({sent} of {head_len} bytes)"
    );

    // A connection that sends nothing at all.
    let started = Instant::now();
    let (out, silent_ended) = raw_exchange_until_end(gw.addr, b"", BOUND).await;
    let silent_after = started.elapsed();
    assert_ne!(
        silent_ended,
        Ended::Limit,
        "the silent connection was closed"
    );
    assert!(out.is_empty());
    assert_eq!(mock.heads(), 0);
    assert_eq!(healthz(gw.addr).await, 200);
    eprintln!(
        "FIGURE slow headers (header_read_timeout 1 s): a head trickled at 10 B/s closed after {} ({ended:?}, {sent} bytes sent); a silent connection closed after {} ({silent_ended:?})",
        ms(closed_after),
        ms(silent_after)
    );
}

/// A body trickled below `server.min_body_rate` (500 B/s against 1024 B/s) gets 408
/// `request_timeout` naming the rate once the grace (1 s) is over, long before
/// `body_read_timeout` (30 s); nothing is forwarded and the refusal is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_408_after_the_grace() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    let form = edit_request(&rgba_png(64, true), "a slow otter");
    let (head, body) = raw_edit(gw.addr, &form);
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(&head).await.unwrap();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        for piece in body.chunks(50) {
            if wr.write_all(piece).await.is_err() {
                break;
            }
            sent += piece.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (sent, wr)
    });
    let mut got = Vec::new();
    bounded("the 408", async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let answered_after = started.elapsed();
    // Read the rest of the answer (the body follows its head).
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(raw_status(&got), Some(408), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert!(
        text.contains("arrived too slowly"),
        "refused for its rate, not the whole-body deadline: {text}"
    );
    let r = gw
        .record("for the slow body", |r| r.status == Some(408))
        .await;
    assert_eq!(r.outcome, Outcome::Rejected, "{r:?}");
    assert_eq!(r.reason_code.as_deref(), Some("request_timeout"));
    assert!(!r.forwarded);
    assert_eq!(mock.heads(), 0, "nothing forwarded");
    eprintln!(
        "FIGURE slow body (500 B/s against min_body_rate 1024 B/s, grace 1 s): 408 after {} of trickling",
        ms(answered_after)
    );
}

/// An HTTP/2 connection that sends its preface and SETTINGS and then nothing gets a GOAWAY after
/// `server.idle_timeout` (1 s here) and is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_gets_a_goaway_and_is_closed() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut goaway = None;
    let mut frames = Vec::new();
    let ended = bounded("the idle h2 connection to end", async {
        let mut chunk = [0u8; 4096];
        loop {
            // Answer the server's SETTINGS and PINGs like a live client would.
            while buf.len() >= 9 {
                let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                frames.push(kind);
                let payload = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                match kind {
                    0x4 if flags & 1 == 0 => {
                        let _ = stream.write_all(b"\0\0\0\x04\x01\0\0\0\0").await;
                    }
                    0x6 if flags & 1 == 0 => {
                        let mut ack = vec![0, 0, 8, 0x6, 0x1, 0, 0, 0, 0];
                        ack.extend_from_slice(&payload);
                        let _ = stream.write_all(&ack).await;
                    }
                    0x7 if goaway.is_none() => goaway = Some(started.elapsed()),
                    _ => {}
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) => return Ended::Closed,
                Err(_) => return Ended::Reset,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let closed_after = started.elapsed();
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY frame; frames seen: {frames:?}"));
    assert_eq!(
        frames.first(),
        Some(&0x4),
        "the server's SETTINGS came first"
    );
    assert_eq!(healthz(gw.addr).await, 200);
    eprintln!(
        "FIGURE idle HTTP/2 (idle_timeout 1 s): GOAWAY after {}, connection closed after {} ({ended:?})",
        ms(goaway),
        ms(closed_after)
    );
}

/// A flood of idle connections up to `server.max_connections` (32 here): the cap is reached; a
/// new connection above it takes a probe place (`server.probe_connections`, 2 here) where
/// `/healthz` is answered and an edit gets 503 `overloaded`; with the probe places held too, a
/// connection above them is closed at once without an answer (and counted), a connection inside
/// the cap still gets `/healthz`, the admin listener (counted apart) still answers, and once the
/// first-bytes deadline (10 s here) has closed the flood a new connection is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_reaches_the_cap() {
    const CAP: usize = 32;
    const PROBES: usize = 2;
    let mock = MockUpstream::start().await;
    let mut conf = Conf::fast();
    conf.set("server", "max_connections", &CAP.to_string())
        .set("server", "probe_connections", &PROBES.to_string())
        // Long enough that the flood still holds every place while the probe places are
        // tried on a loaded machine.
        .set("server", "header_read_timeout", "\"10s\"")
        .set("server", "idle_timeout", "\"10s\"");
    let gw = Proc::start(&conf, &mock).await;
    let open = "imagegate_open_connections{listener=\"api\"}";
    let refused = "imagegate_connections_refused_total{listener=\"api\"}";

    let flood_started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..CAP {
        flood.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let held = poll("the flood to fill the cap", || async {
        let n = gw.metric(open).await;
        (n as usize == CAP).then_some(n)
    })
    .await;
    let refused_before = gw.metric(refused).await;

    // Above the cap, a probe place: /healthz is answered (and the connection closed), anything
    // else is 503 `overloaded` with Retry-After.
    let started = Instant::now();
    let (out, _) =
        raw_exchange_until_end(gw.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", BOUND).await;
    let probe_latency = started.elapsed();
    assert_eq!(
        raw_status(&out),
        Some(200),
        "a health probe above the cap is answered: {}",
        String::from_utf8_lossy(&out)
    );
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.contains("connection: close"), "{text}");
    let (out, _) = raw_exchange_until_end(
        gw.addr,
        b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        BOUND,
    )
    .await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert_eq!(raw_status(&out), Some(503), "{text}");
    assert!(
        text.contains("retry-after: 1") && text.contains("overloaded"),
        "{text}"
    );

    // Probe places held too (2 here): a connection above both is accepted by the kernel and
    // closed by the gateway before a byte is read.
    // The probe connections above have ended (their places are free again) first.
    poll("the probe connections to end", || async {
        (gw.metric(open).await as usize == CAP).then_some(())
    })
    .await;
    let mut squatters = Vec::new();
    for _ in 0..PROBES {
        squatters.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    poll("the probe places to fill", || async {
        (gw.metric(open).await as usize == CAP + PROBES).then_some(())
    })
    .await;
    let started = Instant::now();
    let (out, ended) = raw_exchange_until_end(
        gw.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        BOUND,
    )
    .await;
    let refused_in = started.elapsed();
    assert_ne!(
        ended,
        Ended::Limit,
        "the connection above the cap was closed"
    );
    assert!(
        out.is_empty(),
        "no answer above the cap: {}",
        String::from_utf8_lossy(&out)
    );
    let refused_after = poll("the refusal to be counted", || async {
        let n = gw.metric(refused).await;
        (n > refused_before).then_some(n)
    })
    .await;
    assert_eq!(refused_after, refused_before + 1.0);
    // A probe place that stays silent is closed by the first-bytes deadline.
    for mut c in squatters {
        let mut sink = Vec::new();
        let _ = bounded(
            "a silent probe connection to be closed",
            c.read_to_end(&mut sink),
        )
        .await;
        assert!(sink.is_empty());
    }

    // A connection of the flood is served: its neighbours' idleness does not hurt it.
    let mut inside = flood.pop().unwrap();
    let started = Instant::now();
    inside
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    bounded("/healthz inside the cap", inside.read_to_end(&mut answer))
        .await
        .unwrap();
    let inside_latency = started.elapsed();
    assert_eq!(
        raw_status(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // The rest of the flood is closed by the first-bytes deadline; then new connections are
    // served again.
    for mut c in flood {
        let mut sink = Vec::new();
        let _ = bounded("a flood connection to be closed", c.read_to_end(&mut sink)).await;
        assert!(sink.is_empty());
    }
    let flood_closed = flood_started.elapsed();
    poll("the open connections to drain", || async {
        (gw.metric(open).await == 0.0).then_some(())
    })
    .await;
    let started = Instant::now();
    assert_eq!(healthz(gw.addr).await, 200);
    let after_latency = started.elapsed();
    eprintln!(
        "FIGURE connection flood (max_connections {CAP}, probe_connections {PROBES}): cap reached ({held} open); /healthz on a new connection during the flood (a probe place) {}; with the probe places held too, a connection above them closed in {} without an answer ({ended:?}, refused_total +1); /healthz inside the cap {}; flood closed by the 10 s first-bytes deadline / idle timeout after {}; /healthz on a new connection afterwards {}",
        ms(probe_latency),
        ms(refused_in),
        ms(inside_latency),
        ms(flood_closed),
        ms(after_latency)
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------------------------

/// An upstream that resets its JSON answer mid-body: the caller's answer breaks, the record says `upstream_error` and the reservation is charged (estimated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_body_breaks_the_answer_and_is_charged() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    mock.set_behavior(Behavior::BreakMidBody);
    let started = Instant::now();
    let r = gw
        .edit(&edit_request(&rgba_png(32, true), "p").text("user", "reset"))
        .await;
    let broke_after = started.elapsed();
    // The caller's connection ends without a complete answer: after the head, or before it when
    // hyper had not flushed the head yet (it writes it with the first body bytes).
    let err = r.expect_err("the caller's answer breaks");
    assert!(
        err.starts_with("response body")
            || err.contains("connection closed before message completed"),
        "{err}"
    );
    let rec = gw
        .record("for the reset answer", |r| {
            r.user.as_deref() == Some("reset") && r.outcome != Outcome::Forwarding
        })
        .await;
    assert_eq!(rec.outcome, Outcome::UpstreamError, "{rec:?}");
    assert_eq!(rec.upstream_status, Some(200));
    assert!(rec.forwarded);
    assert_eq!(rec.cost_settled_micros, rec.cost_reserved_micros, "{rec:?}");
    assert_eq!(rec.cost_basis, Some(CostBasis::Estimated));
    assert_eq!(mock.count(), 1);
    eprintln!(
        "FIGURE upstream reset mid-body: the caller's body broke after {}",
        ms(broke_after)
    );
}

/// An upstream that stalls mid-body: after `upstream.idle_timeout` (1 s here) the caller's body
/// breaks, the record says `upstream_timeout` and the reservation is charged (estimated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stalling_mid_body_times_out_and_is_charged() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    mock.set_behavior(Behavior::StallMidBody);
    let started = Instant::now();
    let r = gw
        .edit(&edit_request(&rgba_png(32, true), "p").text("user", "stall"))
        .await;
    let broke_after = started.elapsed();
    let err = r.expect_err("the caller's answer breaks");
    assert!(err.starts_with("response body"), "{err}");
    let rec = gw
        .record("for the stalled answer", |r| {
            r.user.as_deref() == Some("stall") && r.outcome != Outcome::Forwarding
        })
        .await;
    assert_eq!(rec.outcome, Outcome::UpstreamTimeout, "{rec:?}");
    assert_eq!(rec.upstream_status, Some(200));
    assert_eq!(rec.cost_settled_micros, rec.cost_reserved_micros, "{rec:?}");
    assert_eq!(rec.cost_basis, Some(CostBasis::Estimated));
    eprintln!(
        "FIGURE upstream stall mid-body (upstream.idle_timeout 1 s): the caller's body broke after {}",
        ms(broke_after)
    );
}

/// An upstream that answers its head slowly: within `upstream.response_timeout` (2 s here) the
/// answer is relayed; past it the caller gets 504 `upstream_timeout` and the reservation is
/// charged (the upstream may have done the work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_its_head_slowly() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    mock.set_behavior(Behavior::SlowHead { delay_ms: 300 });
    let started = Instant::now();
    let r = gw
        .edit(&edit_request(&rgba_png(32, true), "p").text("user", "slow-ok"))
        .await
        .unwrap();
    let ok_after = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());

    mock.set_behavior(Behavior::SlowHead { delay_ms: 20_000 });
    let started = Instant::now();
    let r = gw
        .edit(&edit_request(&rgba_png(32, true), "p").text("user", "slow-late"))
        .await
        .unwrap();
    let late_after = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    let rec = gw
        .record("for the late head", |r| {
            r.user.as_deref() == Some("slow-late")
        })
        .await;
    assert_eq!(rec.outcome, Outcome::UpstreamTimeout, "{rec:?}");
    assert_eq!(rec.cost_settled_micros, rec.cost_reserved_micros);
    assert_eq!(rec.cost_basis, Some(CostBasis::Estimated));
    eprintln!(
        "FIGURE upstream slow head (response_timeout 2 s): a 300 ms head relayed in {}; a 20 s head cut with 504 after {}",
        ms(ok_after),
        ms(late_after)
    );
}

// ---------------------------------------------------------------------------------------------
// Callers that stop reading or leave
// ---------------------------------------------------------------------------------------------

/// A caller that reads the head of a large answer and then stops reading (its socket open) is
/// treated as gone after `server.caller_idle_timeout` (1 s here); the upstream answer is still
/// read to its end and charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_is_client_gone() {
    let mock = MockUpstream::start().await;
    let gw = Proc::start(&Conf::fast(), &mock).await;
    let padding = "x".repeat(24 << 20);
    mock.set_behavior(Behavior::Custom {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: format!(
            r#"{{"created":1,"data":[{{"url":"https://example.invalid/a.png","revised_prompt":"{padding}"}},{{"url":"https://example.invalid/b.png"}}]}}"#
        ),
    });
    let form = edit_request(&rgba_png(16, true), "p")
        .text("n", "2")
        .text("user", "stopper");
    let (head, body) = raw_edit(gw.addr, &form);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(gw.addr).await.unwrap();
    stream.write_all(&head).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut first = vec![0u8; 1024];
    let n = bounded("the answer's first bytes", stream.read(&mut first))
        .await
        .unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    let stopped = Instant::now();
    // The caller stops reading here, its connection open.
    let rec = gw
        .record("for the caller that stopped reading", |r| {
            r.user.as_deref() == Some("stopper") && r.outcome != Outcome::Forwarding
        })
        .await;
    let recorded_after = stopped.elapsed();
    assert_eq!(rec.outcome, Outcome::ClientGone, "{rec:?}");
    assert_eq!(rec.images_returned, Some(2), "read to its end: {rec:?}");
    assert_eq!(rec.cost_settled_micros, 2 * 20_000, "{rec:?}");
    drop(stream);
    assert_eq!(healthz(gw.addr).await, 200);
    eprintln!(
        "FIGURE caller stops reading (caller_idle_timeout 1 s): recorded client_gone, the 24 MB answer read to its end, {} after the caller stopped",
        ms(recorded_after)
    );
}

/// An 8192 × 8192 RGBA PNG of transparent black, a few hundred KB: a long decode.
fn big_png() -> Vec<u8> {
    use support::fixtures::{assemble, chunk, ihdr};
    let side = 8192u32;
    let row = vec![0u8; 1 + side as usize * 4];
    let mut z = fdeflate::Compressor::new(Vec::new()).unwrap();
    for _ in 0..side {
        z.write_data(&row).unwrap();
    }
    let idat = z.finish().unwrap();
    let mut framed = vec![ihdr(side, side, 8, 6, 0)];
    for piece in idat.chunks(1 << 20) {
        framed.push(chunk(b"IDAT", piece));
    }
    framed.push(chunk(b"IEND", &[]));
    assemble(&framed)
}

/// Callers that send a complete request and leave while its decode runs: each decode notices at
/// its next row and stops (counted in `imagegate_decodes_cancelled_total`, which a decode that
/// ran to its end does not enter), `imagegate_decodes_running` is back to 0, the requests are
/// recorded `client_gone`, and nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_leaving_during_the_decode_release_it() {
    const CALLERS: usize = 2;
    let mock = MockUpstream::start().await;
    let mut conf = Conf::fast();
    conf.set("server", "max_concurrent_decodes", &CALLERS.to_string())
        .set("validation", "max_dimension", "8192")
        // Every caller's file is decoded (no validated-image cache).
        .set("cache", "validated_images_max_entries", "0");
    let gw = Proc::start(&conf, &mock).await;
    let image = big_png();
    assert!(image.len() < 4 << 20, "{} bytes", image.len());

    // The figure to compare with: one complete check of the same image, its caller staying.
    let started = Instant::now();
    let r = gw
        .edit(&edit_request(&image, "p").text("user", "stayer"))
        .await
        .unwrap();
    let full_check = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.metric("imagegate_decodes_running").await, 0.0);
    let cancelled_before = gw.metric("imagegate_decodes_cancelled_total").await;

    let mut callers = Vec::new();
    for i in 0..CALLERS {
        let (head, body) = raw_edit(
            gw.addr,
            &edit_request(&image, "p").text("user", &format!("leaver-{i}")),
        );
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&head).await.unwrap();
        s.write_all(&body).await.unwrap();
        callers.push(s);
    }
    poll("every caller's decode to run", || async {
        (gw.metric("imagegate_decodes_running").await as usize == CALLERS).then_some(())
    })
    .await;
    let left = Instant::now();
    drop(callers);
    poll("the decodes to stop", || async {
        (gw.metric("imagegate_decodes_running").await == 0.0).then_some(())
    })
    .await;
    let released_after = left.elapsed();
    let cancelled = gw.metric("imagegate_decodes_cancelled_total").await - cancelled_before;
    assert_eq!(
        cancelled as usize, CALLERS,
        "each decode stopped at a row, not at its end"
    );
    for i in 0..CALLERS {
        let user = format!("leaver-{i}");
        let rec = gw
            .record("for a caller that left", |r| {
                r.user.as_deref() == Some(user.as_str())
            })
            .await;
        assert_eq!(rec.outcome, Outcome::ClientGone, "{rec:?}");
        assert!(!rec.forwarded);
        assert_eq!(rec.cost_settled_micros, 0);
    }
    assert_eq!(mock.count(), 1, "only the caller that stayed was forwarded");
    eprintln!(
        "FIGURE decode released: {CALLERS} callers left mid-decode of an 8192x8192 PNG ({} KB); decodes running 0 after {} (a complete check of it takes {})",
        image.len() / 1024,
        ms(released_after),
        ms(full_check)
    );
}

// ---------------------------------------------------------------------------------------------
// Overload and memory
// ---------------------------------------------------------------------------------------------

/// With every `server.max_in_flight` slot (4 here) held by an edit waiting on the upstream, new
/// edits are shed at once with 503 `overloaded` and `Retry-After`, while `/healthz` and
/// `/readyz` still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_with_retry_after_and_health_answers() {
    const SLOTS: usize = 4;
    const SHED: usize = 200;
    let mock = MockUpstream::start().await;
    let mut conf = Conf::fast();
    conf.set("server", "max_in_flight", &SLOTS.to_string()).set(
        "upstream",
        "response_timeout",
        "\"20s\"",
    );
    let gw = Proc::start(&conf, &mock).await;
    mock.set_behavior(Behavior::Hang);
    let addr = gw.addr;
    let holders: Vec<_> = (0..SLOTS)
        .map(|i| {
            tokio::spawn(async move {
                post(
                    addr,
                    &edit_request(&rgba_png(16, true), "p").text("user", &format!("h{i}")),
                )
                .await
            })
        })
        .collect();
    bounded("every slot held at the upstream", mock.wait_for(SLOTS)).await;

    let form = edit_request(&rgba_png(16, true), "p");
    let mut latencies = Vec::with_capacity(SHED);
    for _ in 0..SHED {
        let started = Instant::now();
        let r = post(addr, &form).await.expect("an answer");
        latencies.push(started.elapsed());
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "overloaded");
        let retry = r
            .header("retry-after")
            .expect("Retry-After on a shed answer");
        assert!(retry.parse::<u64>().is_ok_and(|s| s > 0), "{retry}");
    }
    let started = Instant::now();
    assert_eq!(healthz(addr).await, 200);
    let health = started.elapsed();
    let ready = bounded(
        "GET /readyz",
        try_send(addr, "GET", "/readyz", &[], Vec::new()),
    )
    .await
    .unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(mock.heads(), SLOTS, "no shed edit reached the upstream");
    for h in holders {
        h.abort();
    }
    latencies.sort();
    eprintln!(
        "FIGURE overload (max_in_flight {SLOTS}, all held): {SHED} edits shed 503 + Retry-After, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (fresh connection per request, client side); /healthz under it {}",
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
        ms(health)
    );
}

/// A bounded flood of 4 MB uploads (64 requests, 16 at once) against a 64 MiB
/// `server.max_buffered_bytes`: every upload is answered (200, or 503 `overloaded` with
/// `Retry-After` when no room came within `buffer_wait`), the gateway serves afterwards, and the
/// peak resident memory is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_memory_under_a_flood_of_4mb_uploads() {
    const UPLOADS: usize = 64;
    const AT_ONCE: usize = 16;
    let mock = MockUpstream::start().await;
    let mut conf = Conf::fast();
    conf.set("server", "max_buffered_bytes", &(64u64 << 20).to_string())
        .set("server", "buffer_wait", "\"5s\"")
        .set("server", "body_rate_grace", "\"10s\"");
    let gw = Proc::start(&conf, &mock).await;
    let before = gw.peak_rss_kib();
    let image = Arc::new(support::fixtures::png_of_size((4 << 20) - 1024));
    let addr = gw.addr;
    let started = Instant::now();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for round in 0..UPLOADS / AT_ONCE {
        let tasks: Vec<_> = (0..AT_ONCE)
            .map(|i| {
                let image = image.clone();
                tokio::spawn(async move {
                    let form = edit_request(&image, "p").text("user", &format!("m{round}-{i}"));
                    post(addr, &form).await
                })
            })
            .collect();
        for t in tasks {
            let r = t.await.unwrap().expect("an answer to every upload");
            match r.status {
                200 => {}
                503 => {
                    assert_eq!(r.json()["error"]["code"], "overloaded", "{}", r.text());
                    assert!(r.header("retry-after").is_some());
                }
                s => panic!("unexpected {s}: {}", r.text()),
            }
            *statuses.entry(r.status).or_default() += 1;
        }
        mock.clear_received();
    }
    let took = started.elapsed();
    let peak = gw.peak_rss_kib();
    let now = gw.current_rss_kib();
    assert_eq!(statuses.values().sum::<usize>(), UPLOADS);
    assert_eq!(healthz(addr).await, 200);
    let r = gw
        .edit(&edit_request(&rgba_png(32, true), "p"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "serves afterwards: {}", r.text());
    eprintln!(
        "FIGURE peak memory: {UPLOADS} uploads of 4 MB, {AT_ONCE} at once, max_buffered_bytes 64 MiB: VmHWM {} MiB (before the flood {} MiB, after {} MiB RSS); answers {statuses:?} in {}",
        peak / 1024,
        before / 1024,
        now / 1024,
        ms(took)
    );
}
