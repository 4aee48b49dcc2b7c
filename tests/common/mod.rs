//! Helpers shared by the integration tests: the guide's topology fixture and
//! a one-line way to ask where a request goes.
#![allow(dead_code)]

pub mod harness;

use std::path::{Path, PathBuf};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use synapse_edge::balancing::{AllUp, Health};
use synapse_edge::state::{EdgeState, RequestView, Sources};

/// A TCP port free on 127.0.0.1 (for a listener a spawned process binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The guide's topology, as an operator would pass it.
pub fn guide_sources() -> Sources {
    let dir = fixture("guide");
    Sources {
        synapse: vec![dir.join("homeserver.yaml"), dir.join("workers")],
        ..Sources::default()
    }
}

pub fn guide() -> EdgeState {
    EdgeState::load(&guide_sources()).expect("the guide fixture loads")
}

/// Copies the guide fixture into a temporary folder so a test can edit it.
pub fn guide_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = fixture("guide");
    std::fs::create_dir(tmp.path().join("workers")).expect("mkdir");
    std::fs::copy(
        src.join("homeserver.yaml"),
        tmp.path().join("homeserver.yaml"),
    )
    .expect("copy");
    for e in std::fs::read_dir(src.join("workers")).expect("read fixture") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), tmp.path().join("workers").join(e.file_name())).expect("copy");
    }
    tmp
}

pub fn sources_in(dir: &Path) -> Sources {
    Sources {
        synapse: vec![dir.join("homeserver.yaml"), dir.join("workers")],
        ..Sources::default()
    }
}

/// Where a request goes: (route, pool, worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Where {
    pub route: String,
    pub pool: String,
    pub worker: String,
}

pub fn route_with(
    state: &EdgeState,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    health: &impl Health,
) -> Where {
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let mut map = HeaderMap::new();
    for (n, v) in headers {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let headers = synapse_edge::request::RequestHeaders::from(map);
    let req = RequestView {
        method: &method,
        target,
        headers: &headers,
        client: "203.0.113.9".parse().expect("addr"),
    };
    let d = state.decide(&req, health);
    Where {
        route: d.route.name.clone(),
        pool: d.pool.name.clone(),
        worker: d
            .worker
            .map(|w| state.topology.worker(w).name.clone())
            .unwrap_or_else(|| "(none)".into()),
    }
}

pub fn route(state: &EdgeState, method: &str, target: &str) -> Where {
    route_with(state, method, target, &[], &AllUp)
}

pub fn worker_for(state: &EdgeState, method: &str, target: &str) -> String {
    route(state, method, target).worker
}
