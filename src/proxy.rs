//! One request, from the client to its worker and back: route it, check its
//! limits, forward it faithfully (the target byte for byte, hop-by-hop
//! headers dropped, X-Forwarded-* set), stream both bodies, and answer
//! failures in Matrix's JSON error form.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{
    CONNECTION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, RETRY_AFTER, STRICT_TRANSPORT_SECURITY,
};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use prometheus::{IntCounter, IntGauge};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use tokio::time::Instant;

use crate::access_log::{self, Outcome, RequestFacts};
use crate::balancing::Health;
use crate::body::{BodyProgress, RequestBody, ResponseBody, Tap, Unsent};
use crate::config::Timeouts;
use crate::conn_timer::ConnTimer;
use crate::front::{self, ListenerRole, Traffic};
use crate::health::{HealthTable, Transition};
use crate::http1::ConnectionOption;
use crate::metrics::{Metrics, method_label, status_class};
use crate::request::{ClientRequest, RequestHeaders};
use crate::routes::Route;
use crate::state::{EdgeState, RequestView, split_target};
use crate::topology::WorkerId;
use crate::topology::WorkerPool;
use crate::upstream::h1::{AnswerHeaders, Forwarded};
use crate::upstream::{Clients, Head, UpstreamError, Upstreams};

/// The default body limit, Synapse's default `max_upload_size`.
pub const DEFAULT_MAX_BODY: u64 = 50 << 20;

/// Everything one request is served with: a configuration, its workers'
/// addresses and their health. Reload builds a new one and swaps it in;
/// requests in flight finish on the one they started with.
pub struct Snapshot {
    pub state: Arc<EdgeState>,
    pub upstreams: Upstreams,
    pub health: Arc<HealthTable>,
    pub max_body: u64,
    /// Metric series per pool and per worker, looked up once per snapshot
    /// rather than by label per request.
    series: Series,
    /// Tells this snapshot's cached request series from an older one's.
    generation: u64,
}

/// Tells snapshots apart in the serving threads' series caches.
static SNAPSHOT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A method's place among the labelled ones.
fn method_index(m: &Method) -> u8 {
    match *m {
        Method::GET => 0,
        Method::PUT => 1,
        Method::POST => 2,
        Method::DELETE => 3,
        Method::HEAD => 4,
        Method::OPTIONS => 5,
        Method::PATCH => 6,
        _ => 7,
    }
}

/// A request's count and duration series, by what labels them.
#[derive(Clone)]
struct RequestSeries {
    count: IntCounter,
    duration: prometheus::Histogram,
}

/// (route, worker, method, status class) in one snapshot.
type RequestSeriesKey = (usize, u32, u8, u8);

thread_local! {
    /// Each serving thread's request series for the current snapshot: a
    /// label lookup (hashing five strings under a read lock that every
    /// serving thread shares, so its cache line moves between cores) once
    /// per combination instead of twice per request. Keyed by small
    /// integers the edge made itself, so hashed with Fx, not SipHash.
    static REQUEST_SERIES: std::cell::RefCell<(u64, FxHashMap<RequestSeriesKey, RequestSeries>)> =
        std::cell::RefCell::new((0, FxHashMap::default()));
}

/// One snapshot's metric series, by `PoolId` and `WorkerId`.
struct Series {
    pools: Vec<PoolSeries>,
    picks: Vec<IntCounter>,
}

struct PoolSeries {
    in_flight: IntGauge,
    request_body_bytes: IntCounter,
    response_body_bytes: IntCounter,
}

impl Series {
    fn of(state: &EdgeState, m: &Metrics) -> Series {
        Series {
            pools: state
                .topology
                .pools
                .iter()
                .map(|p| PoolSeries {
                    in_flight: m.in_flight.with_label_values(&[&p.name]),
                    request_body_bytes: m.request_body_bytes.with_label_values(&[&p.name]),
                    response_body_bytes: m.response_body_bytes.with_label_values(&[&p.name]),
                })
                .collect(),
            picks: state
                .topology
                .workers
                .iter()
                .map(|w| m.picks.with_label_values(&[&w.name]))
                .collect(),
        }
    }
}

impl Snapshot {
    /// Counts a request and records its duration, in the series for its
    /// labels from the serving thread's cache.
    fn record_request(
        &self,
        served: &Served,
        labels: (&str, &str, &str),
        method: &Method,
        status: u16,
        m: &Metrics,
        seconds: f64,
    ) {
        let method_label = method_label(method);
        let key: RequestSeriesKey = (
            served.route.map_or(0, |r| r as *const Route as usize),
            served.worker.map_or(u32::MAX, |w| w.0),
            method_index(method),
            (status / 100) as u8,
        );
        let make = || RequestSeries {
            count: m.requests.with_label_values(&[
                labels.0,
                labels.1,
                labels.2,
                method_label,
                status_class(status),
            ]),
            duration: m.request_duration.with_label_values(&[labels.0]),
        };
        let record = |series: &RequestSeries| {
            series.count.inc();
            series.duration.observe(seconds);
        };
        let cached = REQUEST_SERIES.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != self.generation {
                *cache = (self.generation, FxHashMap::default());
            }
            record(cache.1.entry(key).or_insert_with(make));
        });
        if cached.is_err() {
            // The thread is ending: no cache, the series looked up.
            record(&make());
        }
    }

    fn build(
        state: EdgeState,
        clients: Arc<Clients>,
        health: HealthTable,
        m: &Metrics,
    ) -> Snapshot {
        let max_body = state
            .edge
            .limits
            .max_body_size
            .map(|b| b.0)
            .or(state.synapse.max_upload_size)
            .unwrap_or(DEFAULT_MAX_BODY);
        Snapshot {
            series: Series::of(&state, m),
            generation: SNAPSHOT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            upstreams: Upstreams::new(&state.topology, clients),
            health: Arc::new(health),
            state: Arc::new(state),
            max_body,
        }
    }
}

/// The reverse proxy: the current snapshot and the connection pools.
pub struct Proxy {
    current: ArcSwap<Snapshot>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
}

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// The peer's address (from a PROXY header, if the listener takes one).
    pub peer: IpAddr,
    /// `http` or `https`: the listener's scheme, for X-Forwarded-Proto.
    pub scheme: &'static str,
    /// What the listener is for.
    pub role: Arc<ListenerRole>,
    /// `peer` as an X-Forwarded-For value, formatted once per connection.
    peer_header: HeaderValue,
    /// Times the connection's waits: for its next request (the listener)
    /// and for a worker's answer (the proxy). A clone, one per HTTP/2
    /// stream, has a timer of its own.
    pub timer: ConnTimer,
}

impl ClientConn {
    pub fn new(peer: IpAddr, scheme: &'static str, role: Arc<ListenerRole>) -> ClientConn {
        let peer_header = HeaderValue::from_str(&peer.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientConn {
            peer,
            scheme,
            role,
            peer_header,
            timer: ConnTimer::default(),
        }
    }
}

/// Why one attempt at a worker did not give a response.
enum AttemptError {
    TimedOut,
    Upstream(UpstreamError),
}

impl Proxy {
    pub fn new(state: EdgeState) -> Proxy {
        let metrics = Arc::new(Metrics::new());
        metrics.loaded(&state.routes.synapse_version);
        let clients = Arc::new(Clients::new(
            state.edge.timeouts.connect,
            &state.edge.upstream,
            metrics.clone(),
        ));
        let health = HealthTable::new(&state.topology);
        Proxy {
            current: ArcSwap::from_pointee(Snapshot::build(
                state,
                clients.clone(),
                health,
                &metrics,
            )),
            clients,
            metrics,
        }
    }

    /// The snapshot new requests are served with.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Installs a new, already validated state. Workers that stay keep their
    /// health; connection pools are kept. (Listeners, connect timeout and
    /// pool sizes need a restart to change.)
    pub fn install(&self, state: EdgeState) {
        let old = self.current.load();
        let health = HealthTable::carried_over(&state.topology, &old.health, &old.state.topology);
        self.metrics.loaded(&state.routes.synapse_version);
        self.current.store(Arc::new(Snapshot::build(
            state,
            self.clients.clone(),
            health,
            &self.metrics,
        )));
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves one request. Never fails: every problem becomes a response.
    /// Counts it, and taps its body for the byte count and access log.
    pub async fn handle(&self, req: ClientRequest, conn: &ClientConn) -> Response<ResponseBody> {
        let start = Instant::now();
        let snap = self.current.load_full();
        let m = &*self.metrics;
        let method = req.method.clone();
        let edge = &snap.state.edge;
        let access = access_log::enabled(edge.access_log).then(|| RequestFacts::of(&req));
        // Counts and logs the request if the client leaves before it is
        // answered (this future is then dropped mid-way).
        let mut unanswered = Unanswered {
            served: Served {
                start: Some(start),
                ..Served::default()
            },
            snap: &snap,
            m,
            access,
            peer: conn.peer,
            done: false,
        };
        let mut resp = snap.handle(req, conn, &mut unanswered.served, m).await;
        let (served, access) = unanswered.answered();
        if let Some(hsts) = &conn.role.hsts {
            resp.headers_mut()
                .insert(STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        let route = served.route.map_or("none", |r| r.name.as_str());
        let pool = served.pool.map_or("none", |p| p.name.as_str());
        let worker = served
            .worker
            .map_or("none", |w| snap.state.topology.worker(w).name.as_str());
        let status = resp.status().as_u16();
        let labels = (route, pool, worker);
        let seconds = start.elapsed().as_secs_f64();
        snap.record_request(&served, labels, &method, status, m, seconds);
        if let Some(c) = served
            .worker
            .and_then(|w| snap.series.picks.get(w.0 as usize))
        {
            c.inc();
        }
        let on_end = access.map(|facts| {
            let done = Outcome {
                client: served.client.unwrap_or(conn.peer),
                status,
                route: route.to_string(),
                worker: worker.to_string(),
                upstream: served.upstream,
                start: start.into_std(),
            };
            Box::new(move |bytes| access_log::write(facts, done, bytes))
                as Box<dyn FnOnce(u64) + Send>
        });
        let counter = match served
            .route
            .and_then(|r| snap.series.pools.get(r.pool.0 as usize))
        {
            Some(series) => series.response_body_bytes.clone(),
            None => m.response_body_bytes.with_label_values(&[pool]),
        };
        resp.map(|b| b.tapped(Tap::new(Some(counter), on_end)))
    }
}

/// A request not yet answered: if dropped so (its client left, and the
/// serving future with it), counts it by route and worker and writes its
/// access line with Nginx's 499.
struct Unanswered<'s> {
    served: Served<'s>,
    snap: &'s Snapshot,
    m: &'s Metrics,
    access: Option<RequestFacts>,
    peer: IpAddr,
    done: bool,
}

impl<'s> Unanswered<'s> {
    /// The request was answered: what serving it involved, and its access
    /// line to finish.
    fn answered(&mut self) -> (Served<'s>, Option<RequestFacts>) {
        self.done = true;
        (std::mem::take(&mut self.served), self.access.take())
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let served = &self.served;
        let route = served.route.map_or("none", |r| r.name.as_str());
        let pool = served.pool.map_or("none", |p| p.name.as_str());
        let worker = served
            .worker
            .map_or("none", |w| self.snap.state.topology.worker(w).name.as_str());
        self.m
            .abandoned
            .with_label_values(&[route, pool, worker])
            .inc();
        if let Some(facts) = self.access.take() {
            let done = Outcome {
                client: served.client.unwrap_or(self.peer),
                status: 499,
                route: route.to_string(),
                worker: worker.to_string(),
                upstream: None,
                start: served.start.unwrap_or_else(Instant::now).into_std(),
            };
            access_log::write(facts, done, 0);
        }
    }
}

/// What serving a request involved, for metrics and the access log.
#[derive(Default)]
struct Served<'s> {
    /// When the request arrived (one clock read serves every timer).
    start: Option<Instant>,
    route: Option<&'s Route>,
    pool: Option<&'s WorkerPool>,
    worker: Option<WorkerId>,
    client: Option<IpAddr>,
    upstream: Option<Duration>,
}

/// Decrements an in-flight gauge when the request is answered.
struct InFlight(IntGauge);

impl InFlight {
    fn new(g: IntGauge) -> InFlight {
        g.inc();
        InFlight(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Snapshot {
    async fn handle<'s>(
        &'s self,
        req: ClientRequest,
        conn: &ClientConn,
        served: &mut Served<'s>,
        m: &Metrics,
    ) -> Response<ResponseBody> {
        let reject = |reason: &str| m.rejected.with_label_values(&[reason]).inc();
        let ClientRequest {
            method,
            target,
            version,
            mut headers,
            length,
            body,
        } = req;
        let Some(pq) = target.path_and_query() else {
            reject("bad_request");
            return matrix_error(
                StatusCode::BAD_REQUEST,
                "M_UNRECOGNIZED",
                "the request target must be an absolute path",
            );
        };
        // What the edge answers or refuses itself.
        let edge = &self.state.edge;
        let role = &conn.role;
        if role.redirect_https {
            return front::redirect_or_challenge(role, pq, &headers);
        }
        let (path, _) = split_target(pq);
        if let Some(r) = edge.well_known.answer(path) {
            return r;
        }
        if let Some(kind) = Traffic::of(path)
            && !role.serves.contains(&kind)
        {
            reject("not_served_here");
            return matrix_error(
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "Unrecognized request",
            );
        }
        let client = front::client_address(conn.peer, &headers, &edge.trusted_proxies);
        served.client = Some(client);
        if let Some(r) = edge.admin.check(path, client) {
            reject("admin_guard");
            tracing::info!(%client, path, "admin API refused");
            return r;
        }
        if length.is_some_and(|n| n > self.max_body) {
            tracing::info!(
                path,
                limit = self.max_body,
                "request body too large (Content-Length)"
            );
            reject("too_large");
            return too_large(self.max_body);
        }
        let state = &self.state;
        let health = &*self.health;
        let view = RequestView {
            method: &method,
            target: pq,
            headers: &headers,
            client,
        };
        let routed = state.route(&view);
        // Keep only what outlives the borrowed request view.
        let (route, pool, key_hash) = (routed.route, routed.pool, routed.key_hash);
        served.route = Some(route);
        served.pool = Some(pool);
        let series = &self.series.pools[route.pool.0 as usize];
        let _in_flight = InFlight::new(series.in_flight.clone());
        // The key's live workers in its preference order, then main when
        // main may serve the route.
        let candidates = state.candidates(pool, key_hash);
        let preferred = candidates.first().copied();
        let mut order: SmallVec<[WorkerId; 8]> = candidates
            .into_iter()
            .filter(|&w| health.is_up(w))
            .collect();
        if route.fallback_to_main
            && !order.contains(&WorkerId::MAIN)
            && health.is_up(WorkerId::MAIN)
        {
            order.push(WorkerId::MAIN);
        }
        if order.is_empty() {
            reject("no_live_worker");
            // Per request, so debug: the health transition was logged once.
            tracing::debug!(route = %route.name, pool = %pool.name, "no live worker may serve this route");
            let mut resp = matrix_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "the homeserver worker for this request is unavailable; try again shortly",
            );
            let retry = state.edge.health.interval.as_secs().max(1);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry));
            return resp;
        }
        let timeout = route_timeout(&state.edge.timeouts, route.long_poll);

        // HTTP/2 carries the host in the URI; workers speak HTTP/1.1.
        if let Some(authority) = target.authority()
            && !headers.contains(&HOST)
            && let Ok(v) = HeaderValue::from_str(authority)
        {
            headers.append(HOST, v);
        }
        headers.strip_hop_by_hop();
        let forwarded_for = forwarded_for(client, conn);
        // Borrowed by every attempt: a retry needs no copy of it.
        let head = Head {
            method: &method,
            target: pq,
            headers: &headers,
            length,
            forwarded: Some(Forwarded {
                client: &forwarded_for,
                proto: conn.scheme,
            }),
            // HTTP/1 clients are answered by the edge's own server, which
            // writes the worker's lines as they came; hyper's HTTP/2 server
            // needs a map.
            answer_headers: if version == Version::HTTP_2 {
                AnswerHeaders::Map
            } else {
                AnswerHeaders::Lines
            },
        };
        // Retried after a response was lost only when repeating is harmless.
        let idempotent = matches!(
            method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT
        );

        let progress = BodyProgress::new(served.start.unwrap_or_else(Instant::now));
        let body_bytes = &series.request_body_bytes;
        let mut body = Some(body);
        let mut last_error = None;
        for (i, &worker) in order.iter().enumerate() {
            // A retry needs the whole body back (see body::REPLAY_LIMIT).
            let Some(unsent) = body
                .take()
                .map(Unsent::from)
                .or_else(|| progress.take_unsent())
            else {
                break;
            };
            let worker_name = &state.topology.worker(worker).name;
            let last = i + 1 == order.len();
            served.worker = Some(worker);
            if i > 0 {
                m.retries
                    .with_label_values(&[
                        if last_error.as_ref().is_some_and(UpstreamError::nothing_sent) {
                            "connect_failed"
                        } else {
                            "failed_after_send"
                        },
                    ])
                    .inc();
            }
            if Some(worker) != preferred {
                let reason = if worker == WorkerId::MAIN && !pool.members.contains(&worker) {
                    "fallback_to_main"
                } else if i == 0 {
                    "preferred_worker_down"
                } else {
                    "retry"
                };
                m.failovers.with_label_values(&[reason]).inc();
            }
            // Only the access log shows the worker's time: no clock read
            // per request without it.
            let sent_at = edge.access_log.then(Instant::now);
            let body = RequestBody::new(
                unsent,
                self.max_body,
                progress.clone(),
                Some(body_bytes.clone()),
            );
            // One try at one worker. The send future (about 0.9 KiB) is
            // pinned where it is made and lent to the timeout: handed
            // over by value it was copied whole three more times per
            // request on its way into this state.
            let send = std::pin::pin!(self.upstreams.send(worker, &head, body));
            match answer_within(send, timeout, &progress, &conn.timer).await {
                Ok(resp) => {
                    served.upstream = sent_at.map(|t| t.elapsed());
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Response::from_parts(parts, ResponseBody::upstream(body));
                }
                Err(AttemptError::TimedOut) => {
                    m.upstream_timeouts.with_label_values(&[worker_name]).inc();
                    tracing::warn!(route = %route.name, worker = %worker_name, path, timeout = ?timeout, "worker did not answer in time");
                    return matrix_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "M_UNKNOWN",
                        "the homeserver did not answer in time",
                    );
                }
                Err(AttemptError::Upstream(_)) if progress.exceeded() => {
                    reject("too_large");
                    tracing::info!(route = %route.name, worker = %worker_name, limit = self.max_body, "request body too large (streamed)");
                    return too_large(self.max_body);
                }
                Err(AttemptError::Upstream(e)) => {
                    let nothing_sent = e.nothing_sent();
                    if nothing_sent && health.mark_down(worker).is_some() {
                        tracing::warn!(worker = %worker_name, cause = %e, "worker unreachable: taken out until its health checks pass");
                    }
                    let may_retry = nothing_sent || idempotent;
                    tracing::warn!(route = %route.name, worker = %worker_name, cause = %e, retry = may_retry && !last, "request to worker failed");
                    last_error = Some(e);
                    if !may_retry {
                        break;
                    }
                }
            }
        }
        match last_error {
            Some(UpstreamError::Connect(_)) | Some(UpstreamError::BadTarget) => matrix_error(
                StatusCode::BAD_GATEWAY,
                "M_UNKNOWN",
                "the homeserver worker is unreachable",
            ),
            _ => matrix_error(
                StatusCode::BAD_GATEWAY,
                "M_UNKNOWN",
                "the homeserver worker failed to answer",
            ),
        }
    }
}

pin_project_lite::pin_project! {
    /// Waits for `send` (the worker exchange, pinned by the caller), with
    /// the response timeout counted from the request body's last progress
    /// (an upload is never cut while it flows). A hand-written future, not
    /// an async fn: that would keep `send` twice in every waiting
    /// request's state.
    struct AnswerWithin<'a, F> {
        #[pin]
        send: F,
        // The connection's timer: no timer registered per request.
        timer: &'a ConnTimer,
        last: Instant,
        timeout: Duration,
        progress: &'a BodyProgress,
    }
}

fn answer_within<'a, F>(
    send: F,
    timeout: Duration,
    progress: &'a BodyProgress,
    timer: &'a ConnTimer,
) -> AnswerWithin<'a, F> {
    let last = progress.last_activity();
    timer.set(last + timeout);
    AnswerWithin {
        send,
        timer,
        last,
        timeout,
        progress,
    }
}

impl<F> Future for AnswerWithin<'_, F>
where
    F: Future<Output = Result<Response<crate::upstream::PooledBody>, UpstreamError>>,
{
    type Output = Result<Response<crate::upstream::PooledBody>, AttemptError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(r) = this.send.poll(cx) {
            return std::task::Poll::Ready(r.map_err(AttemptError::Upstream));
        }
        while this.timer.poll_expired(cx).is_ready() {
            let last = this.progress.last_activity();
            if last <= *this.last {
                return std::task::Poll::Ready(Err(AttemptError::TimedOut));
            }
            // The body moved since: the wait starts again from then.
            *this.last = last;
            this.timer.set(last + *this.timeout);
        }
        std::task::Poll::Pending
    }
}

fn too_large(limit: u64) -> Response<ResponseBody> {
    matrix_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "M_TOO_LARGE",
        &format!("request body is larger than the limit of {limit} bytes"),
    )
}

/// A Matrix error response: `{"errcode": "...", "error": "..."}`.
pub fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "errcode": errcode, "error": error }).to_string();
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Hop-by-hop headers concern one connection, not the request: the ones
/// RFC 9110 names, `Proxy-*`, and any that `Connection` lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One walk over the names finds the fixed ones; most requests have
    // none, and most answers only `Connection: keep-alive`, whose options
    // name no header. Removal is by `HeaderName`, hashed without parsing.
    let mut doomed: SmallVec<[HeaderName; 4]> = SmallVec::new();
    for name in headers.keys() {
        if crate::http1::is_hop_by_hop(name.as_str().as_bytes()) {
            doomed.push(name.clone());
        }
    }
    if doomed.is_empty() {
        return;
    }
    for value in headers.get_all(CONNECTION) {
        for option in crate::http1::connection_options(value.as_bytes()) {
            if let ConnectionOption::Names(name) = option
                && let Ok(name) = HeaderName::from_bytes(name)
            {
                doomed.push(name);
            }
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// The `X-Forwarded-For` a worker gets. Synapse takes the client address
/// from the *first* entry, so the client's header is replaced by the one
/// address the edge believes (the peer, or what trusted proxies said),
/// never appended to: otherwise any client could choose the address
/// Synapse logs, rate-limits and bans.
fn forwarded_for(client: IpAddr, conn: &ClientConn) -> Cow<'_, HeaderValue> {
    if client == conn.peer {
        Cow::Borrowed(&conn.peer_header)
    } else {
        // An address's text is always a valid header value; were it not,
        // the peer is what the edge knows for sure.
        Cow::Owned(
            HeaderValue::from_str(&client.to_string()).unwrap_or_else(|_| conn.peer_header.clone()),
        )
    }
}

/// How long a connection may wait for a worker's answer on this route.
pub fn route_timeout(timeouts: &Timeouts, long_poll: bool) -> Duration {
    if long_poll {
        timeouts.long_poll
    } else {
        timeouts.upstream
    }
}

impl Snapshot {
    /// Checks every routed worker once (`GET /health`, concurrently) and
    /// records the results; logs each change of state once.
    pub async fn check_health(&self, m: &Metrics) {
        let settings = &self.state.edge.health;
        let checks = self.state.topology.workers.iter().enumerate().filter(|(_, w)| w.inbound.is_some()).map(
            |(i, w)| async move {
                let id = WorkerId(i as u32);
                // Host as `curl --unix-socket` sends it: HTTP/1.1 servers
                // in front of Synapse may insist on one.
                let mut headers = HeaderMap::new();
                headers.insert(HOST, HeaderValue::from_static("localhost"));
                let headers = RequestHeaders::Map(headers);
                let head = Head {
                    method: &Method::GET,
                    target: "/health",
                    headers: &headers,
                    length: None,
                    forwarded: None,
                    answer_headers: AnswerHeaders::Map,
                };
                let started = Instant::now();
                let ok = matches!(
                    tokio::time::timeout(settings.timeout, self.upstreams.probe(id, &head)).await,
                    Ok(Ok(true))
                );
                m.health_check_duration
                    .with_label_values(&[&w.name])
                    .observe(started.elapsed().as_secs_f64());
                let transition = self.health.observe(id, ok, settings);
                m.worker_up
                    .with_label_values(&[&w.name])
                    .set(i64::from(self.health.is_up(id)));
                match transition {
                    Some(Transition::Down) => tracing::warn!(worker = %w.name, "worker down: failed its health checks; its keys move to their next workers"),
                    Some(Transition::Up) => tracing::info!(worker = %w.name, "worker up: passed its health checks; its keys return"),
                    None => {}
                }
            },
        );
        futures_util::future::join_all(checks).await;
    }
}

/// Runs active health checks until dropped, always on the current snapshot.
pub async fn health_loop(proxy: Arc<Proxy>) {
    loop {
        let snap = proxy.snapshot();
        let interval = snap.state.edge.health.interval;
        snap.check_health(&proxy.metrics).await;
        drop(snap);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in lines {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    /// What is left, sorted (removal does not keep the order of names).
    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn headers_named_by_any_connection_option_go_with_it() {
        let mut h = map(&[
            ("connection", "Close, X-Session-Hint"),
            ("connection", " x-other ,keep-alive"),
            ("x-session-hint", "a"),
            ("x-other", "b"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("content-type", "application/json"),
            ("x-worker", "rooms1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "x-worker"]);
    }

    #[test]
    fn end_to_end_headers_are_kept_when_connection_only_says_keep_alive() {
        let mut h = map(&[
            ("server", "nginx"),
            ("connection", "keep-alive"),
            ("content-length", "28"),
            ("x-worker", "main"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-length", "server", "x-worker"]);
    }
}
