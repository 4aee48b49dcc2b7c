//! The edge process's life: SIGHUP reloads (a broken config is refused and
//! the running one keeps serving), SIGTERM drains in-flight requests, refuses
//! new connections and exits 0, with every access line written; a stuck
//! log reader never stalls serving; a low open-file limit is warned about
//! at start. Runs the real binary.

mod common;
use common::free_port;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use synapse_edge::demo;
use synapse_edge::standin::StandIn;

struct Edge {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Edge {
    async fn start(dir: &Path, workers: &str) -> Edge {
        Edge::start_with(dir, workers, None, "info").await
    }

    /// Started under an open-file limit of `limit` (soft and hard) if given,
    /// with `RUST_LOG=rust_log`.
    async fn start_with(dir: &Path, workers: &str, limit: Option<u32>, rust_log: &str) -> Edge {
        let port = free_port();
        let log = dir.join(format!("edge-{port}.log"));
        let child = edge_command(dir, workers, port, limit)
            .env("RUST_LOG", rust_log)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let edge = Edge {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        if !answers(&edge.base).await {
            panic!("the edge did not start: {}", edge.logs());
        }
        edge
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, target: &str, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
        get(&self.base, target, headers).await
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// `synapse-edge run` on the demo config in `dir`, listening on `port`,
/// under an open-file limit of `limit` (soft and hard) if given.
fn edge_command(dir: &Path, workers: &str, port: u16, limit: Option<u32>) -> Command {
    let bin = env!("CARGO_BIN_EXE_synapse-edge");
    let mut cmd = match limit {
        None => Command::new(bin),
        Some(n) => {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(bin);
            sh
        }
    };
    cmd.arg("run")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--synapse-config")
        .arg(dir.join("homeserver.yaml"))
        .arg("--synapse-config")
        .arg(dir.join(workers))
        .arg("--config")
        .arg(dir.join("edge.yaml"))
        .stdout(Stdio::null());
    cmd
}

/// Whether the edge at `base` answers within 5 s.
async fn answers(base: &str) -> bool {
    for _ in 0..100 {
        if get(base, "/_matrix/client/versions", &[]).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A GET to the edge at `base`: its status and the worker that answered.
async fn get(base: &str, target: &str, headers: &[(&str, &str)]) -> Result<(u16, String), String> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("{base}{target}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let worker = resp
        .headers()
        .get("x-worker")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, worker))
}

fn setup() -> (tempfile::TempDir, Vec<StandIn>) {
    let dir = tempfile::tempdir().unwrap();
    demo::write_config(dir.path()).unwrap();
    std::fs::write(dir.path().join("edge.yaml"), "health:\n  interval: 200ms\n").unwrap();
    let standins = demo::start_standins(dir.path()).unwrap();
    (dir, standins)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_installs_a_valid_config_and_refuses_a_broken_one() {
    let (dir, _standins) = setup();
    let edge = Edge::start(dir.path(), "workers").await;
    let versions = "/_matrix/client/v3/capabilities";
    assert_eq!(edge.get(versions, &[]).await.unwrap(), (200, "main".into()));

    // A broken config: the reload is refused and nothing changes.
    let hs = dir.path().join("homeserver.yaml");
    let good = std::fs::read_to_string(&hs).unwrap();
    std::fs::write(
        &hs,
        good.replace("  typing: client_sync1", "  typin: client_sync1"),
    )
    .unwrap();
    edge.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..20 {
        assert_eq!(edge.get(versions, &[]).await.unwrap().0, 200);
    }
    let logs = edge.logs();
    assert!(logs.contains("reload refused"), "{logs}");
    assert!(
        logs.contains("stream_writers.typin"),
        "the log does not say what is wrong: {logs}"
    );

    // A valid new config: client readers appear, and take their routes.
    std::fs::write(&hs, &good).unwrap();
    std::fs::write(
        dir.path().join("edge.yaml"),
        "health:\n  interval: 200ms\npools:\n  client_reader: [\"rooms*\"]\n",
    )
    .unwrap();
    edge.signal("HUP");
    let mut moved = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, worker) = edge.get(versions, &[]).await.unwrap();
        assert_eq!(status, 200);
        if worker.starts_with("rooms") {
            moved = true;
            break;
        }
    }
    assert!(moved, "the reloaded pools were not used: {}", edge.logs());
    assert!(edge.logs().contains("configuration reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_zero() {
    let (dir, _standins) = setup();
    let mut edge = Edge::start(dir.path(), "workers").await;
    let base = edge.base.clone();
    let long = tokio::spawn(async move {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = Request::get(format!("{base}/_matrix/client/v3/sync?since=s1"))
            .header("x-standin-delay-ms", "1500")
            .body(Empty::new())
            .unwrap();
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body.len()))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let addr = edge.base.trim_start_matches("http://").to_string();
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "a new connection was accepted while draining"
    );
    let (status, len) = long.await.unwrap().expect("the in-flight request was cut");
    assert_eq!(status, 200);
    assert!(len > 0);
    let code = tokio::task::spawn_blocking(move || edge.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(code.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_is_warned_about_at_start() {
    let (dir, _standins) = setup();
    let edge = Edge::start_with(dir.path(), "workers", Some(1024), "info").await;
    let logs = edge.logs();
    assert!(
        logs.contains("open_files_limit=1024") && logs.contains("the open-file limit is low"),
        "{logs}"
    );
    // The default start, under this machine's limit, says what it has.
    let edge = Edge::start(dir.path(), "workers").await;
    assert!(edge.logs().contains("descriptor_table="), "{}", edge.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_line_is_written_before_the_edge_exits() {
    let (dir, _standins) = setup();
    let mut edge = Edge::start(dir.path(), "workers").await;
    // Lines are written in batches: the last ones must not be lost when
    // the edge is stopped right after answering them.
    for i in 0..300 {
        let (status, _) = edge
            .get(&format!("/_matrix/client/v3/sync?since=line{i}"), &[])
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    edge.signal("TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = edge.child.wait().unwrap();
        (code, edge)
    })
    .await
    .unwrap();
    let (code, edge) = code;
    assert_eq!(code.code(), Some(0));
    let logs = edge.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("synapse_edge::access") && l.contains("since=line"))
        .collect();
    assert_eq!(lines.len(), 300, "{logs}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" 200 ") && l.contains("worker=client_sync1"))
    );

    // RUST_LOG can silence them, as it silences any other target.
    let mut quiet =
        Edge::start_with(dir.path(), "workers", None, "info,synapse_edge::access=off").await;
    assert_eq!(
        quiet
            .get("/_matrix/client/v3/sync?since=quiet", &[])
            .await
            .unwrap()
            .0,
        200
    );
    quiet.signal("TERM");
    let quiet = tokio::task::spawn_blocking(move || {
        let _ = quiet.child.wait();
        quiet
    })
    .await
    .unwrap();
    let logs = quiet.logs();
    assert!(
        logs.contains("stopped") && !logs.contains("synapse_edge::access"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_never_stalls_serving() {
    use std::io::Read;
    let (dir, _standins) = setup();
    let (port, metrics_port) = (free_port(), free_port());
    // stderr is a pipe nobody reads, as when journald or docker's log
    // reader is stuck: it fills at 64 KiB.
    let mut child = edge_command(dir.path(), "workers", port, None)
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    assert!(answers(&base).await, "the edge did not start");
    // 3,000 lines of about 4 KiB each: far more than the pipe and the
    // edge's 4 MiB of waiting lines per serving thread hold. Every request
    // is still answered, and at once.
    let agent = "a".repeat(4000);
    let started = std::time::Instant::now();
    for i in 0..3000 {
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(5),
            get(
                &base,
                &format!("/_matrix/client/v3/sync?since=n{i}"),
                &[("user-agent", agent.as_str())],
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} waited on the log"))
        .unwrap();
        assert_eq!(status, 200);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "serving slowed: {took:?}");
    // While stderr is stuck, the metric is how an operator learns of it.
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    };
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("synapse_edge_access_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines metric:\n{metrics}"));
    assert!(counted > 0, "{metrics}");
    // Once the log is read again, what waited is written, and the lines
    // that did not fit are reported.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            if text
                .windows(28)
                .any(|w| w == b"access log lines dropped: st")
            {
                break;
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let mut text = String::new();
    for _ in 0..100 {
        if reader.is_finished() {
            text = reader.join().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = text
        .lines()
        .find(|l| l.contains("access log lines dropped"))
        .unwrap_or_else(|| panic!("no report of dropped lines"));
    let dropped: u64 = warning
        .split("dropped=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let written = text.lines().filter(|l| l.contains("since=n")).count() as u64;
    assert!(
        dropped > 0 && dropped <= counted,
        "{warning}: {counted} counted"
    );
    // What the pipe took before it filled, and the 4 MiB that waited (the
    // other serving thread's lines may still be on their way).
    assert!(written >= 900, "only {written} lines were written");
    assert!(written + dropped <= 3000, "{written} + {dropped}");
}
