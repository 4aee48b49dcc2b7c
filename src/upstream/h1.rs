//! One HTTP/1.1 exchange with a worker, on a connection the request's own
//! task drives: encode the head, stream the body, parse the answer's head,
//! decode its body as the client reads it.
//!
//! Why not hyper's client: it runs a task per connection and talks to it
//! through a channel (an allocation of 32 request slots per connection, a
//! wakeup and a task hop each way per request), and its connection reads
//! into an 8 KiB buffer it keeps for as long as a long-poll waits. Here a
//! waiting request holds the socket and nothing else: the read buffer is
//! allocated when the worker's answer arrives, as Nginx does.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, EXPECT, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http1::{
    ANSWER_BODY_READ, BodyFraming, ChunkState, ConnectionOption, Cursor, Malformed,
    connection_options, is_hop_by_hop, poll_write_slices,
};
use crate::request::{RequestHeaders, X_FORWARDED_FOR, X_FORWARDED_PROTO};

/// The most header lines an answer may have.
const MAX_HEADERS: usize = 128;
/// The longest head an answer may have.
const MAX_HEAD: usize = 64 << 10;
/// First read of an answer: a head and, for most Matrix answers, the body.
const FIRST_READ: usize = 8 << 10;

/// A connection to a worker: its inbound Unix socket or TCP listener.
#[derive(Debug)]
pub enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Conn {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Unix(s) => s.poll_read_ready(cx),
            Conn::Tcp(s) => s.poll_read_ready(cx),
        }
    }

    /// Whether an idle connection can take a request: nothing to read on
    /// it (the worker neither closed it nor sent anything unasked). Costs
    /// a system call only when the socket was seen readable.
    pub fn still_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        // Readiness may be left over from the last answer: a read says.
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }

    /// Waits until the worker sent something (or closed), holding no buffer.
    async fn readable(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.readable().await,
            Conn::Tcp(s) => s.readable().await,
        }
    }

    /// Reads what is there into `buf`, growing it by up to `want` bytes.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        crate::http1::poll_read_more(self, cx, buf, want)
    }

    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_into(cx, buf, want)).await
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_write(cx, b),
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How a request's body is framed on the way to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// `Content-Length` as the client declared it; the body as it comes.
    Length,
    /// A body of unknown length (an HTTP/2 client sent no length).
    Chunked,
}

impl RequestFraming {
    /// Decides from the length the client declared (its `Content-Length`,
    /// passed on with its headers) and whether its body already ended.
    pub fn of(declared: Option<u64>, body_ended: bool) -> RequestFraming {
        if declared.is_some() {
            RequestFraming::Length
        } else if body_ended {
            RequestFraming::Empty
        } else {
            RequestFraming::Chunked
        }
    }
}

/// The client's address and scheme as the edge tells its workers. Written
/// with the head in place of any the client sent, rather than inserted
/// into the request's header map (two hashed inserts per request).
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// The one address the edge believes (see `proxy::forwarded_for`).
    pub client: &'a HeaderValue,
    pub proto: &'static str,
}

/// The request line and headers as the worker gets them. The headers are
/// the proxy's (hop-by-hop ones already gone); `Expect` is dropped because
/// the edge already answered `100 Continue` to the client; with
/// `forwarded`, its two lines replace any `X-Forwarded-For` or `-Proto`
/// the client sent.
pub fn encode_head(
    method: &Method,
    target: &str,
    headers: &RequestHeaders,
    forwarded: Option<Forwarded<'_>>,
    framing: RequestFraming,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + target.len() + headers.len() * 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let is = |name: &[u8], n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
    headers.for_each(|name, value| {
        if is(name, &EXPECT)
            || is(name, &TRANSFER_ENCODING)
            || (forwarded.is_some() && (is(name, &X_FORWARDED_FOR) || is(name, &X_FORWARDED_PROTO)))
        {
            return;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    });
    if let Some(f) = forwarded {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(f.client.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(f.proto.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Empty if matches!(*method, Method::POST | Method::PUT | Method::PATCH) => {
            out.extend_from_slice(b"content-length: 0\r\n")
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes a request's first bytes (its head and what of the body is
/// here) at the end of the serving thread's turn, not at once: the
/// requests of every client served in this turn then reach the workers
/// together, and a worker sharing the core wakes once for all of them
/// instead of once each (load benchmark: context switches per request
/// 0.90 -> 0.47, throughput +20%). Where the thread batches (see
/// [`super::batch`]) they go in one system call for the whole turn.
pub async fn write_at_turn_end(
    conn: &mut Conn,
    bufs: [&[u8]; 5],
    written: &mut usize,
) -> io::Result<()> {
    let mut at = Cursor::default();
    match super::batch::write_at_turn_end(conn.as_raw_fd(), bufs).await {
        Some(Ok(n)) => {
            *written += n;
            at.advance(&bufs, n);
        }
        Some(Err(e)) => return Err(e),
        None => tokio::task::yield_now().await,
    }
    std::future::poll_fn(|cx| poll_write_slices(conn, cx, &bufs, &mut at, written)).await
}

/// Whether the worker sent something (or closed the connection: 0) while
/// the request body is still going out, as it may to refuse an upload:
/// what it sent is read into `buf` for [`read_head`].
pub fn poll_early_answer(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if conn.poll_read_ready(cx).is_pending() {
        return Poll::Pending;
    }
    // Readiness may be left over from the last answer: a read says.
    conn.poll_read_into(cx, buf, FIRST_READ)
}

/// What an answer that came while the body was still going out means.
#[derive(Debug, PartialEq, Eq)]
pub enum Early {
    /// An error status, or the connection closed: the worker takes no more.
    Refused,
    /// An interim or successful status: the worker reads the body on.
    ReadsOn,
    /// Too little of it yet to tell.
    Unknown,
}

/// Judges an early answer by its status line (`read` is what the last read
/// gave: 0 when the worker closed the connection).
pub fn early_verdict(buf: &[u8], read: usize) -> Early {
    if read == 0 {
        return Early::Refused;
    }
    match buf {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', class, ..] if buf.len() >= 12 => {
            if matches!(class, b'1' | b'2' | b'3') {
                Early::ReadsOn
            } else {
                Early::Refused
            }
        }
        _ if buf.len() >= 12 => Early::Refused,
        _ => Early::Unknown,
    }
}

/// Why an answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("the worker closed the connection without answering")]
    ClosedBeforeAnswer,
    #[error("the worker's answer ended early")]
    ClosedEarly,
    #[error("reading the worker's answer: {0}")]
    Io(#[from] io::Error),
    #[error("the worker's answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

impl From<Malformed> for AnswerError {
    fn from(m: Malformed) -> Self {
        AnswerError::Invalid(m.0)
    }
}

/// How the edge wants an answer's header lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerHeaders {
    /// As a `HeaderMap`: for an HTTP/2 client (hyper writes the map) and
    /// for health checks.
    Map,
    /// As the worker wrote them ([`PassedLines`]), for a client the edge
    /// answers over HTTP/1 itself. Falls back to a map when the answer
    /// needs one: HEAD, 1xx, 204 and 304 answers (whose framing headers
    /// are kept), and a `Connection` header naming other headers.
    Lines,
}

/// An answer's head, its body framing, and whether the connection may take
/// another request afterwards.
#[derive(Debug)]
pub struct AnswerHead {
    pub status: StatusCode,
    /// The end-to-end headers, unless they are in `lines`.
    pub headers: HeaderMap,
    /// Boxed: a response body carries it, and inline it would size every
    /// answer's future for its line table.
    pub lines: Option<Box<PassedLines>>,
    pub framing: BodyFraming,
    pub keep_alive: bool,
}

/// An answer's end-to-end header lines as the worker wrote them: without
/// its hop-by-hop headers and its framing (`Content-Length`,
/// `Transfer-Encoding`), which the edge writes for its own connection.
/// Written to an HTTP/1 client as they are, they spare a `HeaderMap` built
/// per answer only to be written out again: each name parsed, each value
/// checked and reference-counted, each entry hashed (about 5% of a short
/// request's CPU over HTTP in an A/B). `httparse` has checked names and values by the same
/// rules a `HeaderMap` would.
#[derive(Debug)]
pub struct PassedLines {
    head: Bytes,
    /// Per line: where its name starts and ends, where its value starts
    /// and ends.
    lines: SmallVec<[[u32; 4]; 16]>,
    has_date: bool,
}

impl PassedLines {
    /// Each line's name and the whole line (`name: value`, no CRLF).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.iter().map(|&[from, name_end, _, to]| {
            (
                &self.head[from as usize..name_end as usize],
                &self.head[from as usize..to as usize],
            )
        })
    }

    pub fn has_date(&self) -> bool {
        self.has_date
    }

    /// The lines as a map (for tests comparing both forms).
    #[cfg(test)]
    pub fn to_map(&self) -> Result<HeaderMap, AnswerError> {
        let mut map = HeaderMap::with_capacity(self.lines.len());
        for &[from, name_end, value_from, to] in &self.lines {
            let name = HeaderName::from_bytes(&self.head[from as usize..name_end as usize])
                .map_err(|_| AnswerError::Invalid("bad header name"))?;
            let value =
                HeaderValue::from_maybe_shared(self.head.slice(value_from as usize..to as usize))
                    .map_err(|_| AnswerError::Invalid("bad header value"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

/// Reads the answer's head into `buf`; what follows it stays in `buf`.
/// Interim (1xx) answers are skipped. Nothing is allocated until the worker
/// sends something.
pub async fn read_head(
    conn: &mut Conn,
    buf: &mut BytesMut,
    request_method: &Method,
    wanted: AnswerHeaders,
) -> Result<AnswerHead, AnswerError> {
    let mut any = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf, request_method, wanted)? {
                Some(head) if head.status.is_informational() => continue,
                Some(head) => return Ok(head),
                None if buf.len() >= MAX_HEAD => {
                    return Err(AnswerError::Invalid("head too large"));
                }
                None => {}
            }
        }
        if buf.capacity() == 0 {
            conn.readable().await?;
        }
        let n = conn.read_into(buf, FIRST_READ).await?;
        if n == 0 {
            return Err(if any {
                AnswerError::ClosedEarly
            } else {
                AnswerError::ClosedBeforeAnswer
            });
        }
        any = true;
    }
}

/// Parses a complete head at the start of `buf` and removes it; `None` if
/// more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    request_method: &Method,
    wanted: AnswerHeaders,
) -> Result<Option<AnswerHead>, AnswerError> {
    // Uninitialised: zeroing 128 header slots per answer showed in profiles.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    );
    let len = match parsing {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(AnswerError::Invalid("too many headers"));
        }
        Err(_) => return Err(AnswerError::Invalid("malformed head")),
    };
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| AnswerError::Invalid("bad status code"))?;
    let http10 = parsed.version == Some(0);
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(AnswerError::Invalid("unexpected protocol switch"));
        }
        buf.advance(len);
        return Ok(Some(AnswerHead {
            status,
            headers: HeaderMap::new(),
            lines: None,
            framing: BodyFraming::Length(0),
            keep_alive: true,
        }));
    }
    let bodiless = *request_method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // Names and values point into the head: they are kept as offsets into
    // it (a head is at most MAX_HEAD long).
    let start = buf.as_ptr() as usize;
    let span = |h: &httparse::Header<'_>| {
        let name = h.name.as_ptr() as usize - start;
        let value = h.value.as_ptr() as usize - start;
        [name, name + h.name.len(), value, value + h.value.len()].map(|n| n as u32)
    };
    // The lines an HTTP/1 client gets, gathered in the same walk as the
    // framing (the edge writes its own framing for its own connection).
    let mut passed: Option<(SmallVec<[[u32; 4]; 16]>, bool)> =
        (wanted == AnswerHeaders::Lines && !bodiless).then(|| (SmallVec::new(), false));
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut keep_alive = !http10;
    // Whether `Connection` names headers that must not be passed on.
    let mut names_headers = false;
    for h in parsed.headers.iter() {
        let (name, value) = (h.name.as_bytes(), h.value);
        let framing = if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(AnswerError::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(AnswerError::Invalid("conflicting content-length"));
            }
            length = Some(n);
            true
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encoded = true;
            // Chunked must be the last coding applied.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            true
        } else {
            if name.eq_ignore_ascii_case(b"connection") {
                for option in connection_options(value) {
                    match option {
                        ConnectionOption::Close => keep_alive = false,
                        ConnectionOption::KeepAlive => keep_alive |= http10,
                        ConnectionOption::Names(_) => names_headers = true,
                    }
                }
            }
            false
        };
        if let Some((lines, has_date)) = &mut passed
            && !framing
            && !is_hop_by_hop(name)
        {
            *has_date |= name.eq_ignore_ascii_case(b"date");
            lines.push(span(h));
        }
    }
    let framing = if bodiless {
        BodyFraming::Length(0)
    } else if encoded {
        if chunked {
            BodyFraming::Chunked(ChunkState::Size)
        } else {
            BodyFraming::UntilClose
        }
    } else if let Some(n) = length {
        BodyFraming::Length(n)
    } else {
        BodyFraming::UntilClose
    };
    if framing == BodyFraming::UntilClose {
        keep_alive = false;
    }
    // A `Connection` naming other headers: those go too, which the map's
    // stripping sees to.
    let passed = passed.filter(|_| !names_headers);
    // Only the map form needs every line.
    let spans: SmallVec<[[u32; 4]; 24]> = match passed {
        Some(_) => SmallVec::new(),
        None => parsed.headers.iter().map(span).collect(),
    };
    let head = buf.split_to(len).freeze();
    let (headers, lines) = match passed {
        Some((lines, has_date)) => {
            let passed = PassedLines {
                head,
                lines,
                has_date,
            };
            (HeaderMap::new(), Some(Box::new(passed)))
        }
        None => {
            let mut headers = HeaderMap::with_capacity(spans.len());
            for s in &spans {
                let name = HeaderName::from_bytes(&head[s[0] as usize..s[1] as usize])
                    .map_err(|_| AnswerError::Invalid("bad header name"))?;
                // RFC 9112 6.3: Transfer-Encoding wins over Content-Length,
                // which must then not be passed on.
                if encoded && name == CONTENT_LENGTH {
                    continue;
                }
                let value =
                    HeaderValue::from_maybe_shared(head.slice(s[2] as usize..s[3] as usize))
                        .map_err(|_| AnswerError::Invalid("bad header value"))?;
                headers.append(name, value);
            }
            (headers, None)
        }
    };
    Ok(Some(AnswerHead {
        status,
        headers,
        lines,
        framing,
        keep_alive,
    }))
}

impl Conn {
    /// Reads more of an answer's body into `buf`, as much as its framing
    /// lets be useful.
    pub fn poll_read_body(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        framing: &BodyFraming,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_into(cx, buf, framing.useful_read(ANSWER_BODY_READ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request bigger than the socket takes at once: the batched write
    /// sends what fits, the rest follows as the worker reads, in order.
    #[tokio::test]
    async fn a_request_the_socket_cannot_take_at_once_arrives_whole() {
        super::super::batch::tests::must_enable();
        let (edge, mut worker) = tokio::net::UnixStream::pair().expect("pair");
        let mut conn = Conn::Unix(edge);
        let head = b"POST /upload HTTP/1.1\r\ncontent-length: 3000000\r\n\r\n".to_vec();
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut worker, &mut got)
                .await
                .map(|_| got)
        });
        let mut written = 0;
        write_at_turn_end(&mut conn, [&head, b"", &body, b"", b""], &mut written)
            .await
            .expect("written");
        assert_eq!(written, head.len() + body.len());
        drop(conn);
        let got = reader.await.expect("reader").expect("read");
        assert_eq!(got, [head, body].concat());
    }

    /// Where io_uring is refused (a seccomp profile, a kernel setting) the
    /// request goes out by `writev`, whole all the same.
    #[tokio::test]
    async fn without_batching_a_request_still_arrives_whole() {
        assert!(!super::super::batch::enabled());
        let (edge, mut worker) = tokio::net::UnixStream::pair().expect("pair");
        let mut conn = Conn::Unix(edge);
        let head = b"PUT /x HTTP/1.1\r\ncontent-length: 2\r\n\r\n";
        let mut written = 0;
        write_at_turn_end(&mut conn, [head, b"", b"{}", b"", b""], &mut written)
            .await
            .expect("written");
        assert_eq!(written, head.len() + 2);
        drop(conn);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut worker, &mut got)
            .await
            .expect("read");
        assert_eq!(got, [&head[..], b"{}"].concat());
    }

    fn head(wire: &[u8], method: Method) -> AnswerHead {
        let mut buf = BytesMut::from(wire);
        parse_head(&mut buf, &method, AnswerHeaders::Map)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn answer_framing_follows_rfc_9112() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            Method::GET,
        );
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Length(12), true));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            Method::GET,
        );
        assert_eq!(h.framing, BodyFraming::Chunked(ChunkState::Size));
        assert!(
            h.headers.get(CONTENT_LENGTH).is_none(),
            "a length beside chunked is not passed on"
        );
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::UntilClose, false));
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            Method::HEAD,
        );
        assert_eq!(h.framing, BodyFraming::Length(0));
        let h = head(b"HTTP/1.1 304 Not Modified\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Length(0), true));
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        );
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", Method::GET);
        assert!(!h.keep_alive);
    }

    #[test]
    fn an_http1_clients_answer_keeps_the_workers_lines_without_hop_by_hop_or_framing() {
        const WIRE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: S\r\nConnection: keep-alive\r\n\
Keep-Alive: timeout=5\r\nProxy-Foo: x\r\nSet-Cookie: a=1\r\nTE: trailers\r\n\
Set-Cookie: b=2\r\nDate: d\r\nContent-Length: 2\r\n\r\n{}";
        let mut buf = BytesMut::from(WIRE);
        let h = parse_head(&mut buf, &Method::GET, AnswerHeaders::Lines)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Length(2), true));
        assert!(h.headers.is_empty());
        let lines = h.lines.expect("lines for an HTTP/1 client");
        let written: Vec<&[u8]> = lines.iter().map(|(_, line)| line).collect();
        assert_eq!(
            written,
            [
                &b"Server: S"[..],
                b"Set-Cookie: a=1",
                b"Set-Cookie: b=2",
                b"Date: d"
            ]
        );
        assert!(lines.has_date());
        assert_eq!(&buf[..], b"{}");
        // The same end-to-end headers a map carries once stripped.
        let mut buf = BytesMut::from(WIRE);
        let mut mapped = parse_head(&mut buf, &Method::GET, AnswerHeaders::Map)
            .unwrap()
            .unwrap()
            .headers;
        crate::proxy::strip_hop_by_hop(&mut mapped);
        mapped.remove(CONTENT_LENGTH);
        assert_eq!(lines.to_map().unwrap(), mapped);
    }

    #[test]
    fn answers_that_need_a_map_get_one_even_for_an_http1_client() {
        let lines = |wire: &[u8], method: Method| {
            let mut buf = BytesMut::from(wire);
            parse_head(&mut buf, &method, AnswerHeaders::Lines)
                .unwrap()
                .unwrap()
                .lines
                .is_some()
        };
        // Bodiless answers keep their Content-Length, which lines leave out.
        assert!(!lines(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            Method::HEAD
        ));
        assert!(!lines(
            b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
            Method::GET
        ));
        // Connection naming a header: the proxy strips it from the map.
        assert!(!lines(
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
            Method::GET
        ));
        assert!(lines(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 0\r\n\r\n",
            Method::GET
        ));
    }

    #[test]
    fn a_head_is_incomplete_until_its_blank_line() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"[..]);
        assert!(
            parse_head(&mut buf, &Method::GET, AnswerHeaders::Map)
                .unwrap()
                .is_none()
        );
        buf.extend_from_slice(b"\r\nhi");
        let h = parse_head(&mut buf, &Method::GET, AnswerHeaders::Map)
            .unwrap()
            .unwrap();
        assert_eq!(h.headers["content-length"], "2");
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
        );
        assert!(parse_head(&mut buf, &Method::GET, AnswerHeaders::Lines).is_err());
    }

    #[test]
    fn request_heads_carry_the_framing_the_body_needs() {
        // An HTTP/1 client's lines go on as it spelled them.
        let h = crate::request::lines("Host: example.org\r\nExpect: 100-continue\r\n");
        let text = |f| String::from_utf8(encode_head(&Method::PUT, "/a?b", &h, None, f)).unwrap();
        assert_eq!(
            text(RequestFraming::Empty),
            "PUT /a?b HTTP/1.1\r\nHost: example.org\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(
            text(RequestFraming::Chunked),
            "PUT /a?b HTTP/1.1\r\nHost: example.org\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // The edge's forwarding lines replace the client's, in any case,
        // from lines or from a map (HTTP/2).
        let h = crate::request::lines(
            "Host: example.org\r\nX-Forwarded-For: 6.6.6.6\r\nx-forwarded-PROTO: https\r\n",
        );
        let mut map = http::HeaderMap::new();
        map.insert("host", HeaderValue::from_static("example.org"));
        map.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let from_map = crate::request::RequestHeaders::from(map);
        let peer = HeaderValue::from_static("192.0.2.7");
        let forwarded = Forwarded {
            client: &peer,
            proto: "http",
        };
        let wire = encode_head(
            &Method::GET,
            "/",
            &h,
            Some(forwarded),
            RequestFraming::Empty,
        );
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "GET / HTTP/1.1\r\nHost: example.org\r\n\
             x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let wire = encode_head(
            &Method::GET,
            "/",
            &from_map,
            Some(forwarded),
            RequestFraming::Empty,
        );
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "GET / HTTP/1.1\r\nhost: example.org\r\n\
             x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let (size, end) = crate::http1::chunk_frame(b"0123456789abcdefX", true);
        assert_eq!((&size[..], end), (&b"11\r\n"[..], &b"\r\n"[..]));
    }
}
