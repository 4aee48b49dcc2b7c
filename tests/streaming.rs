//! Large bodies stream through the edge both ways with memory that does not
//! grow with the body. The edge runs as its own process (the real binary)
//! so its memory can be read from /proc.

mod common;
use common::free_port;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use synapse_edge::demo;
use synapse_edge::standin::pattern;
use xxhash_rust::xxh3::Xxh3;

const SIZE: u64 = 50 << 20;
const CHUNK: usize = 256 << 10;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident and peak resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_upload_and_download_stream_through_with_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let paths = demo::write_config(dir.path()).unwrap();
    let _standins = demo::start_standins(dir.path()).unwrap();
    let edge_yaml = dir.path().join("edge.yaml");
    std::fs::write(&edge_yaml, "limits:\n  max_body_size: 64M\n").unwrap();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_synapse-edge"));
    // One serving thread: one allocator heap, so the peak is comparable.
    cmd.arg("run")
        .arg("--threads")
        .arg("1")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"));
    cmd.arg("--config").arg(&edge_yaml);
    for p in &paths {
        cmd.arg("--synapse-config").arg(p);
    }
    let edge = KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = edge.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = client
            .request(
                Request::get(format!("{base}/_matrix/client/versions"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
        {
            up = r.status().is_success();
            let _ = r.into_body().collect().await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the edge did not start");
    let (baseline, _) = memory_kib(pid);

    // Upload: 50 MiB generated on the fly, never held whole by the test.
    let chunks = Box::pin(futures_util::stream::unfold(0u64, |off| async move {
        (off < SIZE).then(|| {
            let len = (SIZE - off).min(CHUNK as u64) as usize;
            (
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(pattern(off, len)))),
                off + len as u64,
            )
        })
    }));
    let mut expected = Xxh3::new();
    let mut off = 0;
    while off < SIZE {
        let len = (SIZE - off).min(CHUNK as u64) as usize;
        expected.update(&pattern(off, len));
        off += len as u64;
    }
    let expected = format!("{:016x}", expected.digest());
    let upload_client: Client<_, StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = upload_client
        .request(
            Request::post(format!("{base}/_matrix/media/v3/upload?filename=big.bin"))
                .body(StreamBody::new(chunks))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-worker"], "media1");
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["body_bytes"], SIZE);
    assert_eq!(
        v["body_xxh3"], expected,
        "the worker received different bytes"
    );

    // Download: 50 MiB streamed back, hashed as it arrives.
    let resp = client
        .request(
            Request::get(format!(
                "{base}/_matrix/client/v1/media/download/demo.example/big"
            ))
            .header("x-standin-response-bytes", SIZE.to_string())
            .body(Empty::new())
            .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut got = Xxh3::new();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            got.update(d);
            n += d.len() as u64;
        }
    }
    assert_eq!(n, SIZE);
    assert_eq!(
        format!("{:016x}", got.digest()),
        expected,
        "the client received different bytes"
    );

    let (_, peak) = memory_kib(pid);
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    println!(
        "edge RSS before: {} KiB, peak during 2 x 50 MiB: {peak} KiB, growth {growth_mib:.1} MiB",
        baseline
    );
    // Under 8 MiB, the performance issue's bound (measured: about 0.5 MiB).
    assert!(
        growth_mib < 8.0,
        "edge memory grew {growth_mib:.1} MiB for a 50 MiB body"
    );
}
