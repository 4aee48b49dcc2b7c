//! Reads the Synapse configuration the workers run with.
//!
//! Paths are given like Synapse's `--config-path`: files, or folders whose
//! `*.yaml` files are read in name order. A file that carries `worker_*` keys
//! is a worker file; every other file is shared configuration, merged key by
//! key with later files winning (as Synapse merges its config paths).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

use super::error::{ConfigError, ConfigErrors, Problems};

/// Synapse's name for the main process in `stream_writers` and friends.
pub const MAIN: &str = "main";

/// A stream that Synapse lets a worker write (`stream_writers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Events,
    Typing,
    ToDevice,
    AccountData,
    Receipts,
    Presence,
    PushRules,
    DeviceLists,
    ThreadSubscriptions,
    QuarantinedMediaChanges,
}

impl Stream {
    pub const ALL: [Stream; 10] = [
        Stream::Events,
        Stream::Typing,
        Stream::ToDevice,
        Stream::AccountData,
        Stream::Receipts,
        Stream::Presence,
        Stream::PushRules,
        Stream::DeviceLists,
        Stream::ThreadSubscriptions,
        Stream::QuarantinedMediaChanges,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stream::Events => "events",
            Stream::Typing => "typing",
            Stream::ToDevice => "to_device",
            Stream::AccountData => "account_data",
            Stream::Receipts => "receipts",
            Stream::Presence => "presence",
            Stream::PushRules => "push_rules",
            Stream::DeviceLists => "device_lists",
            Stream::ThreadSubscriptions => "thread_subscriptions",
            Stream::QuarantinedMediaChanges => "quarantined_media_changes",
        }
    }

    pub fn from_name(name: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Synapse refuses more than one writer for these streams.
    pub fn single_writer(self) -> bool {
        matches!(
            self,
            Stream::Typing
                | Stream::ToDevice
                | Stream::AccountData
                | Stream::Presence
                | Stream::PushRules
        )
    }

    /// Whether clients reach this stream's writer over HTTP. Only `events`
    /// is fed purely over replication.
    pub fn has_client_endpoints(self) -> bool {
        self != Stream::Events
    }
}

impl serde::Serialize for Stream {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a listener (or an `instance_map` entry) can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One entry of `listeners` / `worker_listeners`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub endpoint: Endpoint,
    /// `http`, `metrics`, `manhole`...
    pub kind: String,
    /// The resource names of all its `resources` entries.
    pub resources: Vec<String>,
}

impl Listener {
    /// An inbound listener carries client, federation or media traffic; a
    /// replication-only (or metrics) listener never does.
    pub fn is_inbound(&self) -> bool {
        self.kind == "http"
            && self
                .resources
                .iter()
                .any(|r| matches!(r.as_str(), "client" | "federation" | "media"))
    }

    pub fn serves(&self, resource: &str) -> bool {
        self.resources.iter().any(|r| r == resource)
    }
}

/// One worker's own file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerFile {
    pub path: PathBuf,
    pub app: String,
    pub name: String,
    pub listeners: Vec<Listener>,
    /// A worker-level `enable_media_repo` overrides the shared one.
    pub enable_media_repo: Option<bool>,
}

/// What the edge needs of the shared configuration (homeserver.yaml and the
/// other non-worker files), merged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SynapseConfig {
    /// Main's listeners.
    pub listeners: Vec<Listener>,
    pub instance_map: BTreeMap<String, Endpoint>,
    /// Writers per stream, as configured (names, `master` mapped to `main`).
    pub stream_writers: BTreeMap<Stream, Vec<String>>,
    pub enable_media_repo: bool,
    pub media_instance_running_background_jobs: Option<String>,
    pub update_user_directory_from_worker: Option<String>,
    pub federation_sender_instances: Vec<String>,
    pub pusher_instances: Vec<String>,
    pub run_background_tasks_on: Option<String>,
    pub notify_appservices_from_worker: Option<String>,
    /// `max_upload_size` (bytes), the default for the edge's body limit.
    pub max_upload_size: Option<u64>,
    pub workers: Vec<WorkerFile>,
    /// For error messages: which file set each shared top-level key.
    pub key_sources: BTreeMap<String, PathBuf>,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
}

impl SynapseConfig {
    /// The file a shared key came from (or the first file, if unset).
    pub fn source_of(&self, key: &str) -> PathBuf {
        self.key_sources
            .get(key)
            .or(self.files.first())
            .cloned()
            .unwrap_or_default()
    }

    fn clone_sources(&self) -> SynapseConfig {
        SynapseConfig {
            key_sources: self.key_sources.clone(),
            files: self.files.clone(),
            ..SynapseConfig::default()
        }
    }

    /// Loads and merges the given `--synapse-config` paths.
    pub fn load(paths: &[PathBuf]) -> Result<SynapseConfig, ConfigErrors> {
        let mut problems = Problems::default();
        if paths.is_empty() {
            return Err(ConfigError::new(
                "--synapse-config",
                "",
                "no Synapse configuration given",
                "pass --synapse-config /data/homeserver.yaml --synapse-config /data/workers",
            )
            .into());
        }
        let files = expand_paths(paths, &mut problems);
        let mut shared = Mapping::new();
        let mut cfg = SynapseConfig {
            files: files.clone(),
            ..SynapseConfig::default()
        };
        let mut worker_docs = Vec::new();
        for file in &files {
            let Some(doc) = read_yaml(file, &mut problems) else {
                continue;
            };
            let is_worker = doc.keys().any(|k| {
                k.as_str()
                    .is_some_and(|k| matches!(k, "worker_app" | "worker_name" | "worker_listeners"))
            });
            if is_worker {
                worker_docs.push((file.clone(), doc));
            } else {
                for (k, v) in doc {
                    if let Some(name) = k.as_str() {
                        cfg.key_sources.insert(name.to_string(), file.clone());
                    }
                    shared.insert(k, v);
                }
            }
        }
        cfg.read_shared(&shared, &mut problems);
        for (file, doc) in worker_docs {
            if let Some(w) = read_worker(&file, &doc, &mut problems) {
                cfg.workers.push(w);
            }
        }
        problems.into_result(cfg)
    }

    fn read_shared(&mut self, doc: &Mapping, problems: &mut Problems) {
        let sources = self.clone_sources();
        let take = |key: &str| -> Option<(Value, PathBuf)> {
            doc.get(key)
                .filter(|v| !v.is_null())
                .map(|v| (v.clone(), sources.source_of(key)))
        };
        if let Some((v, file)) = take("listeners")
            && let Some(ls) = typed::<Vec<RawListener>>(&file, "listeners", v, problems)
        {
            self.listeners = convert_listeners(&file, "listeners", ls, problems);
        }
        if let Some((v, file)) = take("instance_map")
            && let Some(m) =
                typed::<BTreeMap<String, RawInstance>>(&file, "instance_map", v, problems)
        {
            for (name, inst) in m {
                let key = format!("instance_map.{name}");
                if let Some(e) = inst.endpoint(&file, &key, problems) {
                    self.instance_map
                        .insert(canonical_name(&name).to_string(), e);
                }
            }
        }
        if let Some((v, file)) = take("stream_writers")
            && let Some(m) =
                typed::<BTreeMap<String, OneOrMany>>(&file, "stream_writers", v, problems)
        {
            for (stream, writers) in m {
                let key = format!("stream_writers.{stream}");
                let Some(s) = Stream::from_name(&stream) else {
                    let known: Vec<_> = Stream::ALL.iter().map(|s| s.name()).collect();
                    problems.push(ConfigError::new(
                        &file,
                        key,
                        format!("unknown stream `{stream}`"),
                        format!("use one of: {}", known.join(", ")),
                    ));
                    continue;
                };
                let names: Vec<String> = writers
                    .into_vec()
                    .iter()
                    .map(|n| canonical_name(n).to_string())
                    .collect();
                self.stream_writers.insert(s, names);
            }
        }
        if let Some((v, file)) = take("max_upload_size") {
            let size = match &v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => super::ByteSize::parse(s).map(|b| b.0),
                _ => None,
            };
            match size {
                Some(n) => self.max_upload_size = Some(n),
                None => problems.push(ConfigError::new(
                    &file,
                    "max_upload_size",
                    "not a size",
                    "write it as Synapse does, e.g. `50M`",
                )),
            }
        }
        self.enable_media_repo = match take("enable_media_repo") {
            Some((v, file)) => {
                typed::<bool>(&file, "enable_media_repo", v, problems).unwrap_or(true)
            }
            None => true,
        };
        let mut name = |key: &str| -> Option<String> {
            let (v, file) = take(key)?;
            typed::<String>(&file, key, v, problems).map(|n| canonical_name(&n).to_string())
        };
        self.media_instance_running_background_jobs =
            name("media_instance_running_background_jobs");
        self.update_user_directory_from_worker = name("update_user_directory_from_worker");
        self.run_background_tasks_on = name("run_background_tasks_on");
        self.notify_appservices_from_worker = name("notify_appservices_from_worker");
        let mut names = |key: &str| -> Vec<String> {
            take(key)
                .and_then(|(v, file)| typed::<OneOrMany>(&file, key, v, problems))
                .map(|l| l.into_vec())
                .unwrap_or_default()
        };
        self.federation_sender_instances = names("federation_sender_instances");
        self.pusher_instances = names("pusher_instances");
    }
}

/// `master` is Synapse's internal name for main; operators may use either.
fn canonical_name(name: &str) -> &str {
    if name == "master" { MAIN } else { name }
}

fn expand_paths(paths: &[PathBuf], problems: &mut Problems) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => problems.push(ConfigError::new(
                    path,
                    "",
                    format!("cannot read folder: {e}"),
                    "check the path and its permissions",
                )),
            }
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            problems.push(ConfigError::new(
                path,
                "",
                "no such file or folder",
                "pass the path of homeserver.yaml or of the folder of worker files",
            ));
        }
    }
    files
}

fn read_yaml(file: &Path, problems: &mut Problems) -> Option<Mapping> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            problems.push(ConfigError::new(
                file,
                "",
                format!("cannot read file: {e}"),
                "check the path and its permissions",
            ));
            return None;
        }
    };
    match serde_yaml_ng::from_str::<Value>(&text) {
        Ok(Value::Mapping(m)) => Some(m),
        Ok(Value::Null) => Some(Mapping::new()),
        Ok(_) => {
            problems.push(ConfigError::new(
                file,
                "",
                "the file is not a YAML mapping of keys",
                "a Synapse config file holds `key: value` pairs at its top level",
            ));
            None
        }
        Err(e) => {
            problems.push(ConfigError::new(
                file,
                "",
                format!("invalid YAML: {e}"),
                "fix the YAML syntax at the position given",
            ));
            None
        }
    }
}

fn typed<T: DeserializeOwned>(
    file: &Path,
    key: &str,
    value: Value,
    problems: &mut Problems,
) -> Option<T> {
    match serde_yaml_ng::from_value::<T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(ConfigError::new(
                file,
                key,
                format!("unexpected value: {e}"),
                "see Synapse's config documentation for this option's format",
            ));
            None
        }
    }
}

fn read_worker(file: &Path, doc: &Mapping, problems: &mut Problems) -> Option<WorkerFile> {
    let get = |k: &str| doc.get(k).filter(|v| !v.is_null()).cloned();
    let name = match get("worker_name") {
        Some(v) => typed::<String>(file, "worker_name", v, problems)?,
        None => {
            problems.push(ConfigError::new(
                file,
                "worker_name",
                "worker file has no `worker_name`",
                "add `worker_name: <name>` matching the name used in instance_map and stream_writers",
            ));
            return None;
        }
    };
    let app = match get("worker_app") {
        Some(v) => typed::<String>(file, "worker_app", v, problems)?,
        None => "synapse.app.generic_worker".to_string(),
    };
    let listeners = match get("worker_listeners") {
        Some(v) => {
            let raw = typed::<Vec<RawListener>>(file, "worker_listeners", v, problems)?;
            convert_listeners(file, "worker_listeners", raw, problems)
        }
        None => Vec::new(),
    };
    let enable_media_repo = get("enable_media_repo")
        .and_then(|v| typed::<bool>(file, "enable_media_repo", v, problems));
    Some(WorkerFile {
        path: file.to_path_buf(),
        app,
        name,
        listeners,
        enable_media_repo,
    })
}

#[derive(Deserialize)]
struct RawListener {
    port: Option<u16>,
    path: Option<PathBuf>,
    bind_addresses: Option<Vec<String>>,
    bind_address: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    resources: Vec<RawResource>,
}

#[derive(Deserialize)]
struct RawResource {
    #[serde(default)]
    names: Vec<String>,
}

fn convert_listeners(
    file: &Path,
    key: &str,
    raw: Vec<RawListener>,
    problems: &mut Problems,
) -> Vec<Listener> {
    let mut out = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        let key = format!("{key}[{i}]");
        let endpoint = match (l.path, l.port) {
            (Some(_), Some(_)) => {
                problems.push(ConfigError::new(
                    file,
                    &key,
                    "a listener has both `path` and `port`",
                    "keep `path` for a Unix socket or `port` for TCP, not both (Synapse refuses both)",
                ));
                continue;
            }
            (Some(path), None) => Endpoint::Unix(path),
            (None, Some(port)) => {
                let bind = l
                    .bind_addresses
                    .and_then(|b| b.into_iter().next())
                    .or(l.bind_address)
                    .unwrap_or_default();
                Endpoint::Tcp {
                    host: connectable_host(&bind),
                    port,
                }
            }
            (None, None) => {
                problems.push(ConfigError::new(
                    file,
                    &key,
                    "a listener has neither `path` nor `port`",
                    "add `path: /sockets/<name>.sock` or `port: <n>`",
                ));
                continue;
            }
        };
        out.push(Listener {
            endpoint,
            kind: l.kind.unwrap_or_else(|| "http".to_string()),
            resources: l.resources.into_iter().flat_map(|r| r.names).collect(),
        });
    }
    out
}

/// A wildcard bind address is reached on loopback.
fn connectable_host(bind: &str) -> String {
    match bind {
        "" | "0.0.0.0" => "127.0.0.1".to_string(),
        "::" => "::1".to_string(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct RawInstance {
    host: Option<String>,
    port: Option<u16>,
    path: Option<PathBuf>,
}

impl RawInstance {
    fn endpoint(self, file: &Path, key: &str, problems: &mut Problems) -> Option<Endpoint> {
        match (self.path, self.host, self.port) {
            (Some(p), None, None) => Some(Endpoint::Unix(p)),
            (None, host, Some(port)) => Some(Endpoint::Tcp {
                host: connectable_host(host.as_deref().unwrap_or("localhost")),
                port,
            }),
            _ => {
                problems.push(ConfigError::new(
                    file,
                    key,
                    "an instance_map entry needs either `path` or `host` and `port`",
                    "write `path: /sockets/synapse_replication_<name>.sock` or `host: localhost` and `port: 9093`",
                ));
                None
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}
