//! What a client speaking HTTP/1 gets on the wire from the edge's own
//! HTTP/1 server: pipelining, chunked uploads, HTTP/1.0, refused framing
//! that could smuggle a second request past the edge, and header limits.

mod common;

use std::time::Duration;

use common::harness::{Harness, read_answer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROOM: &str = "!abc:example.org";

/// Everything the edge sends until it closes the connection (or 5 s pass).
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn total_requests(h: &Harness) -> usize {
    h.standins.iter().map(|s| s.stats.requests()).sum()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_each_by_its_own_worker() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    let both = format!(
        "GET /_matrix/client/v3/rooms/{ROOM}/messages?dir=b HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    s.write_all(both.as_bytes()).await.unwrap();
    let (head1, body1) = read_answer(&mut s).await;
    let (head2, body2) = read_answer(&mut s).await;
    assert!(head1.starts_with("HTTP/1.1 200"), "{head1}");
    assert!(head2.starts_with("HTTP/1.1 200"), "{head2}");
    assert!(
        json(&body1)["target"]
            .as_str()
            .unwrap()
            .contains("/messages")
    );
    assert!(
        json(&body1)["worker"]
            .as_str()
            .unwrap()
            .starts_with("rooms")
    );
    assert_eq!(json(&body2)["target"], "/_matrix/client/versions");
    assert_eq!(json(&body2)["worker"], "main");
}

#[tokio::test]
async fn a_chunked_upload_reaches_the_worker_whole_and_the_connection_goes_on() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    let target = format!("/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1");
    s.write_all(
        format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (head, body) = read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = json(&body);
    assert_eq!(seen["body_bytes"], 11);
    let expected = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b"hello world"));
    assert_eq!(seen["body_xxh3"], expected.as_str());
    assert!(
        seen["headers"].get("x-trailer").is_none(),
        "a trailer became a header"
    );
    // The same connection serves the next request.
    s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn http_1_0_clients_are_answered_and_closed_unless_they_ask_for_keep_alive() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    s.write_all(b"GET /_matrix/client/versions HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.contains("\"worker\":\"main\""), "{text}");

    let mut s = h.connect().await;
    s.write_all(b"GET /_matrix/client/versions HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_answer(&mut s).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: keep-alive"),
        "{head}"
    );
    s.write_all(b"GET /_matrix/client/versions HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_request_that_could_smuggle_another_is_refused_and_reaches_no_worker() {
    let h = Harness::start("").await;
    let smuggled = "GET /_synapse/admin/v1/users HTTP/1.1\r\nHost: x\r\n\r\n";
    let attempts = [
        // CL.TE: a front reading Content-Length and a back reading chunks
        // would disagree about where the second request starts.
        format!(
            "POST /_matrix/client/v3/keys/query HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        format!(
            "POST /_matrix/client/v3/keys/query HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
        format!(
            "POST /_matrix/client/v3/keys/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /_matrix/client/v3/keys/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
    ];
    for raw in attempts {
        let mut s = h.connect().await;
        s.write_all(raw.as_bytes()).await.unwrap();
        let text = read_to_close(&mut s).await;
        let status: u16 = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(
            status == 400 || status == 501,
            "not refused ({status}): {raw:?}\n{text}"
        );
        let answers = text
            .split("\r\n")
            .filter(|l| l.starts_with("HTTP/1."))
            .count();
        assert_eq!(answers, 1, "a second answer: {text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        assert!(json(body)["errcode"].is_string(), "{text}");
    }
    assert_eq!(total_requests(&h), 0, "a refused request reached a worker");
    let rejected = h
        .proxy
        .metrics()
        .rejected
        .with_label_values(&["malformed_request"])
        .get();
    assert_eq!(rejected, 4);
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431_and_reaches_no_worker() {
    let h = Harness::start("limits:\n  max_header_size: 16K\n").await;
    let mut s = h.connect().await;
    let big = "a".repeat(20 << 10);
    s.write_all(
        format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.contains("M_TOO_LARGE"), "{text}");
    assert_eq!(total_requests(&h), 0);
    // Under the limit is fine.
    let mut s = h.connect().await;
    let fits = "a".repeat(12 << 10);
    s.write_all(
        format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nX-Big: {fits}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (head, _) = read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_upload_has_no_request_completed_at_a_worker() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    let target = format!("/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t2");
    s.write_all(
        format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}",
            "x".repeat(100)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    // The worker saw the request start, and its body end short: it never
    // gets a request it could take for a whole one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while h
        .standins
        .iter()
        .map(|s| s.stats.cancelled().len())
        .sum::<usize>()
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's request never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(total_requests(&h), 1);
    let completed: usize = h
        .standins
        .iter()
        .map(|s| s.stats.completed.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(completed, 0, "a cut-off upload was completed at a worker");
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_dropped() {
    let h = Harness::start("timeouts:\n  client_idle: 500ms\n").await;
    let mut s = h.connect().await;
    // 64 MiB: far more than the sockets between here and the worker buffer.
    let total = 64usize << 20;
    s.write_all(
        format!("GET /_matrix/client/v1/media/download/example.org/abc HTTP/1.1\r\nHost: x\r\nx-standin-response-bytes: {total}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    // The client reads nothing for a while: the edge gives up on it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // What it reads now is what was buffered, then the end: not the rest
    // of the answer, which a patient edge would still be sending.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is still open");
    assert!(got < total, "the whole answer came after all ({got} bytes)");
    let stalls = h
        .proxy
        .metrics()
        .client_timeouts
        .with_label_values(&["send_stall"])
        .get();
    assert_eq!(stalls, 1, "counted in synapse_edge_client_timeouts_total");
}

#[tokio::test]
async fn an_http_1_0_client_gets_a_streamed_answer_delimited_by_the_close() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    // The stand-in streams this answer (chunked to the edge): its length is
    // unknown when the head goes out, and HTTP/1.0 has no chunks.
    s.write_all(
        b"GET /_matrix/client/v1/media/download/example.org/abc HTTP/1.0\r\nx-standin-response-bytes: 200000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("the edge closes the connection to end the answer")
        .unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(all.len() - split, 200_000);
}

#[tokio::test]
async fn a_refused_upload_expecting_100_continue_gets_no_continue_and_a_closed_connection() {
    let h = Harness::start("limits:\n  max_body_size: 1K\n").await;
    let mut s = h.connect().await;
    s.write_all(
        b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    // The client never sends the body: it was not told to.
    let text = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert_eq!(total_requests(&h), 0);
}
