//! The operator's commands: `check` and `route`, and the errors a broken
//! configuration gets (file, key and fix named; non-zero exit; no panic).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_synapse-edge"))
        .args(args)
        .output()
        .expect("run synapse-edge")
}

fn guide_args(dir: &Path) -> Vec<String> {
    vec![
        "--synapse-config".into(),
        dir.join("homeserver.yaml").display().to_string(),
        "--synapse-config".into(),
        dir.join("workers").display().to_string(),
    ]
}

fn run_with(cmd: &str, dir: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec![cmd.into()];
    args.extend(guide_args(dir));
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    edge(&refs)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean refusal: non-zero, no panic, the file and key named.
fn assert_refused(o: &Output, file: &str, key: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "accepted a broken config; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(file), "error does not name {file}: {err}");
    assert!(err.contains(key), "error does not name `{key}`: {err}");
    assert!(err.contains("fix:"), "error gives no fix: {err}");
}

#[test]
fn check_accepts_the_guide_and_lists_workers_pools_and_warnings() {
    let o = run_with("check", &fixture("guide"), &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let workers = v["workers"].as_array().unwrap();
    let sync = workers
        .iter()
        .find(|w| w["name"] == "client_sync1")
        .unwrap();
    assert_eq!(
        sync["inbound"],
        "unix:/sockets/synapse_inbound_client_sync1.sock"
    );
    assert_eq!(
        sync["streams"],
        serde_json::json!([
            "typing",
            "to_device",
            "account_data",
            "receipts",
            "presence"
        ])
    );
    let sender = workers.iter().find(|w| w["name"] == "sender1").unwrap();
    assert_eq!(sender["routed"], false);
    let rooms = v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "rooms")
        .unwrap();
    assert_eq!(
        rooms["members"],
        serde_json::json!(["rooms1", "rooms2", "rooms3", "rooms4"])
    );
    let warnings = v["warnings"].to_string();
    assert!(
        warnings.contains("pool `client_reader` has no workers"),
        "{warnings}"
    );
}

#[test]
fn route_explains_one_request_as_json() {
    let o = run_with(
        "route",
        &fixture("guide"),
        &[
            "--json",
            "PUT",
            "/_matrix/client/v3/rooms/%21a%3Aexample.org/typing/%40u%3Aexample.org",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["route"], "typing");
    assert_eq!(v["pool"], "stream:typing");
    assert_eq!(v["key"], "room !a:example.org");
    assert_eq!(v["worker"], "client_sync1");
    assert_eq!(
        v["upstream"],
        "unix:/sockets/synapse_inbound_client_sync1.sock"
    );
}

#[test]
fn route_reads_the_token_from_a_header() {
    let o = run_with(
        "route",
        &fixture("guide"),
        &[
            "--json",
            "-H",
            "Authorization: Bearer syt_Ym9i_abc_def",
            "GET",
            "/_matrix/client/v3/sync?since=x",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["key"], "user @bob");
    assert_eq!(v["route"], "sync");
}

#[test]
fn a_missing_file_is_named() {
    let o = edge(&["check", "--synapse-config", "/nonexistent/homeserver.yaml"]);
    assert_refused(&o, "/nonexistent/homeserver.yaml", "");
}

#[test]
fn bad_yaml_names_the_file() {
    let dir = guide_copy();
    std::fs::write(
        dir.path().join("workers/rooms1.yaml"),
        "worker_name: [unclosed\n",
    )
    .unwrap();
    let o = run_with("check", dir.path(), &[]);
    assert_refused(&o, "rooms1.yaml", "invalid YAML");
}

#[test]
fn an_unknown_stream_is_refused() {
    let dir = guide_copy();
    let hs = dir.path().join("homeserver.yaml");
    let t = std::fs::read_to_string(&hs)
        .unwrap()
        .replace("  typing:\n", "  typin:\n");
    std::fs::write(&hs, t).unwrap();
    let o = run_with("check", dir.path(), &[]);
    assert_refused(&o, "homeserver.yaml", "stream_writers.typin");
    assert!(stderr(&o).contains("unknown stream"));
}

#[test]
fn a_writer_missing_from_instance_map_is_refused() {
    let dir = guide_copy();
    let hs = dir.path().join("homeserver.yaml");
    let t = std::fs::read_to_string(&hs).unwrap().replace(
        "  client_sync1:\n    path: \"/sockets/synapse_replication_client_sync1.sock\"\n",
        "",
    );
    std::fs::write(&hs, t).unwrap();
    let o = run_with("check", dir.path(), &[]);
    assert_refused(&o, "homeserver.yaml", "stream_writers.typing");
    assert!(stderr(&o).contains("not in instance_map"));
}

#[test]
fn a_worker_file_without_worker_name_is_refused() {
    let dir = guide_copy();
    let f = dir.path().join("workers/rooms2.yaml");
    let t = std::fs::read_to_string(&f)
        .unwrap()
        .replace("worker_name: \"rooms2\"\n", "");
    std::fs::write(&f, t).unwrap();
    let o = run_with("check", dir.path(), &[]);
    assert_refused(&o, "rooms2.yaml", "worker_name");
}

#[test]
fn a_writer_without_inbound_listener_is_an_error() {
    let dir = guide_copy();
    let hs = dir.path().join("homeserver.yaml");
    // tasks1 has only a replication socket; make it the typing writer.
    let t = std::fs::read_to_string(&hs)
        .unwrap()
        .replace("  typing:\n    - client_sync1", "  typing: tasks1");
    std::fs::write(&hs, t).unwrap();
    let o = run_with("check", dir.path(), &[]);
    assert_refused(&o, "tasks1.yaml", "worker_listeners");
    assert!(stderr(&o).contains("typing"));
}

#[test]
fn two_typing_writers_are_refused() {
    let dir = guide_copy();
    let hs = dir.path().join("homeserver.yaml");
    let t = std::fs::read_to_string(&hs).unwrap().replace(
        "  typing:\n    - client_sync1",
        "  typing:\n    - client_sync1\n    - media1",
    );
    std::fs::write(&hs, t).unwrap();
    let o = run_with("check", dir.path(), &[]);
    assert_refused(&o, "homeserver.yaml", "stream_writers.typing");
}

#[test]
fn an_unknown_key_in_edge_yaml_is_refused() {
    let dir = guide_copy();
    let edge_yaml = dir.path().join("edge.yaml");
    std::fs::write(&edge_yaml, "pool:\n  rooms: [rooms1]\n").unwrap();
    let o = run_with(
        "check",
        dir.path(),
        &["--config", edge_yaml.to_str().unwrap()],
    );
    assert_refused(&o, "edge.yaml", "unknown field `pool`");
}

#[test]
fn a_route_table_naming_an_unknown_pool_is_refused() {
    let dir = guide_copy();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        "synapse_version: \"1.0\"\nroutes:\n  - name: x\n    pool: nosuch\n    key: none\n    paths: [/x]\n",
    )
    .unwrap();
    let o = run_with("check", dir.path(), &["--routes", routes.to_str().unwrap()]);
    assert_refused(&o, "routes.yaml", "routes[0] (x).pool");
}

#[test]
fn malformed_route_arguments_are_refused_without_panic() {
    let dir = fixture("guide");
    for extra in [
        vec!["GET", "no-leading-slash"],
        vec!["-H", "NoColonHere", "GET", "/"],
        vec!["BAD METHOD", "/"],
    ] {
        let o = run_with("route", &dir, &extra);
        assert!(!o.status.success(), "{extra:?}");
        assert!(
            !stderr(&o).contains("panicked"),
            "{extra:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn check_refuses_certificates_that_do_not_load() {
    let dir = guide_copy();
    let edge_yaml = dir.path().join("edge.yaml");
    std::fs::write(
        dir.path().join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n",
    )
    .unwrap();
    std::fs::write(
        &edge_yaml,
        format!(
            "listeners:\n  - listen: \"127.0.0.1:8443\"\n    tls: true\ntls:\n  certificates:\n    - cert: {0}/bad.pem\n      key: {0}/bad.pem\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let o = run_with(
        "check",
        dir.path(),
        &["--config", edge_yaml.to_str().unwrap()],
    );
    assert_refused(&o, "bad.pem", "TLS certificates");
}
