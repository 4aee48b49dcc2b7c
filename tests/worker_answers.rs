//! How the edge speaks HTTP/1.1 to workers: whatever framing a worker's
//! answer uses reaches the client whole, connections are reused only when
//! that is safe, and a worker that refuses a request early or misbehaves
//! gets a sensible answer to the client.
//!
//! The worker here is scripted at the byte level (stand-ins built on hyper
//! only ever answer one way).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::harness::{Harness, read_answer};
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use synapse_edge::demo;
use synapse_edge::front::ListenerRole;
use synapse_edge::listeners::{ListenAddr, ListenerSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// What the scripted worker does with a request.
#[derive(Clone)]
enum Script {
    /// Read the request, send these bytes, keep the connection.
    Answer(&'static [u8]),
    /// Read the request, send these bytes, close.
    AnswerAndClose(&'static [u8]),
    /// Send these bytes as soon as the head is in, without reading the
    /// body, then close.
    RefuseBody(&'static [u8]),
    /// Send these bytes as soon as the head is in, then read the body (as
    /// Nginx's `return` does) and keep the connection.
    AnswerThenRead(&'static [u8]),
    /// Answer, keep the connection for this long, then close it.
    AnswerThenDropAfter(&'static [u8], Duration),
}

/// Each request the worker read: the connection it came on, its request
/// line, and how many body bytes it had.
type Log = Arc<Mutex<Vec<(usize, String, usize)>>>;

struct ScriptedWorker {
    log: Log,
    _task: common::harness::AbortOnDrop,
}

impl ScriptedWorker {
    fn start(path: &Path, script: fn(&str) -> Script) -> ScriptedWorker {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let log: Log = Arc::default();
        let seen = log.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((conn, _)) = listener.accept().await {
                n += 1;
                tokio::spawn(serve(conn, n, script, seen.clone()));
            }
        });
        ScriptedWorker {
            log,
            _task: common::harness::AbortOnDrop(task),
        }
    }

    /// Requests other than health checks, in order.
    fn requests(&self) -> Vec<(usize, String, usize)> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(_, line, _)| !line.contains("/health"))
            .cloned()
            .collect()
    }
}

async fn serve(mut conn: UnixStream, id: usize, script: fn(&str) -> Script, log: Log) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_until(&mut conn, &mut buf, b"\r\n\r\n").await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end + 4);
        let line = head.lines().next().unwrap_or_default().to_string();
        if line.contains("/health") {
            log.lock().unwrap().push((id, line, 0));
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nOK")
                .await;
            continue;
        }
        let lower = head.to_ascii_lowercase();
        let script = script(&line);
        if let Script::RefuseBody(answer) = script {
            log.lock().unwrap().push((id, line, 0));
            let _ = conn.write_all(answer).await;
            return;
        }
        let early = if let Script::AnswerThenRead(answer) = script {
            if conn.write_all(answer).await.is_err() {
                return;
            }
            true
        } else {
            false
        };
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let body = if let Some(n) = length {
            while buf.len() < n {
                let mut chunk = [0u8; 65536];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            buf.drain(..n).count()
        } else if lower.contains("transfer-encoding: chunked") {
            let mut total = 0;
            loop {
                let Some(eol) = read_until(&mut conn, &mut buf, b"\r\n").await else {
                    return;
                };
                let line = String::from_utf8_lossy(&buf[..eol]).to_string();
                let size =
                    usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap();
                buf.drain(..eol + 2);
                if size == 0 {
                    let Some(end) = read_until(&mut conn, &mut buf, b"\r\n").await else {
                        return;
                    };
                    buf.drain(..end + 2);
                    break total;
                }
                while buf.len() < size + 2 {
                    let mut chunk = [0u8; 65536];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                buf.drain(..size + 2);
                total += size;
            }
        } else {
            0
        };
        log.lock().unwrap().push((id, line, body));
        if early {
            continue;
        }
        match script {
            Script::Answer(a) => {
                if conn.write_all(a).await.is_err() {
                    return;
                }
            }
            Script::AnswerAndClose(a) => {
                let _ = conn.write_all(a).await;
                return;
            }
            Script::AnswerThenDropAfter(a, after) => {
                let _ = conn.write_all(a).await;
                tokio::time::sleep(after).await;
                return;
            }
            Script::RefuseBody(_) | Script::AnswerThenRead(_) => unreachable!(),
        }
    }
}

async fn read_until(conn: &mut UnixStream, buf: &mut Vec<u8>, end: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(end.len()).position(|w| w == end) {
            return Some(i);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The guide's topology with `name` replaced by a scripted worker.
async fn edge_with_scripted(name: &str, script: fn(&str) -> Script) -> (Harness, ScriptedWorker) {
    let plain = ListenerSpec::plain(ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()));
    edge_with_scripted_on(name, script, vec![plain]).await
}

/// The same, on these listeners (the first plain TCP).
async fn edge_with_scripted_on(
    name: &str,
    script: fn(&str) -> Script,
    listeners: Vec<ListenerSpec>,
) -> (Harness, ScriptedWorker) {
    let dir = tempfile::tempdir().unwrap();
    let paths = demo::write_config(dir.path()).unwrap();
    let mut standins = demo::start_standins(dir.path()).unwrap();
    standins.retain(|s| s.name != name);
    let socket = dir
        .path()
        .join("sockets")
        .join(format!("synapse_inbound_{name}.sock"));
    let worker = ScriptedWorker::start(&socket, script);
    let h =
        Harness::with_listeners(dir, paths, standins, "health:\n  interval: 1h\n", listeners).await;
    (h, worker)
}

const CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
7\r\n{\"versi\r\nf;ext=1\r\nons\":[\"v1.11\"]}\r\n0\r\nx-trailer: dropped\r\n\r\n";

#[tokio::test]
async fn a_chunked_answer_reaches_the_client_whole_and_the_connection_is_reused() {
    let (h, worker) = edge_with_scripted("main", |_| Script::Answer(CHUNKED)).await;
    for _ in 0..3 {
        let a = h.get("/_matrix/client/versions").await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(&a.body[..], br#"{"versions":["v1.11"]}"#);
    }
    let reqs = worker.requests();
    assert_eq!(reqs.len(), 3);
    assert!(
        reqs.iter().all(|(conn, _, _)| *conn == reqs[0].0),
        "all three on one connection: {reqs:?}"
    );
}

#[tokio::test]
async fn an_answer_that_ends_with_its_connection_is_passed_on_whole() {
    let (h, worker) = edge_with_scripted("main", |_| {
        Script::AnswerAndClose(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"until\":\"close\"}",
        )
    })
    .await;
    for _ in 0..2 {
        let a = h.get("/_matrix/client/versions").await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(&a.body[..], br#"{"until":"close"}"#);
    }
    let reqs = worker.requests();
    assert_ne!(
        reqs[0].0, reqs[1].0,
        "a connection the worker ended is not reused"
    );
}

#[tokio::test]
async fn a_head_answer_has_no_body_and_leaves_the_connection_usable() {
    let (h, worker) = edge_with_scripted("main", |line| {
        if line.starts_with("HEAD") {
            Script::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
        } else {
            Script::Answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        }
    })
    .await;
    let a = h.send("HEAD", "/_matrix/client/versions", &[], b"").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-length"], "1234");
    let a = h.get("/_matrix/client/versions").await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let reqs = worker.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].0, reqs[1].0, "both on one connection: {reqs:?}");
}

#[tokio::test]
async fn a_worker_refusing_an_upload_early_has_its_answer_reach_the_client() {
    const REFUSAL: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 46\r\nconnection: close\r\n\r\n{\"errcode\":\"M_TOO_LARGE\",\"error\":\"quota used\"}";
    let (h, worker) = edge_with_scripted("media1", |_| Script::RefuseBody(REFUSAL)).await;
    // A client announcing 16 MiB that waits for an answer before sending
    // (as an `Expect: 100-continue` client would).
    let mut client = h.connect().await;
    client
        .write_all(b"POST /_matrix/media/v3/upload HTTP/1.1\r\nhost: edge\r\ncontent-length: 16777216\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
        .await
        .expect("the client is answered without sending its upload")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "answer: {answer:?}");
    assert!(
        answer.ends_with(r#"{"errcode":"M_TOO_LARGE","error":"quota used"}"#),
        "{answer}"
    );
    assert_eq!(worker.requests().len(), 1);
}

/// A channel as a stream of body frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_request_is_not_sent_on_a_connection_the_worker_closed_and_arrives_once() {
    let (h, worker) = edge_with_scripted("main", |_| {
        Script::AnswerThenDropAfter(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            Duration::from_millis(50),
        )
    })
    .await;
    let target = "/_matrix/client/v3/pushrules/global/override/r1";
    let a = h.send("PUT", target, &[], br#"{"actions":[]}"#).await;
    assert_eq!(a.status, StatusCode::OK);
    // The worker has closed the idle connection by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = h
        .send("PUT", target, &[], br#"{"actions":["notify"]}"#)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let reqs = worker.requests();
    assert_eq!(reqs.len(), 2, "each PUT arrives exactly once: {reqs:?}");
    assert_ne!(reqs[0].0, reqs[1].0);
    assert_eq!((reqs[0].2, reqs[1].2), (14, 22), "bodies arrive whole");
}

#[tokio::test]
async fn a_malformed_answer_gets_a_matrix_502() {
    let (h, _worker) = edge_with_scripted("main", |_| {
        Script::AnswerAndClose(b"HTTP/1.1 2xx Nonsense\r\n\r\n")
    })
    .await;
    let a = h.get("/_matrix/client/versions").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.json()["errcode"], "M_UNKNOWN");
}

#[tokio::test]
async fn a_chunked_upload_from_an_http2_client_arrives_whole() {
    let (h, worker) = edge_with_scripted("main", |_| {
        Script::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
    })
    .await;
    // HTTP/2 without content-length: the edge must frame it for HTTP/1.1.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for part in [&b"{\"actions\":"[..], b"[\"notify\"]", b"}"] {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(part)))).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let req = http::Request::put(format!(
        "{}/_matrix/client/v3/pushrules/global/override/r1",
        h.base
    ))
    .body(StreamBody::new(tokio_stream_from(rx)))
    .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(worker.requests()[0].2, 22);
}

#[tokio::test]
async fn an_answer_cut_short_never_reaches_the_client_as_complete() {
    let (h, _worker) = edge_with_scripted("main", |_| {
        Script::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd")
    })
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let uri: http::Uri = format!("{}/_matrix/client/versions", h.base)
        .parse()
        .unwrap();
    let outcome = match client.get(uri).await {
        Err(_) => None,
        Ok(resp) => Some(
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| b.to_bytes()),
        ),
    };
    assert!(
        !matches!(outcome, Some(Ok(_))),
        "the client must see the answer fail, not a short body: {outcome:?}"
    );
}

#[tokio::test]
async fn an_upload_answered_with_success_before_its_end_is_still_sent_whole() {
    let (h, worker) = edge_with_scripted("media1", |_| {
        Script::AnswerThenRead(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
    })
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for _ in 0..128 {
            if tx
                .send(Ok(Frame::data(Bytes::from(vec![7u8; 65536]))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let req = http::Request::post(format!("{}/_matrix/media/v3/upload", h.base))
        .header("content-length", (8u64 << 20).to_string())
        .body(StreamBody::new(tokio_stream_from(rx)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.expect("the upload goes through");
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    // The worker read all of it, and the connection stays usable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while worker.requests().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(worker.requests()[0].2, 8 << 20);
    let a = h
        .send("POST", "/_matrix/media/v3/upload", &[], b"small")
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let reqs = worker.requests();
    assert_eq!(reqs[1].2, 5);
    assert_eq!(
        reqs[0].0, reqs[1].0,
        "the same connection carries the next upload"
    );
}

/// An answer head as a worker behind a keep-alive server may write it:
/// hop-by-hop headers, a repeated header, its own date and HSTS.
const WITH_HOP_HEADERS: &[u8] = b"HTTP/1.1 200 OK\r\nServer: Synapse/1.140\r\n\
Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n\
Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nDate: Thu, 26 Nov 2026 10:00:00 GMT\r\n\
Strict-Transport-Security: max-age=1\r\nContent-Type: application/json\r\n\
Content-Length: 2\r\n\r\n{}";

/// The header lines of an HTTP/1.1 answer to `GET /_matrix/client/versions`
/// on `addr`, as written, without the status line.
async fn answer_lines(addr: std::net::SocketAddr) -> Vec<String> {
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: edge\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut client).await;
    assert_eq!(body, "{}");
    head.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The values of the lines naming `name`, lowercased.
fn named(lines: &[String], name: &str) -> Vec<String> {
    let prefix = format!("{name}: ");
    lines
        .iter()
        .filter_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix(&prefix)
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn clients_get_the_workers_end_to_end_headers_once_each_and_no_hop_by_hop_ones() {
    let hsts = ListenerRole {
        hsts: Some(http::HeaderValue::from_static("max-age=63072000")),
        ..ListenerRole::default()
    };
    let listeners = vec![
        ListenerSpec::plain(ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())),
        ListenerSpec {
            addr: ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            role: Arc::new(hsts),
            tls: None,
        },
    ];
    let (h, _worker) =
        edge_with_scripted_on("main", |_| Script::Answer(WITH_HOP_HEADERS), listeners).await;

    // HTTP/1.1: the edge writes the worker's lines itself.
    let lines = answer_lines(h.addr(0)).await;
    assert!(
        lines.iter().any(|l| l == "Server: Synapse/1.140"),
        "the worker's line as it wrote it: {lines:?}"
    );
    assert_eq!(named(&lines, "set-cookie"), ["a=1", "b=2"], "{lines:?}");
    assert_eq!(named(&lines, "server"), ["synapse/1.140"]);
    assert_eq!(
        named(&lines, "date"),
        ["thu, 26 nov 2026 10:00:00 gmt"],
        "the worker's date, and no second one"
    );
    assert_eq!(named(&lines, "content-length"), ["2"]);
    assert_eq!(named(&lines, "content-type"), ["application/json"]);
    assert_eq!(named(&lines, "strict-transport-security"), ["max-age=1"]);
    for hop in ["connection", "keep-alive", "proxy-authenticate"] {
        assert!(
            named(&lines, hop).is_empty(),
            "{hop} reached the client: {lines:?}"
        );
    }
    // A listener that sets HSTS replaces the worker's.
    let lines = answer_lines(h.addr(1)).await;
    assert_eq!(
        named(&lines, "strict-transport-security"),
        ["max-age=63072000"],
        "{lines:?}"
    );
    assert_eq!(named(&lines, "set-cookie"), ["a=1", "b=2"]);

    // HTTP/2 (hyper writes the answer from a header map): the same headers.
    let (_client, resp) = h.get_h2("/_matrix/client/versions").await;
    let hd = resp.headers();
    let all =
        |n: &str| -> Vec<&str> { hd.get_all(n).iter().map(|v| v.to_str().unwrap()).collect() };
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(all("server"), ["Synapse/1.140"]);
    assert_eq!(all("date"), ["Thu, 26 Nov 2026 10:00:00 GMT"]);
    assert_eq!(all("strict-transport-security"), ["max-age=1"]);
    for hop in ["keep-alive", "proxy-authenticate"] {
        assert!(all(hop).is_empty(), "{hop} reached the HTTP/2 client");
    }
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"{}"
    );
}
