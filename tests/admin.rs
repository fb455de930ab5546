//! Reports and interfaces of the ledger: the admin listener (`/admin/usage`,
//! `/admin/requests/{id}`, `/metrics`) and the `usage` / `audit` commands, checked against the
//! requests the test sent.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use imagegate::config::hash_key;
use support::fixtures::rgba_png;
use support::gateway::*;
use support::multipart::edit_request;
use support::{Resp, raw_exchange_for, raw_status, send};

const ADMIN_KEY: &str = "ig-admin-key-for-tests-000111";

async fn admin_get(addr: std::net::SocketAddr, path: &str, key: Option<&str>) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    send(addr, "GET", path, &headers, vec![]).await
}

/// Sends: user a: 2 × n=2 (1024x1024), user b: 1 × n=1 (256x256), one validation rejection
/// (user a), one authentication rejection. Returns the request id of the first success.
async fn traffic(gw: &Gateway) -> String {
    let ok = |user: &str, n: &str| {
        edit_request(&rgba_png(16, true), "p")
            .text("user", user)
            .text("n", n)
    };
    let first = gw.edit(APP_KEY, &ok("a", "2")).await;
    assert_eq!(first.status, 200);
    assert_eq!(gw.edit(APP_KEY, &ok("a", "2")).await.status, 200);
    assert_eq!(
        gw.edit(APP_KEY, &ok("b", "1").text("size", "256x256"))
            .await
            .status,
        200
    );
    assert_eq!(gw.edit(APP_KEY, &ok("a", "11")).await.status, 400);
    assert_eq!(
        gw.edit("ig-wrong-key-000000000", &ok("a", "1"))
            .await
            .status,
        401
    );
    first
        .header("x-imagegate-request-id")
        .expect("gateway request id")
}

fn with_admin(c: &mut imagegate::config::Config) {
    c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    c.admin.key_hash = Some(hash_key(ADMIN_KEY));
}

#[tokio::test]
async fn admin_usage_request_and_metrics() {
    let gw = Gateway::start_with(with_admin).await;
    let admin = gw.server.admin_addr.expect("admin listener bound");
    let id = traffic(&gw).await;

    assert_eq!(admin_get(admin, "/admin/usage", None).await.status, 401);
    assert_eq!(
        admin_get(admin, "/admin/usage", Some(APP_KEY)).await.status,
        401,
        "a gateway key is not the admin key"
    );

    let total = admin_get(admin, "/admin/usage", Some(ADMIN_KEY)).await;
    assert_eq!(total.status, 200, "{}", total.text());
    let rows = total.json();
    assert_eq!(rows[0]["requests"], 5);
    assert_eq!(rows[0]["forwarded"], 3);
    assert_eq!(rows[0]["images"], 5);
    assert_eq!(rows[0]["spend_micros"], 4 * 20_000 + 16_000);
    assert_eq!(rows[0]["rejections"]["integer_above_max_value"], 1);
    assert_eq!(rows[0]["rejections"]["invalid_api_key"], 1);

    let by_user = admin_get(
        admin,
        "/admin/usage?group_by=user&client=app",
        Some(ADMIN_KEY),
    )
    .await
    .json();
    let row = |key: &str| {
        by_user
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no row {key}: {by_user}"))
    };
    assert_eq!(row("app/a")["requests"], 3);
    assert_eq!(row("app/a")["images"], 4);
    assert_eq!(row("app/a")["spend_micros"], 80_000);
    assert_eq!(row("app/b")["images"], 1);
    assert_eq!(row("app/b")["spend_micros"], 16_000);
    let only_b = admin_get(admin, "/admin/usage?user=b", Some(ADMIN_KEY))
        .await
        .json();
    assert_eq!(only_b[0]["requests"], 1);
    let by_model = admin_get(admin, "/admin/usage?group_by=model", Some(ADMIN_KEY)).await;
    assert_eq!(by_model.status, 200, "{}", by_model.text());
    let by_model = by_model.json();
    let sum = |field: &str| -> u64 {
        by_model
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!((sum("requests"), sum("images")), (5, 5), "{by_model}");
    assert_eq!(sum("spend_micros"), 4 * 20_000 + 16_000, "{by_model}");
    assert_eq!(sum("input_tokens"), 0, "dall-e-2 answers carry no usage");
    let bad = admin_get(admin, "/admin/usage?group_by=planet", Some(ADMIN_KEY)).await;
    assert_eq!(bad.status, 400);

    let rec = admin_get(admin, &format!("/admin/requests/{id}"), Some(ADMIN_KEY)).await;
    assert_eq!(rec.status, 200, "{}", rec.text());
    let r = rec.json();
    assert_eq!(r["request_id"], id.as_str());
    assert_eq!(r["outcome"], "answered");
    assert_eq!(r["client"], "app");
    assert_eq!(r["user"], "a");
    assert_eq!(r["images_returned"], 2);
    assert_eq!(
        admin_get(admin, "/admin/requests/req_nope", Some(ADMIN_KEY))
            .await
            .status,
        404
    );

    let metrics = admin_get(admin, "/metrics", Some(ADMIN_KEY)).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text();
    let mut samples = 0;
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        // name{labels} value  |  name value
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line}"
            );
        }
        samples += 1;
    }
    assert!(samples > 0);
    for family in [
        "imagegate_requests_total",
        "imagegate_request_duration_seconds_bucket",
        "imagegate_upstream_duration_seconds_bucket",
        "imagegate_validation_duration_seconds_bucket",
        "imagegate_images_total",
        "imagegate_in_flight_requests",
        "imagegate_ledger_queue_depth",
        "imagegate_ledger_write_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing from /metrics");
    }
    assert!(text.contains("outcome=\"answered\""), "{text}");
}

fn imagegate(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("IMAGEGATE_CONFIG")
        .output()
        .unwrap()
}

#[tokio::test]
async fn usage_and_audit_commands() {
    let gw = Gateway::start().await;
    traffic(&gw).await;
    let dir = gw.dir.path().to_path_buf();
    let Gateway {
        server,
        mock,
        dir: tmp,
        ..
    } = gw;
    server.shutdown().await;
    drop(mock);
    let db = dir.join("imagegate.db");
    let config = dir.join("imagegate.toml");
    std::fs::write(
        &config,
        format!("[ledger]\npath = {:?}\n", db.display().to_string()),
    )
    .unwrap();

    let out = imagegate(
        &config,
        &["usage", "--group-by", "user", "--format", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "app/a")
        .unwrap();
    assert_eq!(
        (a["requests"].as_u64(), a["images"].as_u64()),
        (Some(3), Some(4))
    );

    let table = imagegate(&config, &["usage", "--group-by", "client"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("app"), "{text}");
    let csv = imagegate(&config, &["usage", "--format", "csv", "--client", "app"]);
    assert!(String::from_utf8_lossy(&csv.stdout).lines().count() >= 2);
    let future = imagegate(
        &config,
        &["usage", "--since", "2999-01-01", "--format", "json"],
    );
    let none: serde_json::Value = serde_json::from_slice(&future.stdout).unwrap();
    assert!(
        none.as_array().unwrap().iter().all(|r| r["requests"] == 0),
        "{none}"
    );

    let export = imagegate(&config, &["audit", "export", "--format", "jsonl"]);
    assert!(export.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "one record per request");
    assert_eq!(
        lines.iter().filter(|r| r["outcome"] == "answered").count(),
        3
    );
    assert_eq!(
        lines.iter().filter(|r| r["outcome"] == "rejected").count(),
        2
    );
    let csv = imagegate(
        &config,
        &["audit", "export", "--format", "csv", "--user", "b"],
    );
    assert_eq!(
        String::from_utf8_lossy(&csv.stdout).lines().count(),
        2,
        "header + one record"
    );

    let ok = imagegate(&config, &["audit", "verify"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(": ok:"));

    // Tamper with one record: verify names the broken link and fails.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let changed = conn
        .execute(
            "UPDATE records SET images_returned = 9 WHERE end_user = 'b'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let broken = imagegate(&config, &["audit", "verify"]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&broken.stdout).contains("BROKEN at seq"),
        "{}",
        String::from_utf8_lossy(&broken.stdout)
    );
    drop(tmp);
}

#[tokio::test]
async fn admin_connections_are_drained_on_shutdown() {
    let gw = Gateway::start_with(|c| {
        with_admin(c);
        c.server.shutdown_grace = Duration::from_secs(20);
        // Neither timeout may be what closes the connection below.
        c.server.header_read_timeout = Duration::from_secs(60);
        c.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let admin = gw.server.admin_addr.unwrap();
    // An admin keep-alive connection, open and idle when the shutdown comes.
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let closed = tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "admin")
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    let Gateway { server, mock, .. } = gw;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown ends once the admin connection is closed, long before the grace");
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the admin connection was closed by the drain")
        .unwrap()
        .expect("closed cleanly");
    eprintln!(
        "shutdown with an idle admin connection took {:?}",
        started.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener is closed"
    );
    drop(mock);
}

#[tokio::test]
async fn a_silent_admin_connection_is_dropped() {
    let gw = Gateway::start_with(|c| {
        with_admin(c);
        c.server.header_read_timeout = Duration::from_millis(500);
        c.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let admin = gw.server.admin_addr.unwrap();
    for partial in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..], &b"GET /metr"[..]] {
        let started = Instant::now();
        let out = raw_exchange_for(admin, partial, Duration::from_secs(10)).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{:?}: closed by the first-bytes deadline (took {took:?})",
            String::from_utf8_lossy(partial)
        );
        let status = raw_status(&out);
        assert!(out.is_empty() || status == Some(408), "{out:?}");
    }
    // Errors on the admin listener use the API's envelope.
    let r = admin_get(admin, "/admin/nope", Some(ADMIN_KEY)).await;
    assert_error(&r, 404, "invalid_request_error", None, Some("unknown_url"));
    let r = send(
        admin,
        "DELETE",
        "/admin/usage",
        &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        vec![],
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET"));
    let r = admin_get(admin, "/admin/nope", None).await;
    assert_eq!(r.status, 401, "the key is checked before the path");
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        admin_get(admin, "/metrics", Some(ADMIN_KEY)).await.status,
        200
    );
}

const METRICS_TOKEN: &str = "ig-metrics-token-for-tests-42";

/// `/metrics` under its own token: the token reads the metrics and nothing else (the routes
/// that read records still want the admin key); the admin key reads everything. The chain head
/// is on `/metrics` (seq gauge and hash label) and equals what `audit verify` reports.
#[tokio::test]
async fn metrics_have_their_own_token_and_show_the_chain_head() {
    let gw = Gateway::start_with(|c| {
        with_admin(c);
        c.admin.metrics_auth = imagegate::config::MetricsAuth::Token;
        c.admin.metrics_token = Some(imagegate::config::Secret::new(METRICS_TOKEN.into()));
    })
    .await;
    let admin = gw.server.admin_addr.expect("admin listener bound");
    traffic(&gw).await;

    let m = admin_get(admin, "/metrics", Some(METRICS_TOKEN)).await;
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(
        admin_get(admin, "/metrics", Some(ADMIN_KEY)).await.status,
        200
    );
    assert_eq!(admin_get(admin, "/metrics", None).await.status, 401);
    assert_eq!(
        admin_get(admin, "/metrics", Some(APP_KEY)).await.status,
        401
    );
    for path in ["/admin/usage", "/admin/requests/x"] {
        assert_eq!(
            admin_get(admin, path, Some(METRICS_TOKEN)).await.status,
            401,
            "{path}: the metrics token does not read records"
        );
    }

    // The chain head on `/metrics` is the ledger's (polled: the last records of `traffic`
    // may still be committing; bounded to 10 s).
    use imagegate::ledger::LedgerStore;
    let db = gw.dir.path().join("imagegate.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = admin_get(admin, "/metrics", Some(METRICS_TOKEN))
            .await
            .text();
        let seq: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("imagegate_ledger_chain_head_seq "))
            .unwrap_or_else(|| panic!("no chain head seq:\n{text}"))
            .trim()
            .parse()
            .unwrap();
        let info = text
            .lines()
            .find(|l| l.starts_with("imagegate_ledger_chain_head_info{"))
            .unwrap_or_else(|| panic!("no chain head info:\n{text}"))
            .to_owned();
        let hash = info
            .split("hash=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_owned();
        assert_eq!(hash.len(), 64, "{info}");
        assert!(info.contains(&format!("seq=\"{seq}\"")), "{info}");
        let store = imagegate::ledger::sqlite::SqliteStore::open_reader(&db).unwrap();
        let head = store.verify().unwrap().head.expect("a head");
        if (head.seq, head.hash.as_str()) == (seq, hash.as_str()) {
            assert!(
                seq >= 8,
                "3 answered requests (2 entries each) and 2 refusals: {seq}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics shows {seq} {hash}, the ledger {head:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `metrics_auth = "none"`, `/metrics` needs no key; the record routes still do.
#[tokio::test]
async fn metrics_without_a_key_when_configured() {
    let gw = Gateway::start_with(|c| {
        with_admin(c);
        c.admin.metrics_auth = imagegate::config::MetricsAuth::None;
    })
    .await;
    let admin = gw.server.admin_addr.expect("admin listener bound");
    assert_eq!(admin_get(admin, "/metrics", None).await.status, 200);
    assert_eq!(admin_get(admin, "/admin/usage", None).await.status, 401);
    assert_eq!(
        admin_get(admin, "/admin/usage", Some(ADMIN_KEY))
            .await
            .status,
        200
    );
}
