//! The access log: one line per request, written when its answer's body is
//! done (or when its client leaves first, with Nginx's 499).
//!
//! Lines are formatted straight into a buffer of the thread that served the
//! request and reach stderr in batches, written by a thread of their own:
//! at least every 100 ms, sooner once a buffer holds 64 KiB, and all of
//! them when the edge stops (Nginx's `access_log ... buffer= flush=`).
//! Going through `tracing` and writing each line at once had cost 4.6 µs
//! per request in the load benchmark, a third of what proxying it costs,
//! and put the serving thread in a `write` to a pipe that journald or
//! docker may be slow to read. A serving thread never waits on the log:
//! if stderr takes nothing while a thread's buffer grows to 4 MiB, that
//! thread's further lines are dropped, counted in
//! `synapse_edge_access_log_lines_dropped_total`, and reported once
//! writing resumes.
//!
//! The lines keep `tracing`'s layout (timestamp, level, target, message,
//! fields), so `log_format: json` still gives one JSON object per line and
//! `RUST_LOG=...,synapse_edge::access=off` still silences them.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Version};

use crate::request::{ClientRequest, Target};

/// The `tracing` target the lines are filed under (for `RUST_LOG`).
pub const TARGET: &str = "synapse_edge::access";

/// A thread's buffer is handed to the writer once it holds this much.
const FLUSH_AT: usize = 64 * 1024;
/// Past this, a thread's lines are dropped until the writer catches up.
const DROP_AT: usize = 4 * 1024 * 1024;
/// The longest a line waits in a buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Text (`tracing`'s layout, combined-like message) or one JSON object:
/// edge.yaml's `log_format`, the same as the process's other lines.
pub use crate::config::LogFormat as Format;

/// How the process logs, settled once at start with the rest of its
/// logging (`log_format` and `RUST_LOG` are not reloaded).
#[derive(Debug, Clone, Copy)]
struct Settings {
    format: Format,
    /// `RUST_LOG` lets `synapse_edge::access` lines through.
    wanted: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Settles the format of every line and whether `RUST_LOG` lets them
/// through; called once the process's log subscriber is installed, so the
/// request path asks neither again (and a reload cannot leave the access
/// lines in another format than the others).
pub fn init(format: Format) {
    let wanted = tracing::enabled!(target: TARGET, tracing::Level::INFO);
    let _ = SETTINGS.set(Settings { format, wanted });
}

/// The format settled at start; text if [`init`] did not run.
pub fn format() -> Format {
    SETTINGS.get().map_or(Format::Text, |s| s.format)
}

/// Lines dropped since the process started
/// (`synapse_edge_access_log_lines_dropped_total`).
pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether access lines are wanted: `access_log: true` in edge.yaml and
/// not filtered out by `RUST_LOG`.
pub fn enabled(configured: bool) -> bool {
    configured
        && match SETTINGS.get() {
            Some(s) => s.wanted,
            // Not settled (a library user's own runtime): ask the subscriber.
            None => tracing::enabled!(target: TARGET, tracing::Level::INFO),
        }
}

/// The request half of a line, taken when the request arrives (cheap
/// clones of the parsed request's shared bytes).
pub struct RequestFacts {
    method: Method,
    target: Target,
    version: Version,
    user_agent: Option<Bytes>,
}

impl RequestFacts {
    pub fn of(req: &ClientRequest) -> RequestFacts {
        RequestFacts {
            method: req.method.clone(),
            target: req.target.clone(),
            version: req.version,
            user_agent: req.headers.get_shared(&http::header::USER_AGENT),
        }
    }
}

/// The answer half.
pub struct Outcome {
    pub client: IpAddr,
    pub status: u16,
    pub route: String,
    pub worker: String,
    /// The worker's time to its answer head, when a worker answered.
    pub upstream: Option<Duration>,
    pub start: Instant,
}

/// Writes the line of one request whose body ended after `bytes` bytes.
pub fn write(req: RequestFacts, done: Outcome, bytes: u64) {
    let now = Instant::now();
    let duration = now.saturating_duration_since(done.start);
    let full = LOCAL.try_with(|local| {
        let mut pending = local.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.buf.len() >= DROP_AT {
            pending.dropped += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let stamp = pending.clock.stamp(now);
        format_line(
            &mut pending.buf,
            format(),
            &req,
            &done,
            bytes,
            duration,
            &stamp,
        );
        (pending.buf.len() >= FLUSH_AT).then(|| local.clone())
    });
    match full {
        Ok(Some(local)) => writer().wake(&local),
        Ok(None) => {}
        // The thread is ending and its buffer is gone: write at once.
        Err(_) => {
            let mut line = Vec::new();
            let stamp = Clock::default().stamp(now);
            format_line(&mut line, format(), &req, &done, bytes, duration, &stamp);
            let _ = std::io::stderr().lock().write_all(&line);
        }
    }
}

/// A line's timestamp, `2026-11-27T01:02:03.123456Z` (as `tracing`'s).
type Stamp = [u8; 27];

/// Wall-clock timestamps from the monotonic clock read the line needs
/// anyway: the wall clock is read again once a second (so a step of it
/// shows within a second), and its date and time of day are formatted
/// once a second.
#[derive(Default)]
struct Clock {
    base: Option<(Instant, SystemTime)>,
    second: Option<u64>,
    prefix: [u8; 19],
}

impl Clock {
    fn stamp(&mut self, now: Instant) -> Stamp {
        let (at, wall) = match self.base {
            Some((at, wall)) if now.saturating_duration_since(at) < Duration::from_secs(1) => {
                (at, wall)
            }
            _ => *self.base.insert((now, SystemTime::now())),
        };
        let wall = wall + now.saturating_duration_since(at);
        let since_epoch = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        if self.second != Some(since_epoch.as_secs()) {
            self.second = Some(since_epoch.as_secs());
            let text = humantime::format_rfc3339_seconds(wall).to_string();
            if let Some(p) = text.as_bytes().get(..19) {
                self.prefix.copy_from_slice(p);
            }
        }
        stamp(&self.prefix, since_epoch.subsec_micros())
    }
}

/// `prefix` (date and time to the second) with the microseconds.
fn stamp(prefix: &[u8; 19], micros: u32) -> Stamp {
    let mut out = [0u8; 27];
    out[..19].copy_from_slice(prefix);
    out[19] = b'.';
    let mut m = micros;
    for i in (20..26).rev() {
        out[i] = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out[26] = b'Z';
    out
}

/// Writes every buffered line now (at shutdown).
pub fn flush() {
    writer().flush_all();
}

/// One line into `out`.
fn format_line(
    out: &mut Vec<u8>,
    format: Format,
    req: &RequestFacts,
    done: &Outcome,
    bytes: u64,
    duration: Duration,
    stamp: &Stamp,
) {
    let mut num = itoa::Buffer::new();
    let target = req.target.as_str().unwrap_or("-");
    let version = match req.version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "-",
    };
    let agent = req.user_agent.as_deref();
    match format {
        Format::Text => {
            out.extend_from_slice(stamp);
            out.extend_from_slice(b"  INFO ");
            out.extend_from_slice(TARGET.as_bytes());
            out.extend_from_slice(b": ");
            push_ip(out, done.client);
            out.extend_from_slice(b" \"");
            escape_text(out, req.method.as_str().as_bytes());
            out.push(b' ');
            redacted(out, target, escape_text);
            out.push(b' ');
            out.extend_from_slice(version.as_bytes());
            out.extend_from_slice(b"\" ");
            out.extend_from_slice(num.format(done.status).as_bytes());
            out.push(b' ');
            out.extend_from_slice(num.format(bytes).as_bytes());
            out.extend_from_slice(b" \"");
            escape_text(out, agent.unwrap_or(b"-"));
            out.extend_from_slice(b"\" duration_ms=");
            millis(out, duration);
            out.extend_from_slice(b" route=");
            escape_text(out, done.route.as_bytes());
            out.extend_from_slice(b" worker=");
            escape_text(out, done.worker.as_bytes());
            out.extend_from_slice(b" upstream_ms=");
            match done.upstream {
                Some(d) => millis(out, d),
                None => out.push(b'-'),
            }
        }
        Format::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            out.extend_from_slice(stamp);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"access\",\"client\":\"");
            push_ip(out, done.client);
            out.extend_from_slice(b"\",\"method\":\"");
            escape_json(out, req.method.as_str().as_bytes());
            out.extend_from_slice(b"\",\"path\":\"");
            redacted(out, target, escape_json);
            out.extend_from_slice(b"\",\"version\":\"");
            out.extend_from_slice(version.as_bytes());
            out.extend_from_slice(b"\",\"status\":");
            out.extend_from_slice(num.format(done.status).as_bytes());
            out.extend_from_slice(b",\"bytes\":");
            out.extend_from_slice(num.format(bytes).as_bytes());
            out.extend_from_slice(b",\"duration_ms\":");
            millis(out, duration);
            out.extend_from_slice(b",\"route\":\"");
            escape_json(out, done.route.as_bytes());
            out.extend_from_slice(b"\",\"worker\":\"");
            escape_json(out, done.worker.as_bytes());
            out.extend_from_slice(b"\",\"upstream_ms\":");
            match done.upstream {
                Some(d) => millis(out, d),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"user_agent\":");
            match agent {
                Some(a) => {
                    out.push(b'"');
                    escape_json(out, a);
                    out.push(b'"');
                }
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"target\":\"");
            out.extend_from_slice(TARGET.as_bytes());
            out.push(b'"');
            out.push(b'}');
        }
    }
    out.push(b'\n');
}

/// The request target with the value of `access_token` replaced, so no
/// token reaches a log.
fn redacted(out: &mut Vec<u8>, target: &str, escape: fn(&mut Vec<u8>, &[u8])) {
    let target = target.as_bytes();
    let Some(q) = target.iter().position(|&b| b == b'?') else {
        return escape(out, target);
    };
    escape(out, &target[..=q]);
    for (i, pair) in target[q + 1..].split(|&b| b == b'&').enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        if pair.starts_with(b"access_token=") {
            out.extend_from_slice(b"access_token=<redacted>");
        } else {
            escape(out, pair);
        }
    }
}

/// Milliseconds with one decimal.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let tenths = (d.as_nanos() + 50_000) / 100_000;
    out.extend_from_slice(itoa::Buffer::new().format(tenths / 10).as_bytes());
    out.push(b'.');
    out.push(b'0' + (tenths % 10) as u8);
}

/// As Nginx escapes its log: `"`, `\`, control and non-ASCII bytes as
/// `\xHH`, so a client cannot forge fields or lines.
fn escape_text(out: &mut Vec<u8>, s: &[u8]) {
    // Nearly always nothing to escape: one look-up a byte, one copy.
    let mut rest = s;
    while let Some(at) = rest.iter().position(|&b| !TEXT_PLAIN[usize::from(b)]) {
        out.extend_from_slice(&rest[..at]);
        push_hex(out, b"\\x", rest[at]);
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
}

/// Bytes a text line carries as they are.
static TEXT_PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        t[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    t
};

/// The client's address; IPv4 without `core::fmt`, which cost more than
/// the rest of the line.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut num = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(num.format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// A JSON string's contents; bytes that are not UTF-8 (header values may
/// carry them) become U+FFFD.
fn escape_json(out: &mut Vec<u8>, s: &[u8]) {
    for chunk in s.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0..0x20 | 0x7f => push_hex(out, b"\\u00", b),
                _ => out.push(b),
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
}

fn push_hex(out: &mut Vec<u8>, prefix: &[u8], b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(prefix);
    out.push(HEX[usize::from(b >> 4)]);
    out.push(HEX[usize::from(b & 0xf)]);
}

/// A thread's lines not yet written.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    clock: Clock,
}

type Shared = Arc<Mutex<Pending>>;

thread_local! {
    static LOCAL: Shared = writer().register();
}

/// The buffers of every thread that has logged, and the thread that writes
/// them out.
struct Writer {
    buffers: Mutex<Vec<Shared>>,
    /// `None` if the thread could not be started: lines are then written
    /// by the threads that log them.
    thread: Option<std::thread::Thread>,
}

fn writer() -> &'static Writer {
    static WRITER: OnceLock<Writer> = OnceLock::new();
    WRITER.get_or_init(|| {
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| {
                loop {
                    std::thread::park_timeout(FLUSH_EVERY);
                    writer().flush_all();
                }
            })
            .map(|h| h.thread().clone())
            .ok();
        Writer {
            buffers: Mutex::new(Vec::new()),
            thread,
        }
    })
}

impl Writer {
    fn register(&self) -> Shared {
        let shared = Shared::default();
        self.buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(shared.clone());
        shared
    }

    /// A buffer is full: have it written now.
    fn wake(&self, full: &Shared) {
        match &self.thread {
            Some(t) => t.unpark(),
            None => write_out(full),
        }
    }

    fn flush_all(&self) {
        let buffers = {
            let mut all = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
            let list = all.clone();
            // A live thread's buffer is held by the thread, the list and
            // its copy here: those of threads that have ended are written
            // one last time below and forgotten.
            all.retain(|b| Arc::strong_count(b) > 2);
            list
        };
        for b in &buffers {
            write_out(b);
        }
    }
}

/// Writes a buffer's lines to stderr, outside its lock (the serving thread
/// goes on filling a fresh one meanwhile).
fn write_out(shared: &Shared) {
    let (lines, dropped) = {
        let mut p = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if p.buf.is_empty() && p.dropped == 0 {
            return;
        }
        let cap = p.buf.capacity().min(FLUSH_AT * 2);
        (
            std::mem::replace(&mut p.buf, Vec::with_capacity(cap)),
            std::mem::take(&mut p.dropped),
        )
    };
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(&lines);
    if dropped > 0 {
        drop(err);
        tracing::warn!(
            dropped,
            "access log lines dropped: stderr took nothing while 4 MiB of them waited"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: Format, target: &str, agent: Option<&[u8]>) -> String {
        let mut headers = http::HeaderMap::new();
        if let Some(a) = agent {
            headers.insert("user-agent", http::HeaderValue::from_bytes(a).unwrap());
        }
        let headers = crate::request::RequestHeaders::from(headers);
        let req = ClientRequest {
            method: Method::GET,
            target: Target::http1(bytes::Bytes::copy_from_slice(target.as_bytes())).unwrap(),
            version: Version::HTTP_11,
            headers,
            length: None,
            body: crate::body::ClientBody::Empty,
        };
        let done = Outcome {
            client: "203.0.113.9".parse().unwrap(),
            status: 200,
            route: "sync".into(),
            worker: "client_sync1".into(),
            upstream: Some(Duration::from_micros(840)),
            start: Instant::now(),
        };
        let mut out = Vec::new();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        let mut prefix = [0u8; 19];
        prefix.copy_from_slice(
            &humantime::format_rfc3339_seconds(wall)
                .to_string()
                .as_bytes()[..19],
        );
        format_line(
            &mut out,
            format,
            &RequestFacts::of(&req),
            &done,
            261,
            Duration::from_micros(1249),
            &stamp(&prefix, 123_456),
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_text_line_reads_like_nginx_combined_with_the_routing_facts_after_it() {
        assert_eq!(
            line(
                Format::Text,
                "/_matrix/client/v3/sync?since=s1&access_token=syt_secret&timeout=0",
                Some(b"Element/1.11"),
            ),
            "2026-11-18T11:06:40.123456Z  INFO synapse_edge::access: 203.0.113.9 \
             \"GET /_matrix/client/v3/sync?since=s1&access_token=<redacted>&timeout=0 HTTP/1.1\" \
             200 261 \"Element/1.11\" duration_ms=1.2 route=sync worker=client_sync1 upstream_ms=0.8\n"
        );
    }

    #[test]
    fn a_client_cannot_forge_fields_with_quotes_or_odd_bytes() {
        let text = line(Format::Text, "/a", Some(b"x\" 500 0 \"\\\xff"));
        assert!(text.contains("\"x\\x22 500 0 \\x22\\x5c\\xff\""), "{text}");
        let json = line(Format::Json, "/a", Some(b"x\" 500 0 \"\\\xff"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["user_agent"], "x\" 500 0 \"\\\u{fffd}");
    }

    #[test]
    fn timestamps_follow_the_clock_to_the_microsecond() {
        let mut clock = Clock::default();
        let t0 = Instant::now();
        let parse = |s: Stamp| humantime::parse_rfc3339(std::str::from_utf8(&s).unwrap()).unwrap();
        let first = parse(clock.stamp(t0));
        let wall = SystemTime::now();
        assert!(wall.duration_since(first).unwrap_or_default() < Duration::from_secs(1));
        for step in [1, 250_000, 999_999] {
            let later = parse(clock.stamp(t0 + Duration::from_micros(step)));
            assert_eq!(
                later.duration_since(first).unwrap(),
                Duration::from_micros(step)
            );
        }
    }

    #[test]
    fn a_json_line_is_one_object_with_typed_fields() {
        let json = line(Format::Json, "/_matrix/client/v3/sync?access_token=t", None);
        assert!(json.ends_with("}\n") && json.lines().count() == 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["timestamp"], "2026-11-18T11:06:40.123456Z");
        assert_eq!(v["path"], "/_matrix/client/v3/sync?access_token=<redacted>");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 261);
        assert_eq!(v["duration_ms"], 1.2);
        assert_eq!(v["upstream_ms"], 0.8);
        assert_eq!(v["user_agent"], serde_json::Value::Null);
        assert_eq!(v["target"], TARGET);
    }
}
