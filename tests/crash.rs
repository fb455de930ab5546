//! Crash safety of the usage ledger: the real binary, SIGKILLed under load.
//!
//! The gateway runs as its own process (`imagegate serve` on 127.0.0.1:0, JSON logs; the
//! `imagegate listening` line gives the address) in front of the in-process mock upstream. Eight
//! callers send requests, each with a unique `user`; part way through, the mock stops answering
//! so requests are in flight, and the process is killed with SIGKILL. Then:
//! - every request the upstream received has a ledger record (matched by its unique `user`),
//!   committed before it was forwarded; every request answered 200 has its `answered` record;
//! - a restart turns the records left `forwarding` into `unknown` (and says how many), serves
//!   again, and the chain verifies (library and `imagegate audit verify`).

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imagegate::config::hash_key;
use imagegate::ledger::sqlite::SqliteStore;
use imagegate::ledger::{LedgerStore, Outcome, Record, UsageQuery};

use support::fixtures::rgba_png;
use support::mock_upstream::{Behavior, MockUpstream};
use support::multipart::edit_request;
use support::process::Served;
use support::try_send;

const KEY: &str = "ig-crash-test-key-0123456789";
const UPSTREAM_KEY: &str = "sk-crash-test-upstream-key";
const PRICE_1024: i64 = 20_000;
const TASKS: usize = 8;
const PER_TASK: usize = 50;

fn write_config(dir: &Path, mock: &MockUpstream) -> PathBuf {
    let db = dir.join("imagegate.db");
    let generous = "requests_per_minute = 100000\nrequests_burst = 100000\n\
                    images_per_minute = 1000000\nimages_burst = 1000000\n";
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"

[upstream]
base_url = {base:?}
allow_http = true
response_timeout = "300s"

[ledger]
path = {db:?}

[validation]
models = ["dall-e-2"]

[models]
default = "dall-e-2"
accepted = {{}}
# Only edits reach the mock: its counts are the ledger's.
check_at_start = false

[log]
format = "json"
level = "info"

[limits.per_user]
{generous}
[limits.per_client]
{generous}
[[clients]]
name = "crash"
key_hash = {hash:?}
"#,
        base = mock.base_url(),
        db = db.to_str().expect("a UTF-8 temporary path"),
        hash = hash_key(KEY),
    );
    let path = dir.join("imagegate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every record of the ledger at `path`, by request id.
fn read_records(path: &Path) -> HashMap<String, Record> {
    let store = SqliteStore::open_reader(path).expect("the ledger opens for reading");
    let mut out = HashMap::new();
    store
        .export(&UsageQuery::default(), &mut |r| {
            out.insert(r.request_id.clone(), r.clone());
            Ok(())
        })
        .expect("the ledger exports");
    out
}

fn verify(path: &Path) {
    let store = SqliteStore::open_reader(path).expect("the ledger opens for reading");
    let report = store.verify().expect("verify runs");
    assert!(report.is_ok(), "the ledger chain verifies: {report:?}");
}

/// Records by their (unique) end user.
fn by_user(records: &HashMap<String, Record>) -> HashMap<String, Record> {
    let mut out = HashMap::new();
    for r in records.values() {
        let user = r.user.clone().expect("every request named its user");
        assert!(
            out.insert(user.clone(), r.clone()).is_none(),
            "one record per request: user {user} twice"
        );
    }
    out
}

/// One edit request for `user` through the gateway at `addr`, within 30 s.
async fn edit(addr: SocketAddr, user: &str) -> Result<support::Resp, String> {
    let form = edit_request(&rgba_png(16, true), "p").text("user", user);
    let auth = format!("Bearer {KEY}");
    tokio::time::timeout(
        Duration::from_secs(30),
        try_send(
            addr,
            "POST",
            "/v1/images/edits",
            &[
                ("authorization", auth.as_str()),
                ("content-type", &form.content_type()),
            ],
            form.body(),
        ),
    )
    .await
    .unwrap_or_else(|_| Err("no answer within 30 s".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_forwarded_request() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let db = dir.path().join("imagegate.db");
    let mut gw = Served::start(&config, UPSTREAM_KEY).await;
    let addr = gw.addr;

    // The load: 8 callers, up to 50 requests each, for at most 60 s; a caller stops at its
    // first transport error (the gateway is gone).
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(HashSet::new()));
    let other = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (stop, answered, other) = (stop.clone(), answered.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                    break;
                }
                let user = format!("crash-{t}-{i}");
                match edit(addr, &user).await {
                    Ok(r) if r.status == 200 => {
                        answered.lock().unwrap().insert(user);
                    }
                    Ok(r) => other.lock().unwrap().push((user, r.status, r.text())),
                    Err(_) => break,
                }
            }
        }));
    }

    // Let some requests complete, then make the upstream hang so requests are in flight, and
    // kill the gateway once at least four hanging requests reached the upstream.
    tokio::time::timeout(Duration::from_secs(60), mock.wait_for(40))
        .await
        .unwrap_or_else(|_| panic!("40 requests within 60 s:\n{}", gw.log_text()));
    mock.set_behavior(Behavior::Hang);
    // Every head counted after this point was answered with `Hang`.
    let heads_at_switch = mock.heads();
    tokio::time::timeout(
        Duration::from_secs(30),
        mock.wait_for_heads(heads_at_switch + 4),
    )
    .await
    .expect("four hanging requests reach the upstream within 30 s");
    gw.kill();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the callers stop once the gateway is gone")
            .unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        other.lock().unwrap().is_empty(),
        "only 200s or broken connections: {:?}",
        other.lock().unwrap()
    );
    assert!(answered.len() >= 36, "{} answered", answered.len());

    // ---- the ledger as the crash left it ----
    let received = mock.received();
    let before = read_records(&db);
    verify(&db);
    let users = by_user(&before);
    for rec in &received {
        let user = rec.field("user").expect("the user is forwarded");
        let r = users.get(&user).unwrap_or_else(|| {
            panic!("the upstream received a request of {user} that the ledger does not know")
        });
        assert!(r.forwarded, "{r:?}");
    }
    for user in &answered {
        let r = &users[user];
        assert_eq!(
            r.outcome,
            Outcome::Answered,
            "a caller that got its whole answer finds its record: {r:?}"
        );
        assert_eq!(r.images_returned, Some(1));
        assert_eq!(r.cost_settled_micros, PRICE_1024);
    }
    let received_users: HashSet<String> = received.iter().filter_map(|r| r.field("user")).collect();
    for r in before.values() {
        assert!(r.forwarded, "only forwarded requests were sent: {r:?}");
        assert_eq!(r.client.as_deref(), Some("crash"));
        match r.outcome {
            Outcome::Answered => assert!(
                received_users.contains(r.user.as_deref().unwrap()),
                "answered, so the upstream had it: {r:?}"
            ),
            Outcome::Forwarding => {}
            other => panic!("unexpected outcome {other}: {r:?}"),
        }
    }
    let forwarding: HashSet<String> = before
        .values()
        .filter(|r| r.outcome == Outcome::Forwarding)
        .map(|r| r.request_id.clone())
        .collect();
    assert!(
        forwarding.len() >= 4,
        "the hanging requests were committed `forwarding` before they went upstream: {}",
        forwarding.len()
    );
    assert!(before.len() >= mock.count());

    // ---- restart on the same ledger ----
    mock.set_behavior(Behavior::Success);
    let mut gw = Served::start(&config, UPSTREAM_KEY).await;
    let recovered = gw.events("ledger: requests left 'forwarding' by a crash are now 'unknown'");
    assert_eq!(
        recovered.len(),
        1,
        "the recovery is logged:\n{}",
        gw.log_text()
    );
    assert_eq!(
        recovered[0]["recovered"].as_u64(),
        Some(forwarding.len() as u64)
    );
    let after = read_records(&db);
    assert_eq!(after.len(), before.len());
    for (id, old) in &before {
        let new = &after[id];
        if forwarding.contains(id) {
            assert_eq!(new.outcome, Outcome::Unknown, "{new:?}");
            assert_eq!(
                new.cost_settled_micros, new.cost_reserved_micros,
                "an unknown request counts its reservation"
            );
            assert_eq!(new.cost_reserved_micros, PRICE_1024);
            let mut expected = old.clone();
            expected.outcome = Outcome::Unknown;
            expected.cost_settled_micros = old.cost_reserved_micros;
            assert_eq!(new, &expected, "recovery changes nothing else");
        } else {
            assert_eq!(new, old, "final records are untouched");
        }
    }
    verify(&db);

    // The restarted gateway serves, and stops cleanly.
    let r = edit(gw.addr, "after-restart")
        .await
        .expect("the restarted gateway answers");
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-imagegate-request-id").unwrap();
    // A wrong key is refused and logged: masked, never in full.
    let wrong = "ig-wrong-key-that-must-not-be-logged";
    let refused = try_send(
        gw.addr,
        "POST",
        "/v1/images/edits",
        &[("authorization", &format!("Bearer {wrong}"))],
        vec![],
    )
    .await
    .expect("the gateway answers");
    assert_eq!(refused.status, 401);
    let status = gw.terminate().await;
    // One span per request, carrying its id, client and user.
    let finished = gw.events("request finished");
    let span = finished
        .iter()
        .map(|e| &e["span"])
        .find(|s| s["id"] == id.as_str())
        .unwrap_or_else(|| panic!("no 'request finished' line for {id}:\n{}", gw.log_text()));
    assert_eq!(span["client"], "crash", "{span}");
    assert_eq!(span["user"], "after-restart", "{span}");
    assert_eq!(span["path"], "/v1/images/edits", "{span}");
    // No key in the logs or the ledger file, in any form the gateway saw it.
    let logs = gw.log_text();
    let mut stored = std::fs::read(&db).unwrap();
    if let Ok(wal) = std::fs::read(db.with_extension("db-wal")) {
        stored.extend(wal);
    }
    let stored = String::from_utf8_lossy(&stored);
    for secret in [KEY, UPSTREAM_KEY, wrong] {
        assert!(!logs.contains(secret), "{secret} reached the logs");
        assert!(!stored.contains(secret), "{secret} reached the ledger file");
    }
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        gw.log_text()
    );
    let last = read_records(&db);
    assert_eq!(
        last.len(),
        before.len() + 2,
        "the answered request and the refused one"
    );
    assert_eq!(last[&id].outcome, Outcome::Answered);
    assert!(last.values().all(|r| r.outcome.is_final()));
    verify(&db);

    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_UPSTREAM_URL")
        .env("OPENAI_API_KEY", UPSTREAM_KEY)
        .output()
        .expect("imagegate audit verify runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "audit verify: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(": ok:") && stdout.contains(&format!("{} records", last.len())),
        "{stdout}"
    );
}

/// Kills of the random-moment test.
const KILLS: usize = 20;

/// A small xorshift generator: the test prints its seed, and `CRASH_SEED` replays a run.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("crash: seed {seed} (CRASH_SEED={seed} replays it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Quota use of the test's client summed over every month: `(images, micros, open holds)`.
fn quota_use(db: &Path) -> (i64, i64, i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let (images, micros) = conn
        .query_row(
            "SELECT COALESCE(SUM(images), 0), COALESCE(SUM(micros), 0) FROM quota_usage \
             WHERE scope = 'client:crash' AND period LIKE 'month:%'",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .unwrap();
    let holds = conn
        .query_row("SELECT COUNT(*) FROM quota_holds", [], |r| r.get(0))
        .unwrap();
    (images, micros, holds)
}

/// What the ledger's records charge: `(images, micros)`. An `unknown` request is charged its
/// whole reservation (its `n` images); an answered one what it returned.
fn ledger_charges(records: &HashMap<String, Record>) -> (i64, i64) {
    records.values().fold((0, 0), |(images, micros), r| {
        let charged = match r.outcome {
            Outcome::Unknown => i64::from(r.n.unwrap_or(1)),
            _ => i64::from(r.images_returned.unwrap_or(0)),
        };
        (images + charged, micros + r.cost_settled_micros)
    })
}

fn audit_verify(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["audit", "verify", "--config"])
        .arg(config)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_UPSTREAM_URL")
        .env("OPENAI_API_KEY", UPSTREAM_KEY)
        .output()
        .expect("imagegate audit verify runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "audit verify: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// SIGKILL at a random moment of a load, twenty times, on one ledger. After each restart:
/// every request the upstream received has its record, the quota counts exactly what the
/// ledger's records charge (no reservation without a trace), no hold is left, and the chain
/// verifies (`imagegate audit verify`). The figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_keeps_quota_and_ledger_in_step() {
    let mut rng = Rng::from_env();
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let db = dir.path().join("imagegate.db");
    let (mut lost, mut max_drift, mut refunded, mut reconciled) = (0usize, 0i64, 0u64, 0u64);
    let mut sent_total = 0usize;
    let started = Instant::now();
    for round in 0..=KILLS {
        let mut gw = Served::start(&config, UPSTREAM_KEY).await;
        // ---- the state the previous kill left, after recovery ----
        if let Some(e) = gw
            .events("quota: reservations left by a crash now match the ledger")
            .first()
        {
            refunded += e["refunded"].as_u64().unwrap_or(0);
            reconciled += e["reconciled"].as_u64().unwrap_or(0);
        }
        let records = read_records(&db);
        let users = by_user(&records);
        for rec in mock.received() {
            let user = rec.field("user").expect("the user is forwarded");
            match users.get(&user) {
                Some(r) => assert!(r.forwarded, "{r:?}"),
                None => lost += 1,
            }
        }
        assert!(
            records.values().all(|r| r.outcome.is_final()),
            "recovery leaves nothing forwarding"
        );
        let (q_images, q_micros, holds) = quota_use(&db);
        let (l_images, l_micros) = ledger_charges(&records);
        max_drift = max_drift.max((q_micros - l_micros).abs());
        assert_eq!(holds, 0, "round {round}: every hold is reconciled");
        assert_eq!(
            (q_images, q_micros),
            (l_images, l_micros),
            "round {round}: quota use (images, micros) equals the ledger's charges"
        );
        verify(&db);
        let report = audit_verify(&config);
        assert!(report.contains(": ok:"), "{report}");
        if round == KILLS {
            assert!(gw.terminate().await.success(), "{}", gw.log_text());
            break;
        }

        // ---- a load, killed at a random moment ----
        mock.set_behavior(match rng.below(3) {
            0 => Behavior::Success,
            1 => Behavior::SlowBody { chunks: 64 },
            _ => Behavior::Hang,
        });
        let addr = gw.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (stop, sent) = (stop.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                        break;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    let user = format!("r{round}-{t}-{i}");
                    if edit(addr, &user).await.is_err() {
                        break;
                    }
                }
            }));
        }
        // The random moment: anywhere in the first 400 ms of the load.
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        gw.kill();
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("the callers stop once the gateway is gone")
                .unwrap();
        }
        sent_total += sent.load(Ordering::SeqCst);
    }
    let records = read_records(&db);
    eprintln!(
        "crash: {KILLS} kills in {:?}; {sent_total} requests sent, {} reached the upstream, {} records; \
         lost records {lost}; quota drift {max_drift} micro-USD (largest after any restart); \
         holds recovered: {refunded} refunded (killed before forwarding), {reconciled} set to their record's charge",
        started.elapsed(),
        mock.received().len(),
        records.len(),
    );
    assert_eq!(lost, 0, "every request the upstream saw has a record");
    assert_eq!(max_drift, 0);
}

/// A forwarding task that panics after the upstream answered (a test-only trigger: the
/// `testkit` end user) still completes its record, as `upstream_error` charged its whole
/// reservation, and the quota charges the same; the caller gets a 500 and the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_forwarding_task_completes_its_record_and_settles_its_quota() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let db = dir.path().join("imagegate.db");
    let mut gw = Served::start(&config, UPSTREAM_KEY).await;
    let r = edit(gw.addr, imagegate::testkit::PANIC_AFTER_SEND_USER)
        .await
        .expect("the gateway answers");
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(mock.count(), 1, "the request reached the upstream");
    // The record is completed by the task's guard, asynchronously: wait for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        let records = read_records(&db);
        let (_, _, holds) = quota_use(&db);
        if let Some(r) = records.values().next()
            && r.outcome.is_final()
            && holds == 0
        {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the record is completed and its hold reconciled within 20 s: {records:?}\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record.outcome, Outcome::UpstreamError, "{record:?}");
    assert!(record.forwarded);
    assert_eq!(record.reason_code.as_deref(), Some("server_error"));
    assert_eq!(record.cost_settled_micros, PRICE_1024);
    let (q_images, q_micros, _) = quota_use(&db);
    assert_eq!(
        (q_images, q_micros),
        (1, PRICE_1024),
        "the quota charges the whole reservation, as the record does"
    );
    assert!(
        !gw.events(
            "the forwarding task ended without completing its record (a panic); completing it"
        )
        .is_empty(),
        "{}",
        gw.log_text()
    );
    // The gateway serves on.
    let ok = edit(gw.addr, "after-panic").await.expect("answers");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(gw.terminate().await.success(), "{}", gw.log_text());
    verify(&db);
    audit_verify(&config);
}

/// `GET /readyz` status, polled (bounded: 20 s) until it is `want`.
async fn readyz_becomes(gw: &Served, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        let r = try_send(gw.addr, "GET", "/readyz", &[], vec![])
            .await
            .expect("readyz answers");
        if r.status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "/readyz did not become {want} within 20 s (still {}):\n{}",
            r.status,
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ledger file made read-only, or deleted, under the running gateway is noticed: `/readyz`
/// fails, an edit is refused 503 `ledger_unavailable` and not forwarded; once the file is
/// writable (or back) again, the gateway is ready and forwards again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_or_deleted_ledger_file_is_noticed_and_recovered_from() {
    use std::os::unix::fs::PermissionsExt;
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let db = dir.path().join("imagegate.db");
    let mut gw = Served::start(&config, UPSTREAM_KEY).await;
    assert_eq!(edit(gw.addr, "before").await.unwrap().status, 200);
    readyz_becomes(&gw, 200).await;

    type Step<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Step<'_>, Step<'_>); 2] = [
        (
            "read-only",
            Box::new(|| {
                std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap()
            }),
            Box::new(|| {
                std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap()
            }),
        ),
        (
            "deleted",
            Box::new(|| std::fs::rename(&db, db.with_extension("moved")).unwrap()),
            Box::new(|| std::fs::rename(db.with_extension("moved"), &db).unwrap()),
        ),
    ];
    for (name, break_it, mend_it) in &cases {
        break_it();
        let noticed = readyz_becomes(&gw, 503).await;
        let forwarded = mock.count();
        let r = edit(gw.addr, &format!("while-{name}")).await.unwrap();
        assert_eq!(r.status, 503, "{name}: {}", r.text());
        assert!(
            r.text().contains("ledger_unavailable"),
            "{name}: {}",
            r.text()
        );
        assert_eq!(mock.count(), forwarded, "{name}: nothing forwarded");
        mend_it();
        let back = readyz_becomes(&gw, 200).await;
        let r = edit(gw.addr, &format!("after-{name}")).await.unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        eprintln!(
            "ledger file {name}: /readyz failed after {noticed:?}, ready again {back:?} after mending"
        );
    }
    assert!(gw.terminate().await.success(), "{}", gw.log_text());
    let records = by_user(&read_records(&db));
    for name in ["read-only", "deleted"] {
        // The refusal was kept in memory and written once the file was back.
        assert_eq!(records[&format!("while-{name}")].outcome, Outcome::Rejected);
        assert_eq!(records[&format!("after-{name}")].outcome, Outcome::Answered);
    }
    verify(&db);
}
