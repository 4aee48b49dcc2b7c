//! `synapse-edge generate`: the guide's deployment from one topology file,
//! byte for byte as reviewed, read back by the edge's own config reader into
//! the same topology, refused when inconsistent, and never overwriting an
//! operator's edits without --force.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use synapse_edge::config::Stream;
use synapse_edge::generate::{Plan, Role};
use synapse_edge::state::{EdgeState, Sources};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_synapse-edge"))
        .args(args)
        .output()
        .unwrap()
}

fn generate(topology: &Path, out: &Path, force: bool) -> Output {
    let mut args = vec![
        "generate",
        "--topology",
        topology.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    if force {
        args.push("--force");
    }
    edge(&args)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(e.strip_prefix(dir).unwrap().to_path_buf());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The generated files for the guide's topology match the reviewed copies
/// in tests/fixtures/generate/guide (regenerate with UPDATE_GOLDEN=1 only
/// after reviewing the difference).
#[test]
fn the_guides_topology_generates_the_reviewed_files() {
    let out = tempfile::tempdir().unwrap();
    let o = generate(&root().join("examples/topology.yaml"), out.path(), false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let golden = root().join("tests/fixtures/generate/guide");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let _ = std::fs::remove_dir_all(&golden);
        for f in files(out.path()) {
            let dst = golden.join(&f);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(out.path().join(&f), dst).unwrap();
        }
    }
    assert_eq!(
        files(out.path()),
        files(&golden),
        "a different set of files"
    );
    for f in files(&golden) {
        let want = std::fs::read_to_string(golden.join(&f)).unwrap();
        let got = std::fs::read_to_string(out.path().join(&f)).unwrap();
        assert_eq!(got, want, "{} differs from the reviewed copy", f.display());
    }
}

#[test]
fn output_is_deterministic_and_a_second_run_changes_nothing() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let topo = root().join("examples/topology.yaml");
    assert!(generate(&topo, a.path(), false).status.success());
    assert!(generate(&topo, b.path(), false).status.success());
    for f in files(a.path()) {
        assert_eq!(
            std::fs::read(a.path().join(&f)).unwrap(),
            std::fs::read(b.path().join(&f)).unwrap(),
            "{}",
            f.display()
        );
    }
    let again = generate(&topo, a.path(), false);
    assert!(again.status.success());
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(!text.contains("wrote"), "{text}");
    assert!(text.contains("unchanged"));
}

#[test]
fn an_edited_file_is_not_overwritten_without_force() {
    let out = tempfile::tempdir().unwrap();
    let topo = root().join("examples/topology.yaml");
    assert!(generate(&topo, out.path(), false).status.success());
    let edited = out.path().join("workers/rooms2.yaml");
    std::fs::write(&edited, "# my own changes\n").unwrap();
    let o = generate(&topo, out.path(), false);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rooms2.yaml") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&edited).unwrap(),
        "# my own changes\n"
    );
    assert!(generate(&topo, out.path(), true).status.success());
    assert!(
        std::fs::read_to_string(&edited)
            .unwrap()
            .contains("worker_name: rooms2")
    );
}

/// A minimal homeserver.yaml: main's listeners where the generated files
/// expect them.
fn homeserver(dir: &Path, sockets: &str) -> PathBuf {
    let p = dir.join("homeserver.yaml");
    std::fs::write(
        &p,
        format!(
            "server_name: example.org\nlisteners:\n  - path: {sockets}/synapse_inbound_main.sock\n    type: http\n    x_forwarded: true\n    resources: [{{names: [client, federation]}}]\n  - path: {sockets}/synapse_replication_main.sock\n    type: http\n    resources: [{{names: [replication]}}]\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn the_generated_files_read_back_into_the_same_topology() {
    let topo = root().join("examples/topology.yaml");
    let plan = Plan::load(&topo).unwrap();
    let out = tempfile::tempdir().unwrap();
    assert!(generate(&topo, out.path(), false).status.success());
    let hs = homeserver(out.path(), "/sockets");
    let sources = Sources {
        synapse: vec![
            hs.clone(),
            out.path().join("homeserver-workers.yaml"),
            out.path().join("workers"),
        ],
        edge: Some(out.path().join("edge.yaml")),
        routes: None,
    };
    let state = EdgeState::load(&sources).unwrap();
    let topo_read = &state.topology;
    // Same workers (besides main), same streams, inbound sockets exactly for
    // the routed roles, replication sockets exactly for instance_map members.
    let mut names: Vec<&str> = topo_read
        .workers
        .iter()
        .skip(1)
        .map(|w| w.name.as_str())
        .collect();
    names.sort();
    let mut planned: Vec<&str> = plan.workers.iter().map(|w| w.name.as_str()).collect();
    planned.sort();
    assert_eq!(names, planned);
    for p in &plan.workers {
        let w = &topo_read.workers[topo_read.worker_id(&p.name).unwrap().0 as usize];
        let mut got = w.streams.clone();
        got.sort();
        let mut want = p.streams.clone();
        want.sort();
        assert_eq!(got, want, "{}", p.name);
        let routed = !matches!(p.role, Role::Sender | Role::Tasks);
        assert_eq!(w.inbound.is_some(), routed, "{}", p.name);
        if routed {
            assert_eq!(
                w.inbound.as_ref().unwrap().to_string(),
                format!("unix:/sockets/synapse_inbound_{}.sock", p.name)
            );
        }
        assert_eq!(w.replication.is_some(), p.replication, "{}", p.name);
    }
    assert_eq!(
        state.synapse.stream_writers.get(&Stream::Typing),
        Some(&vec!["client_sync1".to_string()])
    );
    assert_eq!(
        state.synapse.federation_sender_instances,
        vec!["sender1", "sender2", "sender3", "sender4"]
    );
    // And `check` passes with the generated edge.yaml, without warnings
    // about media or quarantine.
    let o = edge(&[
        "check",
        "--synapse-config",
        hs.to_str().unwrap(),
        "--synapse-config",
        out.path().join("homeserver-workers.yaml").to_str().unwrap(),
        "--synapse-config",
        out.path().join("workers").to_str().unwrap(),
        "--config",
        out.path().join("edge.yaml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let warnings = text.split("warnings:").nth(1).unwrap_or("");
    assert!(
        !warnings.contains("media") && !warnings.contains("quarantine"),
        "warnings about media:\n{text}"
    );
}

#[test]
fn the_compose_file_parses_with_its_anchors_and_merge_keys() {
    let out = tempfile::tempdir().unwrap();
    assert!(
        generate(&root().join("examples/topology.yaml"), out.path(), false)
            .status
            .success()
    );
    let text = std::fs::read_to_string(out.path().join("docker-compose.workers.yaml")).unwrap();
    let mut v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    v.apply_merge().unwrap();
    let services = &v["services"];
    assert_eq!(
        services["rooms3"]["image"],
        "ghcr.io/element-hq/synapse:latest"
    );
    assert_eq!(services["rooms3"]["restart"], "unless-stopped");
    assert!(
        services["rooms3"]["command"]
            .as_str()
            .unwrap()
            .ends_with("--config-path=/data/workers/rooms3.yaml")
    );
    let health = services["sender2"]["healthcheck"]["test"]
        .as_sequence()
        .unwrap();
    assert!(
        health
            .iter()
            .any(|x| x == "/sockets/synapse_replication_sender2.sock"),
        "senders have no inbound socket"
    );
    let media_volumes = services["media1"]["volumes"].as_sequence().unwrap();
    assert!(media_volumes.iter().any(|x| x == "./media:/media"));
    assert!(
        services["synapse-edge"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|x| x == "sockets:/sockets")
    );
}

fn refused(topology: &str, key: &str, words: &str) {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("topology.yaml");
    std::fs::write(&topo, topology).unwrap();
    let out = dir.path().join("out");
    let o = generate(&topo, &out, false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted: {topology}");
    assert!(err.contains(key) && err.contains(words), "{err}");
    assert!(err.contains("fix:"), "{err}");
    assert!(!out.exists(), "something was written");
}

const BASE: &str = "server_name: example.org\nworkers: {client_sync: 1, rooms: 2, tasks: 1}\n";

#[test]
fn an_inconsistent_topology_is_refused_and_nothing_is_written() {
    refused(
        &format!("{BASE}stream_writers: {{typing: [client_sync1, rooms1]}}\n"),
        "stream_writers.typing",
        "only have one writer",
    );
    refused(
        &format!("{BASE}stream_writers: {{typing: [tasks1]}}\n"),
        "stream_writers.typing",
        "no inbound socket",
    );
    refused(
        &format!("{BASE}custom_workers: [{{name: rooms1, role: rooms}}]\n"),
        "custom_workers",
        "used twice",
    );
    refused(
        &format!("{BASE}sockets: /{}\n", "very-long-folder-name/".repeat(5)),
        "sockets",
        "Unix limit",
    );
    refused(
        &format!("{BASE}stream_writers: {{typing: [nobody]}}\n"),
        "stream_writers.typing",
        "not a worker",
    );
    refused(
        "server_name: x\nworkers: {roomz: 1}\n",
        "",
        "unknown variant",
    );
}
