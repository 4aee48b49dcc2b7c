//! Streaming bodies: the request body on its way to a worker (counted
//! against the size limit, its progress noted for the response timeout),
//! and the response body on its way back. Neither is ever buffered whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

/// Shared between a request body and the code waiting for the response:
/// when the body last made progress, and whether it ran over the limit.
#[derive(Debug)]
pub struct BodyProgress {
    start: Instant,
    last_ms: AtomicU64,
    exceeded: AtomicBool,
    /// A body handed back unread by a failed attempt, for a retry.
    unread: Mutex<Option<Incoming>>,
}

impl BodyProgress {
    pub fn new() -> Arc<BodyProgress> {
        Arc::new(BodyProgress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            exceeded: AtomicBool::new(false),
            unread: Mutex::new(None),
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

    /// The client's body, if an attempt gave it back without having sent
    /// any of it: only then may the request be tried on another worker.
    pub fn take_unread(&self) -> Option<Incoming> {
        self.unread.lock().ok()?.take()
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("reading the request body from the client: {0}")]
    Client(#[from] hyper::Error),
}

/// A client's request body streamed to a worker, cut off past `limit`.
/// Dropped before any of it was sent, it hands the client's body back (see
/// [`BodyProgress::take_unread`]).
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    sent_data: bool,
    progress: Option<Arc<BodyProgress>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, progress: Arc<BodyProgress>) -> Self {
        RequestBody {
            inner: Some(inner),
            limit,
            seen: 0,
            sent_data: false,
            progress: Some(progress),
        }
    }

    /// No body (the edge's own requests, e.g. health checks).
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            limit: 0,
            seen: 0,
            sent_data: false,
            progress: None,
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.sent_data
            && let (Some(inner), Some(p)) = (self.inner.take(), &self.progress)
            && let Ok(mut slot) = p.unread.lock()
        {
            *slot = Some(inner);
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.sent_data = true;
            this.seen += data.len() as u64;
            if this.seen > this.limit {
                if let Some(p) = &this.progress {
                    p.exceeded.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(RequestBodyError::TooLarge(this.limit))));
            }
        }
        if polled.is_ready()
            && let Some(p) = &this.progress
        {
            p.touch();
        }
        polled.map_err(RequestBodyError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What the edge answers with: a worker's streamed body, or a small body
/// of its own (errors, health).
#[derive(Debug)]
pub enum ResponseBody {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    /// Collects the body (tests and small internal responses only).
    pub async fn collect_bytes(self) -> Result<Bytes, hyper::Error> {
        Ok(self.collect().await?.to_bytes())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(b) => b.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(b) => b.size_hint(),
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}
