//! The metrics listener: `/metrics` (Prometheus text), `/status` (a small
//! self-contained HTML page) and `/status.json` (the same data): each pool
//! and worker, its health, requests per second and error rate over the last
//! minute, and the route table.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::core::Collector;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::balancing::Health;
use crate::proxy::Proxy;
use crate::topology::WorkerId;

/// Requests and 5xx answers per worker name, at one instant.
type Totals = HashMap<String, (u64, u64)>;

/// Per-worker request and 5xx totals, sampled each second for a minute.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<(Instant, Totals)>>,
}

impl Sampler {
    fn totals(proxy: &Proxy) -> Totals {
        let mut out = Totals::new();
        // Only the request counter: gathering every family (histograms
        // included) each second would copy all of them to read this one.
        for family in proxy.metrics().requests.collect() {
            for m in family.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let value = m.get_counter().get_value() as u64;
                let e = out.entry(label("worker")).or_default();
                e.0 += value;
                if label("status_class") == "5xx" {
                    e.1 += value;
                }
            }
        }
        out
    }

    /// Takes one sample; keeps the last 61.
    pub fn sample(&self, proxy: &Proxy) {
        let totals = Self::totals(proxy);
        if let Ok(mut s) = self.samples.lock() {
            s.push_back((Instant::now(), totals));
            while s.len() > 61 {
                s.pop_front();
            }
        }
    }

    /// (requests per second, share of 5xx) per worker over the window.
    fn rates(&self) -> HashMap<String, (f64, f64)> {
        let Ok(s) = self.samples.lock() else {
            return HashMap::new();
        };
        let (Some((t0, first)), Some((t1, last))) = (s.front(), s.back()) else {
            return HashMap::new();
        };
        let secs = (*t1 - *t0).as_secs_f64().max(1.0);
        last.iter()
            .map(|(w, (req, err))| {
                let (req0, err0) = first.get(w).copied().unwrap_or((0, 0));
                let dr = req.saturating_sub(req0);
                let de = err.saturating_sub(err0);
                let share = if dr == 0 { 0.0 } else { de as f64 / dr as f64 };
                (w.clone(), (dr as f64 / secs, share))
            })
            .collect()
    }
}

/// Samples every second until dropped.
pub async fn sample_loop(proxy: Arc<Proxy>, sampler: Arc<Sampler>) {
    loop {
        sampler.sample(&proxy);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[derive(Serialize)]
struct WorkerStatus {
    name: String,
    routed: bool,
    up: bool,
    inbound: Option<String>,
    requests_per_second: f64,
    error_rate: f64,
    streams: Vec<&'static str>,
}

#[derive(Serialize)]
struct PoolStatus {
    name: String,
    members: Vec<String>,
}

#[derive(Serialize)]
struct RouteStatus {
    name: String,
    pool: String,
}

#[derive(Serialize)]
pub struct Status {
    version: &'static str,
    synapse_routes_version: String,
    workers: Vec<WorkerStatus>,
    pools: Vec<PoolStatus>,
    routes: Vec<RouteStatus>,
}

/// The status of the current snapshot.
pub fn status(proxy: &Proxy, sampler: &Sampler) -> Status {
    let snap = proxy.snapshot();
    let topo = &snap.state.topology;
    let rates = sampler.rates();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        synapse_routes_version: snap.state.routes.synapse_version.clone(),
        workers: topo
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let (rps, err) = rates.get(&w.name).copied().unwrap_or((0.0, 0.0));
                WorkerStatus {
                    name: w.name.clone(),
                    routed: w.inbound.is_some(),
                    up: snap.health.is_up(WorkerId(i as u32)),
                    inbound: w.inbound.as_ref().map(ToString::to_string),
                    requests_per_second: (rps * 100.0).round() / 100.0,
                    error_rate: (err * 10000.0).round() / 10000.0,
                    streams: w.streams.iter().map(|s| s.name()).collect(),
                }
            })
            .collect(),
        pools: topo
            .pools
            .iter()
            .map(|p| PoolStatus {
                name: p.name.clone(),
                members: p
                    .members
                    .iter()
                    .map(|&id| topo.worker(id).name.clone())
                    .collect(),
            })
            .collect(),
        routes: snap
            .state
            .routes
            .routes()
            .iter()
            .map(|r| RouteStatus {
                name: r.name.clone(),
                pool: topo.pool(r.pool).name.clone(),
            })
            .collect(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The status page: self-contained HTML, no external assets.
pub fn render_html(st: &Status) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>synapse-edge status</title><style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#222}} h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}
table{{border-collapse:collapse}} td,th{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}}
.up{{color:#fff;background:#2a7;border-radius:3px;padding:0 .4em}} .down{{color:#fff;background:#c33;border-radius:3px;padding:0 .4em}}
.idle{{color:#888}}</style></head><body>
<h1>synapse-edge {}</h1><p>Routes follow Synapse {} worker docs. Rates are over the last minute.</p>
<h2>Workers</h2><table id="workers"><tr><th>worker</th><th>health</th><th>req/s</th><th>errors</th><th>inbound</th><th>writes</th></tr>"#,
        esc(st.version),
        esc(&st.synapse_routes_version)
    );
    for w in &st.workers {
        let health = match (w.routed, w.up) {
            (false, _) => r#"<span class="idle">not routed</span>"#,
            (true, true) => r#"<span class="up">up</span>"#,
            (true, false) => r#"<span class="down">down</span>"#,
        };
        let _ = write!(
            h,
            r#"<tr data-worker="{}" data-up="{}"><td>{}</td><td>{health}</td><td>{:.2}</td><td>{:.1}%</td><td>{}</td><td>{}</td></tr>"#,
            esc(&w.name),
            w.routed && w.up,
            esc(&w.name),
            w.requests_per_second,
            w.error_rate * 100.0,
            esc(w.inbound.as_deref().unwrap_or("-")),
            esc(&w.streams.join(", "))
        );
    }
    h.push_str(r#"</table><h2>Pools</h2><table id="pools"><tr><th>pool</th><th>workers</th></tr>"#);
    for p in &st.pools {
        let members = if p.members.is_empty() {
            "(empty: falls back)".to_string()
        } else {
            p.members.join(", ")
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&p.name),
            esc(&members)
        );
    }
    h.push_str(r#"</table><h2>Routes</h2><table id="routes"><tr><th>route</th><th>served by pool</th></tr>"#);
    for r in &st.routes {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(&r.pool)
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn answer(req: &Request<Incoming>, proxy: &Proxy, sampler: &Sampler) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            proxy.metrics().encode(),
        ),
        "/status.json" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&status(proxy, sampler)).unwrap_or_default(),
        ),
        "/status" | "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            render_html(&status(proxy, sampler)),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    }
}

/// Serves the metrics listener until dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, sampler: Arc<Sampler>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let proxy = proxy.clone();
        let sampler = sampler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = answer(&req, &proxy, &sampler);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
