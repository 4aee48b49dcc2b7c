//! The public TLS edge: certificates by SNI, HTTP/2 and HTTP/1.1 through to
//! Unix-socket workers, the redirect and federation-only listeners,
//! certificate swaps on disk, the admin guard, trusted proxies and
//! `.well-known`. Certificates are made by the tests (rcgen).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::harness::{Harness, read_answer, wait_for_cancelled, wait_for_requests};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pki_types::{CertificateDer, ServerName};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use synapse_edge::front::{ListenerRole, Traffic};
use synapse_edge::listeners::{ListenAddr, ListenerSpec};
use synapse_edge::tls::{CertSpec, CertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Writes a leaf certificate for `names` to `dir/<file>.crt|.key`.
    fn leaf(&self, dir: &Path, file: &str, names: &[&str]) -> (CertSpec, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let spec = CertSpec {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
            names: names.iter().map(|s| s.to_string()).collect(),
        };
        std::fs::write(&spec.cert, cert.pem() + &self.ca.pem()).unwrap();
        std::fs::write(&spec.key, key.serialize_pem()).unwrap();
        (spec, cert.der().clone())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(pki: &Pki, addr: SocketAddr, name: &str, alpn: &[&[u8]]) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(alpn));
    connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap()
}

fn peer_cert(tls: &Tls) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Sends requests over one TLS connection with whatever protocol ALPN chose.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn sender(tls: Tls) -> Sender {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Sender::H1(s)
    }
}

async fn send(
    s: &mut Sender,
    req: Request<Full<Bytes>>,
) -> (StatusCode, Version, http::HeaderMap, Bytes) {
    let resp = match s {
        Sender::H1(s) => s.send_request(req).await.unwrap(),
        Sender::H2(s) => s.send_request(req).await.unwrap(),
    };
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.version,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn get(host: &str, target: &str) -> Request<Full<Bytes>> {
    Request::get(format!("https://{host}{target}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn tls_listener(store: &Arc<CertStore>, role: ListenerRole) -> ListenerSpec {
    ListenerSpec {
        addr: ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        role: Arc::new(role),
        tls: Some(synapse_edge::tls::server_config(store.clone()).unwrap()),
    }
}

fn plain(role: ListenerRole) -> ListenerSpec {
    ListenerSpec {
        addr: ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        role: Arc::new(role),
        tls: None,
    }
}

/// Listeners: 0 plain (all), 1 TLS (all, HSTS), 2 TLS federation only,
/// 3 plain redirect with an ACME folder.
async fn tls_edge(
    pki: &Pki,
    dir: &Path,
    edge_yaml: &str,
) -> (Harness, Arc<CertStore>, Vec<CertificateDer<'static>>) {
    let (a, a_der) = pki.leaf(dir, "example", &["example.org"]);
    let (b, b_der) = pki.leaf(dir, "matrix", &["matrix.example.org"]);
    let store = Arc::new(CertStore::load(vec![a, b]).unwrap());
    std::fs::create_dir_all(dir.join("acme")).unwrap();
    std::fs::write(dir.join("acme/tok-EN_1"), "tok-EN_1.thumbprint").unwrap();
    let listeners = vec![
        plain(ListenerRole::default()),
        tls_listener(
            &store,
            ListenerRole {
                hsts: Some(http::HeaderValue::from_static("max-age=63072000")),
                ..ListenerRole::default()
            },
        ),
        tls_listener(
            &store,
            ListenerRole {
                serves: vec![Traffic::Federation],
                ..ListenerRole::default()
            },
        ),
        plain(ListenerRole {
            redirect_https: true,
            acme_challenge_dir: Some(dir.join("acme")),
            ..ListenerRole::default()
        }),
    ];
    let h = Harness::start_listeners(edge_yaml, listeners).await;
    (h, store, vec![a_der, b_der])
}

#[tokio::test]
async fn sni_picks_each_names_certificate_with_a_default() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, ders) = tls_edge(&pki, dir.path(), "").await;
    let tls = connect(&pki, h.addr(1), "example.org", &[b"http/1.1"]).await;
    assert_eq!(peer_cert(&tls), ders[0]);
    let tls = connect(&pki, h.addr(1), "matrix.example.org", &[b"http/1.1"]).await;
    assert_eq!(peer_cert(&tls), ders[1]);
    // Another name gets the default (first) certificate, which then fails
    // the client's name check: the handshake is still answered.
    let tcp = tokio::net::TcpStream::connect(h.addr(1)).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(pki.client_config(&[]))
        .connect(ServerName::try_from("other.example").unwrap(), tcp)
        .await;
    assert!(r.is_err(), "a certificate for another name was accepted");
}

#[tokio::test]
async fn h2_and_http11_are_negotiated_and_proxied_with_5_mib_both_ways() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, _) = tls_edge(&pki, dir.path(), "").await;
    for (alpn, version) in [
        (&b"h2"[..], Version::HTTP_2),
        (&b"http/1.1"[..], Version::HTTP_11),
    ] {
        let tls = connect(&pki, h.addr(1), "matrix.example.org", &[alpn]).await;
        let mut s = sender(tls).await;
        let (status, v, headers, body) = send(
            &mut s,
            get(
                "matrix.example.org",
                "/_matrix/client/v3/rooms/%21a%3Ab/messages",
            ),
        )
        .await;
        assert_eq!((status, v), (StatusCode::OK, version));
        assert!(headers["x-worker"].to_str().unwrap().starts_with("rooms"));
        assert_eq!(headers["strict-transport-security"], "max-age=63072000");
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
        assert_eq!(seen["headers"]["host"], "matrix.example.org");
        // 5 MiB up and down.
        let blob: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
        let up = Request::post("https://matrix.example.org/_matrix/media/v3/upload")
            .header("host", "matrix.example.org")
            .body(Full::new(Bytes::from(blob.clone())))
            .unwrap();
        let (status, _, headers, body) = send(&mut s, up).await;
        assert_eq!(
            (status, headers["x-worker"].to_str().unwrap()),
            (StatusCode::OK, "media1")
        );
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["body_bytes"], blob.len());
        let mut down = get(
            "matrix.example.org",
            "/_matrix/client/v1/media/download/x/y",
        );
        down.headers_mut()
            .insert("x-standin-response-bytes", (5u64 << 20).into());
        let (status, _, _, body) = send(&mut s, down).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body.as_ref(),
            synapse_edge::standin::pattern(0, 5 << 20).as_slice()
        );
    }
}

#[tokio::test]
async fn the_federation_listener_refuses_client_paths() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, _) = tls_edge(&pki, dir.path(), "").await;
    let mut s = sender(connect(&pki, h.addr(2), "example.org", &[b"h2"]).await).await;
    let (status, _, _, body) = send(&mut s, get("example.org", "/_matrix/client/v3/sync")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["errcode"],
        "M_UNRECOGNIZED"
    );
    let (status, _, headers, _) =
        send(&mut s, get("example.org", "/_matrix/federation/v1/version")).await;
    assert_eq!(
        (status, headers["x-worker"].to_str().unwrap()),
        (StatusCode::OK, "federation_reader1")
    );
    let (status, _, headers, _) = send(&mut s, get("example.org", "/_matrix/key/v2/server")).await;
    assert_eq!(
        (status, headers["x-worker"].to_str().unwrap()),
        (StatusCode::OK, "main")
    );
}

#[tokio::test]
async fn the_plain_listener_redirects_to_https_but_serves_acme_challenges() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, _) = tls_edge(&pki, dir.path(), "").await;
    let base = format!("http://{}", h.addr(3));
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("{base}/_matrix/client/v3/sync?since=s1&timeout=30"))
        .header("host", "matrix.example.org:80")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        resp.headers()["location"],
        "https://matrix.example.org/_matrix/client/v3/sync?since=s1&timeout=30"
    );
    let resp = client
        .request(
            Request::get(format!("{base}/.well-known/acme-challenge/tok-EN_1"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "tok-EN_1.thumbprint"
    );
    for bad in ["..%2Fedge.yaml", "nope"] {
        let resp = client
            .request(
                Request::get(format!("{base}/.well-known/acme-challenge/{bad}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_serves_new_connections_while_old_ones_finish() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, store, ders) = tls_edge(&pki, dir.path(), "").await;
    let watch = tokio::spawn(synapse_edge::tls::watch(
        store.clone(),
        Duration::from_millis(50),
    ));
    // A long request on a connection made with the old certificate.
    let mut old = sender(connect(&pki, h.addr(1), "example.org", &[b"http/1.1"]).await).await;
    let mut long = get("example.org", "/_matrix/client/v3/sync?since=s1");
    long.headers_mut().insert("x-standin-delay-ms", 1200.into());
    let in_flight = tokio::spawn(async move { send(&mut old, long).await.0 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Renewal: new files for example.org.
    let (_, renewed) = pki.leaf(dir.path(), "example", &["example.org"]);
    assert_ne!(renewed, ders[0]);
    let mut seen = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = peer_cert(&connect(&pki, h.addr(1), "example.org", &[b"http/1.1"]).await);
        if c == renewed {
            seen = Some(c);
            break;
        }
    }
    assert!(
        seen.is_some(),
        "new connections still get the old certificate"
    );
    assert_eq!(
        in_flight.await.unwrap(),
        StatusCode::OK,
        "the request on the old connection was cut"
    );
    // A broken file is refused and the current certificate stays.
    std::fs::write(
        dir.path().join("example.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.reload().is_err());
    let c = peer_cert(&connect(&pki, h.addr(1), "example.org", &[b"http/1.1"]).await);
    assert_eq!(c, renewed, "a corrupt certificate replaced the working one");
    watch.abort();
}

/// Sends a raw request line to a plain listener and returns the status.
async fn raw_status(addr: SocketAddr, prefix: &[u8], target: &str, extra: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await; // a refused connection may be reset
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn the_admin_guard_refuses_every_spelling_from_outside() {
    // Loopback is not allowed here, so the test client is "outside".
    let h = Harness::start("admin:\n  allow: [10.9.0.0/16]\n").await;
    let addr = h.addr(0);
    for target in [
        "/_synapse/admin/v1/server_version",
        "//_synapse/admin/v1/server_version",
        "/_synapse//admin/v1/server_version",
        "/_synapse/./admin/v1/server_version",
        "/_matrix/../_synapse/admin/v1/server_version",
        "/_synapse/%61dmin/v1/server_version",
        "/%5Fsynapse/admin/v1/server_version",
        "/_synapse%2Fadmin/v1/server_version",
        "/_synapse/%2561dmin/v1/server_version",
        "/_SYNAPSE/ADMIN/v1/server_version",
        "/_synapse/admin/v1/media/x/y",
    ] {
        let (status, text) = raw_status(addr, b"", target, "").await;
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains("M_FORBIDDEN"), "{target}");
    }
    assert_eq!(
        h.standin("main").stats.requests(),
        0,
        "an admin request reached Synapse"
    );
    assert_eq!(
        h.standin("media1").stats.requests(),
        0,
        "an admin request reached Synapse"
    );
    // Non-admin paths are untouched.
    assert_eq!(
        raw_status(addr, b"", "/_synapse/client/pick_idp", "")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn the_admin_api_is_reachable_from_loopback_by_default() {
    let h = Harness::start("").await;
    let (status, text) = raw_status(h.addr(0), b"", "/_synapse/admin/v1/server_version", "").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("x-worker: main"));
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    // Untrusted: the peer address, whatever the header says.
    let h = Harness::start("").await;
    let (_, text) = raw_status(
        h.addr(0),
        b"",
        "/_matrix/client/versions",
        "x-forwarded-for: 198.51.100.7\r\n",
    )
    .await;
    assert!(text.contains(r#""x-forwarded-for":"127.0.0.1""#), "{text}");
    // Trusted loopback balancer: its client's address, which the admin guard
    // then judges (an outside client is refused even through loopback).
    let h = Harness::start("trusted_proxies: [127.0.0.0/8]\n").await;
    let (_, text) = raw_status(
        h.addr(0),
        b"",
        "/_matrix/client/versions",
        "x-forwarded-for: 6.6.6.6, 198.51.100.7\r\n",
    )
    .await;
    assert!(
        text.contains(r#""x-forwarded-for":"198.51.100.7""#),
        "{text}"
    );
    let (status, _) = raw_status(
        h.addr(0),
        b"",
        "/_synapse/admin/v1/server_version",
        "x-forwarded-for: 198.51.100.7\r\n",
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_give_the_client_address() {
    let h = Harness::start_listeners(
        "trusted_proxies: [127.0.0.0/8]\n",
        vec![plain(ListenerRole {
            proxy_protocol: true,
            ..ListenerRole::default()
        })],
    )
    .await;
    let v1 = b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 443\r\n";
    let (status, text) = raw_status(h.addr(0), v1, "/_matrix/client/versions", "").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(r#""x-forwarded-for":"198.51.100.9""#),
        "{text}"
    );
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 203, 0, 113, 5, 127, 0, 0, 1, 0x15, 0xb3, 0x01, 0xbb,
    ]);
    let (status, text) = raw_status(h.addr(0), &v2, "/_matrix/client/versions", "").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(r#""x-forwarded-for":"203.0.113.5""#),
        "{text}"
    );
    // No header: the connection is refused.
    let (status, _) = raw_status(h.addr(0), b"", "/_matrix/client/versions", "").await;
    assert_eq!(status, 0);
}

#[tokio::test]
async fn well_known_is_answered_by_the_edge_when_configured() {
    let h = Harness::start(
        "well_known:\n  server: {\"m.server\": \"matrix.example.org:443\"}\n  client: {\"m.homeserver\": {\"base_url\": \"https://matrix.example.org\"}}\n",
    )
    .await;
    let a = h.get("/.well-known/matrix/server").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(
        a.json(),
        serde_json::json!({"m.server": "matrix.example.org:443"})
    );
    assert!(!a.headers.contains_key("x-worker"));
    let a = h.get("/.well-known/matrix/client").await;
    assert_eq!(
        a.json()["m.homeserver"]["base_url"],
        "https://matrix.example.org"
    );
    assert_eq!(a.headers["access-control-allow-origin"], "*");
    // Not configured: main answers.
    let h = Harness::start("").await;
    assert_eq!(h.get("/.well-known/matrix/client").await.worker(), "main");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_listen_tls_starts_a_tls_listener_from_the_command_line() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let paths = synapse_edge::demo::write_config(dir.path()).unwrap();
    let _standins = synapse_edge::demo::start_standins(dir.path()).unwrap();
    let (spec, der) = pki.leaf(dir.path(), "cli", &["matrix.example.org"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-edge"));
    cmd.args(["run", "--listen-tls", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&spec.cert)
        .arg("--tls-key")
        .arg(&spec.key);
    for p in &paths {
        cmd.arg("--synapse-config").arg(p);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut up = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = Some(());
            break;
        }
    }
    assert!(up.is_some(), "the edge did not listen");
    let tls = connect(&pki, addr, "matrix.example.org", &[b"h2", b"http/1.1"]).await;
    assert_eq!(peer_cert(&tls), der);
    let mut s = sender(tls).await;
    let (status, version, headers, _) = send(
        &mut s,
        get("matrix.example.org", "/_matrix/client/versions"),
    )
    .await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(headers["x-worker"], "main");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn over_tls_a_kept_alive_connection_serves_on_and_a_client_leaving_a_long_poll_cancels_it() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, _) = tls_edge(&pki, dir.path(), "").await;
    let mut tls = connect(&pki, h.addr(1), "example.org", &[b"http/1.1"]).await;
    // Three requests one after another on one TLS connection.
    for _ in 0..3 {
        tls.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: example.org\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_answer(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // Then a long-poll, and the client goes away.
    let sync = h.standin("client_sync1");
    tls.write_all(
        b"GET /_matrix/client/v3/sync?since=s1&timeout=30000 HTTP/1.1\r\nhost: example.org\r\nx-standin-delay-ms: 30000\r\n\r\n",
    )
    .await
    .unwrap();
    wait_for_requests(&sync.stats, 1).await;
    let left = tokio::time::Instant::now();
    drop(tls);
    let cancelled = wait_for_cancelled(&sync.stats).await;
    assert_eq!(
        cancelled.len(),
        1,
        "the worker still holds the abandoned request"
    );
    assert!(cancelled[0] - left < Duration::from_secs(1));
}

#[tokio::test]
async fn over_tls_pipelined_requests_left_waiting_inside_tls_are_all_answered_in_order() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, _) = tls_edge(&pki, dir.path(), "").await;
    let mut tls = connect(&pki, h.addr(1), "example.org", &[b"http/1.1"]).await;
    // Three requests in one write, each exactly as long as the edge's
    // first read (4 KiB): after each, nothing is left in the edge's buffer while
    // the next waits decrypted inside TLS (the socket has nothing more to
    // say, so only asking TLS finds it).
    let request = |i: usize| {
        let bare = format!(
            "GET /_matrix/client/versions?n={i} HTTP/1.1\r\nhost: example.org\r\nx-pad: \r\n\r\n"
        );
        let pad = "p".repeat(4096 - bare.len());
        format!(
            "GET /_matrix/client/versions?n={i} HTTP/1.1\r\nhost: example.org\r\nx-pad: {pad}\r\n\r\n"
        )
    };
    let all: String = (0..3).map(request).collect();
    assert_eq!(all.len(), 3 * 4096);
    tls.write_all(all.as_bytes()).await.unwrap();
    for i in 0..3 {
        let (head, body) = read_answer(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            body.contains(&format!("n={i}")),
            "answer {i} out of order: {body}"
        );
    }
}

/// An HTTP/2 connection in use is never closed as idle, however long it
/// lives; once its requests stop it gets its GOAWAY after the idle timeout.
#[tokio::test]
async fn an_http2_connection_closes_after_the_idle_timeout_once_its_requests_stop() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (h, _store, _) = tls_edge(&pki, dir.path(), "timeouts:\n  client_idle: 400ms\n").await;
    let tls = connect(&pki, h.addr(1), "matrix.example.org", &[b"h2"]).await;
    let (mut s, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Requests 250 ms apart for over twice the idle timeout, all on the
    // one connection.
    for _ in 0..5 {
        let resp = s
            .send_request(get("matrix.example.org", "/_matrix/client/versions"))
            .await;
        let resp = resp.expect("the connection was closed while in use");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last = Instant::now() - Duration::from_millis(250);
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the idle HTTP/2 connection stayed open")
        .unwrap()
        .unwrap();
    let idle = last.elapsed();
    assert!(
        idle >= Duration::from_millis(380) && idle < Duration::from_millis(1500),
        "closed after {idle:?} idle, for a 400 ms timeout"
    );
}
