//! TLS to the upstream: a mock OpenAI upstream behind rustls (a certificate for 127.0.0.1 and
//! localhost, signed by a CA made for the test) and `upstream.ca_file` pointing at that CA.

mod support;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use imagegate::config::Config;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use support::fixtures::rgba_png;
use support::gateway::*;
use support::multipart::edit_request;

/// A CA made for one test and a server certificate it signed for 127.0.0.1 and localhost.
struct TestPki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn test_pki() -> TestPki {
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "imagegate test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().expect("a server key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf parameters");
    leaf.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    leaf.distinguished_name
        .push(DnType::CommonName, "mock upstream");
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .expect("the server certificate");

    TestPki {
        ca_pem: ca_cert.pem(),
        chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
    }
}

/// One TLS handshake the mock saw: the negotiated ALPN protocol, or the handshake error.
type Handshake = Result<Option<String>, String>;

/// One request the mock's handler received completely.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    version: Version,
    authorization: Option<String>,
    n: usize,
}

struct Shared {
    handshakes: watch::Sender<Vec<Handshake>>,
    requests: Mutex<Vec<Seen>>,
}

/// An OpenAI stand-in on 127.0.0.1:0 speaking TLS (ALPN h2 and http/1.1). Answers every
/// request 200 `{"created", "data": [{"url"}; n]}`. Dropping it aborts every task.
struct TlsUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsUpstream {
    async fn start(pki: &TestPki) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(pki.chain.clone(), pki.key.clone_key())
            .expect("a server certificate and key");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            handshakes: watch::Sender::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        TlsUpstream {
            addr,
            shared,
            accept,
        }
    }

    fn base_url(&self, host: &str) -> String {
        format!("https://{host}:{}/v1", self.addr.port())
    }

    fn requests(&self) -> Vec<Seen> {
        self.shared.requests.lock().unwrap().clone()
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.shared.handshakes.borrow().clone()
    }

    /// Resolves once at least `n` handshakes ended (no polling); at most 10 s.
    async fn wait_for_handshakes(&self, n: usize) -> Vec<Handshake> {
        let mut rx = self.shared.handshakes.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|h| h.len() >= n))
            .await
            .expect("the handshake ends within 10 s")
            .expect("the mock is running")
            .clone()
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    conns.spawn(serve(stream, acceptor.clone(), shared.clone()));
                }
                Err(_) => tokio::task::yield_now().await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve(stream: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let tls = match acceptor.accept(stream).await {
        Ok(tls) => tls,
        Err(e) => {
            shared
                .handshakes
                .send_modify(|h| h.push(Err(e.to_string())));
            return;
        }
    };
    let alpn = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    shared.handshakes.send_modify(|h| h.push(Ok(alpn)));
    let svc = service_fn(move |req| handle(req, shared.clone()));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), svc)
        .await;
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let n = field(&head.headers, body, "n")
        .await
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 10);
    shared.requests.lock().unwrap().push(Seen {
        path: head.uri.path().to_string(),
        version: head.version,
        authorization: head
            .headers
            .get("authorization")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        n,
    });
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({ "url": format!("https://example.invalid/tls-{i}.png") }))
        .collect();
    let json = serde_json::json!({ "created": created, "data": data }).to_string();
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("x-request-id", "req_tls_mock")
        .body(Full::new(Bytes::from(json)))
        .expect("a valid response");
    Ok(resp)
}

/// A text field of a multipart body, if there is one.
async fn field(headers: &http::HeaderMap, body: Bytes, name: &str) -> Option<String> {
    let ct = headers.get("content-type")?.to_str().ok()?;
    let boundary = multer::parse_boundary(ct).ok()?;
    let stream = Full::new(body).into_data_stream();
    let mut mp = multer::Multipart::new(stream, boundary);
    while let Ok(Some(f)) = mp.next_field().await {
        if f.name() == Some(name) {
            return f.text().await.ok();
        }
    }
    None
}

/// Writes the test CA to `<dir>/upstream-ca.pem`.
fn write_ca(dir: &Path, pki: &TestPki) -> PathBuf {
    let path = dir.join("upstream-ca.pem");
    std::fs::write(&path, &pki.ca_pem).expect("write the CA file");
    path
}

async fn edit_over_tls(host: &str) {
    let pki = test_pki();
    let tls = TlsUpstream::start(&pki).await;
    let ca_dir = tempfile::tempdir().expect("a temporary directory");
    let ca_file = write_ca(ca_dir.path(), &pki);
    let base_url = tls.base_url(host);
    let gw = Gateway::start_with(|c| {
        c.upstream.base_url = base_url;
        c.upstream.allow_http = false;
        c.upstream.ca_file = Some(ca_file);
    })
    .await;

    let form = edit_request(&rgba_png(32, true), "an otter over TLS").text("n", "3");
    let resp = gw.edit(APP_KEY, &form).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let data = resp.json()["data"].as_array().expect("data").clone();
    assert_eq!(data.len(), 3, "{}", resp.text());
    assert_eq!(data[2]["url"], "https://example.invalid/tls-2.png");
    assert_eq!(resp.header("x-request-id").as_deref(), Some("req_tls_mock"));

    let seen = tls.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let rec = &seen[0];
    assert_eq!(rec.path, "/v1/images/edits");
    assert_eq!(rec.n, 3);
    assert_eq!(
        rec.authorization.as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str()),
        "the injected upstream key went over TLS"
    );
    assert_eq!(rec.version, Version::HTTP_2, "h2 chosen by ALPN");
    assert_eq!(
        tls.handshakes(),
        [Ok(Some("h2".to_string()))],
        "one TLS connection, ALPN h2"
    );
    assert_eq!(gw.mock.count(), 0, "the plain-HTTP mock was not used");
}

#[tokio::test]
async fn edits_go_over_tls_to_an_upstream_signed_by_the_ca_file() {
    edit_over_tls("127.0.0.1").await;
}

#[tokio::test]
async fn the_ca_file_also_verifies_a_host_name() {
    edit_over_tls("localhost").await;
}

#[tokio::test]
async fn pooled_connection_is_reused_over_tls() {
    let pki = test_pki();
    let tls = TlsUpstream::start(&pki).await;
    let ca_dir = tempfile::tempdir().expect("a temporary directory");
    let ca_file = write_ca(ca_dir.path(), &pki);
    let base_url = tls.base_url("127.0.0.1");
    let gw = Gateway::start_with(|c| {
        c.upstream.base_url = base_url;
        c.upstream.allow_http = false;
        c.upstream.ca_file = Some(ca_file);
    })
    .await;
    for i in 0..3 {
        let resp = gw
            .edit(APP_KEY, &edit_request(&rgba_png(32, true), "again"))
            .await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert_eq!(tls.requests().len(), 3);
    assert_eq!(
        tls.handshakes(),
        [Ok(Some("h2".to_string()))],
        "one pooled h2 connection"
    );
}

#[tokio::test]
async fn without_the_ca_file_the_upstream_is_not_trusted() {
    let pki = test_pki();
    let tls = TlsUpstream::start(&pki).await;
    let base_url = tls.base_url("127.0.0.1");
    let gw = Gateway::start_with(|c| {
        c.upstream.base_url = base_url;
        c.upstream.allow_http = false;
        c.upstream.ca_file = None;
    })
    .await;

    let resp = gw
        .edit(APP_KEY, &edit_request(&rgba_png(32, true), "p"))
        .await;
    assert_error(
        &resp,
        502,
        "server_error",
        None,
        Some("upstream_unreachable"),
    );

    // The gateway refused the certificate: the mock's handshake ended with the client's alert.
    let handshakes = tls.wait_for_handshakes(1).await;
    assert!(!handshakes.is_empty());
    for h in &handshakes {
        let err = h.as_ref().expect_err("no handshake succeeded");
        assert!(err.contains("UnknownCA"), "{err}");
    }
    assert!(tls.requests().is_empty(), "nothing reached the handler");
    assert_eq!(gw.mock.count(), 0);
}

#[tokio::test]
async fn a_ca_file_for_another_ca_does_not_help() {
    let pki = test_pki();
    let other = test_pki();
    let tls = TlsUpstream::start(&pki).await;
    let ca_dir = tempfile::tempdir().expect("a temporary directory");
    let ca_file = write_ca(ca_dir.path(), &other);
    let base_url = tls.base_url("127.0.0.1");
    let gw = Gateway::start_with(|c| {
        c.upstream.base_url = base_url;
        c.upstream.allow_http = false;
        c.upstream.ca_file = Some(ca_file);
    })
    .await;
    let resp = gw
        .edit(APP_KEY, &edit_request(&rgba_png(32, true), "p"))
        .await;
    assert_error(
        &resp,
        502,
        "server_error",
        None,
        Some("upstream_unreachable"),
    );
    let handshakes = tls.wait_for_handshakes(1).await;
    assert!(handshakes.iter().all(|h| h.is_err()), "{handshakes:?}");
    assert!(tls.requests().is_empty());
}

fn problems_with_ca_file(path: PathBuf) -> Vec<String> {
    let mut c = Config::default();
    c.upstream.ca_file = Some(path);
    c.problems()
}

#[test]
fn a_bad_ca_file_is_a_config_problem() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pki = test_pki();

    let good = write_ca(dir.path(), &pki);
    assert!(problems_with_ca_file(good.clone()).is_empty());

    let missing = dir.path().join("missing.pem");
    let p = problems_with_ca_file(missing.clone());
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(&format!(
            "upstream.ca_file {}: cannot read",
            missing.display()
        )),
        "{p:?}"
    );

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let p = problems_with_ca_file(empty);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("holds no PEM certificate"), "{p:?}");

    // A key alone is PEM, but no certificate.
    let key_only = dir.path().join("key.pem");
    std::fs::write(&key_only, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let p = problems_with_ca_file(key_only);
    assert!(
        p.len() == 1 && p[0].contains("holds no PEM certificate"),
        "{p:?}"
    );

    // A CERTIFICATE section whose bytes are not a certificate.
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let p = problems_with_ca_file(garbage);
    assert!(p.len() == 1 && p[0].contains("certificate 1:"), "{p:?}");

    // Broken PEM framing.
    let broken = dir.path().join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\naGVsbG8=\n").unwrap();
    let p = problems_with_ca_file(broken);
    assert!(p.len() == 1 && p[0].contains("not a PEM file"), "{p:?}");

    // A directory cannot be read as a file.
    let p = problems_with_ca_file(dir.path().to_path_buf());
    assert!(p.len() == 1 && p[0].contains("cannot read"), "{p:?}");
}

#[test]
fn load_reports_a_missing_ca_file_with_every_other_problem() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("nope.pem");
    let config = dir.path().join("imagegate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmax_in_flight = 0\n[upstream]\nca_file = {:?}\n",
            missing.display().to_string()
        ),
    )
    .unwrap();
    let errs = Config::load(&config, true).expect_err("the config is refused");
    let all = errs.join("\n");
    assert_eq!(errs.len(), 2, "{all}");
    assert!(all.contains("server.max_in_flight"), "{all}");
    assert!(
        all.contains(&format!(
            "upstream.ca_file {}: cannot read",
            missing.display()
        )),
        "{all}"
    );

    // The same file with a valid CA loads.
    std::fs::write(&missing, test_pki().ca_pem).unwrap();
    std::fs::write(
        &config,
        format!(
            "[upstream]\nca_file = {:?}\n",
            missing.display().to_string()
        ),
    )
    .unwrap();
    let loaded = Config::load(&config, true).expect("a valid CA file loads");
    assert_eq!(loaded.upstream.ca_file.as_deref(), Some(missing.as_path()));
}
