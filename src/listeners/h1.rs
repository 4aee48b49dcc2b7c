//! The client-facing HTTP/1.1 server: read a request head, hand the request
//! to the proxy, write its answer, and again while the connection is kept
//! alive. HTTP/2 clients are handed to hyper (see `listeners`).
//!
//! Why not hyper's HTTP/1 server: it allocates an 8 KiB write buffer when a
//! connection starts and an 8 KiB read buffer at its first read, keeps both
//! for the connection's life (a parked long-poll held 19 KiB against
//! Nginx's 8), and passes every request body through a channel to a
//! dispatcher. Here a connection waiting for its next request, or for a
//! worker's answer, holds its socket and its small state and no buffer;
//! the request body is read from the socket by whoever sends it on.
//!
//! What the parser refuses, because a proxy that reads a request one way
//! while its worker reads it another is open to request smuggling (RFC 9112
//! section 6.3, 11.2): `Transfer-Encoding` together with `Content-Length`,
//! any transfer coding but a lone `chunked`, a `Content-Length` that is not
//! one plain number, `Transfer-Encoding` in HTTP/1.0, obsolete line folding
//! and spaces before a header's colon, a missing or repeated `Host`.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{OpenConnection, ServerSettings, count_client_timeout};
use crate::body::{ClientBody, REPLAY_LIMIT, ResponseBody};
use crate::conn_timer::ConnTimer;
use crate::http1::{
    BodyFraming, ChunkState, ConnectionOption, Cursor, Decoded, REQUEST_BODY_READ, chunk_frame,
    connection_options, make_room, poll_read_more, poll_write_slices, release,
};
use crate::proxy::{ClientConn, Proxy, matrix_error};
use crate::request::{ClientRequest, HeaderLines, RequestHeaders, Target};

/// The HTTP/2 connection preface. A cleartext client that starts with it
/// speaks HTTP/2 from its first byte (h2c with prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read of a request: a Matrix request head, bearer token and
/// all, is well under 1 KiB.
const FIRST_READ: usize = 4 << 10;
/// Header slots on the stack; a larger configured limit takes the heap.
const STACK_HEADERS: usize = 100;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// How long a connection closed with request body unread goes on reading
/// (and dropping) what the client still sends: closing at once would reset
/// the connection, and the client could lose the answer it was sent.
const LINGER: Duration = Duration::from_secs(2);

/// A client connection's transport.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when a read would find something (data or the client gone).
    /// Lets a waiting connection hold no read buffer.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ClientIo for tokio::net::TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl ClientIo for tokio::net::UnixStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    /// Readable when TLS has plaintext (or a close) already decrypted, or
    /// the socket has more: not a read per look, which would cost a system
    /// call and a buffer each time a waiting request's task is polled.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.get_mut();
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {
                tcp.poll_read_ready(cx)
            }
            // Something to read, or an error the read will report.
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// How a connection's HTTP/1 service ended.
pub enum Ended<I> {
    Closed,
    /// The client speaks HTTP/2: its connection and what was read of it.
    Http2(I, Bytes),
}

/// A connection's socket and what was read from it, shared between the
/// connection's loop and the body of the request it is serving (both run
/// in the connection's task: the lock is never contended).
struct Shared<I> {
    io: I,
    /// Read and not yet used. Released (no allocation) while waiting.
    buf: BytesMut,
    body: BodyState,
    /// How much of the current request's body has been handed on.
    body_given: u64,
    /// How much of a `100 Continue` owed to the client has been sent.
    continue_sent: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// The request has no body.
    None,
    Reading(BodyFraming),
    Done,
    /// Malformed, or the client left: the connection cannot go on.
    Failed,
}

impl<I> Shared<I> {
    /// A connection that has read nothing yet.
    fn new(io: I) -> Self {
        Shared {
            io,
            buf: BytesMut::new(),
            body: BodyState::None,
            body_given: 0,
            continue_sent: None,
        }
    }
}

type SharedConn<I> = Mutex<Shared<I>>;

fn lock<I>(conn: &SharedConn<I>) -> MutexGuard<'_, Shared<I>> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves HTTP/1.x on one client connection until it closes, goes idle,
/// the edge stops, or the client turns out to speak HTTP/2.
pub async fn serve<I: ClientIo>(
    io: I,
    client: ClientConn,
    proxy: &Proxy,
    settings: &ServerSettings,
    mut stop: watch::Receiver<bool>,
) -> Ended<I> {
    let conn = Arc::new(Mutex::new(Shared::new(io)));
    let mut open: Option<OpenConnection> = None;
    let mut first = true;
    loop {
        // The head is used up in the arm: a parked request's state holds
        // the proxy's future and nothing of the head beside it.
        let (req, keep_alive, version, is_head) = match next_head(
            &conn,
            &client.timer,
            settings,
            first,
            &mut stop,
        )
        .await
        {
            Next::Head(head) => {
                let facts = (head.keep_alive, head.version, head.method == Method::HEAD);
                (into_request(head, &conn), facts.0, facts.1, facts.2)
            }
            Next::Closed => break,
            Next::HeadTimedOut => {
                count_client_timeout(proxy, "header_read");
                tracing::debug!(peer = %client.peer, "request head not received in time");
                break;
            }
            Next::Http2 => {
                return match Arc::try_unwrap(conn) {
                    Ok(m) => {
                        let s = m.into_inner().unwrap_or_else(PoisonError::into_inner);
                        Ended::Http2(s.io, s.buf.freeze())
                    }
                    Err(_) => Ended::Closed,
                };
            }
            Next::Refuse(refusal) => {
                proxy
                    .metrics()
                    .rejected
                    .with_label_values(&[refusal.reason])
                    .inc();
                tracing::debug!(peer = %client.peer, reason = refusal.reason, "malformed request refused");
                let resp = matrix_error(refusal.status, refusal.errcode, refusal.message);
                if write_response(
                    &conn,
                    resp,
                    Version::HTTP_11,
                    false,
                    false,
                    settings.client_idle_timeout,
                )
                .await
                .is_ok()
                {
                    linger(&conn).await;
                }
                break;
            }
        };
        first = false;
        open.get_or_insert_with(|| OpenConnection::count(proxy, &client, "h1"));
        // The proxy's future (about 3 KiB) is built where it is awaited:
        // built in the arm above, it was copied whole twice more on its
        // way into this task's state, each request.
        let handled = WhileClientStays {
            conn: &conn,
            watching: true,
            serving: proxy.handle(req, &client),
        };
        let Some(resp) = handled.await else {
            // The client left: dropping the request cancelled its exchange.
            break;
        };
        let body_unread = !matches!(lock(&conn).body, BodyState::None | BodyState::Done);
        let keep_alive = keep_alive && !body_unread && !*stop.borrow();
        match write_response(
            &conn,
            resp,
            version,
            is_head,
            keep_alive,
            settings.client_idle_timeout,
        )
        .await
        {
            Ok(true) if keep_alive => {}
            Ok(_) => {
                if body_unread {
                    linger(&conn).await;
                } else {
                    shutdown(&conn).await;
                }
                break;
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    count_client_timeout(proxy, "send_stall");
                }
                tracing::debug!(peer = %client.peer, error = %e, "writing a response failed");
                break;
            }
        }
    }
    Ended::Closed
}

/// What waiting for the next request gave.
enum Next {
    Head(ParsedHead),
    Closed,
    /// The header-read timeout passed before a whole head arrived.
    HeadTimedOut,
    Http2,
    Refuse(Refusal),
}

/// Waits for the next request head: up to the idle timeout for its first
/// byte (the header-read timeout on a new connection), then up to the
/// header-read timeout for the rest. Between requests a stopping edge
/// closes the connection.
async fn next_head<I: ClientIo>(
    conn: &SharedConn<I>,
    timer: &ConnTimer,
    settings: &ServerSettings,
    first: bool,
    stop: &mut watch::Receiver<bool>,
) -> Next {
    // Read from the clock when the connection first waits: a pipelined
    // head already buffered needs no clock at all.
    let mut idle_deadline: Option<Instant> = None;
    let mut head_deadline: Option<Instant> = None;
    // How far the buffer was searched for the head's end: a head is parsed
    // once it is all there, not again at every read of a slow client.
    let mut searched = 0;
    loop {
        {
            let mut s = lock(conn);
            if !s.buf.is_empty() {
                if first && H2_PREFACE.starts_with(&s.buf[..s.buf.len().min(H2_PREFACE.len())]) {
                    if s.buf.len() >= H2_PREFACE.len() {
                        return Next::Http2;
                    }
                } else {
                    // The first bytes are parsed at once too: garbage (TLS
                    // on a plain port, say) is refused without waiting.
                    let worth_parsing = searched == 0 || head_ends_in(&s.buf, searched);
                    searched = s.buf.len();
                    let parsed = if worth_parsing {
                        parse_head(&s.buf, settings.max_headers)
                    } else {
                        Ok(None)
                    };
                    match parsed {
                        Ok(Some((head, n))) => {
                            s.buf.advance(n);
                            return Next::Head(head);
                        }
                        Ok(None) if s.buf.len() >= settings.max_header_size => {
                            return Next::Refuse(Refusal::HEAD_TOO_LARGE);
                        }
                        Ok(None) => {}
                        Err(refusal) => return Next::Refuse(refusal),
                    }
                }
                head_deadline.get_or_insert_with(|| Instant::now() + settings.header_read_timeout);
            }
        }
        let idle = head_deadline.is_none();
        let deadline = match head_deadline {
            Some(d) => d,
            None => *idle_deadline.get_or_insert_with(|| {
                Instant::now()
                    + if first {
                        settings.header_read_timeout
                    } else {
                        settings.client_idle_timeout
                    }
            }),
        };
        timer.set(deadline);
        let limit = settings.max_header_size;
        tokio::select! {
            biased;
            read = std::future::poll_fn(|cx| poll_read_head(conn, cx, limit)) => match read {
                Ok(0) | Err(_) => return Next::Closed,
                Ok(_) => {}
            },
            // An idle keep-alive connection ending is routine; a client
            // that connected or began a head and then stalled is not.
            _ = timer.expired() => return if idle && !first { Next::Closed } else { Next::HeadTimedOut },
            _ = stop.wait_for(|s| *s), if idle => return Next::Closed,
        }
    }
}

/// Whether `buf` holds an empty line (the end of a head), looking from
/// just before `from` (the end may straddle two reads).
fn head_ends_in(buf: &[u8], from: usize) -> bool {
    let mut at = from.saturating_sub(2);
    while let Some(i) = buf
        .get(at..)
        .and_then(|b| b.iter().position(|&c| c == b'\n'))
    {
        let nl = at + i;
        match buf.get(nl + 1..nl + 3) {
            Some([b'\n', _]) | Some([b'\r', b'\n']) => return true,
            None if buf.get(nl + 1) == Some(&b'\n') => return true,
            _ => at = nl + 1,
        }
    }
    false
}

/// Reads more of a request head. A connection with nothing buffered waits
/// for readability before taking a buffer.
fn poll_read_head<I: ClientIo>(
    conn: &SharedConn<I>,
    cx: &mut Context<'_>,
    limit: usize,
) -> Poll<io::Result<usize>> {
    let mut guard = lock(conn);
    let s = &mut *guard;
    if s.buf.is_empty() {
        ready!(s.io.poll_readable(cx))?;
    }
    if s.buf.capacity() - s.buf.len() < 512 {
        // Doubling, but no further than the head may grow.
        let more = s
            .buf
            .len()
            .max(FIRST_READ)
            .min(limit.saturating_sub(s.buf.len()).max(512));
        make_room(&mut s.buf, more);
    }
    let read = tokio_util::io::poll_read_buf(Pin::new(&mut s.io), cx, &mut s.buf);
    if read.is_pending() && s.buf.is_empty() {
        // Readiness was stale: wait without the buffer.
        release(&mut s.buf);
    }
    read
}

/// The request for the proxy, its body read from `conn`.
fn into_request<I: ClientIo>(head: ParsedHead, conn: &Arc<SharedConn<I>>) -> ClientRequest {
    let mut s = lock(conn);
    s.body = match head.body {
        Some(framing) if !framing.is_done() => BodyState::Reading(framing),
        _ => BodyState::None,
    };
    s.body_given = 0;
    s.continue_sent = (head.expect_continue && s.body != BodyState::None).then_some(0);
    // A request waiting for its worker holds no read buffer.
    if s.buf.is_empty() {
        release(&mut s.buf);
    }
    let body = match s.body {
        BodyState::None => ClientBody::Empty,
        _ => ClientBody::H1(ConnBody { conn: conn.clone() }),
    };
    drop(s);
    let length = match head.body {
        Some(BodyFraming::Length(n)) => Some(n),
        _ => None,
    };
    ClientRequest {
        method: head.method,
        target: head.target,
        version: head.version,
        headers: head.headers,
        length,
        body,
    }
}

pin_project_lite::pin_project! {
    /// Runs `serving` (the proxy serving a request) unless the client
    /// leaves first: `None` then, and `serving` is dropped, cancelling the
    /// worker's exchange (a long-poll whose client is gone ends at once).
    /// Hand-written: an async fn would hold `serving` twice.
    struct WhileClientStays<'c, I, F> {
        conn: &'c SharedConn<I>,
        watching: bool,
        #[pin]
        serving: F,
    }
}

impl<I: ClientIo, F: Future> Future for WhileClientStays<'_, I, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.serving.poll(cx) {
            return Poll::Ready(Some(out));
        }
        if *this.watching {
            match poll_client_gone(this.conn, cx) {
                Poll::Ready(true) => return Poll::Ready(None),
                Poll::Ready(false) => *this.watching = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

/// Whether the client closed its connection while its request is served.
/// `false` once it sent more (a pipelined request, kept for later).
fn poll_client_gone<I: ClientIo>(conn: &SharedConn<I>, cx: &mut Context<'_>) -> Poll<bool> {
    let mut guard = lock(conn);
    let s = &mut *guard;
    if matches!(s.body, BodyState::Reading(_)) {
        // The body's reader sees the client leave; and woken by the
        // request's progress, this looks again once the body is in.
        return Poll::Pending;
    }
    if !s.buf.is_empty() {
        return Poll::Ready(false);
    }
    if ready!(s.io.poll_readable(cx)).is_err() {
        return Poll::Ready(true);
    }
    match poll_read_more(&mut s.io, cx, &mut s.buf, FIRST_READ) {
        Poll::Pending => {
            release(&mut s.buf);
            Poll::Pending
        }
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(true),
        Poll::Ready(Ok(_)) => Poll::Ready(false),
    }
}

/// A request body read from the client's connection as the worker takes
/// it: no channel, no task, no copy beyond the socket read.
pub struct ConnBody {
    conn: Arc<dyn ReadBody>,
}

impl std::fmt::Debug for ConnBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnBody")
            .field("remaining", &self.conn.remaining())
            .finish()
    }
}

trait ReadBody: Send + Sync {
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>>;
    /// Bytes left when known (0 once the body ended).
    fn remaining(&self) -> Option<u64>;
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn
            .poll_data(cx)
            .map(|d| d.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.conn.remaining() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.conn.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl<I: ClientIo> ReadBody for SharedConn<I> {
    fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let mut guard = lock(self);
        let s = &mut *guard;
        if let Some(mut sent) = s.continue_sent {
            // The client waits for this before it sends its body.
            while sent < CONTINUE.len() {
                match Pin::new(&mut s.io).poll_write(cx, &CONTINUE[sent..]) {
                    Poll::Pending => {
                        s.continue_sent = Some(sent);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(0)) => {
                        s.body = BodyState::Failed;
                        return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => {
                        s.body = BodyState::Failed;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            s.continue_sent = Some(sent);
            if let Err(e) = ready!(Pin::new(&mut s.io).poll_flush(cx)) {
                s.body = BodyState::Failed;
                return Poll::Ready(Some(Err(e)));
            }
            s.continue_sent = None;
        }
        loop {
            let framing = match &mut s.body {
                BodyState::Reading(framing) => framing,
                BodyState::None | BodyState::Done => return Poll::Ready(None),
                BodyState::Failed => {
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the request body was cut off",
                    ))));
                }
            };
            match framing.decode(&mut s.buf) {
                Ok(Decoded::Data(data)) => {
                    if framing.is_done() {
                        s.body = BodyState::Done;
                    }
                    s.body_given += data.len() as u64;
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Decoded::Done) => {
                    s.body = BodyState::Done;
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    s.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed request body: {e}"),
                    ))));
                }
            }
            // Within the part of a body that a failed attempt can still
            // replay, a read asks for no more than that part: a larger
            // first read would end the replay copy at once.
            let most = if s.body_given < REPLAY_LIMIT as u64 {
                REPLAY_LIMIT
            } else {
                REQUEST_BODY_READ
            };
            let want = framing.useful_read(most);
            match ready!(poll_read_more(&mut s.io, cx, &mut s.buf, want)) {
                Ok(0) => {
                    s.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed its connection before its request body ended",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    s.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn remaining(&self) -> Option<u64> {
        match lock(self).body {
            BodyState::Reading(framing) => framing.remaining(),
            BodyState::None | BodyState::Done => Some(0),
            BodyState::Failed => None,
        }
    }
}

/// A request head as the proxy takes it, and how its connection goes on.
#[derive(Debug)]
struct ParsedHead {
    method: Method,
    target: Target,
    version: Version,
    headers: RequestHeaders,
    /// How the body is framed; `None`: no body.
    body: Option<BodyFraming>,
    keep_alive: bool,
    expect_continue: bool,
}

/// Why a request is refused before it reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    errcode: &'static str,
    message: &'static str,
    /// The `synapse_edge_requests_rejected_total` reason.
    reason: &'static str,
}

impl Refusal {
    const fn bad(message: &'static str) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            errcode: "M_BAD_REQUEST",
            message,
            reason: "malformed_request",
        }
    }

    const HEAD_TOO_LARGE: Refusal = Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        errcode: "M_TOO_LARGE",
        message: "the request's headers are too large",
        reason: "headers_too_large",
    };

    const TOO_MANY_HEADERS: Refusal = Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        errcode: "M_TOO_LARGE",
        message: "the request has too many header lines",
        reason: "headers_too_large",
    };

    const CODING: Refusal = Refusal {
        status: StatusCode::NOT_IMPLEMENTED,
        errcode: "M_UNRECOGNIZED",
        message: "only the chunked transfer coding is supported",
        reason: "malformed_request",
    };

    const EXPECTATION: Refusal = Refusal {
        status: StatusCode::EXPECTATION_FAILED,
        errcode: "M_UNRECOGNIZED",
        message: "only `Expect: 100-continue` is supported",
        reason: "malformed_request",
    };
}

/// Parses a request head at the start of `buf`.
fn parse_head(buf: &[u8], max_headers: usize) -> Result<Option<(ParsedHead, usize)>, Refusal> {
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap = vec![MaybeUninit::<httparse::Header<'_>>::uninit(); max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TOO_MANY_HEADERS),
        // A well-formed request line naming another version (not a target
        // with a space in it, which also ends up here).
        Err(httparse::Error::Version) if names_a_version(buf) => {
            return Err(Refusal {
                status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                errcode: "M_UNRECOGNIZED",
                message: "only HTTP/1.0, HTTP/1.1 and HTTP/2 are served",
                reason: "malformed_request",
            });
        }
        Err(_) => return Err(Refusal::bad("the request is not valid HTTP/1.1")),
    };
    // One copy of the head, exactly its size: the target and the header
    // values are slices of it, and the read buffer can go.
    let head = Bytes::copy_from_slice(&buf[..len]);
    let slice = |part: &[u8]| head.slice(offset_in(buf, part));
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::bad("invalid method"))?;
    let target = req.path.unwrap_or_default();
    let target =
        Target::http1(slice(target.as_bytes())).ok_or(Refusal::bad("invalid request target"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // The lines as they came, slices of the head: no map is built (the
    // proxy looks at a few and passes the rest on).
    let mut lines = HeaderLines::new(head.clone(), req.headers.len());
    // What the connection's own headers say, read on the way (a compare
    // of the name's length, then of its bytes) rather than looked up
    // afterwards.
    let (mut hosts, mut close, mut keep) = (0, false, false);
    let mut framing = FramingLines::default();
    // The first `Expect`: whether it asks for `100-continue`.
    let mut expect: Option<bool> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            4 if is(b"host") => hosts += 1,
            6 if is(b"expect") && expect.is_none() => {
                expect = Some(h.value.eq_ignore_ascii_case(b"100-continue"));
            }
            10 if is(b"connection") => {
                for option in connection_options(h.value) {
                    close |= option == ConnectionOption::Close;
                    keep |= option == ConnectionOption::KeepAlive;
                }
            }
            14 if is(b"content-length") => framing.length(h.value),
            17 if is(b"transfer-encoding") => framing.coding(h.value),
            _ => {}
        }
        // `httparse` checked names and values by `http`'s own rules.
        lines
            .push(offset_in(buf, name), offset_in(buf, h.value))
            .ok_or(Refusal::HEAD_TOO_LARGE)?;
    }
    let headers = RequestHeaders::Lines(lines);
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11) {
        return Err(Refusal::bad(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let body = framing.judge(version)?;
    let keep_alive = match version {
        Version::HTTP_10 => keep && !close,
        _ => !close,
    };
    let expect_continue = match expect {
        None => false,
        Some(true) => version == Version::HTTP_11,
        Some(false) => return Err(Refusal::EXPECTATION),
    };
    Ok(Some((
        ParsedHead {
            method,
            target,
            version,
            headers,
            body,
            keep_alive,
            expect_continue,
        },
        len,
    )))
}

/// Whether the request line is three tokens, the last one `HTTP/...`.
fn names_a_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let tokens: SmallVec<[&[u8]; 4]> = line.split(|&b| b == b' ').take(4).collect();
    tokens.len() == 3 && tokens[2].starts_with(b"HTTP/")
}

/// Where `part`, a slice of `buf`, lies in it.
fn offset_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

/// A request's framing headers, gathered line by line as the head is read
/// and judged together at its end (RFC 9112 section 6): every ambiguous
/// case is refused instead of guessed at.
#[derive(Default)]
struct FramingLines<'a> {
    /// `Transfer-Encoding` lines, and the first one's value.
    codings: usize,
    coding: &'a [u8],
    /// `Content-Length` lines, the length they agree on, and the first
    /// problem with them.
    lengths: usize,
    length: Option<u64>,
    bad_length: Option<&'static str>,
}

impl<'a> FramingLines<'a> {
    fn coding(&mut self, value: &'a [u8]) {
        if self.codings == 0 {
            self.coding = value;
        }
        self.codings += 1;
    }

    fn length(&mut self, value: &[u8]) {
        self.lengths += 1;
        if self.bad_length.is_some() {
            return;
        }
        match parse_length(value) {
            None => self.bad_length = Some("Content-Length must be one number"),
            Some(n) if self.length.is_some_and(|l| l != n) => {
                self.bad_length = Some("conflicting Content-Length headers");
            }
            Some(n) => self.length = Some(n),
        }
    }

    /// How the body is framed; `None`: no body.
    fn judge(self, version: Version) -> Result<Option<BodyFraming>, Refusal> {
        if self.codings > 0 {
            if version == Version::HTTP_10 {
                return Err(Refusal::bad("Transfer-Encoding is not allowed in HTTP/1.0"));
            }
            if self.lengths > 0 {
                return Err(Refusal::bad(
                    "a request may not have both Transfer-Encoding and Content-Length",
                ));
            }
            if self.codings > 1 || !self.coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::CODING);
            }
            return Ok(Some(BodyFraming::Chunked(ChunkState::Size)));
        }
        if let Some(why) = self.bad_length {
            return Err(Refusal::bad(why));
        }
        Ok(self.length.map(BodyFraming::Length))
    }
}

/// Digits only: no sign, no spaces, no list.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimited {
    /// No body (HEAD, 1xx, 204, 304).
    Bodyless,
    Length(u64),
    Chunked,
    /// By closing the connection (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes a response: the head and as much body as is already there in one
/// write, then the rest as it comes. `Ok(false)` when the body could not be
/// sent whole (the connection must close: the client sees it cut short).
async fn write_response<I: ClientIo>(
    conn: &SharedConn<I>,
    resp: Response<ResponseBody>,
    version: Version,
    is_head: bool,
    keep_alive: bool,
    stall: Duration,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let delimited = if is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Delimited::Bodyless
    } else if let Some(n) = body.size_hint().exact() {
        Delimited::Length(n)
    } else if version == Version::HTTP_11 {
        Delimited::Chunked
    } else {
        Delimited::Close
    };
    let keep_alive = keep_alive && delimited != Delimited::Close;
    let mut head = Vec::with_capacity(160 + parts.headers.len() * 48);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    let keep_length = delimited == Delimited::Bodyless && status != StatusCode::NO_CONTENT;
    // The worker's lines as it wrote them (hop-by-hop and framing already
    // left out), unless the edge sets a header of the same name itself.
    let mut has_date = false;
    if let Some(lines) = body.header_lines() {
        has_date = lines.has_date();
        for (name, line) in lines.iter() {
            // The edge's own are few (HSTS): comparing names beats parsing
            // each of the worker's into a `HeaderName` to look it up.
            if parts
                .headers
                .keys()
                .any(|own| own.as_str().as_bytes().eq_ignore_ascii_case(name))
            {
                continue;
            }
            head.extend_from_slice(line);
            head.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in &parts.headers {
        let framing_header = name == CONTENT_LENGTH || name == TRANSFER_ENCODING;
        if (framing_header && !(keep_length && name == CONTENT_LENGTH))
            || name == CONNECTION
            || name.as_str() == "keep-alive"
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !has_date && !parts.headers.contains_key(DATE) {
        head.extend_from_slice(b"date: ");
        push_date(&mut head);
        head.extend_from_slice(b"\r\n");
    }
    let length = match delimited {
        Delimited::Length(n) => Some(n),
        // A HEAD answer of the edge's own tells the length of its GET.
        Delimited::Bodyless if is_head && !parts.headers.contains_key(CONTENT_LENGTH) => {
            body.size_hint().exact().filter(|&n| n > 0)
        }
        _ => None,
    };
    if let Some(n) = length {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if delimited == Delimited::Chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        head.extend_from_slice(b"connection: keep-alive\r\n");
    }
    head.extend_from_slice(b"\r\n");
    if delimited == Delimited::Bodyless {
        drop(body);
        write_all(conn, &[&head], stall).await?;
        return Ok(true);
    }
    let mut head = Some(head);
    let mut sent: u64 = 0;
    loop {
        // The first piece at once if it is there: then the head and a small
        // body go out in one write.
        let polled = if head.is_some() {
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await
        } else {
            Poll::Ready(std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await)
        };
        let (data, end) = match polled {
            Poll::Pending => (Bytes::new(), false),
            Poll::Ready(None) => (Bytes::new(), true),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    (data, end)
                }
                // Trailers are not passed on.
                Err(_) => continue,
            },
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "a response body failed midway: the client sees it cut short");
                if let Some(h) = head.take() {
                    write_all(conn, &[&h], stall).await?;
                }
                return Ok(false);
            }
        };
        sent += data.len() as u64;
        let (size, crlf) = chunk_frame(&data, delimited == Delimited::Chunked);
        let last: &[u8] = if end && delimited == Delimited::Chunked {
            b"0\r\n\r\n"
        } else {
            b""
        };
        let h = head.take().unwrap_or_default();
        write_all(conn, &[&h, &size, &data, crlf, last], stall).await?;
        if let Delimited::Length(n) = delimited
            && (sent > n || (end && sent != n))
        {
            return Ok(false);
        }
        if end {
            return Ok(delimited != Delimited::Close);
        }
    }
}

/// Writes every slice and flushes (TLS buffers what it encrypts). A
/// client that takes none of it for `stall` is given up on (Nginx's
/// `send_timeout`): it would hold its worker's answer, and the worker's
/// connection, for as long as it liked.
async fn write_all<I: ClientIo>(
    conn: &SharedConn<I>,
    bufs: &[&[u8]],
    stall: Duration,
) -> io::Result<()> {
    let mut at = Cursor::default();
    let written = AtomicUsize::new(0);
    let mut write = |cx: &mut Context<'_>| {
        let mut guard = lock(conn);
        let s = &mut *guard;
        let mut n = written.load(Relaxed);
        let r = poll_write_slices(&mut s.io, cx, bufs, &mut at, &mut n);
        written.store(n, Relaxed);
        ready!(r)?;
        Pin::new(&mut s.io).poll_flush(cx)
    };
    // Nearly every write completes at once: only one that waits is timed.
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(write(cx))).await {
        return r;
    }
    loop {
        let before = written.load(Relaxed);
        match tokio::time::timeout(stall, std::future::poll_fn(&mut write)).await {
            Ok(r) => return r,
            // Slow is fine; stopped is not.
            Err(_) if written.load(Relaxed) > before => {}
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading its answer",
                ));
            }
        }
    }
}

async fn shutdown<I: ClientIo>(conn: &SharedConn<I>) {
    let _ = std::future::poll_fn(|cx| Pin::new(&mut lock(conn).io).poll_shutdown(cx)).await;
}

/// Closes after an answer sent while the client may still be sending its
/// body: stop writing, then read and drop what comes for a while, so that
/// closing does not reset the connection under the answer.
async fn linger<I: ClientIo>(conn: &SharedConn<I>) {
    shutdown(conn).await;
    let drain = std::future::poll_fn(|cx| {
        let mut guard = lock(conn);
        let s = &mut *guard;
        loop {
            s.buf.clear();
            if s.buf.capacity() < FIRST_READ {
                make_room(&mut s.buf, FIRST_READ);
            }
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut s.io),
                cx,
                &mut s.buf
            )) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
    });
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Appends the current time as an HTTP date, formatted once a second per
/// serving thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<ParsedHead, Refusal> {
        match parse_head(raw.as_bytes(), 100)? {
            Some((head, n)) => {
                assert_eq!(n, raw.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0));
                Ok(head)
            }
            None => panic!("partial: {raw:?}"),
        }
    }

    #[test]
    fn a_plain_get_has_no_body_and_keeps_the_connection() {
        let h = parse("GET /_matrix/client/versions?x=1 HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\r\n")
            .unwrap();
        assert_eq!(h.method, Method::GET);
        assert_eq!(
            h.target.path_and_query(),
            Some("/_matrix/client/versions?x=1")
        );
        assert_eq!(
            h.headers.get(&http::HeaderName::from_static("x-a")),
            Some(&b"b"[..])
        );
        assert_eq!(h.body, None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
    }

    #[test]
    fn ambiguous_body_framing_is_refused() {
        let cases = [
            // Both: the classic smuggling vector.
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            // Obsolete line folding and a space before the colon.
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            // No Host, two Hosts.
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ];
        for raw in cases {
            let r = parse(raw).expect_err(raw);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{raw:?}");
        }
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunkedx\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw).expect_err(raw).status,
                StatusCode::NOT_IMPLEMENTED,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn unambiguous_bodies_are_framed() {
        let h =
            parse("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nContent-Length: 12\r\n\r\n")
                .unwrap();
        assert_eq!(h.body, Some(BodyFraming::Length(12)));
        let h =
            parse("POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding:  Chunked \r\n\r\n").unwrap();
        assert_eq!(h.body, Some(BodyFraming::Chunked(ChunkState::Size)));
        let h = parse(
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap();
        assert!(h.expect_continue);
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: tea\r\n\r\n")
                .unwrap_err()
                .status,
            StatusCode::EXPECTATION_FAILED
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(
            !parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, Close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn a_head_is_complete_at_its_empty_line_however_it_arrives() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..raw.len() {
            // As if the head came in two reads split at `cut`.
            assert!(!head_ends_in(&raw[..cut], 0), "{cut}");
            assert!(head_ends_in(raw, cut), "{cut}");
        }
        assert!(head_ends_in(b"GET / HTTP/1.0\n\n", 0));
        assert!(!head_ends_in(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
    }

    /// Mangled requests (bytes flipped, cut, CR/LF/colon/space/NUL put in)
    /// never panic the parser, and what it takes is never more than it got
    /// and always ends at an empty line.
    #[test]
    fn mangled_requests_never_panic_the_parser() {
        let seeds: [&[u8]; 4] = [
            b"GET /_matrix/client/v3/sync?since=s1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer syt_x\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"PUT /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ];
        let specials = [b'\r', b'\n', b':', b' ', 0, b'\t', 0x80, b',', b'0'];
        // xorshift: deterministic, so a failure reproduces.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..50_000 {
            let mut raw = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + next() % 4 {
                if raw.is_empty() {
                    break;
                }
                let at = (next() as usize) % raw.len();
                match next() % 4 {
                    0 => raw[at] = next() as u8,
                    1 => raw[at] = specials[(next() as usize) % specials.len()],
                    2 => raw.insert(at, specials[(next() as usize) % specials.len()]),
                    _ => raw.truncate(at),
                }
            }
            if let Ok(Some((head, n))) = parse_head(&raw, 100) {
                assert!(n <= raw.len(), "{raw:?}");
                assert!(raw[..n].ends_with(b"\n"), "{raw:?}");
                if let Some(BodyFraming::Length(len)) = head.body {
                    assert!(len < 1 << 63);
                }
            }
            let _ = head_ends_in(&raw, (next() as usize) % (raw.len() + 1));
        }
    }

    #[test]
    fn limits_and_garbage() {
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(
            parse(&raw).unwrap_err().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert!(matches!(parse_head(&raw.as_bytes()[..40], 100), Ok(None)));
        assert_eq!(
            parse("GET / HTTP/2.0\r\nHost: a\r\n\r\n")
                .unwrap_err()
                .status,
            StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
        for raw in [
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{raw:?}"
            );
        }
    }

    /// An upload crosses in reads of up to 256 KiB, but not its first
    /// 64 KiB: while that much has gone, a failed attempt still has the
    /// whole body to send to another worker, and a larger first read would
    /// have ended that copy at once.
    #[tokio::test]
    async fn a_large_request_body_is_read_in_large_pieces_once_past_what_a_retry_could_replay() {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        const LEN: usize = 2 << 20;
        let (io, mut client) = tokio::net::UnixStream::pair().unwrap();
        let sender = tokio::spawn(async move {
            client.write_all(&vec![7; LEN]).await.unwrap();
            client
        });
        let conn = Arc::new(Mutex::new(Shared::new(io)));
        let head = parse(&format!(
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: a\r\nContent-Length: {LEN}\r\n\r\n"
        ))
        .unwrap();
        let mut body = into_request(head, &conn).body;
        let (mut given, mut largest_early, mut largest_late) = (0, 0, 0);
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            if given < REPLAY_LIMIT {
                largest_early = largest_early.max(data.len());
            } else {
                largest_late = largest_late.max(data.len());
            }
            given += data.len();
        }
        assert_eq!(given, LEN);
        assert!(largest_early <= REPLAY_LIMIT, "{largest_early}");
        assert!(
            largest_late > REPLAY_LIMIT && largest_late <= REQUEST_BODY_READ,
            "{largest_late}"
        );
        drop(sender.await.unwrap());
    }
}
