//! Where each request of the guide's topology goes. These are the mistakes
//! hand-written Nginx configs make (a stream endpoint caught by a room rule,
//! pushrules writes on a worker, rooms split across workers), stated as the
//! behaviour an operator relies on.

mod common;

use common::*;

const ROOM: &str = "%21OGEhHVWSdvArJzumhm%3Aexample.org";

#[test]
fn stream_writer_endpoints_reach_their_writer_even_when_the_path_names_a_room() {
    let s = guide();
    let cases = [
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{ROOM}/typing/%40alice%3Aexample.org"),
        ),
        (
            "PUT",
            format!("/_matrix/client/r0/rooms/{ROOM}/typing/@alice:example.org"),
        ),
        (
            "POST",
            format!("/_matrix/client/v3/rooms/{ROOM}/receipt/m.read/%24event"),
        ),
        (
            "POST",
            format!("/_matrix/client/v3/rooms/{ROOM}/read_markers"),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/user/%40alice%3Aexample.org/rooms/{ROOM}/tags/u.work"),
        ),
        (
            "GET",
            format!("/_matrix/client/v3/user/%40alice%3Aexample.org/rooms/{ROOM}/tags"),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/user/%40alice%3Aexample.org/rooms/{ROOM}/account_data/m.x"),
        ),
        (
            "PUT",
            "/_matrix/client/v3/user/%40alice%3Aexample.org/account_data/m.direct".to_string(),
        ),
        (
            "PUT",
            "/_matrix/client/v3/sendToDevice/m.room.encrypted/txn1".to_string(),
        ),
        (
            "PUT",
            "/_matrix/client/v3/presence/%40alice%3Aexample.org/status".to_string(),
        ),
        (
            "GET",
            "/_matrix/client/api/v1/presence/%40alice%3Aexample.org/status".to_string(),
        ),
    ];
    for (method, target) in cases {
        let w = route(&s, method, &target);
        assert_eq!(w.worker, "client_sync1", "{method} {target} went to {w:?}");
        assert!(w.pool.starts_with("stream:"), "{method} {target}: {w:?}");
    }
}

#[test]
fn push_rules_writes_go_to_main_because_the_stream_is_not_delegated() {
    let s = guide();
    for method in ["PUT", "DELETE"] {
        let w = route(
            &s,
            method,
            "/_matrix/client/v3/pushrules/global/override/rule1",
        );
        assert_eq!(
            (w.route.as_str(), w.worker.as_str()),
            ("push_rules", "main")
        );
    }
    // Reads may go to any generic worker; with no client readers, that is main.
    let w = route(&s, "GET", "/_matrix/client/v3/pushrules/");
    assert_eq!(
        (w.route.as_str(), w.worker.as_str()),
        ("push_rules_read", "main")
    );
}

#[test]
fn one_rooms_client_and_federation_traffic_shares_one_rooms_worker() {
    let s = guide();
    let room_plain = "!OGEhHVWSdvArJzumhm:example.org";
    let targets = [
        (
            "GET",
            format!(
                "/_matrix/client/v3/rooms/{ROOM}/messages?from=t1&dir=b&filter=%7B%22a%22%3A1%7D"
            ),
        ),
        (
            "GET",
            format!("/_matrix/client/r0/rooms/{room_plain}/messages?dir=b"),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/txn42"),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{ROOM}/state/m.room.member/%40bob%3Aexample.org"),
        ),
        ("GET", format!("/_matrix/client/v3/rooms/{ROOM}/members")),
        ("POST", format!("/_matrix/client/v3/rooms/{ROOM}/invite")),
        (
            "POST",
            format!("/_matrix/client/v3/join/{ROOM}?server_name=example.org"),
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/state_ids/{ROOM}?event_id=%24abc"),
        ),
        (
            "POST",
            format!("/_matrix/federation/v1/get_missing_events/{room_plain}"),
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/backfill/{ROOM}?v=%24e&limit=10"),
        ),
    ];
    let first = route(&s, targets[0].0, &targets[0].1);
    assert_eq!(first.pool, "rooms");
    assert!(first.worker.starts_with("rooms"));
    for (m, t) in &targets {
        let w = route(&s, m, t);
        assert_eq!(w.pool, "rooms", "{m} {t}");
        assert_eq!(w.worker, first.worker, "{m} {t} left the room's worker");
    }
}

#[test]
fn media_reaches_the_media_worker_for_clients_federation_and_admins() {
    let s = guide();
    for (m, t) in [
        ("POST", "/_matrix/media/v3/upload?filename=a.png"),
        (
            "GET",
            "/_matrix/client/v1/media/download/example.org/abcdef",
        ),
        (
            "GET",
            "/_matrix/client/v1/media/thumbnail/example.org/abcdef?width=32&height=32",
        ),
        ("GET", "/_matrix/media/r0/download/example.org/abcdef"),
        ("GET", "/_matrix/federation/v1/media/download/abcdef"),
        ("POST", "/_synapse/admin/v1/purge_media_cache?before_ts=1"),
        ("GET", "/_synapse/admin/v1/users/%40a%3Aexample.org/media"),
        ("POST", "/_synapse/admin/v1/media/example.org/abcdef/delete"),
    ] {
        assert_eq!(worker_for(&s, m, t), "media1", "{m} {t}");
    }
}

#[test]
fn federation_transactions_go_to_the_federation_reader() {
    let s = guide();
    let w = route(&s, "PUT", "/_matrix/federation/v1/send/1700000000000");
    assert_eq!(
        (w.route.as_str(), w.worker.as_str()),
        ("federation_send", "federation_reader1")
    );
    for t in [
        "/_matrix/federation/v1/version",
        "/_matrix/federation/v1/query/profile?user_id=%40a%3Aexample.org",
        "/_matrix/federation/v1/event/%24abc",
        "/_matrix/key/v2/query",
        "/_matrix/federation/v1/user/devices/%40a%3Aexample.org",
    ] {
        assert_eq!(worker_for(&s, "GET", t), "federation_reader1", "{t}");
    }
}

#[test]
fn sync_goes_to_the_sync_worker_and_user_directory_to_its_worker() {
    let s = guide();
    for t in [
        "/_matrix/client/v3/sync?since=s1_2_3&timeout=30000",
        "/_matrix/client/v3/sync",
        "/_matrix/client/r0/sync?full_state=true&since=s1",
        "/_matrix/client/v3/events?from=s1",
        "/_matrix/client/v3/initialSync",
        &format!("/_matrix/client/v3/rooms/{ROOM}/initialSync"),
    ] {
        assert_eq!(worker_for(&s, "GET", t), "client_sync1", "{t}");
    }
    assert_eq!(
        worker_for(&s, "POST", "/_matrix/client/v3/user_directory/search"),
        "client_sync1"
    );
}

#[test]
fn initial_syncs_are_told_apart_from_incremental_ones() {
    let s = guide();
    assert_eq!(
        route(&s, "GET", "/_matrix/client/v3/sync?timeout=0").route,
        "initial_sync"
    );
    assert_eq!(
        route(&s, "GET", "/_matrix/client/v3/sync?since=").route,
        "initial_sync"
    );
    assert_eq!(
        route(
            &s,
            "GET",
            "/_matrix/client/v3/sync?since=s1&full_state=true"
        )
        .route,
        "initial_sync"
    );
    assert_eq!(
        route(&s, "GET", "/_matrix/client/v3/sync?since=s1&timeout=30000").route,
        "sync"
    );
    assert_eq!(
        route(&s, "GET", "/_matrix/client/v3/events").route,
        "initial_events"
    );
    assert_eq!(
        route(&s, "GET", "/_matrix/client/v3/events?from=s9").route,
        "events"
    );
}

#[test]
fn main_only_endpoints_stay_on_main() {
    let s = guide();
    for (m, t) in [
        ("POST", format!("/_matrix/client/v3/rooms/{ROOM}/forget")),
        ("POST", format!("/_matrix/client/v3/rooms/{ROOM}/upgrade")),
        (
            "POST",
            format!("/_matrix/client/v3/rooms/{ROOM}/report/%24ev"),
        ),
        ("POST", "/_matrix/client/v3/logout".to_string()),
        ("POST", "/_matrix/client/v3/pushers/set".to_string()),
        ("POST", "/_matrix/client/v3/account/password".to_string()),
        (
            "PUT",
            format!("/_matrix/client/v3/directory/list/room/{ROOM}"),
        ),
        ("GET", "/_synapse/admin/v1/server_version".to_string()),
        (
            "GET",
            "/_matrix/federation/v1/openid/userinfo?access_token=x".to_string(),
        ),
        (
            "GET",
            "/_matrix/client/v3/login/sso/redirect?redirectUrl=x".to_string(),
        ),
        ("GET", "/_synapse/client/oidc/callback?code=1".to_string()),
        ("GET", "/.well-known/matrix/client".to_string()),
        ("GET", "/_matrix/key/v2/server".to_string()),
    ] {
        assert_eq!(worker_for(&s, m, &t), "main", "{m} {t}");
    }
}

#[test]
fn path_versions_are_honoured_as_synapse_does_not_widened() {
    let s = guide();
    // `delete_devices` exists for r0 and v3 only; `unstable` is not a worker route.
    assert_eq!(
        route(&s, "POST", "/_matrix/client/v3/delete_devices").route,
        "device_lists"
    );
    assert_eq!(
        route(&s, "POST", "/_matrix/client/unstable/delete_devices").route,
        "main_fallback"
    );
    // `/sync` has no api/v1 or unstable form on workers.
    assert_eq!(
        route(&s, "GET", "/_matrix/client/api/v1/sync?since=1").route,
        "main_fallback"
    );
    assert_eq!(
        route(&s, "GET", "/_matrix/client/v4/rooms/!a:b/messages").route,
        "main_fallback"
    );
    // Matching is on the raw path, case-sensitive, as Synapse's servlets match.
    assert_eq!(
        route(&s, "GET", "/_matrix/client/V3/sync?since=1").route,
        "main_fallback"
    );
}

#[test]
fn typing_follows_stream_writers_not_worker_names() {
    let dir = guide_copy();
    let hs = dir.path().join("homeserver.yaml");
    let text = std::fs::read_to_string(&hs).unwrap();
    // Make rooms2 the typing writer: it needs a replication socket in instance_map.
    let text = text
        .replace("  typing:\n    - client_sync1", "  typing: rooms2")
        .replace(
            "instance_map:\n",
            "instance_map:\n  rooms2:\n    path: /sockets/synapse_replication_rooms2.sock\n",
        );
    std::fs::write(&hs, text).unwrap();
    let s = synapse_edge::state::EdgeState::load(&sources_in(dir.path())).expect("loads");
    let w = route(
        &s,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{ROOM}/typing/%40a%3Ab"),
    );
    assert_eq!(w.worker, "rooms2");
    // Other streams stay where they were.
    assert_eq!(
        worker_for(&s, "PUT", "/_matrix/client/v3/sendToDevice/m.x/t1"),
        "client_sync1"
    );
}

#[test]
fn pushrules_follow_a_delegated_push_rules_writer() {
    let dir = guide_copy();
    let hs = dir.path().join("homeserver.yaml");
    let text = std::fs::read_to_string(&hs).unwrap();
    let text = text.replace(
        "stream_writers:\n",
        "stream_writers:\n  push_rules: client_sync1\n",
    );
    std::fs::write(&hs, text).unwrap();
    let s = synapse_edge::state::EdgeState::load(&sources_in(dir.path())).expect("loads");
    assert_eq!(
        worker_for(&s, "PUT", "/_matrix/client/v3/pushrules/global/override/r"),
        "client_sync1"
    );
}

#[test]
fn an_initial_sync_pool_takes_initial_syncs_when_it_exists() {
    let dir = guide_copy();
    let w = dir.path().join("workers");
    let sync1 = std::fs::read_to_string(w.join("rooms4.yaml")).unwrap();
    std::fs::write(
        w.join("initial_sync1.yaml"),
        sync1.replace("rooms4", "initial_sync1"),
    )
    .unwrap();
    let s = synapse_edge::state::EdgeState::load(&sources_in(dir.path())).expect("loads");
    assert_eq!(
        worker_for(&s, "GET", "/_matrix/client/v3/sync"),
        "initial_sync1"
    );
    assert_eq!(
        worker_for(&s, "GET", "/_matrix/client/v3/initialSync"),
        "initial_sync1"
    );
    assert_eq!(
        worker_for(&s, "GET", "/_matrix/client/v3/sync?since=s1"),
        "client_sync1"
    );
}

#[test]
fn edge_config_pools_override_the_name_patterns() {
    let dir = guide_copy();
    let edge = dir.path().join("edge.yaml");
    // Use rooms3 and rooms4 as client readers; rooms1 and rooms2 keep rooms.
    std::fs::write(
        &edge,
        "pools:\n  rooms: [rooms1, rooms2]\n  client_reader: [\"rooms[34]\"]\n",
    )
    .unwrap();
    let mut src = sources_in(dir.path());
    src.edge = Some(edge);
    let s = synapse_edge::state::EdgeState::load(&src).expect("loads");
    let w = worker_for(&s, "GET", "/_matrix/client/v3/capabilities");
    assert!(w == "rooms3" || w == "rooms4", "{w}");
    let w = worker_for(
        &s,
        "GET",
        &format!("/_matrix/client/v3/rooms/{ROOM}/messages"),
    );
    assert!(w == "rooms1" || w == "rooms2", "{w}");
}
