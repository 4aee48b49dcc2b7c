//! Prometheus metrics, named `synapse_edge_*` with base units. Label values
//! are route, pool and worker names and small fixed sets (methods, status
//! classes, reasons): never paths, room IDs, users or tokens.

use http::Method;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets that suit both fast endpoints and long-poll `/sync`.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0,
    60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub client_connections: IntGaugeVec,
    pub upstream_connections: IntCounterVec,
    pub upstream_connect_errors: IntCounterVec,
    pub upstream_timeouts: IntCounterVec,
    pub retries: IntCounterVec,
    pub failovers: IntCounterVec,
    pub worker_up: IntGaugeVec,
    pub health_check_duration: HistogramVec,
    pub picks: IntCounterVec,
    pub request_body_bytes: IntCounterVec,
    pub response_body_bytes: IntCounterVec,
    pub rejected: IntCounterVec,
    pub abandoned: IntCounterVec,
    pub client_timeouts: IntCounterVec,
    pub reloads: IntCounterVec,
    pub last_reload: Gauge,
    pub tls_handshakes: IntCounter,
    pub tls_handshake_errors: IntCounter,
    /// Brought up to `access_log::dropped_total()` when scraped.
    pub access_log_dropped: IntCounter,
    /// Both brought up to `upstream::batch::totals()` when scraped.
    pub upstream_write_batches: IntCounter,
    pub upstream_batched_writes: IntCounter,
    pub build_info: IntGaugeVec,
}

/// Registers a metric defined by this program (constant names and labels:
/// `expect` can only fail on a programming error, never on input).
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: prometheus::Result<M>,
) -> M {
    let m = m.expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        ),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let last_reload = register(
            &r,
            Gauge::new(
                "synapse_edge_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded successfully (Unix time)",
            ),
        );
        let tls_handshakes = register(
            &r,
            IntCounter::new(
                "synapse_edge_tls_handshakes_total",
                "Completed TLS handshakes",
            ),
        );
        let tls_handshake_errors = register(
            &r,
            IntCounter::new(
                "synapse_edge_tls_handshake_errors_total",
                "Failed or timed-out TLS handshakes",
            ),
        );
        let access_log_dropped = register(
            &r,
            IntCounter::new(
                "synapse_edge_access_log_lines_dropped_total",
                "Access log lines dropped because stderr took nothing while 4 MiB of them waited",
            ),
        );
        let upstream_write_batches = register(
            &r,
            IntCounter::new(
                "synapse_edge_upstream_write_batches_total",
                "Submissions (io_uring) that wrote a serving thread's requests of one turn to the workers",
            ),
        );
        let upstream_batched_writes = register(
            &r,
            IntCounter::new(
                "synapse_edge_upstream_batched_writes_total",
                "Requests' first writes to workers sent in those submissions",
            ),
        );
        Metrics {
            requests: counter(
                &r,
                "synapse_edge_requests_total",
                "Requests answered, by route, pool, worker, method and status class",
                &["route", "pool", "worker", "method", "status_class"],
            ),
            request_duration: histogram(
                &r,
                "synapse_edge_request_duration_seconds",
                "Time to the response head, by route",
                &["route"],
                DURATION_BUCKETS,
            ),
            in_flight: gauge(
                &r,
                "synapse_edge_in_flight_requests",
                "Requests being served, by pool",
                &["pool"],
            ),
            client_connections: gauge(
                &r,
                "synapse_edge_client_connections",
                "Open client connections, by listener, protocol and TLS",
                &["listener", "protocol", "tls"],
            ),
            upstream_connections: counter(
                &r,
                "synapse_edge_upstream_connections_opened_total",
                "Connections opened to workers",
                &["worker"],
            ),
            upstream_connect_errors: counter(
                &r,
                "synapse_edge_upstream_connect_errors_total",
                "Failed connects to workers",
                &["worker"],
            ),
            upstream_timeouts: counter(
                &r,
                "synapse_edge_upstream_timeouts_total",
                "Worker answers that did not come in time",
                &["worker"],
            ),
            retries: counter(
                &r,
                "synapse_edge_retries_total",
                "Requests sent again to another worker, by reason",
                &["reason"],
            ),
            failovers: counter(
                &r,
                "synapse_edge_failovers_total",
                "Requests served by other than the key's first worker, by reason",
                &["reason"],
            ),
            worker_up: gauge(
                &r,
                "synapse_edge_worker_up",
                "1 when the worker passes its health checks",
                &["worker"],
            ),
            health_check_duration: histogram(
                &r,
                "synapse_edge_health_check_duration_seconds",
                "Health check latency",
                &["worker"],
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
                ],
            ),
            picks: counter(
                &r,
                "synapse_edge_worker_picks_total",
                "Requests sent to each worker",
                &["worker"],
            ),
            request_body_bytes: counter(
                &r,
                "synapse_edge_request_body_bytes_total",
                "Request body bytes sent to workers, by pool",
                &["pool"],
            ),
            response_body_bytes: counter(
                &r,
                "synapse_edge_response_body_bytes_total",
                "Response body bytes sent to clients, by pool",
                &["pool"],
            ),
            rejected: counter(
                &r,
                "synapse_edge_requests_rejected_total",
                "Requests the edge refused itself, by reason",
                &["reason"],
            ),
            abandoned: counter(
                &r,
                "synapse_edge_requests_abandoned_total",
                "Requests whose client left before their answer began (Nginx's 499), by route, pool and worker",
                &["route", "pool", "worker"],
            ),
            client_timeouts: counter(
                &r,
                "synapse_edge_client_timeouts_total",
                "Client connections closed for being too slow: to send a request head (header_read) or to read an answer (send_stall)",
                &["kind"],
            ),
            reloads: counter(
                &r,
                "synapse_edge_config_reloads_total",
                "Configuration reloads, by result",
                &["result"],
            ),
            build_info: gauge(
                &r,
                "synapse_edge_build_info",
                "Version of synapse-edge and of the Synapse worker docs its routes follow",
                &["version", "synapse_routes_version"],
            ),
            last_reload,
            tls_handshakes,
            tls_handshake_errors,
            access_log_dropped,
            upstream_write_batches,
            upstream_batched_writes,
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        // Counted by the access log, process-wide, off the request path.
        let dropped = crate::access_log::dropped_total();
        self.access_log_dropped
            .inc_by(dropped.saturating_sub(self.access_log_dropped.get()));
        // Counted by the serving threads, process-wide, once per batch.
        let (batches, writes) = crate::upstream::batch::totals();
        self.upstream_write_batches
            .inc_by(batches.saturating_sub(self.upstream_write_batches.get()));
        self.upstream_batched_writes
            .inc_by(writes.saturating_sub(self.upstream_batched_writes.get()));
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Marks a successful (re)load now.
    pub fn loaded(&self, synapse_routes_version: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload.set(now);
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), synapse_routes_version])
            .set(1);
    }
}

/// A bounded label for a method.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// `2xx`, `4xx`...
pub fn status_class(code: u16) -> &'static str {
    match code / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
