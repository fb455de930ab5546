//! TLS termination on the gateway's own listeners (`server.tls`, `admin.tls`): a CA made for
//! the test signs the gateway's certificates; clients trust that CA only. HTTP/2 by ALPN, a
//! renewed certificate served to new connections after a reload, the handshake under the
//! connection cap and the first-bytes deadline.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use imagegate::config::{Config, hash_key};
use imagegate::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use support::fixtures::rgba_png;
use support::gateway::{APP_KEY, Gateway};
use support::multipart::edit_request;

const ADMIN_KEY: &str = "ig-test-admin-key-0123456789";

/// A CA made for one test; it signs server certificates for 127.0.0.1 and localhost.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "imagegate listener test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("the CA certificate");
        TestCa {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Write a new server certificate (named `name`) and its key as PEM files; the DER of the
    /// certificate.
    fn issue(&self, name: &str, files: &TlsFiles) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("a server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf parameters");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("the server certificate");
        std::fs::write(&files.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// A client trusting this CA only, offering these ALPN protocols.
    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert_file: dir.join(format!("{name}.crt")),
        key_file: dir.join(format!("{name}.key")),
    }
}

async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("a handshake within 30 s")
}

fn alpn(tls: &TlsStream<TcpStream>) -> Option<String> {
    tls.get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

fn leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

/// An HTTP/2 connection over `tls`: its request sender.
async fn h2(tls: TlsStream<TcpStream>) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("an h2 connection");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// An HTTP/1.1 connection over `tls`: its request sender.
async fn h1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("an HTTP/1.1 connection");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

fn get(path: &str, authorization: Option<&str>) -> Request<Full<Bytes>> {
    let mut r = Request::get(format!("https://localhost{path}"));
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    r.body(Full::new(Bytes::new())).unwrap()
}

/// Status, version and body of an answer.
async fn answer(resp: http::Response<hyper::body::Incoming>) -> (u16, Version, Bytes) {
    let (head, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (head.status.as_u16(), head.version, body)
}

#[tokio::test]
async fn a_client_with_the_test_ca_gets_http2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let api = files(dir.path(), "api");
    ca.issue("gateway", &api);
    let gw = Gateway::start_with(|c| c.server.tls = Some(api.clone())).await;

    // Offering h2 and http/1.1: h2, and an edit goes through over it.
    let tls = connect(&ca.connector(&[b"h2", b"http/1.1"]), gw.addr())
        .await
        .expect("the handshake succeeds");
    assert_eq!(alpn(&tls).as_deref(), Some("h2"));
    let mut sender = h2(tls).await;
    let (status, version, _) =
        answer(sender.send_request(get("/healthz", None)).await.unwrap()).await;
    assert_eq!((status, version), (200, Version::HTTP_2));
    let form = edit_request(&rgba_png(16, true), "over h2");
    let edit = Request::post("https://localhost/v1/images/edits")
        .header("authorization", format!("Bearer {APP_KEY}"))
        .header("content-type", form.content_type())
        .body(Full::new(Bytes::from(form.body())))
        .unwrap();
    let (status, version, body) = answer(sender.send_request(edit).await.unwrap()).await;
    assert_eq!(
        (status, version),
        (200, Version::HTTP_2),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(gw.mock.count(), 1);
    assert_eq!(
        gw.mock.last().unwrap().field("prompt").as_deref(),
        Some("over h2")
    );

    // Offering http/1.1 only: HTTP/1.1. Offering nothing: HTTP/1.1 as well.
    for offer in [&[b"http/1.1".as_slice()][..], &[]] {
        let tls = connect(&ca.connector(offer), gw.addr()).await.unwrap();
        let negotiated = alpn(&tls);
        let mut sender = h1(tls).await;
        let req = Request::get("/healthz")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, version, _) = answer(sender.send_request(req).await.unwrap()).await;
        assert_eq!((status, version), (200, Version::HTTP_11), "{negotiated:?}");
    }

    // A client that does not trust the test CA does not get in; plain HTTP gets no answer.
    let stranger = TestCa::new();
    assert!(
        connect(&stranger.connector(&[b"h2"]), gw.addr())
            .await
            .is_err()
    );
    let plain = support::try_send(gw.addr(), "GET", "/healthz", &[], Vec::new()).await;
    assert!(plain.is_err(), "plain HTTP on a TLS listener: {plain:?}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (api, admin) = (files(dir.path(), "api"), files(dir.path(), "admin"));
    let first = ca.issue("first", &api);
    let admin_first = ca.issue("admin", &admin);
    let gw = Gateway::start_with(|c| {
        c.server.tls = Some(api.clone());
        c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.key_hash = Some(hash_key(ADMIN_KEY));
        c.admin.tls = Some(admin.clone());
    })
    .await;
    // The reload reads the same configuration again (and so the certificate files).
    let config: Config = (*gw.server.state.config()).clone();
    gw.server
        .state
        .set_source(Arc::new(move || Ok(config.clone())));
    let connector = ca.connector(&[b"h2", b"http/1.1"]);

    let before = connect(&connector, gw.addr()).await.unwrap();
    assert_eq!(leaf(&before), first);
    let mut kept = h2(before).await;
    let (status, _, _) = answer(kept.send_request(get("/healthz", None)).await.unwrap()).await;
    assert_eq!(status, 200);

    // Renewed on disk: nothing changes until the reload.
    let second = ca.issue("second", &api);
    assert_ne!(first, second);
    let still = connect(&connector, gw.addr()).await.unwrap();
    assert_eq!(leaf(&still), first, "not before the reload");

    // The reload, through the admin listener over its own TLS.
    let admin_addr = gw.server.admin_addr.unwrap();
    let admin_tls = connect(&connector, admin_addr).await.unwrap();
    assert_eq!(leaf(&admin_tls), admin_first);
    let mut admin_h2 = h2(admin_tls).await;
    let reload = Request::post("https://localhost/admin/reload")
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = answer(admin_h2.send_request(reload).await.unwrap()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["status"], "applied");

    let after = connect(&connector, gw.addr()).await.unwrap();
    assert_eq!(
        leaf(&after),
        second,
        "a new connection gets the new certificate"
    );
    // The connection opened before the reload is still open and served.
    let (status, version, _) =
        answer(kept.send_request(get("/healthz", None)).await.unwrap()).await;
    assert_eq!((status, version), (200, Version::HTTP_2));
    // So is the admin connection that asked for the reload.
    let auth = format!("Bearer {ADMIN_KEY}");
    let (status, _, _) = answer(
        admin_h2
            .send_request(get("/metrics", Some(&auth)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);

    // A certificate file broken on disk: the reload is refused, the last good one stays.
    std::fs::write(&api.cert_file, "garbage").unwrap();
    let problems = gw.server.state.reload("test");
    assert!(!problems.applied());
    assert!(
        problems
            .problems
            .iter()
            .any(|p| p.contains("server.tls.cert_file")),
        "{problems:?}"
    );
    let last = connect(&connector, gw.addr()).await.unwrap();
    assert_eq!(leaf(&last), second);
}

#[tokio::test]
async fn the_handshake_is_under_the_connection_cap_and_the_first_bytes_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let api = files(dir.path(), "api");
    ca.issue("gateway", &api);
    let gw = Gateway::start_with(|c| {
        c.server.tls = Some(api.clone());
        c.server.max_connections = 1;
        c.server.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    // A connection that never starts its handshake holds the only place.
    let mut silent = TcpStream::connect(gw.addr()).await.unwrap();
    // Wait until the gateway has accepted it: a second connection is closed at once.
    let mut refused = TcpStream::connect(gw.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), refused.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "over the cap: closed without a byte");
    // The silent one is closed at the deadline, without a byte.
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("closed at the first-bytes deadline")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Its place is free again: a real client gets in.
    let mut ok = None;
    for _ in 0..100 {
        // The closed connection's task may take a moment to release its place.
        if let Ok(tls) = connect(&ca.connector(&[b"h2"]), gw.addr()).await {
            ok = Some(tls);
            break;
        }
        tokio::task::yield_now().await;
    }
    let mut sender = h2(ok.expect("a handshake once the place is free")).await;
    let (status, _, _) = answer(sender.send_request(get("/healthz", None)).await.unwrap()).await;
    assert_eq!(status, 200);
}
