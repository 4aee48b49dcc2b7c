//! Stand-in workers: small HTTP servers on Unix sockets (or TCP) that say
//! who they are. They back the demo and the routing, streaming and failover
//! tests; real Synapse backs the end-to-end suite.
//!
//! Every answer carries `X-Worker: <name>`. `GET /health` answers `OK`.
//! Anything else answers JSON describing what arrived (method, target as
//! received, headers, body length and hash), shaped by request headers:
//! - `x-standin-delay-ms: N`: wait N ms before answering (a slow worker or
//!   a parked long-poll);
//! - `x-standin-response-bytes: N`: answer with N bytes of a fixed pattern,
//!   streamed, instead of JSON;
//! - `x-standin-hop-headers: 1`: add hop-by-hop headers to the answer.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use xxhash_rust::xxh3::Xxh3;

/// The byte at position `i` of the stand-in's response pattern.
fn pattern_byte(i: u64) -> u8 {
    ((i.wrapping_mul(31) + 7) % 251) as u8
}

/// `len` bytes of the response pattern starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

/// What a stand-in has seen.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Requests started (health checks not included).
    pub requests: AtomicUsize,
    /// `GET /health` requests answered.
    pub health_checks: AtomicUsize,
    /// Requests answered completely.
    pub completed: AtomicUsize,
    /// When requests ended before their answer (client went away).
    pub cancelled: Mutex<Vec<Instant>>,
}

impl Stats {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn cancelled(&self) -> Vec<Instant> {
        self.cancelled.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// A running stand-in worker. Dropping it stops it and its connections.
pub struct StandIn {
    pub name: String,
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
    socket: Option<PathBuf>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl StandIn {
    /// Starts a stand-in on a Unix socket (replacing a stale socket file).
    pub fn start_unix(name: &str, path: &Path) -> io::Result<StandIn> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_unix(listener, name.to_string(), stats.clone()));
        Ok(StandIn {
            name: name.to_string(),
            stats,
            task,
            socket: Some(path.to_path_buf()),
        })
    }

    /// Starts a stand-in on a TCP address; returns it and the bound address.
    pub async fn start_tcp(name: &str, addr: SocketAddr) -> io::Result<(StandIn, SocketAddr)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_tcp(listener, name.to_string(), stats.clone()));
        Ok((
            StandIn {
                name: name.to_string(),
                stats,
                task,
                socket: None,
            },
            local,
        ))
    }
}

async fn accept_unix(listener: UnixListener, name: String, stats: Arc<Stats>) {
    let mut conns = JoinSet::new();
    while let Ok((s, _)) = listener.accept().await {
        stats.connections.fetch_add(1, Ordering::SeqCst);
        conns.spawn(serve(s, name.clone(), stats.clone()));
        while conns.try_join_next().is_some() {}
    }
}

async fn accept_tcp(listener: TcpListener, name: String, stats: Arc<Stats>) {
    let mut conns = JoinSet::new();
    while let Ok((s, _)) = listener.accept().await {
        stats.connections.fetch_add(1, Ordering::SeqCst);
        conns.spawn(serve(s, name.clone(), stats.clone()));
        while conns.try_join_next().is_some() {}
    }
}

async fn serve<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    name: String,
    stats: Arc<Stats>,
) {
    let svc = service_fn(move |req| {
        let name = name.clone();
        let stats = stats.clone();
        async move { Ok::<_, Infallible>(answer(req, &name, &stats).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Records a cancellation unless the answer was completed.
struct Pending<'a> {
    stats: &'a Stats,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            self.stats.completed.fetch_add(1, Ordering::SeqCst);
        } else if let Ok(mut v) = self.stats.cancelled.lock() {
            v.push(Instant::now());
        }
    }
}

type AnyBody = BoxBody<Bytes, Infallible>;

fn header_num(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers().get(name)?.to_str().ok()?.parse().ok()
}

async fn answer(req: Request<Incoming>, name: &str, stats: &Stats) -> Response<AnyBody> {
    let worker = HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("invalid"));
    if req.uri().path() == "/health" {
        stats.health_checks.fetch_add(1, Ordering::SeqCst);
        let mut r = Response::new(Full::new(Bytes::from_static(b"OK")).boxed());
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        r.headers_mut().insert("x-worker", worker);
        return r;
    }
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let mut pending = Pending { stats, done: false };
    let delay = header_num(&req, "x-standin-delay-ms");
    let respond_bytes = header_num(&req, "x-standin-response-bytes");
    let hop = req.headers().contains_key("x-standin-hop-headers");
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(s)) => {
                s.push_str(", ");
                s.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), v.into());
            }
        }
    }
    let mut body = req.into_body();
    let mut hasher = Xxh3::new();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                    hasher.update(d);
                }
            }
            Err(_) => {
                return Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(Full::new(Bytes::from_static(b"body error")).boxed())
                    .unwrap_or_default();
            }
        }
    }
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = match respond_bytes {
        Some(n) => {
            let chunks = stream::unfold(0u64, move |off| async move {
                if off >= n {
                    return None;
                }
                let len = (n - off).min(64 * 1024);
                let chunk = Bytes::from(pattern(off, len as usize));
                Some((Ok::<_, Infallible>(Frame::data(chunk)), off + len))
            });
            let mut r = Response::new(StreamBody::new(chunks).boxed());
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        None => {
            let json = serde_json::json!({
                "worker": name,
                "method": method,
                "target": target,
                "headers": headers,
                "body_bytes": body_bytes,
                "body_xxh3": format!("{:016x}", hasher.digest()),
            });
            let mut r = Response::new(Full::new(Bytes::from(json.to_string())).boxed());
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
    };
    resp.headers_mut().insert("x-worker", worker);
    if hop {
        let h = resp.headers_mut();
        h.insert("connection", HeaderValue::from_static("x-hop-custom"));
        h.insert("x-hop-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
    }
    pending.done = true;
    resp
}
