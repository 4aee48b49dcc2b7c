//! Connections to workers: a keep-alive pool of HTTP/1.1 connections per
//! worker endpoint (Unix socket or TCP), so steady traffic opens no new
//! connections, and the exchange on them ([`h1`]).
//!
//! The request path indexes straight into the worker's pool (no hashing of
//! socket paths, no checkout futures). A connection is driven by the
//! request that uses it (no task per connection) and goes back to its pool
//! only once the answer's body is done, so nothing queues behind a long
//! download; a request that a stale pooled connection could not take is
//! sent again on another.

pub mod batch;
pub mod h1;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Method, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::config::{Endpoint, UpstreamPool};
use crate::http1::{self, BodyFraming, Decoded};
use crate::metrics::Metrics;
use crate::request::RequestHeaders;
use crate::topology::{Topology, WorkerId};
use h1::{AnswerError, Conn, RequestFraming};

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
    conn: Conn,
    since: Instant,
}

/// The idle connections to one worker endpoint.
pub struct WorkerConns {
    endpoint: Endpoint,
    /// Label for metrics: the worker's name when the pool was made.
    name: String,
    /// Idle connections by serving thread: a connection is registered with
    /// the reactor of the thread that opened it, so each thread reuses its
    /// own (no wakeups across threads on the request path).
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
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle[shard()].lock().ok()?;
        while let Some(mut i) = idle.pop() {
            if i.since.elapsed() < self.settings.idle_timeout && i.conn.still_usable() {
                return Some(i.conn);
            }
        }
        None
    }

    fn put_back(&self, conn: Conn) {
        if let Ok(mut idle) = self.idle[shard()].lock()
            && idle.len() < self.settings.max_idle
        {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let conn = tokio::time::timeout(self.settings.connect_timeout, self.open());
        let failed = |cause: String| {
            self.metrics
                .upstream_connect_errors
                .with_label_values(&[&self.name])
                .inc();
            UpstreamError::Connect(cause)
        };
        let conn = match conn.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => return Err(failed("connect timed out".to_string())),
        };
        self.metrics
            .upstream_connections
            .with_label_values(&[&self.name])
            .inc();
        Ok(conn)
    }

    async fn open(&self) -> io::Result<Conn> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                // A full listen backlog answers a non-blocking connect with
                // EAGAIN: the worker is busy, not gone. Try again, as a
                // blocking connect would wait (bounded by the timeout).
                let mut pause = Duration::from_millis(1);
                loop {
                    match tokio::net::UnixStream::connect(path).await {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(50));
                        }
                        r => return Ok(Conn::Unix(r?)),
                    }
                }
            }
            Endpoint::Tcp { host, port } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Ok(Conn::Tcp(stream))
            }
        }
    }

    /// A health check on a connection of its own: never one of the pool's
    /// (whose owner may be another serving thread), never kept.
    async fn probe(&self, head: &Head<'_>) -> Result<bool, UpstreamError> {
        let conn = Box::pin(self.open())
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let resp = exchange(conn, head, RequestBody::empty(), None)
            .await
            .map_err(|(e, _)| e)?;
        let ok = resp.status().is_success();
        // Read the (tiny) body so the worker sees a clean exchange; a worker
        // answering with more than a health check's worth is not read on.
        let _ = http_body_util::Limited::new(resp.into_body(), PROBE_BODY_LIMIT)
            .collect()
            .await;
        Ok(ok)
    }

    /// Sends a request on a pooled connection, or a new one. A request that
    /// a stale pooled connection could not take is sent again on another.
    async fn send(
        self: Arc<Self>,
        head: &Head<'_>,
        mut body: RequestBody,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let (conn, reused) = match self.take_idle() {
                Some(c) => (c, true),
                // Boxed: connecting is rare, and its future is large; inline,
                // every parked request would carry its size.
                None => (Box::pin(self.connect()).await?, false),
            };
            match exchange(conn, head, body, Some(&self)).await {
                Ok(resp) => return Ok(resp),
                // Not a byte taken: the pooled connection was gone already.
                Err((e, Some(back))) if reused => {
                    tracing::debug!(worker = %self.name, cause = %e, "stale pooled connection; sending on another");
                    body = back;
                }
                // A new connection that takes nothing: as good as refused.
                Err((e, Some(_))) => return Err(UpstreamError::Connect(e.to_string())),
                Err((e, None)) => return Err(e),
            }
        }
    }
}

/// The most of a health check's answer body that is read.
const PROBE_BODY_LIMIT: usize = 64 << 10;

/// A request's head on its way to a worker, borrowed from the proxy, which
/// keeps it for a retry on another worker (no copy per attempt).
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    /// The request target exactly as the client sent it.
    pub target: &'a str,
    pub headers: &'a RequestHeaders,
    /// The body's length as the client declared it (`ClientRequest::length`).
    pub length: Option<u64>,
    /// The `X-Forwarded-For` and `-Proto` the worker gets, in place of any
    /// in `headers`.
    pub forwarded: Option<h1::Forwarded<'a>>,
    /// How the answer's headers are wanted: as lines when the edge writes
    /// them to an HTTP/1 client itself.
    pub answer_headers: h1::AnswerHeaders,
}

/// What a failed exchange gives back: the error, and the body when the
/// connection took none of the request.
type ExchangeError = (UpstreamError, Option<RequestBody>);

/// One request and its answer's head on `conn`.
async fn exchange(
    mut conn: Conn,
    head: &Head<'_>,
    body: RequestBody,
    pool: Option<&Arc<WorkerConns>>,
) -> Result<Response<PooledBody>, ExchangeError> {
    let mut buf = BytesMut::new();
    // Boxed: sending needs the request and its framing state, waiting for
    // the answer needs neither; a parked long-poll then holds only what
    // waiting takes.
    let sent = Box::pin(send_request(&mut conn, head, body, &mut buf)).await?;
    let answer = h1::read_head(&mut conn, &mut buf, head.method, head.answer_headers);
    let got = match sent.broken {
        None => answer.await,
        // Refused mid-body: the answer is there already, or not at all.
        Some(_) => tokio::time::timeout(EARLY_ANSWER_WAIT, answer)
            .await
            .unwrap_or(Err(AnswerError::ClosedBeforeAnswer)),
    };
    let broken = sent.broken.is_some();
    let answer = match (got, sent.broken) {
        (Ok(answer), _) => answer,
        (Err(_), Some(e)) => return Err((UpstreamError::Failed(e), None)),
        (Err(e), None) => return Err((UpstreamError::Failed(e.to_string()), None)),
    };
    // A connection whose request body was cut short cannot be reused.
    let reusable = answer.keep_alive && !broken && !sent.answered_early;
    let back = pool.cloned().filter(|_| reusable);
    let mut resp = Response::new(PooledBody {
        reading: None,
        lines: answer.lines,
    });
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = answer.headers;
    if answer.framing.is_done() {
        if buf.is_empty()
            && let Some(pool) = back
        {
            pool.put_back(conn);
        }
        http1::release(&mut buf);
        return Ok(resp);
    }
    // Whatever of the body came with the head is handed out first.
    resp.body_mut().reading = Some(Reading {
        conn,
        buf,
        framing: answer.framing,
        back,
    });
    Ok(resp)
}

/// How sending a request ended, when it did not fail outright.
struct Sent {
    /// The worker answered before taking the whole body.
    answered_early: bool,
    /// Writing the body failed; the worker may have answered first.
    broken: Option<String>,
}

/// Writes the request head and streams its body, unless the worker answers
/// first (refusing an upload, say): then what it sent is in `buf`.
async fn send_request(
    conn: &mut Conn,
    head: &Head<'_>,
    mut body: RequestBody,
    buf: &mut BytesMut,
) -> Result<Sent, ExchangeError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| -> ExchangeError {
        (UpstreamError::Failed(format!("{what}: {e}")), None)
    };
    let framing = RequestFraming::of(head.length, body.is_end_stream());
    let encoded = h1::encode_head(
        head.method,
        head.target,
        head.headers,
        head.forwarded,
        framing,
    );
    let mut written = 0;
    // A body already here (a small JSON event, typically) goes out with the
    // head in one write.
    let mut first = Bytes::new();
    let mut took_first = false;
    let mut body_done = framing == RequestFraming::Empty;
    if !body_done {
        match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                took_first = true;
                first = frame.into_data().unwrap_or_default();
                body_done = body.is_end_stream();
            }
            Some(None) => body_done = true,
            Some(Some(Err(e))) => return Err(failed("reading the request body", &e)),
            None => {}
        }
    }
    let (size, end) = http1::chunk_frame(&first, framing == RequestFraming::Chunked);
    let last = last_chunk(body_done, framing);
    let sent =
        h1::write_at_turn_end(conn, [&encoded, &size, &first, end, last], &mut written).await;
    drop(encoded);
    if let Err(e) = sent {
        // Nothing taken: the worker saw nothing and the request is whole.
        let back = (written == 0 && !took_first).then_some(body);
        return Err((
            UpstreamError::Failed(format!("writing the request: {e}")),
            back,
        ));
    }
    let mut sent = Sent {
        answered_early: false,
        broken: None,
    };
    // Whether an answer arriving now could mean the worker refuses the
    // rest: until one shows it does not (a 1xx-3xx status: the worker reads
    // on, as Nginx's `return` does, and the body goes on to the end).
    let mut watch = true;
    while !body_done {
        let next = watching(conn, buf, &mut watch, |_, cx| {
            Pin::new(&mut body).poll_frame(cx)
        });
        let Some(frame) = next
            .await
            .map_err(|e| failed("reading while sending", &e))?
        else {
            sent.answered_early = true;
            break;
        };
        let data = match frame {
            None => {
                body_done = true;
                Bytes::new()
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) if !d.is_empty() => {
                    body_done = body.is_end_stream();
                    d
                }
                // Trailers are not passed on: Synapse reads none.
                _ => continue,
            },
            Some(Err(e)) => return Err(failed("reading the request body", &e)),
        };
        let (size, end) = http1::chunk_frame(&data, framing == RequestFraming::Chunked);
        let bufs = [&size[..], &data[..], end, last_chunk(body_done, framing)];
        let mut at = http1::Cursor::default();
        let write = watching(conn, buf, &mut watch, |conn, cx| {
            http1::poll_write_slices(conn, cx, &bufs, &mut at, &mut written)
        });
        match write
            .await
            .map_err(|e| failed("reading while sending", &e))?
        {
            Some(Ok(())) => {}
            None => {
                sent.answered_early = true;
                break;
            }
            // The worker may have answered and closed before reading it
            // all: its answer, if any, is still there to read.
            Some(Err(e)) => {
                sent.broken = Some(format!("writing the request body: {e}"));
                break;
            }
        }
    }
    Ok(sent)
}

/// Drives `step` to completion while watching for the worker answering
/// meanwhile: `None` when that answer refuses the rest of the body (see
/// [`h1::early_verdict`]); once an answer shows the worker reads on, it
/// stops watching and what it read stays in `buf` for [`h1::read_head`].
async fn watching<T>(
    conn: &mut Conn,
    buf: &mut BytesMut,
    watch: &mut bool,
    mut step: impl FnMut(&mut Conn, &mut Context<'_>) -> Poll<T>,
) -> std::io::Result<Option<T>> {
    loop {
        let polled = std::future::poll_fn(|cx| {
            if *watch && let Poll::Ready(r) = h1::poll_early_answer(conn, cx, buf) {
                return Poll::Ready(Err(r));
            }
            step(conn, cx).map(Ok)
        })
        .await;
        match polled {
            Ok(out) => return Ok(Some(out)),
            Err(Err(e)) => return Err(e),
            Err(Ok(n)) => match h1::early_verdict(buf, n) {
                h1::Early::Refused => return Ok(None),
                h1::Early::ReadsOn => *watch = false,
                h1::Early::Unknown => {}
            },
        }
    }
}

/// How long to look for a worker's answer after it stopped taking the body.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// The end of a chunked body, once its last data is out.
fn last_chunk(body_done: bool, framing: RequestFraming) -> &'static [u8] {
    if body_done && framing == RequestFraming::Chunked {
        b"0\r\n\r\n"
    } else {
        b""
    }
}

/// A worker's response body, read from the connection as the client takes
/// it; the connection returns to its pool when the body is done, and closes
/// if the body is abandoned.
pub struct PooledBody {
    reading: Option<Reading>,
    /// The answer's header lines, when they were wanted as lines: the
    /// response's `HeaderMap` then holds only what the edge adds.
    lines: Option<Box<h1::PassedLines>>,
}

struct Reading {
    conn: Conn,
    buf: BytesMut,
    framing: BodyFraming,
    /// Where the connection goes when the body is done; `None` when it may
    /// not be reused.
    back: Option<Arc<WorkerConns>>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish()
    }
}

/// Why a worker's response body stopped.
pub type BodyError = AnswerError;

impl PooledBody {
    /// The worker's header lines, to be written before the response's own
    /// headers (see [`h1::AnswerHeaders::Lines`]).
    pub fn header_lines(&self) -> Option<&h1::PassedLines> {
        self.lines.as_deref()
    }

    fn finish(&mut self) {
        if let Some(mut r) = self.reading.take()
            && r.buf.is_empty()
        {
            if let Some(pool) = r.back {
                pool.put_back(r.conn);
            }
            http1::release(&mut r.buf);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(r) = this.reading.as_mut() else {
                return Poll::Ready(None);
            };
            match r.framing.decode(&mut r.buf) {
                Ok(Decoded::Data(data)) => {
                    // Done when the last byte goes out: hyper stops polling
                    // a body whose length is reached.
                    if r.framing.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.reading = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match r.conn.poll_read_body(cx, &mut r.buf, &r.framing) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let until_close = r.framing == BodyFraming::UntilClose;
                    this.reading = None;
                    return Poll::Ready(if until_close {
                        None
                    } else {
                        Some(Err(AnswerError::ClosedEarly))
                    });
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.reading = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.as_ref().is_none_or(|r| r.framing.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reading {
            None => SizeHint::with_exact(0),
            Some(r) => match r.framing.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
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

    /// Sends a request to a worker.
    pub fn send<'a>(
        &self,
        worker: WorkerId,
        head: &'a Head<'a>,
        body: RequestBody,
    ) -> impl Future<Output = Result<Response<PooledBody>, UpstreamError>> + Send + 'a {
        use futures_util::future::{Either, ready};
        // Not an async fn: the body moves straight into the pool's future
        // instead of being kept twice in a parked request's state.
        match self.pools.get(worker.0 as usize).cloned().flatten() {
            Some(pool) => Either::Left(pool.send(head, body)),
            None => Either::Right(ready(Err(UpstreamError::BadTarget))),
        }
    }
}

impl Upstreams {
    /// `GET /health` on a fresh connection to the worker: `Ok(true)` when
    /// it answers 2xx.
    pub async fn probe(&self, worker: WorkerId, head: &Head<'_>) -> Result<bool, UpstreamError> {
        let Some(Some(pool)) = self.pools.get(worker.0 as usize) else {
            return Err(UpstreamError::BadTarget);
        };
        pool.probe(head).await
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
