//! Streaming bodies: the request body on its way to a worker (counted
//! against the size limit, its progress noted for the response timeout),
//! and the response body on its way back. Neither is ever buffered whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

/// How much of a request body the edge keeps a copy of while sending it, so
/// that a request whose worker fails can be sent to another one. Matrix
/// requests are small JSON; uploads are larger and are never replayed.
pub const REPLAY_LIMIT: usize = 64 << 10;

/// Shared between a request body and the code waiting for the response:
/// when the body last made progress, whether it ran over the limit, and the
/// body handed back by a failed attempt.
#[derive(Debug)]
pub struct BodyProgress {
    start: Instant,
    last_ms: AtomicU64,
    exceeded: AtomicBool,
    unsent: Mutex<Option<Unsent>>,
}

impl BodyProgress {
    /// `start`: when the request arrived.
    pub fn new(start: Instant) -> Arc<BodyProgress> {
        Arc::new(BodyProgress {
            start,
            last_ms: AtomicU64::new(0),
            exceeded: AtomicBool::new(false),
            unsent: Mutex::new(None),
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the body last moved (the start, if it never has).
    pub fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Whether the body was cut off for exceeding the limit.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    /// The whole body again, if the failed attempt gave it back: only then
    /// may the request be tried on another worker.
    pub fn take_unsent(&self) -> Option<Unsent> {
        self.unsent.lock().ok()?.take()
    }
}

/// A client's request body: none, read by the edge's own HTTP/1 server
/// from the connection, or an HTTP/2 stream's (hyper's).
#[derive(Debug)]
pub enum ClientBody {
    Empty,
    H1(crate::listeners::h1::ConnBody),
    H2(Incoming),
}

/// Why reading a client's body failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error(transparent)]
    H1(#[from] std::io::Error),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// A request body as yet unsent to the next worker: a copy of what an
/// earlier attempt sent, then the rest still to read from the client.
#[derive(Debug)]
pub struct Unsent {
    prefix: Bytes,
    rest: Option<ClientBody>,
}

impl From<ClientBody> for Unsent {
    fn from(body: ClientBody) -> Self {
        Unsent {
            prefix: Bytes::new(),
            rest: Some(body),
        }
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("reading the request body from the client: {0}")]
    Client(#[from] ClientBodyError),
}

/// A client's request body streamed to a worker, cut off past `limit`.
/// While what it has sent is small it keeps a copy, and when dropped (the
/// attempt over) it hands the whole body back for a retry
/// ([`BodyProgress::take_unsent`]); past [`REPLAY_LIMIT`] it cannot.
#[derive(Debug)]
pub struct RequestBody {
    prefix: Bytes,
    inner: Option<ClientBody>,
    kept: Option<BytesMut>,
    limit: u64,
    seen: u64,
    progress: Option<Arc<BodyProgress>>,
    counter: Option<prometheus::IntCounter>,
}

impl RequestBody {
    pub fn new(
        body: Unsent,
        limit: u64,
        progress: Arc<BodyProgress>,
        counter: Option<prometheus::IntCounter>,
    ) -> Self {
        RequestBody {
            prefix: body.prefix,
            inner: body.rest,
            kept: Some(BytesMut::new()),
            limit,
            seen: 0,
            progress: Some(progress),
            counter,
        }
    }

    /// No body (the edge's own requests, e.g. health checks).
    pub fn empty() -> Self {
        RequestBody {
            prefix: Bytes::new(),
            inner: None,
            kept: None,
            limit: 0,
            seen: 0,
            progress: None,
            counter: None,
        }
    }

    /// Counts and keeps a copy of data about to be sent.
    fn account(&mut self, data: &Bytes) -> Result<(), RequestBodyError> {
        self.seen += data.len() as u64;
        if let Some(c) = &self.counter {
            c.inc_by(data.len() as u64);
        }
        if self.seen > self.limit {
            if let Some(p) = &self.progress {
                p.exceeded.store(true, Ordering::Relaxed);
            }
            return Err(RequestBodyError::TooLarge(self.limit));
        }
        if let Some(kept) = &mut self.kept {
            if kept.len() + data.len() <= REPLAY_LIMIT {
                kept.extend_from_slice(data);
            } else {
                self.kept = None;
            }
        }
        Ok(())
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let (Some(mut kept), Some(p)) = (self.kept.take(), &self.progress) else {
            return;
        };
        kept.extend_from_slice(&self.prefix);
        if let Ok(mut slot) = p.unsent.lock() {
            *slot = Some(Unsent {
                prefix: kept.freeze(),
                rest: self.inner.take(),
            });
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let data = std::mem::take(&mut this.prefix);
            if let Err(e) = this.account(&data) {
                return Poll::Ready(Some(Err(e)));
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(p) => p,
        };
        if let Some(p) = &this.progress {
            p.touch();
        }
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.account(data)
                {
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => {
                this.inner = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let n = self.prefix.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + n);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}

/// Called when a response body is finished (or abandoned) with the number
/// of body bytes sent: counts them and writes the access log line.
pub struct Tap {
    bytes: u64,
    counter: Option<prometheus::IntCounter>,
    on_end: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Tap {
    pub fn new(
        counter: Option<prometheus::IntCounter>,
        on_end: Option<Box<dyn FnOnce(u64) + Send>>,
    ) -> Tap {
        Tap {
            bytes: 0,
            counter,
            on_end,
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(c) = &self.counter {
            c.inc_by(self.bytes);
        }
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("bytes", &self.bytes).finish()
    }
}

#[derive(Debug)]
enum Content {
    Upstream(crate::upstream::PooledBody),
    Full(Option<Bytes>),
}

/// What the edge answers with: a worker's streamed body, or a small body
/// of its own (errors, well-known...), optionally tapped.
#[derive(Debug)]
pub struct ResponseBody {
    content: Content,
    /// Inline, not boxed: one allocation fewer per response.
    tap: Option<Tap>,
}

impl ResponseBody {
    pub fn upstream(body: crate::upstream::PooledBody) -> Self {
        ResponseBody {
            content: Content::Upstream(body),
            tap: None,
        }
    }

    /// The worker's header lines, when the answer carries them as lines
    /// rather than in its `HeaderMap` (an HTTP/1 client's answers).
    pub fn header_lines(&self) -> Option<&crate::upstream::h1::PassedLines> {
        match &self.content {
            Content::Upstream(b) => b.header_lines(),
            Content::Full(_) => None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody {
            content: Content::Full(Some(bytes.into())),
            tap: None,
        }
    }

    pub fn empty() -> Self {
        ResponseBody {
            content: Content::Full(None),
            tap: None,
        }
    }

    pub fn tapped(mut self, tap: Tap) -> Self {
        self.tap = Some(tap);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = crate::upstream::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.content {
            Content::Upstream(b) => Pin::new(b).poll_frame(cx),
            Content::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(tap)) = (&polled, &mut this.tap)
            && let Some(d) = frame.data_ref()
        {
            tap.bytes += d.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.content {
            Content::Upstream(b) => b.is_end_stream(),
            Content::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.content {
            Content::Upstream(b) => b.size_hint(),
            Content::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Content::Full(None) => SizeHint::with_exact(0),
        }
    }
}
