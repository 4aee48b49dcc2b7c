//! An edge in front of stand-in workers laid out like the guide's topology,
//! on an ephemeral port, with a real HTTP client.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use synapse_edge::demo;
use synapse_edge::listeners::{ListenAddr, ListenerSpec, Running, ServerSettings};
use synapse_edge::proxy::Proxy;
use synapse_edge::standin::StandIn;
use synapse_edge::state::{EdgeState, Sources};

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub standins: Vec<StandIn>,
    pub edge: Running,
    pub proxy: Arc<Proxy>,
    _health: AbortOnDrop,
    pub base: String,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

/// Stops a background task when the harness goes.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn worker(&self) -> &str {
        self.headers
            .get("x-worker")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Harness {
    /// The guide's topology with stand-ins, and the edge with `edge_yaml`.
    pub async fn start(edge_yaml: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let paths = demo::write_config(dir.path()).unwrap();
        let standins = demo::start_standins(dir.path()).unwrap();
        Self::with(dir, paths, standins, edge_yaml).await
    }

    pub async fn with(
        dir: tempfile::TempDir,
        paths: Vec<std::path::PathBuf>,
        standins: Vec<StandIn>,
        edge_yaml: &str,
    ) -> Harness {
        let plain = ListenerSpec::plain(ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()));
        Self::with_listeners(dir, paths, standins, edge_yaml, vec![plain]).await
    }

    /// The guide's topology with stand-ins, and the edge on these listeners
    /// (the first must be plain TCP: it is `base`).
    pub async fn start_listeners(edge_yaml: &str, listeners: Vec<ListenerSpec>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let paths = demo::write_config(dir.path()).unwrap();
        let standins = demo::start_standins(dir.path()).unwrap();
        Self::with_listeners(dir, paths, standins, edge_yaml, listeners).await
    }

    pub async fn with_listeners(
        dir: tempfile::TempDir,
        paths: Vec<std::path::PathBuf>,
        standins: Vec<StandIn>,
        edge_yaml: &str,
        listeners: Vec<ListenerSpec>,
    ) -> Harness {
        let edge_path = dir.path().join("edge.yaml");
        std::fs::write(&edge_path, edge_yaml).unwrap();
        let state = EdgeState::load(&Sources {
            synapse: paths,
            edge: Some(edge_path),
            routes: None,
        })
        .unwrap();
        let settings = ServerSettings::from_config(&state.edge);
        let proxy = Arc::new(Proxy::new(state));
        let health = AbortOnDrop(tokio::spawn(synapse_edge::proxy::health_loop(
            proxy.clone(),
        )));
        // A test's single-thread runtime polls every task on this thread,
        // as a serving thread's does: batch requests to workers as the
        // serving threads do.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            synapse_edge::upstream::batch::enable().unwrap();
        }
        let edge = Running::start(proxy.clone(), &listeners, settings)
            .await
            .unwrap();
        let base = format!("http://{}", edge.tcp_addr().unwrap());
        Harness {
            dir,
            standins,
            edge,
            proxy,
            _health: health,
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The TCP address of the n-th listener.
    pub fn addr(&self, n: usize) -> std::net::SocketAddr {
        match &self.edge.addrs[n] {
            ListenAddr::Tcp(a) => *a,
            ListenAddr::Unix(_) => panic!("listener {n} is a Unix socket"),
        }
    }

    /// A raw TCP connection to the edge's first listener, for requests a
    /// client library would not send.
    pub async fn connect(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(self.edge.tcp_addr().unwrap())
            .await
            .unwrap()
    }

    pub fn standin(&self, name: &str) -> &StandIn {
        self.standins.iter().find(|s| s.name == name).unwrap()
    }

    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let mut req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(format!("{}{target}", self.base));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn get(&self, target: &str) -> Answer {
        self.send("GET", target, &[], b"").await
    }

    /// `GET target` over cleartext HTTP/2 (prior knowledge), with the
    /// client, whose connection lives as long as it does.
    pub async fn get_h2(
        &self,
        target: &str,
    ) -> (
        Client<HttpConnector, Full<Bytes>>,
        http::Response<hyper::body::Incoming>,
    ) {
        self.send_h2(Request::get(target), Full::new(Bytes::new()))
            .await
    }

    /// A request (its target a path on the edge) over cleartext HTTP/2
    /// (prior knowledge), with any body: checks that it was answered over
    /// HTTP/2, and returns the client, whose connection lives as long as
    /// it does.
    pub async fn send_h2<B>(
        &self,
        req: http::request::Builder,
        body: B,
    ) -> (
        Client<HttpConnector, B>,
        http::Response<hyper::body::Incoming>,
    )
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let target = req.uri_ref().map(|u| u.to_string()).unwrap_or_default();
        let req = req
            .uri(format!("{}{target}", self.base))
            .body(body)
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        (client, resp)
    }
}

/// A request body streamed as `frames` frames of `chunk` each, with no
/// declared length (so an HTTP/1 client sends it chunked).
pub fn streamed(
    frames: usize,
    chunk: Bytes,
) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Unpin + 'static
{
    let frames: Vec<_> = (0..frames)
        .map(|_| Ok(hyper::body::Frame::data(chunk.clone())))
        .collect();
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

/// Waits (up to 2 s) until a worker has started `n` requests.
pub async fn wait_for_requests(stats: &synapse_edge::standin::Stats, n: usize) {
    for _ in 0..100 {
        if stats.requests() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(stats.requests(), n, "the worker never got the request");
}

/// Waits (up to 2 s) until a worker saw a request end before its answer:
/// when each did.
pub async fn wait_for_cancelled(stats: &synapse_edge::standin::Stats) -> Vec<tokio::time::Instant> {
    let mut cancelled = Vec::new();
    for _ in 0..100 {
        cancelled = stats.cancelled();
        if !cancelled.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cancelled
}

/// Reads one HTTP/1.1 answer with a Content-Length body off a kept-alive
/// connection (byte by byte up to the head's end, so nothing of the next
/// answer is taken): (head, body).
pub async fn read_answer<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(n, 1, "closed mid-head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}
