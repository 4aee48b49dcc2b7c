//! What operators scrape and read: Prometheus metrics that count what was
//! sent (and never leak identifiers), access logs without tokens, and the
//! status page, checked in a real browser.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::harness::{AbortOnDrop, Harness};
use http::StatusCode;
use synapse_edge::status::{Sampler, serve};

type Labels = BTreeMap<String, String>;

/// One sample of the text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format strictly enough to catch a malformed
/// exposition: every sample belongs to a declared family, values are
/// numbers, histogram buckets are cumulative and end in `+Inf` = `_count`.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                l.strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}")),
            ),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (k, v) = rest
                .split_once("=\"")
                .unwrap_or_else(|| panic!("bad label: {line}"));
            let end = v
                .find('"')
                .unwrap_or_else(|| panic!("bad label value: {line}"));
            map.insert(k.to_string(), v[..end].to_string());
            rest = v[end + 1..].trim_start_matches(',');
        }
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample of undeclared family: {line}"
        );
        assert!(
            name.starts_with("synapse_edge_"),
            "unprefixed metric: {name}"
        );
        samples.push(Sample {
            name: name.to_string(),
            labels: map,
            value,
        });
    }
    // Histogram buckets: cumulative, +Inf equals _count.
    let mut buckets: BTreeMap<(String, Labels), Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name.ends_with("_bucket")) {
        let mut key = s.labels.clone();
        let le = key.remove("le").unwrap();
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        buckets
            .entry((s.name.trim_end_matches("_bucket").to_string(), key))
            .or_default()
            .push((le, s.value));
    }
    for ((name, labels), mut bs) in buckets {
        bs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(
            bs.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets not cumulative"
        );
        let count = samples
            .iter()
            .find(|s| s.name == format!("{name}_count") && s.labels == labels)
            .unwrap()
            .value;
        assert_eq!(
            bs.last().unwrap(),
            &(f64::INFINITY, count),
            "{name} +Inf != _count"
        );
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

const ROOM: &str = "%21OGEhHVWSdvArJzumhm%3Ademo.example";

#[tokio::test]
async fn a_known_request_mix_is_counted_by_route_worker_and_status() {
    let mut h = Harness::start("limits:\n  max_body_size: 1K\n").await;
    let mut room_worker = String::new();
    for _ in 0..5 {
        let a = h
            .get(&format!("/_matrix/client/v3/rooms/{ROOM}/messages?dir=b"))
            .await;
        room_worker = a.worker().to_string();
    }
    for i in 0..3 {
        let a = h
            .send(
                "PUT",
                &format!("/_matrix/client/v3/rooms/{ROOM}/typing/%40a%3Ab?i={i}"),
                &[],
                b"{}",
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let big = vec![b'x'; 4096];
    assert_eq!(
        h.send("POST", "/_matrix/media/v3/upload", &[], &big)
            .await
            .status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    h.standins.retain(|s| s.name != "media1");
    assert_eq!(
        h.get("/_matrix/client/v1/media/download/a/b").await.status,
        StatusCode::BAD_GATEWAY
    );

    let samples = parse_exposition(&h.proxy.metrics().encode());
    let req = "synapse_edge_requests_total";
    assert_eq!(
        value(
            &samples,
            req,
            &[
                ("route", "room_messages"),
                ("pool", "rooms"),
                ("worker", &room_worker),
                ("method", "GET"),
                ("status_class", "2xx")
            ]
        ),
        5.0
    );
    assert_eq!(
        value(
            &samples,
            req,
            &[
                ("route", "typing"),
                ("pool", "stream:typing"),
                ("worker", "client_sync1"),
                ("method", "PUT"),
                ("status_class", "2xx")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            req,
            &[
                ("route", "media"),
                ("worker", "media1"),
                ("status_class", "5xx")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "synapse_edge_request_duration_seconds_count",
            &[("route", "room_messages")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &samples,
            "synapse_edge_requests_rejected_total",
            &[("reason", "too_large")]
        ),
        1.0
    );
    assert!(
        value(
            &samples,
            "synapse_edge_upstream_connect_errors_total",
            &[("worker", "media1")]
        ) >= 1.0
    );
    assert!(
        value(
            &samples,
            "synapse_edge_upstream_connections_opened_total",
            &[("worker", &room_worker)]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &samples,
            "synapse_edge_worker_picks_total",
            &[("worker", "client_sync1")]
        ),
        3.0
    );
    assert!(
        value(
            &samples,
            "synapse_edge_request_body_bytes_total",
            &[("pool", "stream:typing")]
        ) >= 6.0
    );
    assert!(
        value(
            &samples,
            "synapse_edge_response_body_bytes_total",
            &[("pool", "rooms")]
        ) > 0.0
    );
    assert_eq!(
        value(
            &samples,
            "synapse_edge_build_info",
            &[("synapse_routes_version", "1.157.1")]
        ),
        1.0
    );
    assert_eq!(value(&samples, "synapse_edge_in_flight_requests", &[]), 0.0);
    assert_eq!(
        value(
            &samples,
            "synapse_edge_client_connections",
            &[("protocol", "h1"), ("tls", "false")]
        ),
        1.0
    );
}

/// Requests to workers go out in batches, one submission per turn, and
/// the metrics say so (they stay at 0 where io_uring is refused).
#[tokio::test]
async fn requests_written_to_workers_together_are_counted() {
    let h = Harness::start("").await;
    let totals = |text: &str| {
        let samples = parse_exposition(text);
        (
            value(&samples, "synapse_edge_upstream_write_batches_total", &[]),
            value(&samples, "synapse_edge_upstream_batched_writes_total", &[]),
        )
    };
    let (batches_before, writes_before) = totals(&h.proxy.metrics().encode());
    let targets: Vec<String> = (0..20)
        .map(|i| format!("/_matrix/client/v3/rooms/{ROOM}/messages?i={i}"))
        .collect();
    let answers = futures_util::future::join_all(targets.iter().map(|t| h.get(t))).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    let (batches, writes) = totals(&h.proxy.metrics().encode());
    // Other tests of this binary may send requests meanwhile: at least
    // these twenty, in at least one batch.
    assert!(
        writes - writes_before >= 20.0,
        "{writes_before} -> {writes}"
    );
    assert!(
        batches - batches_before >= 1.0,
        "{batches_before} -> {batches}"
    );
    assert!(batches <= writes);
}

#[tokio::test]
async fn no_label_carries_a_room_user_or_token() {
    let h = Harness::start("").await;
    let secrets = [
        "OGEhHVWSdvArJzumhm",
        "@alice",
        "%40alice",
        "syt_YWxpY2U",
        "s3cr3tT0ken",
        "!OGEh",
    ];
    h.get(&format!(
        "/_matrix/client/v3/rooms/{ROOM}/messages?access_token=syt_YWxpY2U_s3cr3tT0ken_abc"
    ))
    .await;
    h.send(
        "PUT",
        "/_matrix/client/v3/presence/%40alice%3Ademo.example/status",
        &[("authorization", "Bearer syt_YWxpY2U_s3cr3tT0ken_x")],
        b"{}",
    )
    .await;
    h.get("/_matrix/client/v3/profile/%40alice%3Ademo.example")
        .await;
    h.get("/not/a/matrix/path/OGEhHVWSdvArJzumhm").await;
    let text = h.proxy.metrics().encode();
    for s in parse_exposition(&text) {
        for v in s.labels.values() {
            for secret in secrets {
                assert!(
                    !v.contains(secret),
                    "label value {v:?} of {} leaks {secret}",
                    s.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_never_contains_a_token() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let paths = synapse_edge::demo::write_config(dir.path()).unwrap();
        let _standins = synapse_edge::demo::start_standins(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("edge.yaml"),
            format!("log_format: {format}\n"),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("edge.log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-edge"));
        cmd.args(["run", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(dir.path().join("edge.yaml"));
        for p in &paths {
            cmd.arg("--synapse-config").arg(p);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let target =
            "/_matrix/client/v3/sync?since=s1&access_token=syt_YWxpY2U_s3cr3tT0ken_abc&timeout=0";
        let mut ok = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(
                    format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                ok = buf.starts_with(b"HTTP/1.1 200");
                break;
            }
        }
        assert!(ok, "the request failed");
        // A long-poll whose client leaves: logged with Nginx's 499.
        {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            s.write_all(
                b"GET /_matrix/client/v3/sync?since=s2 HTTP/1.1\r\nhost: x\r\nx-standin-delay-ms: 30000\r\n\r\n",
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Stopped as an operator stops it: every line is written first.
        let stopped = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(stopped.success());
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains("s3cr3tT0ken"),
            "{format}: the token reached the log:\n{text}"
        );
        let line = text
            .lines()
            .find(|l| l.contains("access_token=<redacted>"))
            .unwrap_or_else(|| panic!("{format}: no access line:\n{text}"));
        let left = text
            .lines()
            .find(|l| l.contains("since=s2"))
            .unwrap_or_else(|| panic!("{format}: no line for the abandoned request:\n{text}"));
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["route"], "sync");
            assert_eq!(v["worker"], "client_sync1");
            assert_eq!(v["status"], 200);
            let v: serde_json::Value = serde_json::from_str(left).unwrap();
            assert_eq!(
                (v["status"].as_u64(), v["worker"].as_str()),
                (Some(499), Some("client_sync1"))
            );
        } else {
            assert!(
                left.contains("\" 499 0 ") && left.contains("worker=client_sync1"),
                "{left}"
            );
            assert!(
                line.contains("route=sync")
                    && line.contains("worker=client_sync1")
                    && line.contains("\" 200 "),
                "{line}"
            );
        }
    }
}

const FAST_HEALTH: &str = "health:\n  interval: 100ms\n  timeout: 300ms\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_worker_going_down() {
    let mut h = Harness::start(FAST_HEALTH).await;
    let sampler = Arc::new(Sampler::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _sampling = AbortOnDrop(tokio::spawn(synapse_edge::status::sample_loop(
        h.proxy.clone(),
        sampler.clone(),
    )));
    let _server = AbortOnDrop(tokio::spawn(serve(
        listener,
        h.proxy.clone(),
        sampler.clone(),
    )));
    for _ in 0..20 {
        h.get(&format!("/_matrix/client/v3/rooms/{ROOM}/messages"))
            .await;
    }
    h.standins.retain(|s| s.name != "rooms2");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = client
        .get(format!("http://{addr}/status.json").parse().unwrap())
        .await
        .unwrap();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let worker = |n: &str| {
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(worker("rooms2")["up"], false);
    assert_eq!(worker("rooms1")["up"], true);
    assert_eq!(worker("sender1")["routed"], false);
    let served: f64 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests_per_second"].as_f64().unwrap())
        .sum();
    assert!(served > 0.0, "no request rate: {status}");
    assert!(
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "typing" && r["pool"] == "stream:typing")
    );

    // The HTML page, rendered by a real browser.
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Chromium is needed for this test: scripts/test.sh installs it (apt-get install chromium)");
    let profile = tempfile::tempdir().unwrap();
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ];
    let url = format!("http://{addr}/status");
    let run = |extra: &[String]| {
        let mut cmd = std::process::Command::new(chromium);
        cmd.args(flags)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url);
        cmd.output().unwrap()
    };
    let dom = tokio::task::spawn_blocking({
        let run_dom = run(&["--dump-dom".to_string()]);
        move || run_dom
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains(r#"data-worker="rooms2" data-up="false""#),
        "the page does not show rooms2 down:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-worker="rooms1" data-up="true""#),
        "{dom}"
    );
    assert!(dom.contains(r#"<span class="down">down</span>"#));
    let artefacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run(&[
        format!("--screenshot={}", shot.display()),
        "--window-size=1100,1400".to_string(),
    ]);
    assert!(
        shot.exists() && std::fs::metadata(&shot).unwrap().len() > 1000,
        "no screenshot"
    );
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_one_the_edge_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../contrib/grafana-dashboard.json")).unwrap();
    let defined = include_str!("../src/metrics.rs");
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("synapse_edge_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    defined.contains(&format!("\"{family}\"")),
                    "panel {:?} queries {name}, which the edge does not export",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "only {queried} metric references found");
}
