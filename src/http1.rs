//! HTTP/1.1 wire pieces both sides share: how a body is framed and its
//! decoder (RFC 9112: length, chunked, until close), chunk framing for
//! writing, and writing a list of slices in as few system calls as the
//! socket allows. The edge's client side (`listeners::h1`) and its worker
//! side (`upstream::h1`) are built on them.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite};

/// The largest read of an answer's body at a time. Each answer being
/// written to a slow client holds up to this much.
pub const ANSWER_BODY_READ: usize = 64 << 10;

/// The largest read of a request body at a time, once past the part a
/// failed attempt could replay (`body::REPLAY_LIMIT`, read at most that
/// much at a time). Larger than an answer's: a large upload crosses to its
/// worker in fewer, larger writes, and the worker sharing the edge's core
/// is woken less often. A 50 MiB upload took half the time with 256 KiB
/// reads as with 64 KiB ones; 512 KiB and 1 MiB were slower again
/// (BENCHMARKS.md, eleventh session).
pub const REQUEST_BODY_READ: usize = 256 << 10;

/// The read of a body whose length is not known (chunked, or until
/// close): it may end in the next few bytes.
const UNKNOWN_LENGTH_READ: usize = 16 << 10;

/// The longest chunk-size line or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 << 10;
const MAX_TRAILERS: usize = 16 << 10;

/// A body that breaks HTTP/1.1's framing rules: refused, never guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// How a body ends (a request's or an answer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// This many bytes are left.
    Length(u64),
    Chunked(ChunkState),
    /// Until the sender closes the connection (answers only).
    UntilClose,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// What decoding the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl BodyFraming {
    /// Takes the next piece of body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        match self {
            BodyFraming::Length(0) => Ok(Decoded::Done),
            BodyFraming::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            BodyFraming::UntilClose => {
                if buf.is_empty() {
                    Ok(Decoded::NeedMore)
                } else {
                    Ok(Decoded::Data(buf.split().freeze()))
                }
            }
            BodyFraming::Chunked(state) => state.decode(buf),
        }
    }

    /// Bytes left when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            BodyFraming::Length(n) => Some(*n),
            BodyFraming::Chunked(ChunkState::Done) => Some(0),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.remaining() == Some(0)
    }

    /// How much to read at once for the rest of the body: what is left
    /// (at least 1 KiB, at most `most`), or [`UNKNOWN_LENGTH_READ`] when
    /// that is unknown.
    pub fn useful_read(&self, most: usize) -> usize {
        match self.remaining() {
            Some(n) => n.clamp(1024, most as u64) as usize,
            None => UNKNOWN_LENGTH_READ,
        }
    }
}

/// Reads what is there into `buf`, first making room for `want` bytes
/// when less than 1 KiB (or `want`) of room is left.
pub fn poll_read_more<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want.min(1024) {
        make_room(buf, want);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Room in `buf` for `want` more bytes: a spare buffer when it has none at
/// all (it was [`release`]d while its connection waited), else grown.
pub fn make_room(buf: &mut BytesMut, want: usize) {
    if buf.capacity() == 0 {
        *buf = take_buffer(want);
    } else {
        buf.reserve(want);
    }
}

/// How many finished-with read buffers a serving thread keeps, and the
/// most room one may have left to be kept (a body read's buffer grows to
/// 64 KiB and more; such a buffer is not kept).
const SPARES: usize = 8;
const SPARE_MAX_CAPACITY: usize = 16 << 10;

thread_local! {
    /// Read buffers that connections of this thread have finished with.
    /// A connection holds no buffer while it waits (idle between requests,
    /// or for its worker's answer), so every request's reads needed a
    /// fresh one on each side; at 4 and 8 KiB these are past mimalloc's
    /// small sizes, and allocating and freeing them cost about 600
    /// instructions per proxied request.
    static SPARE_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for `want` bytes, a spare one if one has it.
/// A spare may share its memory with bytes split off it and still in use
/// (an answer's head being written): only the room after them is its own,
/// and it is taken only if that room is enough or it can be reclaimed
/// (`try_reclaim` moves it back to the start only once nothing else holds
/// the memory).
fn take_buffer(want: usize) -> BytesMut {
    SPARE_BUFFERS
        .with_borrow_mut(|spares| {
            let free = spares.iter_mut().rposition(|b| b.try_reclaim(want))?;
            Some(spares.swap_remove(free))
        })
        .unwrap_or_else(|| BytesMut::with_capacity(want))
}

/// Lets go of a read buffer its connection has finished with, leaving
/// `buf` with no memory: kept for the next [`make_room`] on this thread
/// if it is empty and of modest size, and fewer than [`SPARES`] are kept.
pub fn release(buf: &mut BytesMut) {
    let buf = std::mem::take(buf);
    if !buf.is_empty() || buf.capacity() == 0 || buf.capacity() > SPARE_MAX_CAPACITY {
        return;
    }
    SPARE_BUFFERS.with_borrow_mut(|spares| {
        if spares.len() < SPARES {
            spares.push(buf);
        }
    });
}

impl ChunkState {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        loop {
            match *self {
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(Malformed("chunk size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err(Malformed("bad chunk size")),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = left.min(buf.len() as u64) as usize;
                    *self = if n as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    // Trailers are read and dropped: Synapse sends none.
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > MAX_TRAILERS {
                            return Err(Malformed("trailers too large"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        *self = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Decoded::Done),
            }
        }
    }
}

/// Whether a header concerns the connection it came on rather than the
/// message (RFC 9110 7.6.1's hop-by-hop headers, and `Proxy-*`), by a name
/// in any case. Headers that `Connection` names are hop-by-hop too; the
/// caller looks at those.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let named = match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        17 => is(b"transfer-encoding"),
        _ => false,
    };
    named || (name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-"))
}

/// One comma-separated option of a `Connection` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionOption<'a> {
    Close,
    KeepAlive,
    /// Any other: the name of a header that concerns this connection only.
    Names(&'a [u8]),
}

/// The options of one `Connection` header value, in any case and spacing.
pub fn connection_options(value: &[u8]) -> impl Iterator<Item = ConnectionOption<'_>> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|option| !option.is_empty())
        .map(|option| {
            if option.eq_ignore_ascii_case(b"close") {
                ConnectionOption::Close
            } else if option.eq_ignore_ascii_case(b"keep-alive") {
                ConnectionOption::KeepAlive
            } else {
                ConnectionOption::Names(option)
            }
        })
}

/// Body data framed for the wire: as is, or (`chunked`) as one chunk: the
/// size line to write before it and the CRLF after.
pub fn chunk_frame(data: &[u8], chunked: bool) -> (SmallVec<[u8; 20]>, &'static [u8]) {
    match chunked {
        true if !data.is_empty() => {
            // Hex length and CRLF: at most 16 digits.
            let mut size: SmallVec<[u8; 20]> = SmallVec::new();
            let n = data.len();
            let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
            for shift in (0..digits).rev() {
                size.push(b"0123456789abcdef"[(n >> (shift * 4)) & 0xf]);
            }
            size.extend_from_slice(b"\r\n");
            (size, b"\r\n")
        }
        _ => (SmallVec::new(), b""),
    }
}

/// How far writing a list of slices got.
#[derive(Debug, Default)]
pub struct Cursor {
    index: usize,
    offset: usize,
}

impl Cursor {
    /// Moves past `n` more bytes of `bufs` that the socket took.
    pub fn advance(&mut self, bufs: &[&[u8]], mut n: usize) {
        while n > 0 && self.index < bufs.len() {
            let left = bufs[self.index].len() - self.offset;
            if n < left {
                self.offset += n;
                n = 0;
            } else {
                n -= left;
                self.index += 1;
                self.offset = 0;
            }
        }
    }
}

/// Writes every slice, in as few system calls as the socket allows.
/// `written` counts what the socket took, so a failure can tell whether
/// the worker may have seen any of the request.
pub fn poll_write_slices<W: AsyncWrite + Unpin + ?Sized>(
    conn: &mut W,
    cx: &mut Context<'_>,
    bufs: &[&[u8]],
    at: &mut Cursor,
    written: &mut usize,
) -> Poll<io::Result<()>> {
    loop {
        while at.index < bufs.len() && bufs[at.index].len() == at.offset {
            at.index += 1;
            at.offset = 0;
        }
        if at.index == bufs.len() {
            return Poll::Ready(Ok(()));
        }
        // Empty slices (an answer's absent parts) are left out: the kernel
        // would walk them in every write.
        let slices: SmallVec<[IoSlice<'_>; 5]> =
            std::iter::once(IoSlice::new(&bufs[at.index][at.offset..]))
                .chain(
                    bufs[at.index + 1..]
                        .iter()
                        .filter(|b| !b.is_empty())
                        .map(|b| IoSlice::new(b)),
                )
                .collect();
        let n = match Pin::new(&mut *conn).poll_write_vectored(cx, &slices) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
        };
        *written += n;
        at.advance(bufs, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_read_buffer_is_reused_but_never_while_its_bytes_are_in_use() {
        // An answer's head is split off its read buffer and written to the
        // client after the buffer is given back.
        let mut buf = take_buffer(8 << 10);
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        let head = buf.split().freeze();
        let memory = buf.as_ptr();
        release(&mut buf);
        assert_eq!(buf.capacity(), 0, "a released buffer keeps no memory");
        // Meanwhile another answer is read: not into the head's memory.
        let mut other = take_buffer(8 << 10);
        other.extend_from_slice(&[b'x'; 64]);
        assert_eq!(&head[..], b"HTTP/1.1 200 OK\r\n\r\n");
        drop(other);
        // Once the head is written and dropped, its buffer serves again.
        drop(head);
        let again = take_buffer(8 << 10);
        assert!(again.is_empty() && again.capacity() >= 8 << 10);
        let start = again.as_ptr();
        assert!(start <= memory && memory < start.wrapping_add(again.capacity()));
        // A buffer with data, or a large one, is not kept.
        let mut full = BytesMut::with_capacity(1024);
        full.extend_from_slice(b"pipelined");
        release(&mut full);
        release(&mut BytesMut::with_capacity(64 << 10));
        SPARE_BUFFERS.with_borrow(|spares| {
            assert!(
                spares
                    .iter()
                    .all(|b| b.is_empty() && b.capacity() <= SPARE_MAX_CAPACITY)
            );
        });
    }

    #[test]
    fn connection_options_are_read_in_any_case_and_spacing() {
        use ConnectionOption::*;
        let options: Vec<_> = connection_options(b" Keep-Alive ,, X-Hint,CLOSE ,").collect();
        assert_eq!(options, [KeepAlive, Names(b"X-Hint"), Close]);
        assert_eq!(connection_options(b"").count(), 0);
    }

    #[test]
    fn hop_by_hop_names_are_known_in_any_case_and_only_exactly() {
        for name in [
            "Connection",
            "keep-alive",
            "TE",
            "Trailer",
            "transfer-encoding",
            "Upgrade",
            "Proxy-Authenticate",
            "proxy-authorization",
        ] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in [
            "tee",
            "connections",
            "x-proxy-id",
            "proxy",
            "content-length",
            "date",
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    fn decode_all(
        framing: &mut BodyFraming,
        wire: &[u8],
        step: usize,
    ) -> Result<Vec<u8>, &'static str> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match framing.decode(&mut buf).map_err(|m| m.0)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Done => return Ok(out),
                Decoded::NeedMore if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Decoded::NeedMore => return Err("ended early"),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_look_like() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: y\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let mut f = BodyFraming::Chunked(ChunkState::Size);
            assert_eq!(
                decode_all(&mut f, wire, step).unwrap(),
                b"hello 0123456789",
                "step {step}"
            );
            assert!(f.is_done());
        }
    }

    #[test]
    fn malformed_chunks_are_refused_not_guessed() {
        for wire in [&b"zz\r\nhello\r\n0\r\n\r\n"[..], b"5\r\nhelloXX0\r\n\r\n"] {
            let mut f = BodyFraming::Chunked(ChunkState::Size);
            assert!(decode_all(&mut f, wire, 4).is_err());
        }
    }

    /// Takes at most `limit` bytes per write and records what it was given.
    struct ShortWriter {
        limit: usize,
        out: Vec<u8>,
        empty_slices: usize,
    }

    impl AsyncWrite for ShortWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.empty_slices += bufs.iter().filter(|b| b.is_empty()).count();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.limit - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn slices_are_written_whole_in_order_and_empty_ones_never_reach_the_socket() {
        // An answer's head, its absent chunk framing, its body, an absent
        // trailer: as write_response hands them over.
        let bufs: [&[u8]; 5] = [b"HTTP/1.1 200 OK\r\n\r\n", b"", b"0123456789", b"", b""];
        let whole: Vec<u8> = bufs.concat();
        for limit in 1..=whole.len() {
            let mut w = ShortWriter {
                limit,
                out: Vec::new(),
                empty_slices: 0,
            };
            let (mut at, mut written) = (Cursor::default(), 0);
            let waker = std::task::Waker::noop();
            let r = poll_write_slices(
                &mut w,
                &mut Context::from_waker(waker),
                &bufs,
                &mut at,
                &mut written,
            );
            assert!(matches!(r, Poll::Ready(Ok(()))));
            assert_eq!(w.out, whole, "writing {limit} bytes at a time");
            assert_eq!(written, whole.len());
            assert_eq!(w.empty_slices, 0, "writing {limit} bytes at a time");
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let mut f = BodyFraming::Length(5);
        let mut buf = BytesMut::from(&b"helloEXTRA"[..]);
        assert_eq!(
            f.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"hello"))
        );
        assert!(f.is_done());
        assert_eq!(&buf[..], b"EXTRA");
    }
}
