//! Workers come and go under load: failover in each key's sticky order, safe
//! retries, fallbacks, and reloads that drop nothing.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness::Harness;
use http::StatusCode;
use synapse_edge::standin::StandIn;
use synapse_edge::state::{EdgeState, Sources};
use tokio::time::Instant;

const FAST_HEALTH: &str =
    "health:\n  interval: 100ms\n  timeout: 300ms\n  unhealthy_after: 2\n  healthy_after: 2\n";

fn room(i: usize) -> String {
    format!("%21room{i}xyz%3Ademo.example")
}

/// What a load run saw.
#[derive(Default)]
struct Seen {
    ok: usize,
    /// Failures of requests the edge may retry (GET/PUT): must be zero.
    failed: Vec<String>,
    /// (time, room, worker) for room requests.
    rooms: Vec<(Instant, usize, String)>,
}

/// `clients` concurrent clients mixing room, sync and media requests until
/// `until`.
async fn load(h: Arc<Harness>, clients: usize, rooms: usize, until: Instant) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let h = h.clone();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = c;
            while Instant::now() < until {
                n += clients;
                let r = n % rooms;
                let (method, target) = match n % 4 {
                    0 => (
                        "GET",
                        format!("/_matrix/client/v3/rooms/{}/messages?dir=b", room(r)),
                    ),
                    1 => (
                        "PUT",
                        format!(
                            "/_matrix/client/v3/rooms/{}/send/m.room.message/t{n}",
                            room(r)
                        ),
                    ),
                    2 => (
                        "GET",
                        format!("/_matrix/client/v3/sync?since=s{n}&access_token=syt_dXNlcg_{c}_x"),
                    ),
                    _ => (
                        "GET",
                        "/_matrix/client/v1/media/download/demo.example/m".to_string(),
                    ),
                };
                let a = h.send(method, &target, &[], b"{}").await;
                let mut s = seen.lock().unwrap();
                if a.status == StatusCode::OK {
                    s.ok += 1;
                    if n % 4 < 2 {
                        s.rooms.push((Instant::now(), r, a.worker().to_string()));
                    }
                } else {
                    s.failed.push(format!(
                        "{method} {target}: {} {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    ));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap()
}

async fn owners(h: &Harness, rooms: usize) -> Vec<String> {
    let mut v = Vec::new();
    for r in 0..rooms {
        v.push(
            h.get(&format!("/_matrix/client/v3/rooms/{}/messages", room(r)))
                .await
                .worker()
                .to_string(),
        );
    }
    v
}

fn take_standin(h: &mut Harness, name: &str) -> StandIn {
    let i = h.standins.iter().position(|s| s.name == name).unwrap();
    h.standins.remove(i)
}

fn socket(h: &Harness, name: &str) -> std::path::PathBuf {
    h.dir
        .path()
        .join("sockets")
        .join(format!("synapse_inbound_{name}.sock"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_room_worker_under_load_fails_no_request_and_moves_only_its_rooms() {
    const ROOMS: usize = 48;
    let mut h = Harness::start(FAST_HEALTH).await;
    let before = owners(&h, ROOMS).await;
    assert!(before.iter().any(|w| w == "rooms2"));
    let victim = take_standin(&mut h, "rooms2");
    let path = socket(&h, "rooms2");
    let h = Arc::new(h);
    let start = Instant::now();
    let run = tokio::spawn(load(
        h.clone(),
        16,
        ROOMS,
        start + Duration::from_millis(2500),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    drop(victim);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _back = StandIn::start_unix("rooms2", &path).unwrap();
    let restarted = Instant::now();
    let seen = run.await.unwrap();

    assert!(
        seen.failed.is_empty(),
        "{} requests failed, e.g. {:?}",
        seen.failed.len(),
        &seen.failed[..seen.failed.len().min(3)]
    );
    // While rooms2 was out, its rooms went elsewhere and no other room moved.
    let mut first_moved = None;
    for (t, r, w) in &seen.rooms {
        if before[*r] != "rooms2" {
            assert_eq!(
                w, &before[*r],
                "room {r} moved although its worker stayed up"
            );
        } else if *t > killed && *t < restarted && w != "rooms2" {
            first_moved.get_or_insert(*t);
        } else if *t > killed + Duration::from_millis(50) && *t < restarted {
            panic!("room {r} still served by the dead worker");
        }
    }
    let gap = first_moved.map(|t| t - killed);
    println!(
        "failover: {} requests, 0 failed; first rooms2 room served elsewhere {gap:?} after the kill",
        seen.ok
    );
    // After the hold-down its rooms come back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        owners(&h, ROOMS).await,
        before,
        "rooms did not return to rooms2"
    );
}

#[tokio::test]
async fn an_empty_pool_falls_back_to_main_but_a_down_stream_writer_gets_503() {
    let mut h = Harness::start(FAST_HEALTH).await;
    for r in ["rooms1", "rooms2", "rooms3", "rooms4", "client_sync1"] {
        drop(take_standin(&mut h, r));
    }
    // Room traffic: every room worker is gone; main serves it.
    let a = h
        .get(&format!("/_matrix/client/v3/rooms/{}/messages", room(1)))
        .await;
    assert_eq!((a.status, a.worker()), (StatusCode::OK, "main"));
    // Let the health checks mark the writer down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = h
        .send(
            "PUT",
            &format!("/_matrix/client/v3/rooms/{}/typing/%40a%3Ab", room(1)),
            &[],
            b"{}",
        )
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.json()["errcode"], "M_UNKNOWN");
    assert!(a.headers.contains_key("retry-after"));
    // Sync may run anywhere: main takes it.
    let a = h.get("/_matrix/client/v3/sync?since=s1").await;
    assert_eq!((a.status, a.worker()), (StatusCode::OK, "main"));
}

#[tokio::test]
async fn a_non_idempotent_request_is_not_repeated_after_it_was_sent() {
    let mut h = Harness::start("").await;
    let owner = owners(&h, 4).await[3].clone();
    let counts = |h: &Harness| -> Vec<(String, usize)> {
        h.standins
            .iter()
            .map(|s| (s.name.clone(), s.stats.requests()))
            .collect()
    };
    let before = counts(&h);
    // The worker accepts the request and then dies before answering.
    let a = tokio::spawn({
        let base = h.base.clone();
        async move {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let req = http::Request::post(format!(
                "{base}/_matrix/client/v3/rooms/{}/redact/%24e",
                room(3)
            ))
            .header("x-standin-delay-ms", "3000")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
            client.request(req).await.unwrap().status()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let owner_had = before.iter().find(|(n, _)| n == &owner).unwrap().1;
    let victim = take_standin(&mut h, &owner);
    assert_eq!(
        victim.stats.requests(),
        owner_had + 1,
        "the POST reached the room's worker"
    );
    drop(victim);
    assert_eq!(a.await.unwrap(), StatusCode::BAD_GATEWAY);
    let after = counts(&h);
    let before: Vec<_> = before.into_iter().filter(|(n, _)| n != &owner).collect();
    assert_eq!(after, before, "the POST was sent again to another worker");
}

fn with_worker_folder(h: &Harness, extra: Option<&str>) -> Sources {
    let dir = h.dir.path();
    let folder = dir.join(if extra.is_some() {
        "workers_b"
    } else {
        "workers"
    });
    if let Some(name) = extra {
        std::fs::create_dir_all(&folder).unwrap();
        for e in std::fs::read_dir(dir.join("workers")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), folder.join(e.file_name())).unwrap();
        }
        let rooms1 = std::fs::read_to_string(folder.join("rooms1.yaml")).unwrap();
        std::fs::write(
            folder.join(format!("{name}.yaml")),
            rooms1.replace("rooms1", name),
        )
        .unwrap();
    }
    Sources {
        synapse: vec![dir.join("homeserver.yaml"), folder],
        edge: Some(dir.join("edge.yaml")),
        routes: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing_and_move_only_the_keys_a_new_worker_takes() {
    const ROOMS: usize = 64;
    let h = Harness::start("").await;
    let a = with_worker_folder(&h, None);
    let b = with_worker_folder(&h, Some("rooms5"));
    let _rooms5 = StandIn::start_unix("rooms5", &socket(&h, "rooms5")).unwrap();
    let state_a = EdgeState::load(&a).unwrap();
    let state_b = EdgeState::load(&b).unwrap();
    let owner = |s: &EdgeState, r: usize| {
        let target = format!("/_matrix/client/v3/rooms/{}/messages", room(r));
        let headers = synapse_edge::request::RequestHeaders::default();
        let view = synapse_edge::state::RequestView {
            method: &http::Method::GET,
            target: &target,
            headers: &headers,
            client: "127.0.0.1".parse().unwrap(),
        };
        let d = s.decide(&view, &synapse_edge::balancing::AllUp);
        s.topology.worker(d.worker.unwrap()).name.clone()
    };
    let mut moved = 0;
    for r in 0..ROOMS {
        let (x, y) = (owner(&state_a, r), owner(&state_b, r));
        if x != y {
            assert_eq!(
                y, "rooms5",
                "room {r} moved from {x} to {y}, not to the new worker"
            );
            moved += 1;
        }
    }
    assert!(moved > 0, "the new worker took no rooms");

    let h = Arc::new(h);
    // A long-poll parked before the reloads.
    let parked = tokio::spawn({
        let h = h.clone();
        async move {
            h.send(
                "GET",
                "/_matrix/client/v3/sync?since=s0",
                &[("x-standin-delay-ms", "2500")],
                b"",
            )
            .await
            .status
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let until = Instant::now() + Duration::from_millis(2000);
    let run = tokio::spawn(load(h.clone(), 8, ROOMS, until));
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = EdgeState::load(if i % 2 == 0 { &b } else { &a }).unwrap();
        h.proxy.install(next);
    }
    let seen = run.await.unwrap();
    assert_eq!(
        parked.await.unwrap(),
        StatusCode::OK,
        "the parked long-poll was cut"
    );
    assert!(
        seen.failed.is_empty(),
        "{:?}",
        &seen.failed[..seen.failed.len().min(3)]
    );
    let by_worker: HashMap<&str, usize> =
        seen.rooms.iter().fold(HashMap::new(), |mut m, (_, _, w)| {
            *m.entry(w.as_str()).or_default() += 1;
            m
        });
    for (_, r, w) in &seen.rooms {
        let (x, y) = (owner(&state_a, *r), owner(&state_b, *r));
        assert!(
            w == &x || w == &y,
            "room {r} served by {w}, neither of its owners {x}/{y}"
        );
    }
    assert!(
        by_worker.contains_key("rooms5"),
        "the added worker never served: {by_worker:?}"
    );
    println!(
        "{} requests across 10 reloads, 0 failed; {moved} of {ROOMS} rooms move to rooms5",
        seen.ok
    );
}

#[tokio::test]
async fn a_request_that_could_not_connect_goes_to_the_next_worker_with_its_body() {
    let mut h = Harness::start("").await;
    let owner = owners(&h, 8).await[5].clone();
    drop(take_standin(&mut h, &owner));
    let body = br#"{"user_id": "@bob:demo.example", "reason": "a body the retry must carry"}"#;
    let a = h
        .send(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/invite", room(5)),
            &[],
            body,
        )
        .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(
        a.worker().starts_with("rooms") && a.worker() != owner,
        "{}",
        a.worker()
    );
    assert_eq!(a.json()["body_bytes"], body.len());
    // The dead worker is out now: the next request goes straight elsewhere.
    let b = h
        .get(&format!("/_matrix/client/v3/rooms/{}/messages", room(5)))
        .await;
    assert_eq!(b.worker(), a.worker());
}
