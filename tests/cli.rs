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
    for cmd in ["serve", "check-config", "hash-key", "quota"] {
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
        header.contains(",total_ms,upstream_ms,quality,output_format,input_images,stream,input_tokens,input_text_tokens,input_image_tokens,output_tokens,total_tokens,usage_extra,cost_basis,forwarded"),
        "{header}"
    );
    let g1 = csv.lines().find(|l| l.starts_with("req_g1,")).unwrap();
    assert!(
        g1.ends_with(",medium,webp,1,false,1060,530,530,2000,3060,,usage,true"),
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
        csv.lines().nth(1).unwrap().ends_with(",,,,,,,,,,,,true"),
        "{csv}"
    );
    assert_eq!(schema_version(&db), "1");

    // The gateway's store upgrades it; the chain still verifies.
    drop(imagegate::ledger::SqliteStore::open(&db).unwrap());
    assert_eq!(schema_version(&db), "2");
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
