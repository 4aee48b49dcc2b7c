//! One request, from the client to its worker and back: route it, check its
//! limits, forward it faithfully (the target byte for byte, hop-by-hop
//! headers dropped, X-Forwarded-* set), stream both bodies, and answer
//! failures in Matrix's JSON error form.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};
use smallvec::SmallVec;

use crate::balancing::AllUp;
use crate::body::{BodyProgress, RequestBody, ResponseBody};
use crate::config::Timeouts;
use crate::state::{EdgeState, RequestView};
use crate::upstream::{UpstreamError, Upstreams};

/// The default body limit, Synapse's default `max_upload_size`.
pub const DEFAULT_MAX_BODY: u64 = 50 << 20;

/// What the proxy needs to serve requests: one consistent snapshot.
pub struct Proxy {
    pub state: Arc<EdgeState>,
    pub upstreams: Upstreams,
    pub max_body: u64,
    pub timeouts: Timeouts,
}

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ClientConn {
    pub addr: IpAddr,
    /// `http` or `https`: the listener's scheme, for X-Forwarded-Proto.
    pub scheme: &'static str,
}

impl Proxy {
    pub fn new(state: Arc<EdgeState>) -> Proxy {
        let edge = &state.edge;
        let max_body = edge
            .limits
            .max_body_size
            .map(|b| b.0)
            .or(state.synapse.max_upload_size)
            .unwrap_or(DEFAULT_MAX_BODY);
        let upstreams = Upstreams::new(&state.topology, edge.timeouts.connect, &edge.upstream);
        Proxy {
            timeouts: edge.timeouts.clone(),
            state,
            upstreams,
            max_body,
        }
    }

    /// Serves one request. Never fails: every problem becomes a response.
    pub async fn handle(&self, req: Request<Incoming>, conn: ClientConn) -> Response<ResponseBody> {
        let (mut parts, body) = req.into_parts();
        let Some(pq) = parts
            .uri
            .path_and_query()
            .cloned()
            .filter(|pq| pq.path().starts_with('/'))
        else {
            return matrix_error(
                StatusCode::BAD_REQUEST,
                "M_UNRECOGNIZED",
                "the request target must be an absolute path",
            );
        };
        if declared_length(&parts.headers).is_some_and(|n| n > self.max_body) {
            tracing::info!(target: "synapse_edge::proxy", path = pq.path(), limit = self.max_body, "request body too large (Content-Length)");
            return too_large(self.max_body);
        }
        let state = &self.state;
        let view = RequestView {
            method: &parts.method,
            target: pq.as_str(),
            headers: &parts.headers,
            client: conn.addr,
        };
        let decision = state.decide(&view, &AllUp);
        let route = decision.route;
        let Some(worker) = decision.worker else {
            tracing::warn!(route = %route.name, pool = %decision.pool.name, "no live worker in pool");
            return matrix_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "no worker is available for this request",
            );
        };
        let worker_name = &state.topology.worker(worker).name;
        let timeout = route_timeout(&self.timeouts, route.long_poll);

        // HTTP/2 carries the host in the URI; workers speak HTTP/1.1.
        if !parts.headers.contains_key(HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(HOST, v);
        }
        strip_hop_by_hop(&mut parts.headers);
        set_forwarded(&mut parts.headers, conn);
        parts.version = Version::HTTP_11;

        let progress = BodyProgress::new();
        let has_body = !body.is_end_stream();
        let upstream_req = Request::from_parts(
            parts,
            RequestBody::new(body, self.max_body, progress.clone()),
        );
        let send = self.upstreams.send(worker, pq.clone(), upstream_req);
        tokio::pin!(send);
        // The timeout runs from the last progress of the request body, so a
        // large upload is not cut off while it is still flowing.
        let result = loop {
            let last = progress.last_activity();
            tokio::select! {
                r = &mut send => break r,
                _ = tokio::time::sleep_until(last + timeout) => {
                    if has_body && progress.last_activity() > last {
                        continue;
                    }
                    tracing::warn!(route = %route.name, worker = %worker_name, path = pq.path(), timeout = ?timeout, "worker did not answer in time");
                    return matrix_error(StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN", "the homeserver did not answer in time");
                }
            }
        };
        match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, ResponseBody::Upstream(body))
            }
            Err(_) if progress.exceeded() => {
                tracing::info!(route = %route.name, worker = %worker_name, limit = self.max_body, "request body too large (streamed)");
                too_large(self.max_body)
            }
            Err(e @ UpstreamError::Connect(_)) | Err(e @ UpstreamError::BadTarget) => {
                tracing::warn!(route = %route.name, worker = %worker_name, cause = %e, "worker unreachable");
                matrix_error(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    "the homeserver worker is unreachable",
                )
            }
            Err(e) => {
                tracing::warn!(route = %route.name, worker = %worker_name, cause = %e, "request to worker failed");
                matrix_error(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    "the homeserver worker failed to answer",
                )
            }
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
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
    let listed: SmallVec<[HeaderName; 4]> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    let proxied: SmallVec<[HeaderName; 2]> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxied {
        headers.remove(name);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Synapse takes the client address from the *first* X-Forwarded-For entry,
/// so a value sent by an untrusted client is replaced, never appended to:
/// otherwise any client could choose the address Synapse logs, rate-limits
/// and bans.
fn set_forwarded(headers: &mut HeaderMap, conn: ClientConn) {
    if let Ok(v) = HeaderValue::from_str(&conn.addr.to_string()) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(conn.scheme));
}

/// How long a connection may wait for a worker's answer on this route.
pub fn route_timeout(timeouts: &Timeouts, long_poll: bool) -> Duration {
    if long_poll {
        timeouts.long_poll
    } else {
        timeouts.upstream
    }
}
