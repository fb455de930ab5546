//! Start the real gateway on 127.0.0.1:0 against a [`MockUpstream`], with a temporary data
//! directory and (optionally) a manual clock.

use std::time::{Duration, SystemTime};

use imagegate::clock::Clock;
use imagegate::config::{ClientConfig, Config, Secret, hash_key};
use imagegate::limits::spec::RateSpec;
use imagegate::server::{RunningServer, spawn_with_clock};

use super::mock_upstream::MockUpstream;
use super::multipart::Multipart;
use super::{Resp, send};

/// The gateway key of client "app" (kind app).
pub const APP_KEY: &str = "ig-test-app-key-0123456789";
/// The gateway key of client "other" (kind app).
pub const OTHER_KEY: &str = "ig-test-other-key-0123456789";
/// The upstream key the gateway injects.
pub const UPSTREAM_KEY: &str = "sk-test-upstream-key-abcdef";

pub struct Gateway {
    pub server: RunningServer,
    pub mock: MockUpstream,
    pub dir: tempfile::TempDir,
    pub clock: Clock,
}

/// A config for tests: the mock as upstream, two app clients, generous limits, no quotas.
pub fn test_config(mock: &MockUpstream, dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    // The dall-e-2 profile alone, as for an OpenAI-compatible server; gpt-image tests use
    // `gpt_config`.
    c.validation.models = vec!["dall-e-2".into()];
    c.models = imagegate::models::ModelsConfig::dall_e_2_only();
    c.server.listen = "127.0.0.1:0".parse().expect("a valid address");
    c.upstream.base_url = mock.base_url();
    c.upstream.allow_http = true;
    c.upstream.response_timeout = Duration::from_secs(30);
    c.upstream_key = Some(Secret::new(UPSTREAM_KEY.to_string()));
    c.ledger.path = dir.join("imagegate.db");
    let generous = RateSpec {
        requests_per_minute: Some(100_000),
        requests_burst: Some(100_000),
        images_per_minute: Some(1_000_000),
        images_burst: Some(1_000_000),
    };
    c.limits.per_user = generous;
    c.limits.per_client = generous;
    for (name, key) in [("app", APP_KEY), ("other", OTHER_KEY)] {
        c.clients.push(ClientConfig {
            name: name.into(),
            key_hash: hash_key(key),
            ..Default::default()
        });
    }
    c
}

impl Gateway {
    /// Default test gateway.
    pub async fn start() -> Gateway {
        Gateway::start_with(|_| {}).await
    }

    /// Test gateway with the config adjusted by `tweak`, on a manual clock (time stands still
    /// unless the test advances it).
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Gateway {
        let mock = MockUpstream::start().await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = test_config(&mock, dir.path());
        tweak(&mut config);
        assert!(
            config.problems().is_empty(),
            "test config invalid: {:?}",
            config.problems()
        );
        let clock = Clock::manual(SystemTime::now());
        let server = spawn_with_clock(config, clock.clone())
            .await
            .expect("the gateway starts");
        Gateway {
            server,
            mock,
            dir,
            clock,
        }
    }

    /// Restart the gateway on the same data directory and mock (a new process would do the same).
    pub async fn restart(self, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let Gateway {
            server,
            mock,
            dir,
            clock,
        } = self;
        server.shutdown().await;
        let mut config = test_config(&mock, dir.path());
        tweak(&mut config);
        let server = spawn_with_clock(config, clock.clone())
            .await
            .expect("the gateway restarts");
        Gateway {
            server,
            mock,
            dir,
            clock,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr
    }

    /// POST a multipart body to the edits route with a gateway key.
    pub async fn edit(&self, key: &str, form: &Multipart) -> Resp {
        self.edit_raw(key, &form.content_type(), form.body()).await
    }

    pub async fn edit_raw(&self, key: &str, content_type: &str, body: Vec<u8>) -> Resp {
        post_edit(self.addr(), key, content_type, body).await
    }
}

/// POST a body to the edits route at `addr` with a gateway key; the answer must come within
/// 60 s. Free of `Gateway`, so it can run in a spawned task.
pub async fn post_edit(
    addr: std::net::SocketAddr,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Resp {
    let auth = format!("Bearer {key}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", content_type),
    ];
    tokio::time::timeout(
        Duration::from_secs(60),
        send(addr, "POST", "/v1/images/edits", &headers, body),
    )
    .await
    .expect("the gateway answers within 60 s")
}

/// Assert an OpenAI error envelope: status, type, param, code; returns the message.
pub fn assert_error(
    resp: &Resp,
    status: u16,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> String {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    let j = resp.json();
    let e = j
        .get("error")
        .unwrap_or_else(|| panic!("no error envelope: {j}"));
    let obj = e.as_object().expect("error is an object");
    for k in ["message", "type", "param", "code"] {
        assert!(obj.contains_key(k), "envelope misses {k}: {j}");
    }
    assert_eq!(e["type"], kind, "type: {j}");
    assert_eq!(e["param"].as_str(), param, "param: {j}");
    assert_eq!(e["code"].as_str(), code, "code: {j}");
    assert!(
        resp.header("x-request-id").is_some(),
        "x-request-id missing"
    );
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/json")
    );
    e["message"]
        .as_str()
        .expect("message is a string")
        .to_string()
}

/// Tweak for gpt-image tests: the shipped model table (gpt-image-2, 2.5, 2.6), no dall-e-2
/// profile, no start-up model check.
pub fn gpt(c: &mut Config) {
    c.validation.models = Vec::new();
    c.models = imagegate::models::ModelsConfig::default();
    c.models.check_at_start = false;
}

/// The record of request `id` in the ledger file at `path`.
pub fn ledger_record(path: &std::path::Path, id: &str) -> imagegate::ledger::Record {
    use imagegate::ledger::sqlite::SqliteStore;
    use imagegate::ledger::store::{LedgerStore, UsageQuery};
    let store = SqliteStore::open_reader(path).expect("the ledger opens for reading");
    let mut found = None;
    store
        .export(&UsageQuery::default(), &mut |r| {
            if r.request_id == id {
                found = Some(r.clone());
            }
            Ok(())
        })
        .expect("the ledger exports");
    found.unwrap_or_else(|| panic!("no record for {id}"))
}

impl Gateway {
    /// The record of the request this answer belongs to.
    pub fn record_of(&self, resp: &Resp) -> imagegate::ledger::Record {
        let id = resp
            .header("x-imagegate-request-id")
            .expect("every answer carries x-imagegate-request-id");
        ledger_record(&self.dir.path().join("imagegate.db"), &id)
    }
}
