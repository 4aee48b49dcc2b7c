//! `synapse-edge generate`: one short topology file in, the guide's whole
//! worker deployment out: the shared worker section of the Synapse config
//! (with the `instance_map` the edge will honour), a file per worker, log
//! configs, a compose file and the edge's own config. Output is
//! deterministic and never silently overwrites a different file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, ConfigErrors, Problems, Stream};

/// The roles a worker can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ClientSync,
    Rooms,
    ClientReader,
    FederationReader,
    InitialSync,
    Media,
    Sender,
    Tasks,
}

impl Role {
    const ALL: [Role; 8] = [
        Role::ClientSync,
        Role::Rooms,
        Role::ClientReader,
        Role::FederationReader,
        Role::InitialSync,
        Role::Media,
        Role::Sender,
        Role::Tasks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::ClientSync => "client_sync",
            Role::Rooms => "rooms",
            Role::ClientReader => "client_reader",
            Role::FederationReader => "federation_reader",
            Role::InitialSync => "initial_sync",
            Role::Media => "media",
            Role::Sender => "sender",
            Role::Tasks => "tasks",
        }
    }

    /// Whether the edge routes requests to it (it gets an inbound socket).
    fn routed(self) -> bool {
        !matches!(self, Role::Sender | Role::Tasks)
    }
}

/// A custom-named worker.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CustomWorker {
    pub name: String,
    pub role: Role,
}

/// The topology file as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    pub server_name: String,
    #[serde(default = "default_sockets")]
    pub sockets: PathBuf,
    #[serde(default = "default_config_dir")]
    pub config_dir: PathBuf,
    #[serde(default = "default_log_dir")]
    pub log_dir: PathBuf,
    #[serde(default = "default_retention")]
    pub log_retention_days: u32,
    #[serde(default = "default_metrics_port")]
    pub metrics_base_port: u16,
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default = "default_edge_image")]
    pub edge_image: String,
    #[serde(default)]
    pub workers: BTreeMap<Role, u32>,
    #[serde(default)]
    pub custom_workers: Vec<CustomWorker>,
    #[serde(default)]
    pub stream_writers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub background_tasks: Option<String>,
    #[serde(default)]
    pub pushers: Vec<String>,
    #[serde(default)]
    pub appservice_notifications: Option<String>,
    #[serde(default)]
    pub user_directory: Option<String>,
    #[serde(default)]
    pub media_background_jobs: Option<String>,
}

fn default_sockets() -> PathBuf {
    PathBuf::from("/sockets")
}
fn default_config_dir() -> PathBuf {
    PathBuf::from("/data")
}
fn default_log_dir() -> PathBuf {
    PathBuf::from("/data/log")
}
fn default_retention() -> u32 {
    3
}
fn default_metrics_port() -> u16 {
    9101
}
fn default_image() -> String {
    "ghcr.io/element-hq/synapse:latest".to_string()
}
fn default_edge_image() -> String {
    "synapse-edge:latest".to_string()
}

/// A worker of the validated plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWorker {
    pub name: String,
    pub role: Role,
    pub streams: Vec<Stream>,
    /// In `instance_map`, with a replication socket.
    pub replication: bool,
    pub metrics_port: u16,
}

/// The validated topology: workers in a fixed order, stream writers.
#[derive(Debug, Clone)]
pub struct Plan {
    pub file: TopologyFile,
    pub workers: Vec<PlannedWorker>,
    pub stream_writers: BTreeMap<Stream, Vec<String>>,
}

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL).
const UNIX_PATH_MAX: usize = 107;

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                path,
                "",
                format!("cannot read the topology: {e}"),
                "check the --topology path",
            )
        })?;
        let file: TopologyFile = serde_yaml_ng::from_str(&text).map_err(|e| {
            ConfigError::new(
                path,
                "",
                format!("{e}"),
                "see examples/topology.yaml for the format",
            )
        })?;
        Plan::from_file(file, path)
    }

    /// Validates a topology; every problem is reported, nothing is written.
    pub fn from_file(file: TopologyFile, path: &Path) -> Result<Plan, ConfigErrors> {
        let mut problems = Problems::default();
        let err = |key: &str, problem: String, fix: &str| ConfigError::new(path, key, problem, fix);
        // Workers: counted roles in a fixed order, then custom ones.
        let mut workers: Vec<(String, Role)> = Vec::new();
        for role in Role::ALL {
            for i in 1..=file.workers.get(&role).copied().unwrap_or(0) {
                workers.push((format!("{}{i}", role.name()), role));
            }
        }
        for c in &file.custom_workers {
            workers.push((c.name.clone(), c.role));
        }
        let mut seen = BTreeSet::new();
        for (name, _) in &workers {
            if name == "main" || name == "master" || !seen.insert(name.clone()) {
                problems.push(err(
                    "custom_workers",
                    format!("the worker name `{name}` is used twice (or is main's)"),
                    "give every worker a unique name",
                ));
            }
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                problems.push(err(
                    "custom_workers",
                    format!("`{name}` is not a usable worker name"),
                    "use letters, digits, `_` and `-`",
                ));
            }
        }
        let role_of = |n: &str| workers.iter().find(|(w, _)| w == n).map(|(_, r)| *r);
        // Stream writers: the guide's by default.
        let writers_in = file.stream_writers.clone().unwrap_or_else(|| {
            let mut m = BTreeMap::new();
            for s in [
                "account_data",
                "presence",
                "receipts",
                "to_device",
                "typing",
            ] {
                m.insert(s.to_string(), vec!["client_sync1".to_string()]);
            }
            m.insert("events".to_string(), vec!["tasks1".to_string()]);
            m
        });
        // Since Synapse 1.152 whoever serves /quarantine_media must write
        // this stream: with media workers, that is them.
        let mut writers_in = writers_in;
        let media: Vec<String> = workers
            .iter()
            .filter(|(_, r)| *r == Role::Media)
            .map(|(n, _)| n.clone())
            .collect();
        if !media.is_empty() {
            writers_in
                .entry("quarantined_media_changes".to_string())
                .or_insert(media);
        }
        let mut stream_writers = BTreeMap::new();
        for (name, ws) in &writers_in {
            let key = format!("stream_writers.{name}");
            let Some(stream) = Stream::from_name(name) else {
                problems.push(err(
                    &key,
                    format!("unknown stream `{name}`"),
                    "use a stream Synapse knows, e.g. typing",
                ));
                continue;
            };
            if stream.single_writer() && ws.len() > 1 {
                problems.push(err(
                    &key,
                    format!("`{name}` can only have one writer, {} are listed", ws.len()),
                    "keep exactly one writer",
                ));
            }
            for w in ws {
                match role_of(w) {
                    None => problems.push(err(&key, format!("`{w}` is not a worker of this topology"), "name a worker from `workers` or `custom_workers`")),
                    Some(r) if stream.has_client_endpoints() && !r.routed() => problems.push(err(
                        &key,
                        format!("`{w}` writes `{name}` but has no inbound socket ({} workers take no requests), so its endpoints could not be served", r.name()),
                        "choose a worker that takes requests, e.g. client_sync1",
                    )),
                    Some(_) => {}
                }
            }
            stream_writers.insert(stream, ws.clone());
        }
        for (key, name) in [
            ("background_tasks", &file.background_tasks),
            ("appservice_notifications", &file.appservice_notifications),
            ("user_directory", &file.user_directory),
            ("media_background_jobs", &file.media_background_jobs),
        ] {
            if let Some(n) = name
                && role_of(n).is_none()
            {
                problems.push(err(
                    key,
                    format!("`{n}` is not a worker of this topology"),
                    "name a worker from `workers`",
                ));
            }
        }
        for p in &file.pushers {
            if role_of(p).is_none() {
                problems.push(err(
                    "pushers",
                    format!("`{p}` is not a worker of this topology"),
                    "name a worker from `workers`",
                ));
            }
        }
        if let Some(n) = &file.media_background_jobs
            && role_of(n).is_some_and(|r| r != Role::Media)
        {
            problems.push(err(
                "media_background_jobs",
                format!("`{n}` is not a media worker"),
                "name a media worker",
            ));
        }
        // Sockets must fit a Unix socket address.
        for (name, _) in workers.iter().chain([&("main".to_string(), Role::Tasks)]) {
            for kind in ["inbound", "replication"] {
                let p = file.sockets.join(format!("synapse_{kind}_{name}.sock"));
                let len = p.as_os_str().len();
                if len > UNIX_PATH_MAX {
                    problems.push(err(
                        "sockets",
                        format!("the socket path {} is {len} bytes, over the Unix limit of {UNIX_PATH_MAX}", p.display()),
                        "use a shorter sockets folder or worker name",
                    ));
                }
            }
        }
        // Who is in instance_map: stream writers, media, senders, tasks.
        let writes = |n: &str| -> Vec<Stream> {
            stream_writers
                .iter()
                .filter(|(_, ws)| ws.iter().any(|w| w == n))
                .map(|(s, _)| *s)
                .collect()
        };
        let planned = workers
            .iter()
            .enumerate()
            .map(|(i, (name, role))| {
                let streams = writes(name);
                PlannedWorker {
                    replication: !streams.is_empty()
                        || matches!(role, Role::Media | Role::Sender | Role::Tasks),
                    streams,
                    name: name.clone(),
                    role: *role,
                    metrics_port: file.metrics_base_port.saturating_add(1 + i as u16),
                }
            })
            .collect();
        problems.into_result(Plan {
            file,
            workers: planned,
            stream_writers,
        })
    }

    fn sock(&self, kind: &str, name: &str) -> String {
        self.file
            .sockets
            .join(format!("synapse_{kind}_{name}.sock"))
            .display()
            .to_string()
    }

    fn of_role(&self, role: Role) -> Vec<&PlannedWorker> {
        self.workers.iter().filter(|w| w.role == role).collect()
    }

    fn senders(&self) -> Vec<&str> {
        self.of_role(Role::Sender)
            .iter()
            .map(|w| w.name.as_str())
            .collect()
    }

    /// Every file to write, path relative to the output folder, in order.
    pub fn render(&self) -> Vec<(PathBuf, String)> {
        let mut out = vec![(PathBuf::from("homeserver-workers.yaml"), self.shared())];
        for w in &self.workers {
            out.push((
                PathBuf::from(format!("workers/{}.yaml", w.name)),
                self.worker(w),
            ));
        }
        let types: BTreeSet<&str> = self.workers.iter().map(|w| w.role.name()).collect();
        for t in types {
            out.push((
                PathBuf::from(format!("log.config/{t}.log.config")),
                self.log_config(t),
            ));
        }
        out.push((PathBuf::from("docker-compose.workers.yaml"), self.compose()));
        out.push((PathBuf::from("edge.yaml"), self.edge()));
        out
    }

    fn shared(&self) -> String {
        let f = &self.file;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Generated by `synapse-edge generate` for {}. Do not edit: change the topology",
            f.server_name
        );
        let _ = writeln!(
            s,
            "# and generate again. Include it after homeserver.yaml (--config-path order)."
        );
        let _ = writeln!(
            s,
            "# homeserver.yaml keeps main's listeners: inbound {} and",
            self.sock("inbound", "main")
        );
        let _ = writeln!(s, "# replication {}.\n", self.sock("replication", "main"));
        let _ = writeln!(s, "# Media is served by the media workers only.");
        let _ = writeln!(s, "enable_media_repo: false");
        let senders = self.senders();
        let _ = writeln!(s, "# Outbound federation.");
        if senders.is_empty() {
            let _ = writeln!(s, "federation_sender_instances: []");
        } else {
            let _ = writeln!(s, "federation_sender_instances:");
            for w in &senders {
                let _ = writeln!(s, "  - {w}");
            }
        }
        if let Some(m) = &f.media_background_jobs {
            let _ = writeln!(s, "media_instance_running_background_jobs: {m}");
        }
        if let Some(a) = &f.appservice_notifications {
            let _ = writeln!(s, "notify_appservices_from_worker: {a}");
        }
        let _ = writeln!(s, "# Push notifications.");
        if f.pushers.is_empty() {
            let _ = writeln!(s, "pusher_instances: []\nstart_pushers: true");
        } else {
            let _ = writeln!(s, "pusher_instances:");
            for p in &f.pushers {
                let _ = writeln!(s, "  - {p}");
            }
            let _ = writeln!(s, "start_pushers: false");
        }
        if let Some(b) = &f.background_tasks {
            let _ = writeln!(s, "run_background_tasks_on: {b}");
        }
        let _ = writeln!(
            s,
            "# Which worker writes which stream; synapse-edge routes each stream's endpoints there."
        );
        let _ = writeln!(s, "stream_writers:");
        for (stream, ws) in &self.stream_writers {
            let _ = writeln!(s, "  {}:", stream.name());
            for w in ws {
                let _ = writeln!(s, "    - {w}");
            }
        }
        if let Some(u) = &f.user_directory {
            let _ = writeln!(s, "update_user_directory_from_worker: {u}");
        }
        let _ = writeln!(
            s,
            "# Replication sockets of main and of every worker that needs one."
        );
        let _ = writeln!(s, "instance_map:");
        let _ = writeln!(
            s,
            "  main:\n    path: \"{}\"",
            self.sock("replication", "main")
        );
        for w in self.workers.iter().filter(|w| w.replication) {
            let _ = writeln!(
                s,
                "  {}:\n    path: \"{}\"",
                w.name,
                self.sock("replication", &w.name)
            );
        }
        let _ = writeln!(s, "# Workers need Redis.");
        let _ = writeln!(
            s,
            "redis:\n  enabled: true\n  path: \"{}\"",
            f.sockets.join("synapse_redis.sock").display()
        );
        s
    }

    fn worker(&self, w: &PlannedWorker) -> String {
        let f = &self.file;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Generated by `synapse-edge generate`: {} ({}).",
            w.name,
            w.role.name()
        );
        if !w.streams.is_empty() {
            let streams: Vec<&str> = w.streams.iter().map(|s| s.name()).collect();
            let _ = writeln!(s, "# Writes: {}.", streams.join(", "));
        }
        let _ = writeln!(s, "worker_app: synapse.app.generic_worker");
        let _ = writeln!(s, "worker_name: {}", w.name);
        let _ = writeln!(
            s,
            "worker_log_config: \"{}\"",
            f.config_dir
                .join(format!("log.config/{}.log.config", w.role.name()))
                .display()
        );
        if w.role == Role::Media {
            let _ = writeln!(
                s,
                "# The shared config turns the media repository off; this worker serves it."
            );
            let _ = writeln!(s, "enable_media_repo: true");
        }
        let _ = writeln!(s, "worker_listeners:");
        if w.replication {
            let _ = writeln!(s, "  # Replication, for the instance_map.");
            let _ = writeln!(
                s,
                "  - path: \"{}\"\n    type: http\n    resources:\n      - names: [replication]\n        compress: false",
                self.sock("replication", &w.name)
            );
        }
        if w.role.routed() {
            let resources = if w.role == Role::Media {
                "media, client, federation"
            } else {
                "client, federation"
            };
            let _ = writeln!(s, "  # Requests from synapse-edge.");
            let _ = writeln!(
                s,
                "  - path: \"{}\"\n    type: http\n    x_forwarded: true\n    resources:\n      - names: [{resources}]\n        compress: false",
                self.sock("inbound", &w.name)
            );
        }
        let _ = writeln!(
            s,
            "  # Prometheus (metrics listeners cannot use Unix sockets)."
        );
        let _ = writeln!(
            s,
            "  - type: metrics\n    bind_address: ''\n    port: {}",
            w.metrics_port
        );
        s
    }

    fn log_config(&self, kind: &str) -> String {
        let f = &self.file;
        format!(
            r#"# Generated by `synapse-edge generate`: logging for the {kind} workers.
# Daily files kept {days} days; writes buffered (flushed every 5 s or on warnings).
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.handlers.TimedRotatingFileHandler
    formatter: precise
    filename: {dir}/{kind}.log
    when: midnight
    backupCount: {days}
    encoding: utf8
  buffer:
    class: synapse.logging.handlers.PeriodicallyFlushingMemoryHandler
    target: file
    capacity: 10
    flushLevel: 30
    period: 5
loggers:
  synapse.metrics:
    level: WARN
    handlers: [buffer]
  synapse.replication.tcp:
    level: WARN
    handlers: [buffer]
  synapse.util.caches.lrucache:
    level: WARN
    handlers: [buffer]
  twisted:
    level: WARN
    handlers: [buffer]
  synapse:
    level: INFO
    handlers: [buffer]
root:
  level: INFO
  handlers: [buffer]
disable_existing_loggers: false
"#,
            dir = f.log_dir.display(),
            days = f.log_retention_days
        )
    }

    fn compose(&self) -> String {
        let f = &self.file;
        let cfg = f.config_dir.display();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Generated by `synapse-edge generate`: the workers and synapse-edge."
        );
        let _ = writeln!(
            s,
            "# Use beside your main compose file: docker compose -f compose.yaml -f docker-compose.workers.yaml up -d"
        );
        let _ = writeln!(
            s,
            "# The templates live in this file because YAML anchors cannot cross files."
        );
        let _ = writeln!(s, "x-synapse-worker-template: &synapse-worker-template");
        let _ = writeln!(s, "  image: {}", f.image);
        let _ = writeln!(s, "  restart: unless-stopped");
        let _ = writeln!(
            s,
            "  volumes:\n    - sockets:{}\n    - ./synapse:{cfg}",
            f.sockets.display()
        );
        let _ = writeln!(s, "  depends_on:\n    - synapse");
        let _ = writeln!(
            s,
            "  environment:\n    SYNAPSE_WORKER: synapse.app.generic_worker\n    SYNAPSE_CONFIG_DIR: {cfg}"
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "x-synapse-media-template: &synapse-media-template");
        let _ = writeln!(s, "  <<: *synapse-worker-template");
        let _ = writeln!(
            s,
            "  volumes:\n    - sockets:{}\n    - ./synapse:{cfg}\n    - ./media:/media",
            f.sockets.display()
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "services:");
        for w in &self.workers {
            let template = if w.role == Role::Media {
                "synapse-media-template"
            } else {
                "synapse-worker-template"
            };
            let health = if w.role.routed() {
                self.sock("inbound", &w.name)
            } else {
                self.sock("replication", &w.name)
            };
            let _ = writeln!(s, "  {}:", w.name.replace('_', "-"));
            let _ = writeln!(s, "    <<: *{template}");
            let _ = writeln!(
                s,
                "    command: run --config-path={cfg}/homeserver.yaml --config-path={cfg}/homeserver-workers.yaml --config-path={cfg}/workers/{}.yaml",
                w.name
            );
            let _ = writeln!(
                s,
                "    healthcheck:\n      test: [\"CMD\", \"curl\", \"-fSs\", \"--unix-socket\", \"{health}\", \"http://localhost/health\"]"
            );
        }
        let _ = writeln!(s, "  synapse-edge:");
        let _ = writeln!(s, "    image: {}", f.edge_image);
        let _ = writeln!(s, "    restart: unless-stopped");
        let _ = writeln!(
            s,
            "    command: [\"run\", \"--synapse-config={cfg}/homeserver.yaml\", \"--synapse-config={cfg}/homeserver-workers.yaml\", \"--synapse-config={cfg}/workers\", \"--config={cfg}/edge.yaml\"]"
        );
        let _ = writeln!(
            s,
            "    volumes:\n      - sockets:{}\n      - ./synapse:{cfg}:ro",
            f.sockets.display()
        );
        let _ = writeln!(
            s,
            "    # Add TLS listeners (443, 8448) in edge.yaml and publish them here."
        );
        let _ = writeln!(s, "    ports:\n      - \"8008:8008\"");
        let _ = writeln!(s, "    depends_on:\n      - synapse");
        let _ = writeln!(s);
        let _ = writeln!(s, "volumes:\n  sockets: {{}}");
        s
    }

    fn edge(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Generated by `synapse-edge generate`: synapse-edge for this topology."
        );
        let _ = writeln!(
            s,
            "# The worker names follow the default pool patterns (rooms*, client_sync*, ...);"
        );
        let _ = writeln!(
            s,
            "# pools are listed here so that the file says what serves what."
        );
        let _ = writeln!(s, "pools:");
        let mut pools: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for w in self.workers.iter().filter(|w| w.role.routed()) {
            pools.entry(w.role.name()).or_default().push(&w.name);
        }
        for (p, ws) in pools {
            let _ = writeln!(s, "  {p}: [{}]", ws.join(", "));
        }
        let _ = writeln!(s, "listeners:");
        let _ = writeln!(s, "  - listen: \"[::]:8008\"");
        let _ = writeln!(s, "    serve: [client, federation, media]");
        let _ = writeln!(
            s,
            "# Scraped by Prometheus inside the compose network; not published."
        );
        let _ = writeln!(s, "metrics_listen: \"0.0.0.0:9100\"");
        s
    }
}

/// What `generate` did, or would do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
    /// Files that exist with other contents (not written without --force).
    pub conflicts: Vec<PathBuf>,
}

/// Writes the plan into `out`. Without `force`, nothing is written when
/// any existing file would change.
pub fn write(plan: &Plan, out: &Path, force: bool) -> std::io::Result<Outcome> {
    let files = plan.render();
    let mut outcome = Outcome::default();
    for (rel, text) in &files {
        match std::fs::read_to_string(out.join(rel)) {
            Ok(existing) if existing == *text => outcome.unchanged.push(rel.clone()),
            Ok(_) => outcome.conflicts.push(rel.clone()),
            Err(_) => {}
        }
    }
    if !outcome.conflicts.is_empty() && !force {
        return Ok(outcome);
    }
    for (rel, text) in files {
        if outcome.unchanged.contains(&rel) {
            continue;
        }
        let path = out.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text)?;
        outcome.written.push(rel);
    }
    Ok(outcome)
}
