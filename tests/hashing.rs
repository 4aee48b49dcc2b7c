//! Room stickiness: even spread, minimal movement when a worker leaves,
//! stable across instances and releases, and one key per room however the
//! room ID is written.

mod common;

use std::collections::HashMap;

use common::*;
use synapse_edge::balancing::AllUp;
use synapse_edge::topology::WorkerId;

/// A room ID of the common `!opaque:server` form, deterministic per index.
fn room_id(i: u32) -> String {
    format!(
        "!{:08x}{:04x}Qz:server{}.example",
        i.wrapping_mul(2654435761),
        i % 7919,
        i % 13
    )
}

fn messages_target(room: &str) -> String {
    format!(
        "/_matrix/client/v3/rooms/{}/messages?dir=b",
        room.replace('!', "%21").replace(':', "%3A")
    )
}

#[test]
fn a_hundred_thousand_rooms_spread_evenly_over_four_room_workers() {
    let s = guide();
    let mut counts: HashMap<String, u32> = HashMap::new();
    let n = 100_000;
    for i in 0..n {
        *counts
            .entry(worker_for(&s, "GET", &messages_target(&room_id(i))))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 4, "{counts:?}");
    let even = n as f64 / 4.0;
    for (w, c) in &counts {
        let dev = (*c as f64 - even).abs() / even;
        assert!(
            dev < 0.10,
            "{w} owns {c} of {n} rooms ({:.1}% off even)",
            dev * 100.0
        );
    }
}

#[test]
fn losing_a_worker_moves_only_that_workers_rooms() {
    let s = guide();
    let rooms3 = s.topology.worker_id("rooms3").unwrap();
    let without_rooms3 = |w: WorkerId| w != rooms3;
    let mut moved = 0;
    for i in 0..20_000 {
        let t = messages_target(&room_id(i));
        let before = route_with(&s, "GET", &t, &[], &AllUp).worker;
        let after = route_with(&s, "GET", &t, &[], &without_rooms3).worker;
        if before == "rooms3" {
            assert_ne!(after, "rooms3");
            moved += 1;
        } else {
            assert_eq!(before, after, "room {i} moved although its worker stayed");
        }
    }
    assert!(moved > 4_000, "rooms3 owned only {moved} rooms");
}

#[test]
fn removing_a_worker_from_the_config_moves_only_its_rooms_too() {
    let full = guide();
    let dir = guide_copy();
    std::fs::remove_file(dir.path().join("workers/rooms2.yaml")).unwrap();
    let smaller = synapse_edge::state::EdgeState::load(&sources_in(dir.path())).unwrap();
    for i in 0..5_000 {
        let t = messages_target(&room_id(i));
        let before = worker_for(&full, "GET", &t);
        let after = worker_for(&smaller, "GET", &t);
        if before != "rooms2" {
            assert_eq!(before, after, "room {i} moved");
        }
    }
}

#[test]
fn two_edge_instances_with_the_same_config_agree() {
    let a = guide();
    let b = guide();
    for i in 0..2_000 {
        let t = messages_target(&room_id(i));
        assert_eq!(worker_for(&a, "GET", &t), worker_for(&b, "GET", &t));
    }
}

/// A golden file of room → worker for the guide's topology. If this fails,
/// every deployment's rooms would move on upgrade: that needs a deliberate
/// decision (and a release note), not a refactor. Regenerate with
/// `UPDATE_GOLDEN=1 cargo test --test hashing` only when intended.
#[test]
fn room_assignment_matches_the_golden_file() {
    let s = guide();
    let path = fixture("golden/rooms_guide.tsv");
    let mut rooms: Vec<String> = (0..400).map(room_id).collect();
    // v12 domainless room IDs: `!` + 43 url-safe base64 characters.
    rooms.extend((0..100u32).map(|i| {
        let base = format!("{:043}", u128::from(i) * 7_919_000_013);
        format!(
            "!{}",
            &base[base.len() - 43..].replace('0', "A").replace('7', "-")
        )
    }));
    let actual: String = rooms
        .iter()
        .map(|r| format!("{r}\t{}\n", worker_for(&s, "GET", &messages_target(r))))
        .collect();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
    }
    let expected =
        std::fs::read_to_string(&path).expect("golden file exists (UPDATE_GOLDEN=1 creates it)");
    for (i, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        assert_eq!(
            a,
            e,
            "line {} of {}: a room changed worker",
            i + 1,
            path.display()
        );
    }
    assert_eq!(actual.lines().count(), expected.lines().count());
}

#[test]
fn a_room_has_one_key_however_it_is_written() {
    let s = guide();
    let v12 = "!Ab3_-x9QwErTyUiOpAsDfGhJkLzXcVbNm1234567890";
    assert_eq!(v12.len(), 44);
    let forms = [
        "/_matrix/client/v3/rooms/!abc:example.org/messages".to_string(),
        "/_matrix/client/v3/rooms/%21abc%3Aexample.org/messages".to_string(),
        "/_matrix/client/v3/rooms/%21abc%3aexample.org/messages".to_string(),
        "/_matrix/client/v3/rooms/!abc%3Aexample.org/messages?from=a:b&filter=%7B%22x%22%3A1%7D"
            .to_string(),
        "/_matrix/client/v3/rooms/%21abc:example.org/messages?to=t%3A1".to_string(),
        "/_matrix/client/v3/rooms/!abc:example.org/send/m.room.message/t:1".to_string(),
        "/_matrix/client/v3/rooms/!abc:example.org/state/m.room.member/@u:other.org".to_string(),
        "/_matrix/federation/v1/state_ids/!abc:example.org?event_id=$e:other.org".to_string(),
    ];
    let first = worker_for(&s, "GET", &forms[0]);
    for f in &forms {
        assert_eq!(worker_for(&s, "GET", f), first, "{f}");
    }
    // v12 IDs, plain and encoded, stick the same way, and differ between rooms.
    let a = worker_for(
        &s,
        "GET",
        &format!("/_matrix/client/v3/rooms/{v12}/messages"),
    );
    let b = worker_for(
        &s,
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?from=x%3Ay",
            v12.replace('!', "%21")
        ),
    );
    assert_eq!(a, b);
    // The key is the room, never what follows it.
    let key_of = |t: &str| {
        let st = &s;
        let method = http::Method::GET;
        let headers = synapse_edge::request::RequestHeaders::default();
        let req = synapse_edge::state::RequestView {
            method: &method,
            target: t,
            headers: &headers,
            client: "127.0.0.1".parse().unwrap(),
        };
        st.decide(&req, &AllUp).key.describe()
    };
    assert_eq!(key_of(&forms[3]), "room !abc:example.org");
    assert_eq!(key_of(&forms[6]), "room !abc:example.org");
    assert_eq!(
        key_of(&format!("/_matrix/client/v3/rooms/{v12}/messages?dir=b")),
        format!("room {v12}")
    );
}

#[test]
fn sync_sticks_by_user_whether_the_token_is_a_header_or_a_query() {
    let dir = guide_copy();
    // Four sync workers, so stickiness is observable.
    for i in 2..=4 {
        let text = std::fs::read_to_string(dir.path().join("workers/rooms1.yaml")).unwrap();
        std::fs::write(
            dir.path().join(format!("workers/client_sync{i}.yaml")),
            text.replace("rooms1", &format!("client_sync{i}")),
        )
        .unwrap();
    }
    let s = synapse_edge::state::EdgeState::load(&sources_in(dir.path())).unwrap();
    let mut seen = std::collections::HashSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let b64 = base64_nopad(user);
        let header = format!("Bearer syt_{b64}_RandomPartOfTheToken_1a2b3c");
        let h = route_with(
            &s,
            "GET",
            "/_matrix/client/v3/sync?since=s1",
            &[("authorization", &header)],
            &AllUp,
        );
        let q = route(
            &s,
            "GET",
            &format!("/_matrix/client/v3/sync?since=s2&access_token=syt_{b64}_OtherDevice_9z8y7x"),
        );
        assert_eq!(h.worker, q.worker, "{user}: header and query differ");
        seen.insert(h.worker);
    }
    assert!(
        seen.len() >= 2,
        "eight users all on one sync worker: {seen:?}"
    );
}

fn base64_nopad(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(s)
}
