//! Connections to workers: a keep-alive pool of hyper HTTP/1.1 connections
//! per worker endpoint (Unix socket or TCP), so steady traffic opens no new
//! connections.
//!
//! The pool is ours rather than hyper-util's legacy client: the request
//! path indexes straight into the worker's pool (no per-request hashing of
//! socket paths, no checkout futures), a connection goes back to its pool
//! only once the response body is done (so nothing queues behind a long
//! download), and a request that could not be sent comes back whole, so a
//! retry needs no copy of its headers.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::config::{Endpoint, UpstreamPool};
use crate::metrics::Metrics;
use crate::topology::{Topology, WorkerId};

/// Why a request did not get a response from its worker.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: the worker could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The worker's address could not be used.
    #[error("unusable upstream address")]
    BadTarget,
    /// The request failed after (part of) it was sent.
    #[error("{0}")]
    Failed(String),
}

impl UpstreamError {
    /// Whether the worker surely received nothing of the request.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::BadTarget)
    }
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// The idle connections to one worker endpoint.
pub struct WorkerConns {
    endpoint: Endpoint,
    /// Label for metrics: the worker's name when the pool was made.
    name: String,
    /// Idle connections by serving thread: a connection's task runs on the
    /// thread that opened it, so each thread reuses its own (no wakeups
    /// across threads on the request path).
    idle: Vec<Mutex<Vec<Idle>>>,
    settings: PoolSettings,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Copy)]
struct PoolSettings {
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
}

impl WorkerConns {
    /// An idle connection still usable, most recent first.
    fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle[shard()].lock().ok()?;
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < self.settings.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    fn put_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle[shard()].lock()
            && idle.len() < self.settings.max_idle
        {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let conn = tokio::time::timeout(self.settings.connect_timeout, self.open());
        let sender = match conn.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics
                    .upstream_connect_errors
                    .with_label_values(&[&self.name])
                    .inc();
                return Err(UpstreamError::Connect(e.to_string()));
            }
            Err(_) => {
                self.metrics
                    .upstream_connect_errors
                    .with_label_values(&[&self.name])
                    .inc();
                return Err(UpstreamError::Connect("connect timed out".to_string()));
            }
        };
        self.metrics
            .upstream_connections
            .with_label_values(&[&self.name])
            .inc();
        Ok(sender)
    }

    async fn open(&self) -> io::Result<SendRequest<RequestBody>> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                // A full listen backlog answers a non-blocking connect with
                // EAGAIN: the worker is busy, not gone. Try again, as a
                // blocking connect would wait (bounded by the timeout).
                let mut pause = Duration::from_millis(1);
                let stream = loop {
                    match tokio::net::UnixStream::connect(path).await {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(50));
                        }
                        r => break r?,
                    }
                };
                handshake(stream).await
            }
            Endpoint::Tcp { host, port } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                handshake(stream).await
            }
        }
    }

    /// A health check on a connection of its own: never one of the pool's
    /// (whose owner may be another serving thread), never kept.
    async fn probe(&self, req: Request<RequestBody>) -> Result<bool, UpstreamError> {
        let mut sender = Box::pin(self.open())
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Failed(error_chain(&e)))?;
        let ok = resp.status().is_success();
        // Read the (tiny) body so the worker sees a clean exchange.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        Ok(ok)
    }

    /// Sends a request on a pooled connection, or a new one. A request that
    /// a stale pooled connection could not take is sent again on another.
    async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) => (s, true),
                // Boxed: connecting is rare, and its future is large; inline,
                // every parked request would carry its size.
                None => (Box::pin(self.connect()).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Connect(
                    "the connection closed at once".to_string(),
                ));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    // An empty body is done already: nothing will poll it.
                    let back = if body.is_end_stream() {
                        self.put_back(sender);
                        None
                    } else {
                        Some((self.clone(), sender))
                    };
                    return Ok(Response::from_parts(
                        parts,
                        PooledBody { inner: body, back },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection was gone before it took it.
                    Some(back) if reused => req = back,
                    Some(_) => return Err(UpstreamError::Connect(error_chain(e.error()))),
                    None => return Err(UpstreamError::Failed(error_chain(e.error()))),
                },
            }
        }
    }
}

/// Starts HTTP/1.1 on a new connection; its task runs until it closes.
async fn handshake<S>(stream: S) -> io::Result<SendRequest<RequestBody>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A worker's response body; its connection returns to the pool when the
/// body is done, and closes if the body is abandoned.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<WorkerConns>, SendRequest<RequestBody>)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        // Done when it says so: hyper stops polling a body whose length is
        // reached, so the end may never be polled.
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if done && let Some((pool, sender)) = this.back.take() {
            pool.put_back(sender);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How many per-thread shards of idle connections a pool keeps.
const SHARDS: usize = 64;

thread_local! {
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes the calling thread use its own shard of every pool (the serving
/// threads call this once; other threads share shard 0).
pub fn set_serving_thread(index: usize) {
    SHARD.with(|s| s.set(index % SHARDS));
}

fn shard() -> usize {
    SHARD.with(|s| s.get())
}

/// Pools for every endpoint ever used, shared by every topology a reload
/// installs, so idle connections to workers survive reloads.
pub struct Clients {
    pools: Mutex<HashMap<Endpoint, Arc<WorkerConns>>>,
    settings: PoolSettings,
    metrics: Arc<Metrics>,
}

impl Clients {
    pub fn new(connect_timeout: Duration, pool: &UpstreamPool, metrics: Arc<Metrics>) -> Clients {
        Clients {
            pools: Mutex::new(HashMap::new()),
            settings: PoolSettings {
                connect_timeout,
                max_idle: pool.max_idle_per_worker,
                idle_timeout: pool.idle_timeout,
            },
            metrics,
        }
    }

    fn pool(&self, endpoint: &Endpoint, name: &str) -> Arc<WorkerConns> {
        let make = || {
            Arc::new(WorkerConns {
                endpoint: endpoint.clone(),
                name: name.to_string(),
                idle: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
                settings: self.settings,
                metrics: self.metrics.clone(),
            })
        };
        match self.pools.lock() {
            Ok(mut pools) => pools.entry(endpoint.clone()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }
}

/// Where each worker of one topology is reached: its pool, by `WorkerId`.
#[derive(Clone)]
pub struct Upstreams {
    pools: Vec<Option<Arc<WorkerConns>>>,
}

impl Upstreams {
    pub fn new(topology: &Topology, clients: Arc<Clients>) -> Upstreams {
        Upstreams {
            pools: topology
                .workers
                .iter()
                .map(|w| w.inbound.as_ref().map(|e| clients.pool(e, &w.name)))
                .collect(),
        }
    }

    /// Sends a request to a worker; the request target is `path_and_query`
    /// exactly as the client sent it.
    pub async fn send(
        &self,
        worker: WorkerId,
        path_and_query: PathAndQuery,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let Some(Some(pool)) = self.pools.get(worker.0 as usize) else {
            return Err(UpstreamError::BadTarget);
        };
        *req.uri_mut() = Uri::from(path_and_query);
        pool.send(req).await
    }
}

impl Upstreams {
    /// `GET /health` on a fresh connection to the worker: `Ok(true)` when
    /// it answers 2xx.
    pub async fn probe(
        &self,
        worker: WorkerId,
        req: Request<RequestBody>,
    ) -> Result<bool, UpstreamError> {
        let Some(Some(pool)) = self.pools.get(worker.0 as usize) else {
            return Err(UpstreamError::BadTarget);
        };
        pool.probe(req).await
    }
}

/// An error with its causes, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
