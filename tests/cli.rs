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
