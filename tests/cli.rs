//! The command line, run as the real binary.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::fixtures::rgba_png;
use support::gateway::*;
use support::multipart::edit_request;
use support::process::{START_WITHIN, Served};

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

/// A ledger with one dall-e-2 request, two gpt-image-2 requests (token usage) and one
/// rejection; returns the config file that points at it.
fn model_ledger(dir: &std::path::Path) -> std::path::PathBuf {
    use imagegate::ledger::{CostBasis, LedgerOp, LedgerStore, Outcome, Record, SqliteStore};
    let db = dir.join("models.db");
    let mut store = SqliteStore::open(&db).unwrap();
    let at = |s: &str| s.parse().unwrap();
    let dalle = Record {
        client: Some("app".into()),
        outcome: Outcome::Answered,
        model: Some("dall-e-2".into()),
        images_returned: Some(2),
        cost_reserved_micros: 40_000,
        cost_settled_micros: 40_000,
        cost_basis: Some(CostBasis::PerImage),
        ..Record::new("req_d", at("2026-11-05T08:00:00Z"))
    };
    let gpt = |id: &str, input, output, cost| Record {
        client: Some("app".into()),
        outcome: Outcome::Answered,
        model: Some("gpt-image-2".into()),
        images_returned: Some(1),
        cost_reserved_micros: 400_000,
        cost_settled_micros: cost,
        quality: Some("medium".into()),
        output_format: Some("webp".into()),
        input_images: Some(1),
        stream: Some(false),
        input_tokens: Some(input),
        input_text_tokens: Some(input / 2),
        input_image_tokens: Some(input - input / 2),
        output_tokens: Some(output),
        total_tokens: Some(input + output),
        cost_basis: Some(CostBasis::Usage),
        ..Record::new(id, at("2026-11-05T09:00:00Z"))
    };
    let mut ops = Vec::new();
    for r in [
        dalle,
        gpt("req_g1", 1_060, 2_000, 68_300),
        gpt("req_g2", 40, 1_000, 30_160),
    ] {
        ops.push(LedgerOp::Begin(r.clone()));
        ops.push(LedgerOp::Complete(r));
    }
    ops.push(LedgerOp::Final(Record {
        reason_code: Some("invalid_api_key".into()),
        outcome: Outcome::Rejected,
        ..Record::new("req_r", at("2026-11-05T10:00:00Z"))
    }));
    for r in store.write_batch(&ops).unwrap() {
        r.unwrap();
    }
    let config = dir.join("imagegate.toml");
    std::fs::write(
        &config,
        format!("[ledger]\npath = {:?}\n", db.display().to_string()),
    )
    .unwrap();
    config
}

fn run_ok(args: &[&str], config: &std::path::Path) -> String {
    let out = imagegate()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn usage_by_model_and_exports_with_token_fields() {
    let dir = tempfile::tempdir().unwrap();
    let config = model_ledger(dir.path());

    let json = run_ok(
        &["usage", "--group-by", "model", "--format", "json"],
        &config,
    );
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let summary: Vec<(String, u64, u64, String, u64, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["requests"].as_u64().unwrap(),
                r["images"].as_u64().unwrap(),
                r["spend_usd"].as_str().unwrap().to_owned(),
                r["input_tokens"].as_u64().unwrap(),
                r["output_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("-".into(), 1, 0, "0.000000".into(), 0, 0),
            ("dall-e-2".into(), 1, 2, "0.040000".into(), 0, 0),
            ("gpt-image-2".into(), 2, 2, "0.098460".into(), 1_100, 3_000),
        ]
    );

    let table = run_ok(&["usage", "--group-by", "model"], &config);
    let gpt = table
        .lines()
        .find(|l| l.starts_with("gpt-image-2"))
        .unwrap_or_else(|| panic!("{table}"));
    for cell in ["0.098460", "1100", "3000"] {
        assert!(gpt.contains(cell), "{table}");
    }
    let csv = run_ok(
        &["usage", "--group-by", "model", "--format", "csv"],
        &config,
    );
    assert!(
        csv.starts_with("key,requests,forwarded,images,spend_usd,spend_micros,input_tokens,output_tokens,rejected,"),
        "{csv}"
    );

    // An unknown grouping is refused by the parser.
    let out = imagegate()
        .args(["usage", "--group-by", "planet", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model"));

    // Exports carry the new fields, in Record field order.
    let csv = run_ok(&["audit", "export", "--format", "csv"], &config);
    let header = csv.lines().next().unwrap();
    assert!(
        header.contains(",total_ms,upstream_ms,quality,output_format,input_images,stream,input_tokens,input_text_tokens,input_image_tokens,output_tokens,total_tokens,usage_extra,cost_basis,upstream_key,forwarded"),
        "{header}"
    );
    let g1 = csv.lines().find(|l| l.starts_with("req_g1,")).unwrap();
    assert!(
        g1.ends_with(",medium,webp,1,false,1060,530,530,2000,3060,,usage,,true"),
        "{g1}"
    );
    let jsonl = run_ok(&["audit", "export", "--format", "jsonl"], &config);
    let records: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let d = records.iter().find(|r| r["request_id"] == "req_d").unwrap();
    assert_eq!(d["cost_basis"], "per_image");
    assert_eq!(d["input_tokens"], serde_json::Value::Null);
    let g2 = records
        .iter()
        .find(|r| r["request_id"] == "req_g2")
        .unwrap();
    assert_eq!(
        (&g2["output_tokens"], &g2["cost_basis"], &g2["stream"]),
        (
            &serde_json::json!(1_000),
            &serde_json::json!("usage"),
            &serde_json::json!(false)
        )
    );

    let verify = run_ok(&["audit", "verify"], &config);
    assert!(verify.contains("ok"), "{verify}");
}

#[test]
fn audit_verify_reads_a_first_release_ledger_before_and_after_the_upgrade() {
    use support::ledger_v1::{V1Ledger, V1Record, schema_version};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    let r = V1Record {
        request_id: "req_old",
        received_at: "2026-10-01T08:00:00Z",
        received_at_us: 1_790_841_600_000_000,
        client: "app",
        outcome: "forwarding",
        model: Some("dall-e-2"),
        images_returned: None,
        cost_reserved_micros: 20_000,
        cost_settled_micros: 0,
        forwarded: true,
    };
    let mut v1 = V1Ledger::create(&db);
    v1.append("begin", &r);
    v1.append(
        "complete",
        &V1Record {
            outcome: "answered",
            images_returned: Some(1),
            cost_settled_micros: 20_000,
            ..r
        },
    );
    drop(v1);
    let config = dir.path().join("imagegate.toml");
    std::fs::write(
        &config,
        format!("[ledger]\npath = {:?}\n", db.display().to_string()),
    )
    .unwrap();

    // The CLI reads without upgrading.
    let verify = run_ok(&["audit", "verify"], &config);
    assert!(
        verify.contains("ok: 2 chain entries, 1 records"),
        "{verify}"
    );
    let csv = run_ok(&["audit", "export", "--format", "csv"], &config);
    assert!(
        csv.lines().nth(1).unwrap().ends_with(",,,,,,,,,,,,,true"),
        "{csv}"
    );
    assert_eq!(schema_version(&db), "1");

    // The gateway's store upgrades it; the chain still verifies.
    drop(imagegate::ledger::SqliteStore::open(&db).unwrap());
    assert_eq!(schema_version(&db), "3");
    let verify = run_ok(&["audit", "verify"], &config);
    assert!(
        verify.contains("ok: 2 chain entries, 1 records"),
        "{verify}"
    );
    let usage = run_ok(
        &["usage", "--group-by", "model", "--format", "json"],
        &config,
    );
    assert!(usage.contains("\"key\": \"dall-e-2\""), "{usage}");
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
    let mut served = Served::spawn(&models_config(dir.path(), &mock.base_url()), MODELS_KEY);
    let addr = served.listening(START_WITHIN).await;
    let gone = served
        .wait_for("model not listed upstream", START_WITHIN)
        .await;
    assert_eq!(gone["level"], "WARN");
    assert_eq!(gone["model"], "dall-e-2");
    let soon_event = served.wait_for("model shuts down soon", START_WITHIN).await;
    assert_eq!(soon_event["level"], "WARN");
    assert_eq!(soon_event["model"], "gpt-image-2.6-sunburst");
    assert_eq!(soon_event["shutdown_date"], soon.as_str());
    // Every configured model gets a line; the live one and the retired one at info level.
    let ok = served.wait_for("model checked", START_WITHIN).await;
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
    let mut served = Served::spawn(&models_config(dir.path(), &mock.base_url()), MODELS_KEY);
    let addr = served.listening(START_WITHIN).await;
    let failed = served
        .wait_for(
            "models check failed: the configured models are not verified upstream",
            START_WITHIN,
        )
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
    let mut served = Served::spawn(&models_config(dir.path(), &base), MODELS_KEY);
    let addr = served.listening(START_WITHIN).await;
    let failed = served
        .wait_for(
            "models check failed: the configured models are not verified upstream",
            START_WITHIN,
        )
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

/// Run the binary to its end (at most 60 s: a gateway that serves instead of refusing is a
/// failure, not a hang).
fn run_to_end(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after 60 s: {out:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn all_output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn serve_refuses_the_demo_key_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let out = run_to_end(
            imagegate()
                .args([
                    "serve",
                    "--config",
                    "config/imagegate.toml",
                    "--listen",
                    listen,
                ])
                .env("OPENAI_API_KEY", MODELS_KEY)
                .current_dir(env!("CARGO_MANIFEST_DIR")),
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let all = all_output(&out);
        assert!(
            all.contains("client 'demo' uses the documented demo key"),
            "{all}"
        );
        assert!(all.contains("refusing to serve"), "{all}");
        assert!(!all.contains("imagegate listening"), "{all}");
        assert!(!all.contains(imagegate::cli::DEMO_KEY), "{all}");
        assert!(!all.contains(MODELS_KEY), "{all}");
    }
    // The admin listener counts too.
    let path = dir.path().join("admin.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:0\"\nkey_hash = \"{}\"\n[[clients]]\nname = \"demo\"\nkey_hash = \"{}\"\n",
            imagegate::config::hash_key("an-admin-key-for-tests"),
            imagegate::config::hash_key(imagegate::cli::DEMO_KEY),
        ),
    )
    .unwrap();
    let out = run_to_end(imagegate().arg("serve").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(all_output(&out).contains("admin.listen 0.0.0.0:0"));
    // No client at all on a public address: refused too (the container's built-in config).
    let out =
        run_to_end(imagegate().args(["serve", "--config", "deploy/imagegate.container.toml"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let all = all_output(&out);
    assert!(all.contains("no clients are configured"), "{all}");
    assert!(all.contains("refusing to serve"), "{all}");
}

#[test]
fn check_config_reports_the_demo_key_as_a_problem_off_loopback_and_a_warning_on_it() {
    // Shipped config, 127.0.0.1: a warning, exit 0.
    let out = run_to_end(imagegate().args(["check-config", "--config", "config/imagegate.toml"]));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("warning: client 'demo' uses the documented demo key")),
        "{text}"
    );
    assert!(!text.contains(imagegate::cli::DEMO_KEY), "{text}");
    // The same file served on every interface: a problem, exit 2.
    let out = run_to_end(imagegate().args([
        "check-config",
        "--config",
        "config/imagegate.toml",
        "--listen",
        "0.0.0.0:8080",
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(
            |l| l.starts_with("error: client 'demo' uses the documented demo key")
                && l.contains("server.listen 0.0.0.0:8080")
        ),
        "{text}"
    );
    assert!(text.contains("1 problem(s)"), "{text}");
    assert!(!text.contains(imagegate::cli::DEMO_KEY), "{text}");
    // A file that listens on all interfaces itself.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("public.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"0.0.0.0:8080\"\n[[clients]]\nname = \"demo\"\nkey_hash = \"{}\"\n",
            imagegate::config::hash_key(imagegate::cli::DEMO_KEY)
        ),
    )
    .unwrap();
    let out = run_to_end(imagegate().arg("check-config").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // The container's config has no client: a problem on 0.0.0.0, a warning on loopback.
    let out = run_to_end(imagegate().args([
        "check-config",
        "--config",
        "deploy/imagegate.container.toml",
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(all_output(&out).contains("error: no clients are configured"));
    let out = run_to_end(imagegate().args([
        "check-config",
        "--config",
        "deploy/imagegate.container.toml",
        "--listen",
        "127.0.0.1:8080",
    ]));
    assert!(out.status.success(), "{out:?}");
    assert!(all_output(&out).contains("warning: no clients are configured"));
}

#[tokio::test]
async fn serve_with_the_demo_key_on_loopback_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[ledger]\npath = {:?}\n[log]\nformat = \"json\"\n[models]\ncheck_at_start = false\n[[clients]]\nname = \"demo\"\nkey_hash = \"{}\"\n",
            dir.path().join("imagegate.db").display().to_string(),
            imagegate::config::hash_key(imagegate::cli::DEMO_KEY)
        ),
    )
    .unwrap();
    let mut served = Served::spawn(&path, MODELS_KEY);
    let addr = served.listening(START_WITHIN).await;
    let warning = served
        .log_events()
        .into_iter()
        .take_while(|e| e["message"] != "imagegate listening")
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("uses the documented demo key"))
        })
        .expect("a demo key warning before listening");
    assert_eq!(warning["level"], "WARN");
    assert!(!warning.to_string().contains(imagegate::cli::DEMO_KEY));
    let health = support::send(addr, "GET", "/healthz", &[], Vec::new()).await;
    assert_eq!(health.status, 200);
    // The demo key authenticates (the request fails later, not with 401).
    let auth = format!("Bearer {}", imagegate::cli::DEMO_KEY);
    let answer = support::send(
        addr,
        "POST",
        "/v1/images/edits",
        &[("authorization", auth.as_str())],
        Vec::new(),
    )
    .await;
    assert_ne!(answer.status, 401, "{answer:?}");
}

/// The configuration of the SIGHUP test: the mock as upstream, the dall-e-2 profile, JSON logs,
/// these clients.
fn hangup_config(path: &std::path::Path, base_url: &str, clients: &[(&str, &str)]) {
    let dir = path.parent().unwrap();
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[upstream]
base_url = {base_url:?}
allow_http = true
[ledger]
path = {db:?}
[log]
format = "json"
level = "info"
[validation]
models = ["dall-e-2"]
[models]
default = ""
check_at_start = false
accepted = {{}}
"#,
        db = dir.join("imagegate.db"),
    );
    for (name, key) in clients {
        text.push_str(&format!(
            "[[clients]]\nname = {name:?}\nkey_hash = {:?}\n",
            imagegate::config::hash_key(key)
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn hangup(served: &Served) {
    served.signal("-HUP");
}

#[tokio::test]
async fn sighup_reloads_the_configuration_of_the_real_binary() {
    use support::mock_upstream::MockUpstream;
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.toml");
    hangup_config(&path, &mock.base_url(), &[("app", APP_KEY)]);
    let mut served = Served::spawn(&path, MODELS_KEY);
    let addr = served.listening(START_WITHIN).await;
    let edit = async |key: &str| {
        let form = edit_request(&rgba_png(16, true), "p");
        post_edit(addr, key, &form.content_type(), form.body()).await
    };
    assert_eq!(edit(OTHER_KEY).await.status, 401);

    // "other" added, "app" removed.
    hangup_config(&path, &mock.base_url(), &[("other", OTHER_KEY)]);
    hangup(&served);
    let reloaded = served
        .wait_for("configuration reloaded", START_WITHIN)
        .await;
    assert_eq!(reloaded["level"], "INFO");
    assert_eq!(reloaded["trigger"], "SIGHUP");
    assert_eq!(reloaded["generation"], 2);
    eprintln!(
        "SIGHUP reload in the real binary: {} ms",
        reloaded["duration_ms"]
    );
    assert_eq!(edit(OTHER_KEY).await.status, 200);
    assert_eq!(edit(APP_KEY).await.status, 401);

    // A broken file: logged, nothing changes, the process keeps serving.
    std::fs::write(&path, "[server]\nlisten = 42\n").unwrap();
    hangup(&served);
    let rejected = served
        .wait_for(
            "configuration reload rejected: nothing changed",
            START_WITHIN,
        )
        .await;
    assert_eq!(rejected["level"], "ERROR");
    assert!(
        rejected["problems"].as_str().unwrap().contains("listen"),
        "{rejected}"
    );
    assert_eq!(edit(OTHER_KEY).await.status, 200);
    assert_eq!(mock.count(), 2);
}

/// A truncated tail verifies as a chain; `--expect-head` with the head kept elsewhere (as
/// `/metrics` shows it) catches it: exit 1 and a clear message. A head kept earlier
/// (`SEQ:HASH`) still matches a chain that has grown since.
#[test]
fn audit_verify_expect_head_detects_a_truncated_tail() {
    use imagegate::ledger::{LedgerOp, LedgerStore, Outcome, Record};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("imagegate.db");
    let mut store = imagegate::ledger::SqliteStore::open(&db).unwrap();
    let rec = |id: &str| Record {
        request_id: id.into(),
        received_at: "2026-10-01T08:00:00Z".parse().unwrap(),
        client: Some("app".into()),
        outcome: Outcome::Rejected,
        ..Record::default()
    };
    for id in ["req_1", "req_2", "req_3"] {
        assert!(
            store
                .write_batch(&[LedgerOp::Final(rec(id))])
                .unwrap()
                .iter()
                .all(Result::is_ok)
        );
    }
    let head = store.head().unwrap().unwrap();
    assert_eq!(head.seq, 3);
    let second = store.entry_hash(2).unwrap().unwrap();
    drop(store);
    let config = dir.path().join("imagegate.toml");
    std::fs::write(
        &config,
        format!("[ledger]\npath = {:?}\n", db.display().to_string()),
    )
    .unwrap();
    let verify = |expect: &str| {
        imagegate()
            .args(["audit", "verify", "--expect-head", expect, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    for expect in [
        head.hash.clone(),
        format!("3:{}", head.hash),
        format!("2:{second}"),
    ] {
        let out = verify(&expect);
        assert!(
            out.status.success(),
            "{expect}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Someone removes the last entry and its record (dropping the guard trigger first).
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "DROP TRIGGER ledger_chain_no_delete;
         DELETE FROM ledger_chain WHERE seq = 3;
         DELETE FROM records WHERE request_id = 'req_3';",
    )
    .unwrap();
    drop(conn);
    let plain = run_ok(&["audit", "verify"], &config);
    assert!(plain.contains(": ok: 2 chain entries"), "{plain}");
    for expect in [head.hash.clone(), format!("3:{}", head.hash)] {
        let out = verify(&expect);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{expect}: {stdout}");
        assert!(stdout.contains("HEAD MISMATCH"), "{stdout}");
        assert!(stdout.contains(&head.hash), "{stdout}");
    }
    // A head kept before the truncation point still matches.
    assert!(verify(&format!("2:{second}")).status.success());
}
