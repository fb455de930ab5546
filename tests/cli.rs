//! The command line, run as the real binary.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::fixtures::rgba_png;
use support::gateway::*;
use support::multipart::edit_request;

fn imagegate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imagegate"));
    c.env_remove("IMAGEGATE_CONFIG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("IMAGEGATE_UPSTREAM_URL");
    c
}

#[test]
fn version_and_help() {
    let out = imagegate().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = imagegate().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "check-config", "hash-key", "quota", "models"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn hash_key_reads_stdin() {
    let mut child = imagegate()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ig-demo-key-change-me\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        imagegate::config::hash_key("ig-demo-key-change-me")
    );
    let empty = imagegate()
        .arg("hash-key")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!empty.status.success());
}

#[test]
fn check_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "colour = 1\n[server]\nmax_in_flight = 0\n[validation]\ntransparency = \"strict\"\nmax_dimension = 0\n[[clients]]\nname = \"a\"\nkey_hash = \"plain\"\n",
    )
    .unwrap();
    let out = imagegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "unknown key: colour",
        "server.max_in_flight",
        "validation.max_dimension",
        "clients[0].key_hash",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // The shipped example is valid.
    let ok = imagegate()
        .args(["check-config", "--config", "config/imagegate.toml"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // A missing explicit file is an error, not the defaults.
    let missing = imagegate()
        .args(["check-config", "--config", "/nonexistent/imagegate.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn file_and_key_file_problems_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("empty-key");
    std::fs::write(&key_file, "\n").unwrap();
    let path = dir.path().join("c.toml");
    let text = format!(
        "[upstream]\napi_key_file = {:?}\nbogus = 1\n[server]\nmax_in_flight = 0\n",
        key_file.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    let out = imagegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "unknown key: upstream.bogus",
        "upstream.api_key_file",
        "is empty",
        "server.max_in_flight",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn secrets_never_reach_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai-key");
    std::fs::write(&key_file, "sk-very-secret-upstream-key\n").unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\napi_key_file = {:?}\nbogus = 1\n",
            key_file.display().to_string()
        ),
    )
    .unwrap();
    let out = imagegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("sk-very-secret"), "{all}");
}

#[tokio::test]
async fn quota_show_reports_use_and_remaining() {
    let spec = imagegate::limits::spec::QuotaSpec {
        images_per_day: Some(10),
        ..Default::default()
    };
    let gw = Gateway::start_with(move |c| c.quotas.per_user = spec).await;
    let form = edit_request(&rgba_png(16, true), "p")
        .text("n", "3")
        .text("user", "carol");
    assert_eq!(gw.edit(APP_KEY, &form).await.status, 200);
    let db = gw.dir.path().join("imagegate.db");
    let config = gw.dir.path().join("imagegate.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\npath = {:?}\n[quotas.per_user]\nimages_per_day = 10\n[[clients]]\nname = \"app\"\nkey_hash = {:?}\n",
            db.display().to_string(),
            imagegate::config::hash_key(APP_KEY)
        ),
    )
    .unwrap();
    let out = imagegate()
        .args([
            "quota", "show", "--client", "app", "--user", "carol", "--format", "json", "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let day = &lines[0];
    assert_eq!(day["scope"], "user 'carol' of client 'app'");
    assert_eq!(day["images_used"], 3);
    assert_eq!(day["images_limit"], 10);
    assert_eq!(day["images_remaining"], 7);
    assert_eq!(day["usd_used"], "0.060000");
    let table = imagegate()
        .args(["quota", "show", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("client 'app'") && text.contains("user 'carol' of client 'app'"),
        "{text}"
    );
}

/// Today (UTC) plus `days`, as the binary computes it.
fn utc_date_in(days: i64) -> jiff::civil::Date {
    use jiff::ToSpan;
    jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date()
        .checked_add(days.days())
        .unwrap()
}

/// A config with three gpt-image ids (one retired by its configured date) and dall-e-2, the
/// upstream at `base_url`.
fn models_config(dir: &std::path::Path, base_url: &str) -> std::path::PathBuf {
    let path = dir.join("models.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[upstream]
base_url = {base_url:?}
allow_http = true
organization = "org-models-test"
[ledger]
path = {db:?}
[log]
format = "json"
level = "info"
[validation]
models = ["dall-e-2"]
[models]
default = "gpt-image-2"
check_at_start = true
warn_within_days = 30
[models.accepted."gpt-image-2"]
family = "gpt-image-2"
[models.accepted."gpt-image-2.6-sunburst"]
family = "gpt-image-2.6"
prices = {{ text_in = 4.0, image_in = 7.5, image_out = 25.0 }}
[models.accepted."gpt-image-1.5"]
family = "gpt-image-2"
shutdown = "2026-10-23"
"#,
            db = dir.join("imagegate.db").display().to_string(),
        ),
    )
    .unwrap();
    path
}

const MODELS_KEY: &str = "sk-models-test-upstream-key";

/// Run `imagegate models <args> --config <config>` with the upstream key, off the runtime's
/// thread (the mock upstream keeps serving meanwhile).
async fn run_models(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = imagegate();
    cmd.arg("models")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("OPENAI_API_KEY", MODELS_KEY);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn models_lists_the_configured_models_and_checks_them_upstream() {
    use support::mock_upstream::{MockUpstream, ModelsAnswer};
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = models_config(dir.path(), &mock.base_url());
    let soon = utc_date_in(10).to_string();
    let later = utc_date_in(200).to_string();

    // Without --check: the configuration only, no upstream call.
    let out = run_models(&config, &[]).await;
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(mock.count(), 0);
    assert!(!table.contains("UPSTREAM"), "{table}");
    let row = |table: &str, id: &str| -> String {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .to_string()
    };
    let r = row(&table, "gpt-image-2");
    assert!(r.contains("(default)") && r.contains("gpt-image"), "{r}");
    assert!(
        r.contains("USD/1M tokens: text in 5.00, image in 8.00, image out 30.00"),
        "{r}"
    );
    let r = row(&table, "gpt-image-2.6-sunburst");
    assert!(
        r.contains("gpt-image-2.6") && r.contains("text in 4.00, image in 7.50, image out 25.00"),
        "{r}"
    );
    assert!(
        row(&table, "gpt-image-1.5").contains("shut down 2026-10-23 ("),
        "{table}"
    );
    let r = row(&table, "dall-e-2");
    assert!(
        r.contains("dall-e-2")
            && r.contains("USD/image: 256x256 0.016, 512x512 0.018, 1024x1024 0.020"),
        "{r}"
    );

    // --check: gpt-image-2 live, gpt-image-2.6-sunburst shuts down in 10 days, dall-e-2 gone.
    mock.set_models(ModelsAnswer::listing(&[
        ("gpt-image-2", None),
        ("gpt-image-2.6-sunburst", Some(&soon)),
        ("gpt-image-2.5-flare", Some(&later)),
    ]));
    let out = run_models(&config, &["--check"]).await;
    let table = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a served model is gone:\n{table}{stderr}"
    );
    assert!(
        table.lines().next().unwrap().ends_with("UPSTREAM"),
        "{table}"
    );
    assert!(row(&table, "gpt-image-2").ends_with("  live"), "{table}");
    assert!(
        row(&table, "gpt-image-2.6-sunburst").ends_with(&format!("shuts down {soon} in 10 days"))
            || row(&table, "gpt-image-2.6-sunburst")
                .contains(&format!("shuts down {soon} in 9 days")),
        "{table}"
    );
    assert!(row(&table, "dall-e-2").ends_with("  gone"), "{table}");
    assert!(row(&table, "gpt-image-1.5").ends_with("  gone"), "{table}");
    assert!(
        table.contains("warning: dall-e-2: not listed by the upstream"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "warning: gpt-image-2.6-sunburst: shuts down {soon}"
        )),
        "{table}"
    );
    assert!(
        !table.contains("warning: gpt-image-1.5"),
        "retired by config:\n{table}"
    );
    assert!(!format!("{table}{stderr}").contains(MODELS_KEY));
    // What went upstream: GET /v1/models with the key and the organization.
    let got = mock.last().unwrap();
    assert_eq!(got.method, http::Method::GET);
    assert_eq!(got.path, "/v1/models");
    assert_eq!(
        got.header("authorization").as_deref(),
        Some(format!("Bearer {MODELS_KEY}").as_str())
    );
    assert_eq!(
        got.header("openai-organization").as_deref(),
        Some("org-models-test")
    );

    // Everything served is listed: exit 0; JSON.
    mock.set_models(ModelsAnswer::listing(&[
        ("gpt-image-2", None),
        ("gpt-image-2.6-sunburst", Some(&soon)),
        ("dall-e-2", None),
    ]));
    let out = run_models(&config, &["--check", "--format", "json"]).await;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["checked"], true);
    assert_eq!(v["check_error"], serde_json::Value::Null);
    let model = |id: &str| {
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()
            .clone()
    };
    let m = model("gpt-image-2.6-sunburst");
    assert_eq!(m["profile"], "gpt-image");
    assert_eq!(m["upstream"]["status"], "live");
    assert_eq!(m["upstream"]["shutdown_date"], soon.as_str());
    assert_eq!(
        m["shutdown"],
        serde_json::Value::Null,
        "the configured date is unchanged"
    );
    assert_eq!(m["effective_shutdown"], soon.as_str());
    assert_eq!(m["warning"], true);
    assert_eq!(m["prices"]["usd_per_1m_tokens"]["image_in"], 7.5);
    let m = model("dall-e-2");
    assert_eq!(m["profile"], "dall-e-2");
    assert_eq!(m["upstream"]["status"], "live");
    assert_eq!(m["prices"]["usd_per_image"]["512x512"], 0.018);
    assert_eq!(model("gpt-image-1.5")["served"], false);

    // The upstream answers 500: every model unknown, exit 1.
    mock.set_models(ModelsAnswer::Status {
        status: 500,
        body: r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#.into(),
    });
    let out = run_models(&config, &["--check"]).await;
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(row(&table, "gpt-image-2").ends_with("  unknown"), "{table}");
    assert!(
        table.contains("upstream check failed: GET /models answered 500 Internal Server Error: server_error: The server had an error"),
        "{table}"
    );

    // No upstream key: the check fails at once, nothing is sent.
    let before = mock.count();
    let mut cmd = imagegate();
    cmd.args(["models", "--check", "--config"]).arg(&config);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("upstream check failed: no upstream key"),
        "{out:?}"
    );
    assert_eq!(mock.count(), before);
}

/// `imagegate serve` as a child process with JSON logs; its log events arrive on a channel.
/// Killed on drop.
struct Served {
    child: std::process::Child,
    events: std::sync::mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(config: &std::path::Path) -> Served {
        use std::io::BufRead;
        let mut child = imagegate()
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("OPENAI_API_KEY", MODELS_KEY)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Served {
            child,
            events,
            seen: Vec::new(),
        }
    }

    /// The first event with this message (waiting at most 60 s for it, no polling).
    async fn wait_for(&mut self, message: &str) -> serde_json::Value {
        if let Some(e) = self.seen.iter().find(|e| e["message"] == message) {
            return e.clone();
        }
        loop {
            let rx = std::mem::replace(&mut self.events, std::sync::mpsc::channel().1);
            let (rx, got) = tokio::task::spawn_blocking(move || {
                let got = rx.recv_timeout(std::time::Duration::from_secs(60));
                (rx, got)
            })
            .await
            .unwrap();
            self.events = rx;
            match got {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if e["message"] == message {
                        return e;
                    }
                }
                Err(_) => panic!(
                    "no {message:?} log line within 60 s; seen:\n{}",
                    self.seen
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Wait for `imagegate listening` and return the address.
    async fn listening(&mut self) -> std::net::SocketAddr {
        let e = self.wait_for("imagegate listening").await;
        e["addr"].as_str().unwrap().parse().unwrap()
    }
}

#[tokio::test]
async fn serve_checks_the_models_at_start_and_warns() {
    use support::mock_upstream::{MockUpstream, ModelsAnswer};
    let mock = MockUpstream::start().await;
    let soon = utc_date_in(10).to_string();
    mock.set_models(ModelsAnswer::listing(&[
        ("gpt-image-2", None),
        ("gpt-image-2.6-sunburst", Some(&soon)),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(&models_config(dir.path(), &mock.base_url()));
    let addr = served.listening().await;
    let gone = served.wait_for("model not listed upstream").await;
    assert_eq!(gone["level"], "WARN");
    assert_eq!(gone["model"], "dall-e-2");
    let soon_event = served.wait_for("model shuts down soon").await;
    assert_eq!(soon_event["level"], "WARN");
    assert_eq!(soon_event["model"], "gpt-image-2.6-sunburst");
    assert_eq!(soon_event["shutdown_date"], soon.as_str());
    // Every configured model gets a line; the live one and the retired one at info level.
    let ok = served.wait_for("model checked").await;
    assert_eq!(ok["level"], "INFO");
    let models = mock.received();
    assert_eq!(models.len(), 1, "one check");
    assert_eq!(models[0].path, "/v1/models");
    let health = support::send(addr, "GET", "/healthz", &[], Vec::new()).await;
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn serve_starts_when_the_models_check_fails() {
    use support::mock_upstream::{MockUpstream, ModelsAnswer};
    // The upstream answers 500 to GET /v1/models.
    let mock = MockUpstream::start().await;
    mock.set_models(ModelsAnswer::Status {
        status: 500,
        body: "{}".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(&models_config(dir.path(), &mock.base_url()));
    let addr = served.listening().await;
    let failed = served
        .wait_for("models check failed: the configured models are not verified upstream")
        .await;
    assert_eq!(failed["level"], "WARN");
    assert!(
        failed["error"].as_str().unwrap().contains("500"),
        "{failed}"
    );
    let health = support::send(addr, "GET", "/healthz", &[], Vec::new()).await;
    assert_eq!(health.status, 200);
    drop(served);

    // Nothing listens upstream (a port just released).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(&models_config(dir.path(), &base));
    let addr = served.listening().await;
    let failed = served
        .wait_for("models check failed: the configured models are not verified upstream")
        .await;
    assert_eq!(failed["level"], "WARN");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .starts_with("GET /models failed"),
        "{failed}"
    );
    let health = support::send(addr, "GET", "/healthz", &[], Vec::new()).await;
    assert_eq!(health.status, 200);
}
