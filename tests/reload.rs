//! Reload without restart (`POST /admin/reload`; SIGHUP is tested on the real binary in
//! `tests/cli.rs`): the gateway is started from a configuration file, the file is rewritten,
//! and the admin listener is asked to read it again. Real sockets, a mock upstream, a manual
//! clock (rate limiters do not refill unless the test says so).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use imagegate::clock::Clock;
use imagegate::config::{Config, hash_key};
use imagegate::server::{RunningServer, spawn_with_clock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::fixtures::rgba_png;
use support::gateway::{APP_KEY, OTHER_KEY, UPSTREAM_KEY, assert_error, post_edit};
use support::mock_upstream::{Behavior, MockUpstream};
use support::multipart::{Multipart, edit_request};
use support::{Resp, raw_status, send};

const ADMIN_KEY: &str = "ig-test-admin-key-0123456789";
const NEW_KEY: &str = "ig-test-new-key-0123456789";

/// A gateway served from a configuration file in a temporary directory.
struct Reloadable {
    server: RunningServer,
    mock: MockUpstream,
    dir: tempfile::TempDir,
    path: PathBuf,
}

/// The configuration file: the mock as upstream (its key in a key file), the dall-e-2 profile,
/// the admin listener, generous default limits, `clients` and then `extra` TOML.
fn config_text(mock: &MockUpstream, dir: &Path, clients: &[(&str, &str)], extra: &str) -> String {
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[upstream]
base_url = {base:?}
allow_http = true
response_timeout = "30s"
api_key_file = {key:?}
[validation]
models = ["dall-e-2"]
[models]
default = ""
check_at_start = false
accepted = {{}}
[ledger]
path = {db:?}
[admin]
listen = "127.0.0.1:0"
key_hash = {admin:?}
[limits.per_user]
requests_per_minute = 100000
images_per_minute = 1000000
[limits.per_client]
requests_per_minute = 100000
"#,
        base = mock.base_url(),
        key = dir.join("upstream.key"),
        db = dir.join("imagegate.db"),
        admin = hash_key(ADMIN_KEY),
    );
    text.push_str(extra);
    for (name, key) in clients {
        text.push_str(&format!(
            "\n[[clients]]\nname = {name:?}\nkey_hash = {:?}\n",
            hash_key(key)
        ));
    }
    text
}

impl Reloadable {
    async fn start(clients: &[(&str, &str)], extra: &str) -> Reloadable {
        let mock = MockUpstream::start().await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("upstream.key"), UPSTREAM_KEY).unwrap();
        let path = dir.path().join("imagegate.toml");
        std::fs::write(&path, config_text(&mock, dir.path(), clients, extra)).unwrap();
        let config = Config::load(&path, true).expect("the test configuration is valid");
        let server = spawn_with_clock(config, Clock::manual(SystemTime::now()))
            .await
            .expect("the gateway starts");
        let source = path.clone();
        server
            .state
            .set_source(Arc::new(move || Config::load(&source, true)));
        Reloadable {
            server,
            mock,
            dir,
            path,
        }
    }

    /// Rewrite the configuration file (the same layout, other clients and extra TOML).
    fn rewrite(&self, clients: &[(&str, &str)], extra: &str) {
        std::fs::write(
            &self.path,
            config_text(&self.mock, self.dir.path(), clients, extra),
        )
        .unwrap();
    }

    /// Rewrite the configuration file with `max_prompt_chars` in its `[validation]` table.
    fn rewrite_prompt_cap(&self, clients: &[(&str, &str)], max_prompt_chars: usize) {
        let text = config_text(&self.mock, self.dir.path(), clients, "").replacen(
            "[validation]\n",
            &format!("[validation]\nmax_prompt_chars = {max_prompt_chars}\n"),
            1,
        );
        std::fs::write(&self.path, text).unwrap();
    }

    fn admin(&self) -> SocketAddr {
        self.server.admin_addr.expect("the admin listener is on")
    }

    /// `POST /admin/reload` with the admin key; prints how long it took.
    async fn reload(&self) -> Resp {
        let auth = format!("Bearer {ADMIN_KEY}");
        let started = Instant::now();
        let resp = send(
            self.admin(),
            "POST",
            "/admin/reload",
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await;
        eprintln!(
            "reload: {} in {:?} (round trip), {}",
            resp.status,
            started.elapsed(),
            resp.text()
        );
        resp
    }

    async fn metrics(&self) -> String {
        let auth = format!("Bearer {ADMIN_KEY}");
        send(
            self.admin(),
            "GET",
            "/metrics",
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await
        .text()
    }

    async fn edit(&self, key: &str, form: &Multipart) -> Resp {
        post_edit(self.server.addr, key, &form.content_type(), form.body()).await
    }
}

fn form(prompt: &str, user: Option<&str>) -> Multipart {
    let f = edit_request(&rgba_png(16, true), prompt);
    match user {
        Some(u) => f.text("user", u),
        None => f,
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// A request sent by hand with `Expect: 100-continue`: once the gateway asks for the body it
/// has authenticated the caller and taken its configuration snapshot; the body is sent later.
struct Waiting {
    stream: TcpStream,
    body: Vec<u8>,
}

impl Waiting {
    async fn start(addr: SocketAddr, key: &str, form: &Multipart) -> Waiting {
        let body = form.body();
        let head = format!(
            "POST /v1/images/edits HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
             content-type: {}\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\
             connection: close\r\n\r\n",
            form.content_type(),
            body.len()
        );
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte))
                .await
                .expect("the gateway asks for the body within 30 s")
                .unwrap();
            assert_eq!(n, 1, "closed before asking for the body: {seen:?}");
            seen.push(byte[0]);
        }
        assert!(
            seen.starts_with(b"HTTP/1.1 100 Continue"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
        Waiting { stream, body }
    }

    /// Send the body; the status of the answer.
    async fn finish(mut self) -> Option<u16> {
        self.stream.write_all(&self.body).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(60),
            self.stream.read_to_end(&mut answer),
        )
        .await
        .expect("an answer within 60 s")
        .unwrap();
        raw_status(&answer)
    }
}

#[tokio::test]
async fn clients_added_and_removed_apply_to_the_next_request_not_to_one_in_flight() {
    let gw = Reloadable::start(&[("app", APP_KEY), ("other", OTHER_KEY)], "").await;
    let long_prompt = "a prompt of more than twenty characters";

    // In flight at the reload: one request of "other" waiting for its upstream answer, and one
    // whose body has not been sent yet (its caller authenticated, its snapshot taken).
    gw.mock.set_behavior(Behavior::Held);
    let held = tokio::spawn({
        let (addr, f) = (gw.server.addr, form("held", None));
        async move { post_edit(addr, OTHER_KEY, &f.content_type(), f.body()).await }
    });
    gw.mock.wait_for(1).await;
    let waiting = Waiting::start(gw.server.addr, OTHER_KEY, &form(long_prompt, None)).await;

    // "other" removed, "new" added, prompts limited to 20 characters.
    gw.rewrite_prompt_cap(&[("app", APP_KEY), ("new", NEW_KEY)], 20);
    let resp = gw.reload().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let report = resp.json();
    assert_eq!(report["status"], "applied");
    assert_eq!(report["generation"], 2);
    let changed = strings(&report["changed"]);
    assert!(
        changed.contains(&"clients added: new".to_string()),
        "{changed:?}"
    );
    assert!(
        changed.contains(&"clients removed: other".to_string()),
        "{changed:?}"
    );
    assert!(changed.contains(&"validation".to_string()), "{changed:?}");
    assert!(strings(&report["restart_required"]).is_empty(), "{report}");
    assert!(strings(&report["problems"]).is_empty(), "{report}");

    // The requests in flight finish under the configuration they started with.
    gw.mock.release();
    assert_eq!(held.await.unwrap().status, 200, "the held request");
    assert_eq!(
        waiting.finish().await,
        Some(200),
        "a removed client's request, started before the reload, with a prompt the new rules refuse"
    );
    assert_eq!(gw.mock.count(), 2);

    // The next requests get the new configuration.
    gw.mock.set_behavior(Behavior::Success);
    let gone = gw.edit(OTHER_KEY, &form("p", None)).await;
    assert_error(
        &gone,
        401,
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    );
    assert_eq!(gw.edit(NEW_KEY, &form("p", None)).await.status, 200);
    let long = gw.edit(NEW_KEY, &form(long_prompt, None)).await;
    assert_eq!(long.status, 400, "{}", long.text());
    assert_eq!(gw.edit(APP_KEY, &form("p", None)).await.status, 200);
    assert_eq!(
        gw.mock.count(),
        4,
        "the refused requests never reached the upstream"
    );
    assert_eq!(gw.server.state.live().generation, 2);
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_the_answer_lists_the_problems() {
    let gw = Reloadable::start(&[("app", APP_KEY)], "").await;

    // Two problems at once: an unknown key and a client key hash that is not one.
    let mut text = config_text(&gw.mock, gw.dir.path(), &[("app", APP_KEY)], "bogus = 1\n");
    text.push_str("\n[[clients]]\nname = \"new\"\nkey_hash = \"md5:abc\"\n");
    // `bogus` lands in the last table opened before it ([limits.per_client]).
    std::fs::write(&gw.path, text).unwrap();
    let resp = gw.reload().await;
    assert_eq!(resp.status, 422, "{}", resp.text());
    let report = resp.json();
    assert_eq!(report["status"], "rejected");
    assert_eq!(report["generation"], 1);
    let problems = strings(&report["problems"]);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("unknown key: limits.per_client.bogus")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("clients[1].key_hash")),
        "{problems:?}"
    );
    assert!(strings(&report["changed"]).is_empty());

    // A missing key file, and a file that is not TOML: rejected too.
    std::fs::remove_file(gw.dir.path().join("upstream.key")).unwrap();
    gw.rewrite(&[("app", APP_KEY), ("new", NEW_KEY)], "");
    let resp = gw.reload().await;
    assert_eq!(resp.status, 422);
    assert!(
        strings(&resp.json()["problems"])
            .iter()
            .any(|p| p.contains("upstream.api_key_file")),
        "{}",
        resp.text()
    );
    std::fs::write(gw.dir.path().join("upstream.key"), UPSTREAM_KEY).unwrap();
    std::fs::write(&gw.path, "[server\nlisten = ").unwrap();
    let resp = gw.reload().await;
    assert_eq!(resp.status, 422);
    assert_eq!(
        strings(&resp.json()["problems"]).len(),
        1,
        "{}",
        resp.text()
    );

    // Nothing changed: the old client works, the new key is unknown, still generation 1.
    assert_eq!(gw.edit(APP_KEY, &form("p", None)).await.status, 200);
    assert_eq!(gw.edit(NEW_KEY, &form("p", None)).await.status, 401);
    assert_eq!(gw.server.state.live().generation, 1);
    let metrics = gw.metrics().await;
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("imagegate_config_reload_failures_total"))
        .unwrap_or_else(|| panic!("no failure counter in:\n{metrics}"));
    let count: f64 = failures.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 3.0, "{failures}");

    // A valid file with a setting that needs a restart: the rest is applied, that is named.
    let text = config_text(
        &gw.mock,
        gw.dir.path(),
        &[("app", APP_KEY), ("new", NEW_KEY)],
        "",
    )
    .replacen(
        "listen = \"127.0.0.1:0\"\n[upstream]",
        "listen = \"127.0.0.1:0\"\nmax_connections = 7\n[upstream]",
        1,
    );
    assert!(text.contains("max_connections = 7"));
    std::fs::write(&gw.path, text).unwrap();
    let resp = gw.reload().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let report = resp.json();
    assert_eq!(report["generation"], 2);
    assert_eq!(
        strings(&report["restart_required"]),
        ["server.max_connections"]
    );
    assert_eq!(gw.server.state.config().server.max_connections, 1024);
    assert_eq!(gw.edit(NEW_KEY, &form("p", None)).await.status, 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("imagegate_config_last_reload_success_timestamp_seconds")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_users_limiter_keeps_its_state_across_a_reload_that_does_not_touch_it() {
    let app_limits = |burst: u32| {
        format!(
            "\n[[clients]]\nname = \"app\"\nkey_hash = {:?}\nuser_limits = {{ requests_per_minute = 1, requests_burst = {burst} }}\n",
            hash_key(APP_KEY)
        )
    };
    let gw = Reloadable::start(&[], &app_limits(2)).await;
    let statuses = async |n: usize| {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(gw.edit(APP_KEY, &form("p", Some("u1"))).await.status);
        }
        out
    };
    assert_eq!(
        statuses(3).await,
        [200, 200, 429],
        "burst of 2, clock stopped"
    );

    // Another client added: u1's bucket is kept.
    gw.rewrite(&[("other", OTHER_KEY)], &app_limits(2));
    let resp = gw.reload().await;
    assert_eq!(resp.json()["status"], "applied", "{}", resp.text());
    assert_eq!(statuses(1).await, [429], "still empty after the reload");
    assert_eq!(
        gw.edit(OTHER_KEY, &form("p", Some("u1"))).await.status,
        200,
        "the new client's u1 is another user"
    );
    assert_eq!(gw.server.state.live().rates.tracked_users("app"), 1);

    // u1's own limits change: a new, full bucket under the new numbers.
    gw.rewrite(&[("other", OTHER_KEY)], &app_limits(3));
    let resp = gw.reload().await;
    assert_eq!(resp.json()["status"], "applied", "{}", resp.text());
    assert_eq!(statuses(4).await, [200, 200, 200, 429], "burst of 3");
}

#[tokio::test]
async fn quota_use_is_kept_and_new_quotas_apply_to_it() {
    let gw = Reloadable::start(&[("app", APP_KEY)], "").await;
    for _ in 0..3 {
        assert_eq!(gw.edit(APP_KEY, &form("p", Some("u1"))).await.status, 200);
    }
    // A daily quota of 3 images per user, added by a reload: u1 has used it already.
    gw.rewrite(
        &[("app", APP_KEY)],
        "[quotas.per_user]\nimages_per_day = 3\n",
    );
    assert_eq!(gw.reload().await.status, 200);
    let resp = gw.edit(APP_KEY, &form("p", Some("u1"))).await;
    assert_eq!(resp.status, 429, "{}", resp.text());
    assert_eq!(gw.edit(APP_KEY, &form("p", Some("u2"))).await.status, 200);
}

#[tokio::test]
async fn the_reload_route_needs_the_admin_key_and_post() {
    let gw = Reloadable::start(&[("app", APP_KEY)], "").await;
    let resp = send(gw.admin(), "POST", "/admin/reload", &[], Vec::new()).await;
    assert_eq!(resp.status, 401);
    let app = format!("Bearer {APP_KEY}");
    let resp = send(
        gw.admin(),
        "POST",
        "/admin/reload",
        &[("authorization", &app)],
        Vec::new(),
    )
    .await;
    assert_eq!(resp.status, 401, "a client key is not the admin key");
    let admin = format!("Bearer {ADMIN_KEY}");
    let resp = send(
        gw.admin(),
        "GET",
        "/admin/reload",
        &[("authorization", &admin)],
        Vec::new(),
    )
    .await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow").as_deref(), Some("POST"));
    assert_eq!(gw.server.state.live().generation, 1);
}

/// `admin.metrics_auth` and the metrics token follow a reload: a scraper's token that reads
/// nothing under `admin_key` reads `/metrics` (and only it) once the file says `token`, and a
/// rotated token replaces the old one.
#[tokio::test]
async fn the_metrics_token_follows_a_reload() {
    let gw = Reloadable::start(&[("app", APP_KEY)], "").await;
    let with_token = |token_file: &str| {
        config_text(&gw.mock, gw.dir.path(), &[("app", APP_KEY)], "").replacen(
            "[admin]\n",
            &format!("[admin]\nmetrics_auth = \"token\"\nmetrics_token_file = {token_file:?}\n"),
            1,
        )
    };
    let scrape = |token: &'static str| {
        let admin = gw.admin();
        async move {
            let auth = format!("Bearer {token}");
            send(
                admin,
                "GET",
                "/metrics",
                &[("authorization", &auth)],
                Vec::new(),
            )
            .await
            .status
        }
    };
    const FIRST: &str = "ig-metrics-token-first-000111";
    const SECOND: &str = "ig-metrics-token-second-000222";
    assert_eq!(scrape(FIRST).await, 401, "admin_key: a token reads nothing");

    let file = gw.dir.path().join("metrics.token");
    std::fs::write(&file, FIRST).unwrap();
    std::fs::write(&gw.path, with_token(file.to_str().unwrap())).unwrap();
    assert_eq!(gw.reload().await.status, 200);
    assert_eq!(scrape(FIRST).await, 200, "the token reads /metrics");
    let auth = format!("Bearer {FIRST}");
    let usage = send(
        gw.admin(),
        "GET",
        "/admin/usage",
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(usage.status, 401, "and nothing else");

    // The token rotated in its file: the reload reads it again.
    std::fs::write(&file, SECOND).unwrap();
    assert_eq!(gw.reload().await.status, 200);
    assert_eq!(scrape(SECOND).await, 200);
    assert_eq!(scrape(FIRST).await, 401, "the old token is refused");
}

/// Not a test of speed (nothing is asserted on time): prints the time a reload takes, from the
/// admin request to the swap, over 20 reloads of a configuration with 200 clients.
#[tokio::test]
async fn reload_time_is_measured() {
    let keys: Vec<(String, String)> = (0..200)
        .map(|i| (format!("client-{i}"), format!("ig-key-{i}-0123456789")))
        .collect();
    let clients: Vec<(&str, &str)> = keys.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
    let gw = Reloadable::start(&clients, "").await;
    let mut inside = Vec::new();
    let mut round_trip = Vec::new();
    for i in 0..20 {
        gw.rewrite_prompt_cap(&clients, 1000 + i);
        let started = Instant::now();
        let resp = gw.reload().await;
        round_trip.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(resp.status, 200, "{}", resp.text());
        inside.push(resp.json()["duration_ms"].as_f64().unwrap());
    }
    inside.sort_by(f64::total_cmp);
    round_trip.sort_by(f64::total_cmp);
    eprintln!(
        "reload of 200 clients, 20 runs: in the gateway median {:.2} ms (max {:.2} ms); admin round trip median {:.2} ms (max {:.2} ms)",
        inside[10], inside[19], round_trip[10], round_trip[19]
    );
    assert_eq!(gw.server.state.live().generation, 21);
    assert_eq!(
        gw.edit("ig-key-199-0123456789", &form("p", None))
            .await
            .status,
        200
    );
}
