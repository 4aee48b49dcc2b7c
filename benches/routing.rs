//! Route lookup + sticky key extraction + worker choice for a realistic
//! request mix on the guide's topology with the full built-in route table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use synapse_edge::balancing::AllUp;
use synapse_edge::request::RequestHeaders;
use synapse_edge::state::{EdgeState, RequestView, Sources};

/// Counts heap allocations, to show the decision path makes none.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn guide() -> EdgeState {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guide");
    EdgeState::load(&Sources {
        synapse: vec![dir.join("homeserver.yaml"), dir.join("workers")],
        ..Sources::default()
    })
    .expect("guide fixture")
}

/// Roughly what a busy homeserver sees: mostly sync long-polls and room
/// traffic, some media, federation and misc.
fn mix() -> Vec<(Method, String, RequestHeaders)> {
    let mut auth = HeaderMap::new();
    auth.insert(
        "authorization",
        HeaderValue::from_static("Bearer syt_YWxpY2U_aBcDeFgHiJkLmNoPqRsT_0a1b2c"),
    );
    let mut xm = HeaderMap::new();
    xm.insert(
        "authorization",
        HeaderValue::from_static(r#"X-Matrix origin="remote.example",destination="example.org",key="ed25519:a",sig="c2lnbmF0dXJl""#),
    );
    let none = RequestHeaders::default();
    let (auth, xm) = (RequestHeaders::from(auth), RequestHeaders::from(xm));
    let mut v = Vec::new();
    for i in 0..64u32 {
        let room = format!("%21room{i:04}abcdef%3Aexample.org");
        v.push((
            Method::GET,
            format!("/_matrix/client/v3/sync?since=s{i}_1_2&timeout=30000"),
            auth.clone(),
        ));
        v.push((
            Method::GET,
            format!("/_matrix/client/v3/sync?since=s{i}&access_token=syt_Ym9i_x{i}_y"),
            none.clone(),
        ));
        v.push((
            Method::GET,
            format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&from=t{i}"),
            auth.clone(),
        ));
        v.push((
            Method::PUT,
            format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/txn{i}"),
            auth.clone(),
        ));
        v.push((
            Method::PUT,
            format!("/_matrix/client/v3/rooms/{room}/typing/%40alice%3Aexample.org"),
            auth.clone(),
        ));
        v.push((
            Method::POST,
            format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/%24ev{i}"),
            auth.clone(),
        ));
        v.push((
            Method::GET,
            format!("/_matrix/client/v1/media/download/example.org/media{i}"),
            auth.clone(),
        ));
        v.push((
            Method::PUT,
            format!("/_matrix/federation/v1/send/{i}"),
            xm.clone(),
        ));
        v.push((
            Method::GET,
            "/_matrix/client/versions".to_string(),
            none.clone(),
        ));
        v.push((
            Method::POST,
            "/_matrix/client/v3/keys/query".to_string(),
            auth.clone(),
        ));
    }
    v
}

/// Routes every request of the mix once.
fn decide_all(
    state: &EdgeState,
    reqs: &[(Method, String, RequestHeaders)],
    client: std::net::IpAddr,
) {
    for (m, t, h) in reqs {
        let req = RequestView {
            method: m,
            target: t,
            headers: h,
            client,
        };
        black_box(state.decide(black_box(&req), &AllUp).worker);
    }
}

fn bench(c: &mut Criterion) {
    let state = guide();
    let reqs = mix();
    let client = "203.0.113.1".parse().expect("addr");
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    decide_all(&state, &reqs, client);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "heap allocations while deciding {} requests: {allocations} ({:.3} per request)",
        reqs.len(),
        allocations as f64 / reqs.len() as f64
    );
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(reqs.len() as u64));
    g.bench_function("request_mix", |b| {
        b.iter(|| decide_all(&state, &reqs, client))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
