//! Several replicas: real `imagegate serve` processes sharing one Redis (rate limits) and one
//! PostgreSQL (quotas and the ledger), in front of the in-process mock upstream.
//!
//! - `two_replicas_share_limits_quotas_and_the_ledger` uses the services of the development and
//!   CI machines (Redis at `REDIS_URL`, default `redis://127.0.0.1:6379`; PostgreSQL at
//!   `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`), in a key prefix and a
//!   schema of its own.
//! - `faults_of_redis_and_postgres` starts its own `redis-server` and PostgreSQL (the
//!   `/usr/lib/postgresql/15/bin` binaries, or `PG_BIN`) on free ports, so it can stop them.
//!
//! Both are ignored in a plain `cargo test`; CI runs them with `--include-ignored`.

mod support;

use support::pg::{Schema, database_url};
use support::process::Served;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imagegate::config::hash_key;
use imagegate::ledger::{LedgerStore, Outcome, PgSettings, PostgresStore, Record, UsageQuery};

use support::fixtures::rgba_png;
use support::mock_upstream::{Behavior, MockUpstream};
use support::multipart::edit_request;
use support::try_send;

const UPSTREAM_KEY: &str = "sk-replicas-test-upstream-key";
const BURST_KEY: &str = "ig-replicas-burst-key-0123456789";
const QUOTA_KEY: &str = "ig-replicas-quota-key-0123456789";
const LOAD_KEY: &str = "ig-replicas-load-key-01234567890";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(tag: &str) -> String {
    format!("{tag}_{}", uuid::Uuid::new_v4().simple())
}

/// What a gateway process is configured with.
struct Setup<'a> {
    mock: &'a MockUpstream,
    redis_url: String,
    prefix: String,
    redis_failure: &'a str,
    pg_url: String,
    schema: Option<String>,
    replica: &'a str,
}

fn write_config(dir: &Path, s: &Setup<'_>) -> PathBuf {
    let generous = "requests_per_minute = 100000\nrequests_burst = 100000\n\
                    images_per_minute = 1000000\nimages_burst = 1000000\n";
    let schema = s
        .schema
        .as_ref()
        .map(|n| format!("postgres_schema = {n:?}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"

[upstream]
base_url = {base:?}
allow_http = true
response_timeout = "300s"

[validation]
models = ["dall-e-2"]

[models]
default = "dall-e-2"
accepted = {{}}
check_at_start = false

[log]
format = "json"
level = "info"

[limits]
backend = "redis"
redis_url = {redis:?}
redis_prefix = {prefix:?}
redis_timeout = "50ms"
redis_failure = {failure:?}

[limits.per_user]
{generous}
[limits.per_client]
{generous}
[ledger]
backend = "postgres"
postgres_url = {pg:?}
{schema}replica_id = {replica:?}
pool_size = 4
connect_timeout = "2s"
startup_wait = "60s"
health_interval = "200ms"
stall_timeout = "1s"

# A burst of 10 per user, refilled slowly.
[[clients]]
name = "burst"
key_hash = {burst:?}
user_limits = {{ requests_per_minute = 1, requests_burst = 10, images_per_minute = 1, images_burst = 10 }}

# 10 images a day for the whole client.
[[clients]]
name = "quota"
key_hash = {quota:?}
quotas = {{ images_per_day = 10 }}

[[clients]]
name = "load"
key_hash = {load:?}
"#,
        base = s.mock.base_url(),
        redis = s.redis_url,
        prefix = s.prefix,
        failure = s.redis_failure,
        pg = s.pg_url,
        replica = s.replica,
        burst = hash_key(BURST_KEY),
        quota = hash_key(QUOTA_KEY),
        load = hash_key(LOAD_KEY),
    );
    let path = dir.join(format!("{}.toml", s.replica));
    std::fs::write(&path, text).unwrap();
    path
}

/// One edit (dall-e-2, n = 1) for `user` with `key`, answered within 30 s.
async fn edit(addr: SocketAddr, key: &str, user: &str) -> Result<support::Resp, String> {
    let form = edit_request(&rgba_png(16, true), "p").text("user", user);
    let auth = format!("Bearer {key}");
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

fn code(r: &support::Resp) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

async fn readyz(addr: SocketAddr) -> Option<u16> {
    tokio::time::timeout(
        Duration::from_secs(10),
        try_send(addr, "GET", "/readyz", &[], Vec::new()),
    )
    .await
    .ok()?
    .ok()
    .map(|r| r.status)
}

/// Poll `check` every 50 ms until it holds, at most `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `imagegate <args> --config <config>`: (exit code, stdout, stderr).
fn cli(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_POSTGRES_URL")
        .env_remove("IMAGEGATE_REDIS_URL")
        .output()
        .expect("imagegate runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The records of the load phase (users `load-*` and `after-*`, one request each), by user.
fn records_by_user(schema: &Schema) -> HashMap<String, Record> {
    let reader = PostgresStore::reader(schema.settings_pooled(1), "gw-a");
    let mut out = HashMap::new();
    reader
        .export(&UsageQuery::default(), &mut |r| {
            let user = r.user.clone().expect("every request names its user");
            if !user.starts_with("load-") && !user.starts_with("after-") {
                return Ok(());
            }
            assert!(
                out.insert(user.clone(), r.clone()).is_none(),
                "one record per request: {user} twice"
            );
            Ok(())
        })
        .unwrap();
    out
}

/// `n` parallel edits of `key`, request `i` to `addrs[i % 2]` for user `user(i)`; the answers.
async fn parallel(
    addrs: [SocketAddr; 2],
    key: &'static str,
    n: usize,
    user: impl Fn(usize) -> String,
) -> Vec<support::Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (addr, user) = (addrs[i % 2], user(i));
            tokio::spawn(async move { edit(addr, key, &user).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().expect("an answer"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis at REDIS_URL and PostgreSQL at DATABASE_URL"]
async fn two_replicas_share_limits_quotas_and_the_ledger() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = tokio::task::block_in_place(|| Schema::at(&database_url()));
    let prefix = format!("{}:", unique("imagegate-replicas"));
    let config = |replica| {
        write_config(
            dir.path(),
            &Setup {
                mock: &mock,
                redis_url: redis_url(),
                prefix: prefix.clone(),
                redis_failure: "fail_closed",
                pg_url: database_url(),
                schema: Some(schema.name.clone()),
                replica,
            },
        )
    };
    let (config_a, config_b) = (config("gw-a"), config("gw-b"));
    let a = Served::start(&config_a, UPSTREAM_KEY).await;
    let mut b = Served::start(&config_b, UPSTREAM_KEY).await;
    let addrs = [a.addr, b.addr];

    // A burst of 10 per user: 20 parallel requests over both replicas, exactly 10 admitted.
    let answers = parallel(addrs, BURST_KEY, 20, |_| "burst-user".into()).await;
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 10, "exactly the burst is admitted over both replicas");
    assert_eq!(limited.len(), 10);
    assert!(limited.iter().all(|r| code(r) == "rate_limit_exceeded"));
    assert!(limited.iter().all(|r| r.header("retry-after").is_some()));

    // A quota of 10 images for the client: 24 parallel requests of distinct users, exactly 10.
    let answers = parallel(addrs, QUOTA_KEY, 24, |i| format!("quota-{i}")).await;
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 10, "exactly the quota is admitted over both replicas");
    assert_eq!(refused.len(), 14);
    assert!(refused.iter().all(|r| code(r) == "insufficient_quota"));
    assert_eq!(
        mock.count(),
        20,
        "only admitted requests reached the upstream"
    );

    // Both replicas wrote; one report shows them all.
    let by_replica = tokio::task::block_in_place(|| {
        (
            schema.count("SELECT count(*) FROM records WHERE replica = 'gw-a'"),
            schema.count("SELECT count(*) FROM records WHERE replica = 'gw-b'"),
        )
    });
    assert_eq!(by_replica.0 + by_replica.1, 44);
    assert!(by_replica.0 > 0 && by_replica.1 > 0, "{by_replica:?}");
    let (status, stdout, stderr) = tokio::task::block_in_place(|| {
        cli(
            &config_a,
            &["usage", "--group-by", "client", "--format", "json"],
        )
    });
    assert_eq!(status, Some(0), "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).expect("JSON usage");
    let row = |key: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("no {key} row: {stdout}"))
            .clone()
    };
    assert_eq!(row("burst")["requests"], 20, "{stdout}");
    assert_eq!(row("burst")["images"], 10, "{stdout}");
    assert_eq!(row("quota")["requests"], 24, "{stdout}");
    assert_eq!(row("quota")["images"], 10, "{stdout}");

    // SIGKILL of replica b under load: load on both first, then only on b once the upstream
    // hangs, and b is killed with requests in flight.
    let stop_a = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(HashSet::new()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks_a = Vec::new();
    let mut tasks_b = Vec::new();
    for t in 0..6 {
        let on_a = t % 2 == 0;
        let (addr, stop) = if on_a {
            (a.addr, stop_a.clone())
        } else {
            (b.addr, stop_b.clone())
        };
        let answered = answered.clone();
        let task = tokio::spawn(async move {
            for i in 0..40 {
                if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                    break;
                }
                let user = format!("load-{t}-{i}");
                match edit(addr, LOAD_KEY, &user).await {
                    Ok(r) if r.status == 200 => {
                        answered.lock().unwrap().insert(user);
                    }
                    Ok(r) => panic!("{user}: {} {}", r.status, r.text()),
                    Err(_) => break,
                }
            }
        });
        if on_a {
            tasks_a.push(task);
        } else {
            tasks_b.push(task);
        }
    }
    tokio::time::timeout(Duration::from_secs(60), mock.wait_for(20 + 30))
        .await
        .expect("30 load requests within 60 s");
    stop_a.store(true, Ordering::SeqCst);
    for t in tasks_a {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("replica a's callers stop")
            .unwrap();
    }
    mock.set_behavior(Behavior::Hang);
    let heads = mock.heads();
    tokio::time::timeout(Duration::from_secs(30), mock.wait_for_heads(heads + 3))
        .await
        .expect("three hanging requests reach the upstream");
    b.kill();
    stop_b.store(true, Ordering::SeqCst);
    for t in tasks_b {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("replica b's callers stop once it is gone")
            .unwrap();
    }
    let stuck = tokio::task::block_in_place(|| {
        schema
            .count("SELECT count(*) FROM records WHERE outcome = 'forwarding' AND replica = 'gw-b'")
    });
    assert!(
        stuck >= 3,
        "b's in-flight requests were committed first: {stuck}"
    );
    assert_eq!(
        tokio::task::block_in_place(|| schema.count(
            "SELECT count(*) FROM records WHERE outcome = 'forwarding' AND replica = 'gw-a'"
        )),
        0
    );

    // b restarts: its stragglers become unknown; nothing the upstream saw is missing.
    mock.set_behavior(Behavior::Success);
    let b = Served::start(&config_b, UPSTREAM_KEY).await;
    let recovered = b.events("ledger: requests left 'forwarding' by a crash are now 'unknown'");
    assert_eq!(recovered.len(), 1, "{}", b.log_text());
    assert_eq!(recovered[0]["recovered"].as_i64(), Some(stuck));
    let records = tokio::task::block_in_place(|| records_by_user(&schema));
    let load_seen: Vec<String> = mock
        .received()
        .iter()
        .map(|seen| seen.field("user").expect("the user is forwarded"))
        .filter(|user| user.starts_with("load-"))
        .collect();
    assert!(load_seen.len() >= 33, "{}", load_seen.len());
    for user in load_seen {
        let r = records
            .get(&user)
            .unwrap_or_else(|| panic!("the upstream saw {user}, the ledger does not know it"));
        assert!(r.forwarded, "{r:?}");
        assert!(r.outcome.is_final(), "{r:?}");
    }
    for user in answered.lock().unwrap().iter() {
        assert_eq!(records[user].outcome, Outcome::Answered, "{user}");
    }
    let unknown = records
        .values()
        .filter(|r| r.outcome == Outcome::Unknown)
        .count();
    assert_eq!(unknown as i64, stuck);

    // Both chains verify, through the CLI too.
    let (status, stdout, stderr) =
        tokio::task::block_in_place(|| cli(&config_a, &["audit", "verify", "--format", "json"]));
    assert_eq!(status, Some(0), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(
        report["chains"].as_array().map(Vec::len),
        Some(2),
        "{stdout}"
    );
    let all = tokio::task::block_in_place(|| schema.count("SELECT count(*) FROM records"));
    assert_eq!(report["records"].as_i64(), Some(all));
    assert_eq!(
        all as usize,
        44 + records.len(),
        "the load phase's and the 44 before"
    );

    // The restarted replica serves.
    let r = edit(b.addr, LOAD_KEY, "after-restart").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop(a);
    drop(b);
}

// ---------------------------------------------------------------------------------------------
// Faults: a Redis and a PostgreSQL of the test's own.

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

struct OwnRedis {
    child: Option<Child>,
    port: u16,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let mut own = OwnRedis { child: None, port };
        own.restart();
        own
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is on the PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .get_connection_with_timeout(Duration::from_millis(200))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -STOP` / `kill -CONT`: a frozen server accepts connections and never answers.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL cluster in a temporary directory, on a free port and its own socket
/// directory. As root, its commands run as the `postgres` user (initdb refuses root).
struct OwnPostgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(tool)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = is_root();
        if as_postgres {
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chown.success());
        }
        let pg = OwnPostgres {
            data: dir.path().join("data"),
            socket: dir.path().to_path_buf(),
            log: dir.path().join("postgres.log"),
            port: free_port(),
            as_postgres,
            _dir: dir,
        };
        let init = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&pg.data)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        pg.resume();
        pg
    }

    fn command(&self, tool: &str) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
            c
        } else {
            Command::new(pg_bin(tool))
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.socket.display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// `kill -SIG` to the postmaster and every process it started (backends included): STOP
    /// freezes the whole server with its connections open, CONT thaws it.
    fn signal_all(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .expect("postmaster.pid")
            .lines()
            .next()
            .unwrap()
            .trim()
            .to_string();
        let children = Command::new("pkill")
            .args([&format!("-{signal}"), "-P", &pid])
            .status()
            .unwrap();
        assert!(children.success(), "pkill -{signal} -P {pid}");
        let main = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(main.success(), "kill -{signal} {pid}");
    }

    fn stop(&self, mode: &str) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

/// An edit for `user` and the time its answer took (bounded by `edit`'s 30 s).
async fn timed_edit(addr: SocketAddr, user: &str) -> (support::Resp, Duration) {
    let started = Instant::now();
    let r = edit(addr, LOAD_KEY, user).await.expect("an answer");
    (r, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs redis-server and the PostgreSQL 15 binaries"]
async fn faults_of_redis_and_postgres() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut redis = tokio::task::block_in_place(|| OwnRedis::start(free_port()));
    let pg = tokio::task::block_in_place(OwnPostgres::start);
    let redis_url = redis.url();
    let setup = |replica, failure| Setup {
        mock: &mock,
        redis_url: redis_url.clone(),
        prefix: "faults:".into(),
        redis_failure: failure,
        pg_url: pg.url(),
        schema: None,
        replica,
    };
    let open_cfg = write_config(dir.path(), &setup("open", "fail_open"));
    let closed_cfg = write_config(dir.path(), &setup("closed", "fail_closed"));
    let open = Served::start(&open_cfg, UPSTREAM_KEY).await;
    let closed = Served::start(&closed_cfg, UPSTREAM_KEY).await;
    for gw in [&open, &closed] {
        assert_eq!(timed_edit(gw.addr, "warm-up").await.0.status, 200);
        assert_eq!(readyz(gw.addr).await, Some(200));
    }

    // ---- Redis stops ----
    tokio::task::block_in_place(|| redis.stop());
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let (r, took) = timed_edit(open.addr, &format!("open-{i}")).await;
        assert_eq!(
            r.status,
            200,
            "fail_open: the local limiter answers: {}",
            r.text()
        );
        slowest = slowest.max(took);
        let (r, took) = timed_edit(closed.addr, &format!("closed-{i}")).await;
        assert_eq!(r.status, 503, "fail_closed: {}", r.text());
        assert_eq!(code(&r), "rate_limiter_unavailable");
        slowest = slowest.max(took);
    }
    // Every answer came (`edit` gives up after 30 s); how long the slowest took is printed.
    eprintln!("Redis down: slowest answer {slowest:?} (redis_timeout 50ms)");
    for gw in [&open, &closed] {
        assert!(
            !gw.events("rate limits: Redis unreachable").is_empty(),
            "the outage is logged:\n{}",
            gw.log_text()
        );
    }

    // Redis returns: both recover by themselves.
    tokio::task::block_in_place(|| redis.restart());
    eventually(Duration::from_secs(30), "fail_closed recovers", || async {
        timed_edit(closed.addr, &unique("closed-back"))
            .await
            .0
            .status
            == 200
    })
    .await;
    assert_eq!(timed_edit(open.addr, "open-back").await.0.status, 200);
    for gw in [&open, &closed] {
        eventually(
            Duration::from_secs(30),
            "the recovery is logged",
            || async {
                timed_edit(gw.addr, &unique("back")).await.0.status == 200
                    && !gw.events("rate limits: Redis is back").is_empty()
            },
        )
        .await;
    }

    // ---- Redis freezes (SIGSTOP): only the timeout can answer ----
    tokio::task::block_in_place(|| redis.signal("STOP"));
    let mut slowest = Duration::ZERO;
    for i in 0..3 {
        let (r, took) = timed_edit(open.addr, &format!("frozen-open-{i}")).await;
        assert_eq!(r.status, 200, "fail_open: {}", r.text());
        slowest = slowest.max(took);
        let (r, took) = timed_edit(closed.addr, &format!("frozen-closed-{i}")).await;
        assert_eq!(r.status, 503, "fail_closed: {}", r.text());
        assert_eq!(code(&r), "rate_limiter_unavailable");
        slowest = slowest.max(took);
    }
    eprintln!("Redis frozen: slowest answer {slowest:?} (redis_timeout 50ms)");
    tokio::task::block_in_place(|| redis.signal("CONT"));
    eventually(
        Duration::from_secs(30),
        "recovers from the freeze",
        || async { timed_edit(closed.addr, &unique("thawed")).await.0.status == 200 },
    )
    .await;

    // ---- PostgreSQL stops ----
    tokio::task::block_in_place(|| pg.stop("fast"));
    // Idle: the writer's probe turns /readyz 503 with no request at all.
    for gw in [&open, &closed] {
        eventually(
            Duration::from_secs(30),
            "/readyz fails while idle",
            || async { readyz(gw.addr).await == Some(503) },
        )
        .await;
    }
    for gw in [&open, &closed] {
        let (r, took) = timed_edit(gw.addr, "pg-down").await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(code(&r), "ledger_unavailable");
        eprintln!("PostgreSQL down: 503 ledger_unavailable in {took:?}");
    }
    let before = mock.count();

    // A replica that starts while PostgreSQL is down waits for it (ledger.startup_wait).
    let late_cfg = write_config(dir.path(), &setup("late", "fail_open"));
    let mut late = Served::spawn(&late_cfg, UPSTREAM_KEY);
    eventually(
        Duration::from_secs(30),
        "the late replica waits",
        || async { late.log_text().contains("PostgreSQL not reachable yet") },
    )
    .await;
    tokio::task::block_in_place(|| pg.resume());
    late.listening(Duration::from_secs(60)).await;

    // PostgreSQL is back: ready again, edits forwarded again.
    for gw in [&open, &closed, &late] {
        eventually(Duration::from_secs(30), "/readyz recovers", || async {
            readyz(gw.addr).await == Some(200)
        })
        .await;
        eventually(Duration::from_secs(30), "edits recover", || async {
            timed_edit(gw.addr, &unique("pg-back")).await.0.status == 200
        })
        .await;
    }
    assert!(mock.count() > before);
    assert_eq!(
        mock.count(),
        before + 3,
        "nothing was forwarded while the ledger was down"
    );

    // ---- PostgreSQL freezes (every process SIGSTOPped): connections stay open, nothing
    // answers. The idle writer's check hangs; past ledger.stall_timeout (1 s here) /readyz
    // fails and a new edit is refused 503 ledger_unavailable at once, before any quota is
    // reserved. SIGCONT: ready again, edits forwarded again.
    tokio::task::block_in_place(|| pg.signal_all("STOP"));
    for gw in [&open, &closed] {
        eventually(
            Duration::from_secs(30),
            "/readyz fails while PostgreSQL is frozen",
            || async { readyz(gw.addr).await == Some(503) },
        )
        .await;
        let (r, took) = timed_edit(gw.addr, &unique("pg-frozen")).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(code(&r), "ledger_unavailable");
        eprintln!("PostgreSQL frozen: 503 ledger_unavailable in {took:?}");
    }
    let frozen_before = mock.count();
    tokio::task::block_in_place(|| pg.signal_all("CONT"));
    for gw in [&open, &closed] {
        eventually(
            Duration::from_secs(30),
            "/readyz recovers after the freeze",
            || async { readyz(gw.addr).await == Some(200) },
        )
        .await;
        eventually(
            Duration::from_secs(30),
            "edits recover after the freeze",
            || async { timed_edit(gw.addr, &unique("pg-thawed")).await.0.status == 200 },
        )
        .await;
    }
    assert_eq!(
        mock.count(),
        frozen_before + 2,
        "nothing was forwarded while PostgreSQL was frozen"
    );
    // Every request has its record, the refusals included; the chains verify.
    let v = tokio::task::block_in_place(|| {
        PostgresStore::reader(
            PgSettings {
                url: pg.url(),
                schema: None,
                pool_size: 1,
                connect_timeout: Duration::from_secs(5),
            },
            "open",
        )
        .verify()
        .unwrap()
    });
    assert!(v.is_ok(), "{v:?}");
    assert_eq!(v.chains.len(), 3, "{v:?}");
}
