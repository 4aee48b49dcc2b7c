//! The edge as a reverse proxy, over real sockets: stand-in workers on
//! temporary Unix sockets (the guide's topology, written by the demo's
//! config generator and read back by the real config reader), the edge on
//! an ephemeral port, and a real HTTP client.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::harness::{Harness, streamed, wait_for_cancelled, wait_for_requests};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use synapse_edge::demo;
use synapse_edge::standin::StandIn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROOM: &str = "%21OGEhHVWSdvArJzumhm%3Ademo.example";

#[tokio::test]
async fn each_endpoint_family_reaches_its_worker() {
    let h = Harness::start("").await;
    let cases: &[(&str, String, &str)] = &[
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{ROOM}/typing/%40a%3Ademo.example"),
            "client_sync1",
        ),
        (
            "POST",
            format!("/_matrix/client/v3/rooms/{ROOM}/receipt/m.read/%24e"),
            "client_sync1",
        ),
        (
            "PUT",
            "/_matrix/client/v3/sendToDevice/m.x/t1".into(),
            "client_sync1",
        ),
        (
            "GET",
            "/_matrix/client/v3/sync?since=s1".into(),
            "client_sync1",
        ),
        (
            "POST",
            "/_matrix/client/v3/user_directory/search".into(),
            "client_sync1",
        ),
        ("POST", "/_matrix/media/v3/upload".into(), "media1"),
        (
            "GET",
            "/_matrix/client/v1/media/download/demo.example/abc".into(),
            "media1",
        ),
        (
            "PUT",
            "/_matrix/federation/v1/send/txn1".into(),
            "federation_reader1",
        ),
        (
            "GET",
            "/_matrix/federation/v1/version".into(),
            "federation_reader1",
        ),
        (
            "PUT",
            "/_matrix/client/v3/pushrules/global/override/x".into(),
            "main",
        ),
        ("GET", "/_matrix/client/versions".into(), "main"),
        ("POST", "/_matrix/client/v3/logout".into(), "main"),
    ];
    for (m, t, want) in cases {
        let a = h.send(m, t, &[], b"{}").await;
        assert_eq!(a.status, StatusCode::OK, "{m} {t}");
        assert_eq!(a.worker(), *want, "{m} {t}");
    }
    let a = h
        .get(&format!("/_matrix/client/v3/rooms/{ROOM}/messages?dir=b"))
        .await;
    assert!(a.worker().starts_with("rooms"), "{}", a.worker());
}

#[tokio::test]
async fn rooms_and_users_stick_to_one_worker_across_many_requests() {
    // Make the room workers the sync pool too, so user stickiness is visible.
    let h = Harness::start("pools:\n  client_sync: [\"rooms*\"]\n").await;
    let mut room_workers = std::collections::HashSet::new();
    for r in 0..16 {
        let room = format!("%21room{r}xyz%3Ademo.example");
        let first = h
            .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"))
            .await;
        for i in 0..5 {
            let send = h
                .send(
                    "PUT",
                    &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t{i}"),
                    &[],
                    b"{}",
                )
                .await;
            assert_eq!(send.worker(), first.worker(), "room {r} moved");
        }
        room_workers.insert(first.worker().to_string());
    }
    assert!(room_workers.len() >= 3, "16 rooms on {room_workers:?}");
    let mut user_workers = std::collections::HashSet::new();
    for user in ["YWxpY2U", "Ym9i", "Y2Fyb2w", "ZGF2ZQ", "ZXJpbg", "ZnJhbms"] {
        let auth = format!("Bearer syt_{user}_devicetoken_abc");
        let first = h
            .send(
                "GET",
                "/_matrix/client/v3/sync?since=s1",
                &[("authorization", &auth)],
                b"",
            )
            .await;
        for i in 0..5 {
            let q = h
                .get(&format!(
                    "/_matrix/client/v3/sync?since=s{i}&access_token=syt_{user}_other_x"
                ))
                .await;
            assert_eq!(q.worker(), first.worker(), "user {user} moved");
        }
        user_workers.insert(first.worker().to_string());
    }
    assert!(user_workers.len() >= 2, "{user_workers:?}");
}

#[tokio::test]
async fn the_worker_receives_the_target_byte_for_byte_and_forwarding_headers() {
    let h = Harness::start("").await;
    let target = format!(
        "/_matrix/client/v3/rooms/{ROOM}/messages?filter=%7B%22types%22%3A%5B%22m.room.message%22%5D%7D&from=t1%2F2&dir=b&x=a+b"
    );
    let a = h
        .send(
            "GET",
            &target,
            &[
                ("host", "matrix.example.org"),
                ("x-forwarded-for", "6.6.6.6"),
                ("X-Forwarded-Proto", "https"),
                ("connection", "x-private, keep-alive"),
                ("x-private", "secret"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic eA=="),
                ("x-end-to-end", "kept"),
            ],
            b"",
        )
        .await;
    let seen = a.json();
    assert_eq!(seen["target"], target);
    let hd = &seen["headers"];
    assert_eq!(hd["host"], "matrix.example.org");
    assert_eq!(
        hd["x-forwarded-for"], "127.0.0.1",
        "a client-sent X-Forwarded-For must not reach Synapse"
    );
    assert_eq!(
        hd["x-forwarded-proto"], "http",
        "the scheme is the edge's listener's, not what the client claims"
    );
    assert_eq!(hd["x-end-to-end"], "kept");
    for hop in [
        "connection",
        "x-private",
        "keep-alive",
        "te",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert!(
            hd.get(hop).is_none(),
            "hop-by-hop header {hop} reached the worker"
        );
    }
    // And on the way back.
    let a = h
        .send(
            "GET",
            "/_matrix/client/versions",
            &[("x-standin-hop-headers", "1")],
            b"",
        )
        .await;
    for hop in ["x-hop-custom", "keep-alive", "proxy-authenticate"] {
        assert!(
            !a.headers.contains_key(hop),
            "hop-by-hop header {hop} reached the client"
        );
    }
    assert_eq!(a.worker(), "main");
}

#[tokio::test]
async fn an_oversized_body_gets_413_and_never_reaches_the_worker() {
    let h = Harness::start("limits:\n  max_body_size: 1M\n").await;
    let media = h.standin("media1");
    let before = media.stats.requests();
    // Declared too large: refused before anything is sent upstream.
    let mut s = h.connect().await;
    s.write_all(
        b"POST /_matrix/media/v3/upload HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("M_TOO_LARGE"), "{text}");
    assert_eq!(
        media.stats.requests(),
        before,
        "the worker saw the oversized request"
    );
    // Chunked and too large: cut off, answered 413.
    let body = streamed(40, Bytes::from(vec![7u8; 64 * 1024]));
    let client: Client<HttpConnector, _> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(
            Request::post(format!("{}/_matrix/media/v3/upload", h.base))
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errcode"], "M_TOO_LARGE");
    // Declared too large over HTTP/2: refused from its `content-length`.
    let before = media.stats.requests();
    let (_h2, resp) = h
        .send_h2(
            Request::post("/_matrix/media/v3/upload").header("content-length", "2000000"),
            Full::new(Bytes::from(vec![7u8; 2_000_000])),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        media.stats.requests(),
        before,
        "the worker saw the oversized HTTP/2 request"
    );
}

#[tokio::test]
async fn a_body_reaches_the_worker_framed_as_the_client_declared_it() {
    let h = Harness::start("").await;
    let target = format!("/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1");
    // HTTP/1 with a Content-Length: passed on with it, never chunked.
    let a = h.send("PUT", &target, &[], b"hello world").await;
    let seen = a.json();
    assert_eq!(seen["headers"]["content-length"], "11");
    assert!(
        seen["headers"].get("transfer-encoding").is_none(),
        "a body of declared length was chunked: {seen}"
    );
    assert_eq!(seen["body_bytes"], 11);
    // HTTP/2 without a length: chunked to the worker, which speaks HTTP/1.1.
    let (_client, resp) = h
        .send_h2(
            Request::put(target.as_str()),
            streamed(3, Bytes::from_static(b"0123456789")),
        )
        .await;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["transfer-encoding"], "chunked");
    assert!(seen["headers"].get("content-length").is_none(), "{seen}");
    assert_eq!(seen["body_bytes"], 30);
}

#[tokio::test]
async fn a_missing_worker_socket_gets_502_in_matrix_form() {
    let mut h = Harness::start("").await;
    h.standins.retain(|s| s.name != "media1"); // stops it and removes its socket
    let a = h
        .get("/_matrix/client/v1/media/download/demo.example/abc")
        .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.json()["errcode"], "M_UNKNOWN");
    assert!(a.json()["error"].as_str().unwrap().contains("unreachable"));
}

#[tokio::test]
async fn a_stalled_worker_gets_504_while_long_polls_wait_longer() {
    let h = Harness::start("timeouts:\n  upstream: 500ms\n  long_poll: 5s\n").await;
    let a = h
        .send(
            "GET",
            "/_matrix/client/versions",
            &[("x-standin-delay-ms", "1500")],
            b"",
        )
        .await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.json()["errcode"], "M_UNKNOWN");
    let a = h
        .send(
            "GET",
            "/_matrix/client/v3/sync?since=s1&timeout=1500",
            &[("x-standin-delay-ms", "1500")],
            b"",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "the long-poll was cut off");
    assert_eq!(a.worker(), "client_sync1");
}

#[tokio::test]
async fn a_client_leaving_a_long_poll_cancels_the_upstream_request_and_is_counted() {
    let h = Harness::start("").await;
    let sync = h.standin("client_sync1");
    let mut s = h.connect().await;
    s.write_all(
        b"GET /_matrix/client/v3/sync?since=s1&timeout=30000 HTTP/1.1\r\nhost: x\r\nx-standin-delay-ms: 30000\r\n\r\n",
    )
    .await
    .unwrap();
    wait_for_requests(&sync.stats, 1).await;
    let left = tokio::time::Instant::now();
    drop(s);
    let cancelled = wait_for_cancelled(&sync.stats).await;
    assert_eq!(
        cancelled.len(),
        1,
        "the worker still holds the abandoned request"
    );
    assert!(
        cancelled[0] - left < Duration::from_secs(1),
        "took {:?}",
        cancelled[0] - left
    );
    // Counted as abandoned (Nginx's 499), by route and worker; nothing
    // counted as answered.
    let m = h.proxy.metrics();
    let by_sync_worker = |vec: &prometheus::IntCounterVec| -> u64 {
        use prometheus::core::Collector;
        vec.collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|s| {
                let l = s.get_label();
                l.iter().any(|p| p.name() == "route" && p.value() == "sync")
                    && l.iter()
                        .any(|p| p.name() == "worker" && p.value() == "client_sync1")
            })
            .map(|s| s.get_counter().get_value() as u64)
            .sum()
    };
    assert_eq!(by_sync_worker(&m.abandoned), 1);
    assert_eq!(by_sync_worker(&m.requests), 0);
}

#[tokio::test]
async fn steady_traffic_reuses_upstream_connections() {
    let h = Harness::start("").await;
    for _ in 0..1000 {
        let a = h.get("/_matrix/client/versions").await;
        assert_eq!(a.status, StatusCode::OK);
    }
    // Health checks use connections of their own, one each (let any probe
    // in progress finish before counting).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let main = h.standin("main");
    let opened = main.stats.connections()
        - main
            .stats
            .health_checks
            .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        opened, 1,
        "1000 sequential requests opened {opened} upstream connections"
    );
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let h = Harness::start("").await;
    let (_client, resp) = h
        .get_h2(&format!("/_matrix/client/v3/rooms/{ROOM}/messages?dir=b"))
        .await;
    assert!(
        resp.headers()["x-worker"]
            .to_str()
            .unwrap()
            .starts_with("rooms")
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // The worker speaks HTTP/1.1 and still learns the host the client asked for.
    assert_eq!(v["headers"]["host"], h.base.trim_start_matches("http://"));
}

#[tokio::test]
async fn a_request_target_that_is_not_a_path_gets_400() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    s.write_all(b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = s.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"errcode\""), "{text}");
    // Garbage is refused by the HTTP layer, and the edge keeps serving.
    let mut s = h.connect().await;
    s.write_all(b"\x01\x02 not http\r\n\r\n").await.unwrap();
    let _ = s.read(&mut buf).await;
    assert_eq!(
        h.get("/_matrix/client/versions").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_tcp_worker_works_like_a_unix_one() {
    let dir = tempfile::tempdir().unwrap();
    let paths = demo::write_config(dir.path()).unwrap();
    let mut standins = demo::start_standins(dir.path()).unwrap();
    // federation_reader1 listens on TCP instead.
    let (tcp, addr) = StandIn::start_tcp("federation_reader1", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    standins.retain(|s| s.name != "federation_reader1");
    let wf = dir.path().join("workers/federation_reader1.yaml");
    std::fs::write(
        &wf,
        format!(
            "worker_app: synapse.app.generic_worker\nworker_name: federation_reader1\nworker_listeners:\n  - port: {}\n    bind_addresses: ['127.0.0.1']\n    type: http\n    x_forwarded: true\n    resources:\n      - names: [client, federation]\n",
            addr.port()
        ),
    )
    .unwrap();
    standins.push(tcp);
    let h = Harness::with(dir, paths, standins, "").await;
    let a = h
        .send("PUT", "/_matrix/federation/v1/send/t1", &[], b"{}")
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.worker(), "federation_reader1");
    assert_eq!(a.json()["body_bytes"], 2);
    assert!(Path::new(&h.dir.path().join("sockets")).exists());
}

/// Reads until the edge closes the connection; returns what was read.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None, // still open
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&all).into_owned()),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_client_too_slow_to_send_its_headers_is_disconnected() {
    let h = Harness::start("timeouts:\n  header_read: 300ms\n").await;
    let mut s = h.connect().await;
    s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let closed = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(
        closed.is_some(),
        "a half-sent request head kept the connection open"
    );
    assert_eq!(h.standin("main").stats.requests(), 0);
    assert_eq!(client_timeouts(&h, "header_read"), 1);
}

/// `synapse_edge_client_timeouts_total{kind}`.
fn client_timeouts(h: &Harness, kind: &str) -> u64 {
    h.proxy
        .metrics()
        .client_timeouts
        .with_label_values(&[kind])
        .get()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let h = Harness::start("timeouts:\n  client_idle: 300ms\n  header_read: 30s\n").await;
    let mut s = h.connect().await;
    s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let text = read_until_closed(&mut s, Duration::from_secs(3)).await;
    let text = text.expect("the idle connection stayed open");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "closed before the idle timeout"
    );
    // Routine: not counted as a client too slow to send its head.
    assert_eq!(client_timeouts(&h, "header_read"), 0);
}

#[tokio::test]
async fn a_long_poll_is_not_an_idle_connection() {
    let h = Harness::start("timeouts:\n  client_idle: 200ms\n").await;
    let a = h
        .send(
            "GET",
            "/_matrix/client/v3/sync?since=s1",
            &[("x-standin-delay-ms", "800")],
            b"",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
}

/// One kept-alive connection goes through waits with different timeouts in
/// turn (a long-poll, a stalled request, then idleness): each wait ends at
/// its own timeout, not at one left from an earlier wait.
#[tokio::test]
async fn each_wait_on_a_kept_alive_connection_keeps_its_own_timeout() {
    let h = Harness::start(
        "timeouts:\n  upstream: 400ms\n  long_poll: 5s\n  client_idle: 700ms\n  header_read: 30s\n",
    )
    .await;
    let mut s = h.connect().await;
    let send = |target: &str, delay_ms: u32| {
        format!("GET {target} HTTP/1.1\r\nhost: x\r\nx-standin-delay-ms: {delay_ms}\r\n\r\n")
    };
    // A quick request first: its answer wait is the short upstream timeout.
    s.write_all(send("/_matrix/client/versions", 0).as_bytes())
        .await
        .unwrap();
    let (head, _) = common::harness::read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // A long-poll outlives the upstream timeout...
    s.write_all(send("/_matrix/client/v3/sync?since=s1", 1200).as_bytes())
        .await
        .unwrap();
    let (head, _) = common::harness::read_answer(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the long-poll was cut: {head}"
    );
    // ...and the stalled request after it still gets its 504 in time.
    let t0 = tokio::time::Instant::now();
    s.write_all(send("/_matrix/client/versions", 3000).as_bytes())
        .await
        .unwrap();
    let (head, _) = common::harness::read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_millis(1500),
        "504 after {waited:?}, for a 400 ms timeout"
    );
    // Then the connection idles out after its idle timeout.
    let t0 = tokio::time::Instant::now();
    let closed = read_until_closed(&mut s, Duration::from_secs(4)).await;
    assert!(closed.is_some(), "the idle connection stayed open");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_millis(2000),
        "closed after {waited:?} idle, for a 700 ms timeout"
    );
}

/// Sends a GET with `extra` header lines on a fresh connection; the status.
async fn status_with_headers(h: &Harness, extra: usize) -> String {
    let mut s = h.connect().await;
    let mut req = String::from(
        "GET /_matrix/client/versions HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n",
    );
    for i in 0..extra {
        req.push_str(&format!("x-extra-{i}: {i}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn requests_with_more_header_lines_than_the_limit_are_refused() {
    // hyper's limit (100) unless configured.
    let h = Harness::start("").await;
    assert!(
        status_with_headers(&h, 90)
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        status_with_headers(&h, 120)
            .await
            .starts_with("HTTP/1.1 431")
    );
    let h = Harness::start("limits:\n  max_headers: 10\n").await;
    assert!(status_with_headers(&h, 5).await.starts_with("HTTP/1.1 200"));
    assert!(
        status_with_headers(&h, 20)
            .await
            .starts_with("HTTP/1.1 431")
    );
}

#[tokio::test]
async fn a_client_expecting_100_continue_is_told_to_send_and_its_body_arrives() {
    let h = Harness::start("").await;
    let mut s = h.connect().await;
    let body = vec![b'x'; 4096];
    s.write_all(
        format!(
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nhost: edge\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The edge answers 100 at once (curl would otherwise wait a second).
    let mut interim = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(500), s.read(&mut interim))
        .await
        .expect("100 Continue within half a second")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&interim[..n]).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim[..n])
    );
    s.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The worker got the whole body, and no Expect of its own to answer.
    assert!(answer.contains("\"body_bytes\":4096"), "{answer}");
    assert!(!answer.contains("\"expect\""), "{answer}");
}

/// Open client connections by protocol, as `synapse_edge_client_connections`
/// counts them.
fn open_connections(h: &Harness, protocol: &str) -> i64 {
    use prometheus::core::Collector;
    h.proxy
        .metrics()
        .client_connections
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|s| {
            s.get_label()
                .iter()
                .any(|l| l.name() == "protocol" && l.value() == protocol)
        })
        .map(|s| s.get_gauge().get_value() as i64)
        .sum()
}

async fn until_open(h: &Harness, protocol: &str, n: i64) {
    for _ in 0..100 {
        if open_connections(h, protocol) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open_connections(h, protocol), n, "{protocol} connections");
}

#[tokio::test]
async fn open_client_connections_are_counted_by_protocol_until_they_close() {
    let h = Harness::start("").await;
    // HTTP/1.1, kept alive after its request, then closed by the client.
    let mut s = h.connect().await;
    s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = common::harness::read_answer(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    until_open(&h, "h1", 1).await;
    drop(s);
    until_open(&h, "h1", 0).await;
    // HTTP/2 with prior knowledge, until its client goes.
    let (client, resp) = h.get_h2("/_matrix/client/versions").await;
    assert_eq!(resp.status(), StatusCode::OK);
    until_open(&h, "h2", 1).await;
    drop(resp);
    drop(client);
    until_open(&h, "h2", 0).await;
}
