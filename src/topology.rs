//! The topology: which workers exist, where each one listens for routed
//! traffic, what it writes, and the pools routes choose from.
//!
//! Built once from the Synapse config (and the edge config) at start-up or
//! reload; the request path only indexes into it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::balancing::identity_hash;
use crate::config::{
    ConfigError, ConfigErrors, EdgeConfig, Endpoint, MAIN, Problems, Stream, SynapseConfig,
};

/// Index of a worker in [`Topology::workers`]. Main is always 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkerId(pub u32);

impl WorkerId {
    pub const MAIN: WorkerId = WorkerId(0);
}

/// Index of a pool in [`Topology::pools`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PoolId(pub u32);

/// One Synapse process.
#[derive(Debug, Clone, Serialize)]
pub struct Worker {
    pub name: String,
    pub app: String,
    /// The listener that takes routed client/federation/media traffic.
    /// Workers without one (senders, pushers) are known but never routed to.
    pub inbound: Option<Endpoint>,
    /// The resources its inbound listener serves (client, federation, media).
    pub inbound_resources: Vec<String>,
    /// The replication endpoint from `instance_map`, if listed.
    pub replication: Option<Endpoint>,
    /// The streams this worker writes.
    pub streams: Vec<Stream>,
    /// Other roles from the shared config (federation sender, pusher...).
    pub roles: Vec<String>,
    /// Whether the media repository runs here.
    pub media_enabled: bool,
    /// The file the worker came from (main: the first Synapse config file).
    pub file: PathBuf,
    /// Hash of the worker's stable identity (its name), for rendezvous hashing.
    #[serde(skip)]
    pub identity: u64,
}

/// Why a pool has the members it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolSource {
    /// The main process alone.
    Main,
    /// The writers of a stream (main when the stream is not delegated).
    StreamWriters(Stream),
    /// Workers whose names match these patterns.
    Patterns(Vec<String>),
    /// The worker named by `update_user_directory_from_worker`.
    UserDirectory,
}

/// A set of interchangeable workers a route chooses from.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerPool {
    pub name: String,
    /// Routable members (all have an inbound endpoint), in config order.
    pub members: Vec<WorkerId>,
    pub source: PoolSource,
}

impl WorkerPool {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl fmt::Display for PoolSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolSource::Main => f.write_str("main process"),
            PoolSource::StreamWriters(s) => write!(f, "stream_writers.{s}"),
            PoolSource::Patterns(p) => write!(f, "names matching {}", p.join(", ")),
            PoolSource::UserDirectory => f.write_str("update_user_directory_from_worker"),
        }
    }
}

/// The name of the pool of a stream's writers, as route tables name it.
pub fn stream_pool_name(stream: Stream) -> String {
    format!("stream:{}", stream.name())
}

/// Name-pattern pools that fit the guide's worker naming.
pub const DEFAULT_POOL_PATTERNS: [(&str, &str); 6] = [
    ("rooms", "rooms*"),
    ("client_sync", "client_sync*"),
    ("client_reader", "client_reader*"),
    ("federation_reader", "federation_reader*"),
    ("media", "media*"),
    ("initial_sync", "initial_sync*"),
];

/// Workers, pools and what the operator should know about them.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    pub workers: Vec<Worker>,
    pub pools: Vec<WorkerPool>,
    /// Things that work but may not be what the operator meant.
    pub warnings: Vec<String>,
    #[serde(skip)]
    pool_by_name: HashMap<String, PoolId>,
}

impl Topology {
    pub fn worker(&self, id: WorkerId) -> &Worker {
        &self.workers[id.0 as usize]
    }

    pub fn pool(&self, id: PoolId) -> &WorkerPool {
        &self.pools[id.0 as usize]
    }

    pub fn pool_id(&self, name: &str) -> Option<PoolId> {
        self.pool_by_name.get(name).copied()
    }

    pub fn worker_id(&self, name: &str) -> Option<WorkerId> {
        self.workers
            .iter()
            .position(|w| w.name == name)
            .map(|i| WorkerId(i as u32))
    }

    /// The pool of main alone; always present.
    pub fn main_pool(&self) -> PoolId {
        PoolId(0)
    }

    /// Derives workers and pools. Every problem is reported at once.
    pub fn build(synapse: &SynapseConfig, edge: &EdgeConfig) -> Result<Topology, ConfigErrors> {
        let mut problems = Problems::default();
        let mut warnings = Vec::new();
        let main_file = synapse.source_of("listeners");

        // Main first, so that WorkerId::MAIN is 0.
        let (main_inbound, main_resources) = pick_inbound(&synapse.listeners);
        if main_inbound.is_none() {
            problems.push(ConfigError::new(
                &main_file,
                "listeners",
                "main has no http listener with the client, federation or media resource",
                "add an inbound listener to homeserver.yaml, e.g. `path: /sockets/synapse_inbound_main.sock` with `resources: [{names: [client, federation]}]`",
            ));
        }
        let mut workers = vec![Worker {
            name: MAIN.to_string(),
            app: "synapse.app.homeserver".to_string(),
            inbound: main_inbound,
            inbound_resources: main_resources,
            replication: synapse.instance_map.get(MAIN).cloned(),
            streams: Vec::new(),
            roles: Vec::new(),
            media_enabled: synapse.enable_media_repo,
            file: main_file,
            identity: identity_hash(MAIN),
        }];
        for wf in &synapse.workers {
            if wf.name == MAIN || wf.name == "master" {
                problems.push(ConfigError::new(
                    &wf.path,
                    "worker_name",
                    format!("`{}` is the main process's name", wf.name),
                    "give the worker its own name",
                ));
                continue;
            }
            if let Some(other) = workers.iter().find(|w| w.name == wf.name) {
                problems.push(ConfigError::new(
                    &wf.path,
                    "worker_name",
                    format!(
                        "worker `{}` is also defined in {}",
                        wf.name,
                        other.file.display()
                    ),
                    "each worker needs a unique worker_name",
                ));
                continue;
            }
            let media_app = wf.app == "synapse.app.media_repository";
            let (inbound, inbound_resources) = pick_inbound(&wf.listeners);
            workers.push(Worker {
                name: wf.name.clone(),
                app: wf.app.clone(),
                inbound,
                inbound_resources,
                replication: synapse.instance_map.get(&wf.name).cloned(),
                streams: Vec::new(),
                roles: Vec::new(),
                media_enabled: media_app
                    || wf.enable_media_repo.unwrap_or(synapse.enable_media_repo),
                file: wf.path.clone(),
                identity: identity_hash(&wf.name),
            });
        }
        let index: HashMap<String, WorkerId> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.name.clone(), WorkerId(i as u32)))
            .collect();

        // Stream writers.
        let sw_file = synapse.source_of("stream_writers");
        let mut writers: BTreeMap<Stream, Vec<WorkerId>> = BTreeMap::new();
        for (&stream, names) in &synapse.stream_writers {
            let key = format!("stream_writers.{stream}");
            if names.is_empty() {
                problems.push(ConfigError::new(
                    &sw_file,
                    &key,
                    "the writer list is empty",
                    format!("name a writer, or remove `{stream}` to leave it on main"),
                ));
                continue;
            }
            if stream.single_writer() && names.len() > 1 {
                problems.push(ConfigError::new(
                    &sw_file,
                    &key,
                    format!(
                        "`{stream}` can only have one writer, {} are listed",
                        names.len()
                    ),
                    "keep exactly one writer (Synapse refuses to start otherwise)",
                ));
            }
            let mut ids = Vec::new();
            for name in names {
                if name != MAIN && !synapse.instance_map.contains_key(name) {
                    problems.push(ConfigError::new(
                        &sw_file,
                        &key,
                        format!("writer `{name}` is not in instance_map"),
                        format!(
                            "add `{name}` with its replication socket to instance_map (Synapse refuses to start otherwise)"
                        ),
                    ));
                }
                let Some(&id) = index.get(name) else {
                    if stream.has_client_endpoints() {
                        problems.push(ConfigError::new(
                            &sw_file,
                            &key,
                            format!("writer `{name}` has no worker file"),
                            format!(
                                "pass the folder with {name}.yaml via --synapse-config, so its inbound listener is known"
                            ),
                        ));
                    }
                    continue;
                };
                let w = &mut workers[id.0 as usize];
                if !w.streams.contains(&stream) {
                    w.streams.push(stream);
                }
                if stream.has_client_endpoints() && w.inbound.is_none() {
                    problems.push(ConfigError::new(
                        &w.file,
                        "worker_listeners",
                        format!(
                            "`{name}` writes the `{stream}` stream but has no inbound listener, so its endpoints could not be served"
                        ),
                        "add an http listener with `resources: [{names: [client, federation]}]` and `x_forwarded: true`",
                    ));
                }
                ids.push(id);
            }
            writers.insert(stream, ids);
        }
        for stream in Stream::ALL {
            if !synapse.stream_writers.contains_key(&stream) {
                workers[0].streams.push(stream);
            }
        }
        for name in synapse.instance_map.keys() {
            if !index.contains_key(name) {
                warnings.push(format!(
                    "instance_map lists `{name}` but no worker file names it; it is not routed to"
                ));
            }
        }

        // Roles that need no routing, for the operator's picture.
        let mut role = |name: &Option<String>, label: &str, warnings: &mut Vec<String>| {
            if let Some(n) = name {
                match index.get(n) {
                    Some(id) => workers[id.0 as usize].roles.push(label.to_string()),
                    None => {
                        warnings.push(format!("{label} runs on `{n}`, which has no worker file"))
                    }
                }
            }
        };
        role(
            &synapse.run_background_tasks_on,
            "background tasks",
            &mut warnings,
        );
        role(
            &synapse.update_user_directory_from_worker,
            "user directory",
            &mut warnings,
        );
        role(
            &synapse.media_instance_running_background_jobs,
            "media background jobs",
            &mut warnings,
        );
        role(
            &synapse.notify_appservices_from_worker,
            "appservice notifications",
            &mut warnings,
        );
        for n in &synapse.federation_sender_instances {
            role(&Some(n.clone()), "federation sender", &mut warnings);
        }
        for n in &synapse.pusher_instances {
            role(&Some(n.clone()), "pusher", &mut warnings);
        }

        // Pools: main, stream writers, user directory, name patterns.
        let mut pools = vec![WorkerPool {
            name: MAIN.to_string(),
            members: vec![WorkerId::MAIN],
            source: PoolSource::Main,
        }];
        for stream in Stream::ALL {
            let members = match writers.get(&stream) {
                Some(ids) => ids.clone(),
                None if synapse.stream_writers.contains_key(&stream) => Vec::new(),
                None => vec![WorkerId::MAIN],
            };
            // A writer without inbound listener cannot serve; that is an error above
            // for streams with endpoints. Keep only routable members.
            let members = members
                .into_iter()
                .filter(|id| workers[id.0 as usize].inbound.is_some())
                .collect();
            pools.push(WorkerPool {
                name: stream_pool_name(stream),
                members,
                source: PoolSource::StreamWriters(stream),
            });
        }
        let user_dir = synapse
            .update_user_directory_from_worker
            .as_ref()
            .and_then(|n| index.get(n))
            .filter(|id| workers[id.0 as usize].inbound.is_some())
            .copied();
        pools.push(WorkerPool {
            name: "user_directory".to_string(),
            members: user_dir.into_iter().collect(),
            source: PoolSource::UserDirectory,
        });
        let mut patterns: BTreeMap<String, Vec<String>> = DEFAULT_POOL_PATTERNS
            .iter()
            .map(|(n, p)| (n.to_string(), vec![p.to_string()]))
            .collect();
        let edge_file = edge
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from("--config"));
        for (name, pats) in &edge.pools {
            if pools.iter().any(|p| &p.name == name) {
                problems.push(ConfigError::new(
                    &edge_file,
                    format!("pools.{name}"),
                    format!("`{name}` is derived from the Synapse config and cannot be redefined"),
                    "choose another pool name",
                ));
                continue;
            }
            for p in pats {
                if let Err(e) = glob::Pattern::new(p) {
                    problems.push(ConfigError::new(
                        &edge_file,
                        format!("pools.{name}"),
                        format!("bad pattern `{p}`: {e}"),
                        "use worker names with `*` wildcards, e.g. `rooms*`",
                    ));
                }
            }
            patterns.insert(name.clone(), pats.clone());
        }
        for (name, pats) in patterns {
            let compiled: Vec<glob::Pattern> = pats
                .iter()
                .filter_map(|p| glob::Pattern::new(p).ok())
                .collect();
            let mut members = Vec::new();
            for (i, w) in workers.iter().enumerate().skip(1) {
                if compiled.iter().any(|p| p.matches(&w.name)) {
                    if w.inbound.is_some() {
                        members.push(WorkerId(i as u32));
                    } else {
                        warnings.push(format!(
                            "`{}` matches pool `{name}` but has no inbound listener; it is left out",
                            w.name
                        ));
                    }
                }
            }
            pools.push(WorkerPool {
                name,
                members,
                source: PoolSource::Patterns(pats),
            });
        }

        // Media sanity: Synapse 404s media on processes without the repository.
        let media_pool = pools.iter().find(|p| p.name == "media");
        if let Some(mp) = media_pool {
            if mp.members.is_empty() && !synapse.enable_media_repo {
                warnings.push(
                    "no media worker and `enable_media_repo: false`: media requests reach main, which will answer 404"
                        .to_string(),
                );
            }
            for id in &mp.members {
                let w = &workers[id.0 as usize];
                if !w.media_enabled {
                    warnings.push(format!(
                        "`{}` is in the media pool but the media repository is disabled there; set `enable_media_repo: true` in {}",
                        w.name,
                        w.file.display()
                    ));
                }
                // /_matrix/media/ needs `media`; /_matrix/client/v1/media/ and
                // /_matrix/federation/v1/media/ are served under client and federation.
                let missing: Vec<&str> = ["media", "client", "federation"]
                    .into_iter()
                    .filter(|r| !w.inbound_resources.iter().any(|x| x == r))
                    .collect();
                if !missing.is_empty() {
                    warnings.push(format!(
                        "`{}` serves media but its inbound listener lacks the {} resource(s); add them in {} or some media requests will answer 404",
                        w.name,
                        missing.join(", "),
                        w.file.display()
                    ));
                }
            }
        }

        // Since Synapse 1.152 a process serving /quarantine_media must write
        // this stream; the edge sends it to the writers, so they need media.
        if let Some(qp) = pools
            .iter()
            .find(|p| p.source == PoolSource::StreamWriters(Stream::QuarantinedMediaChanges))
        {
            for id in &qp.members {
                let w = &workers[id.0 as usize];
                if !w.media_enabled {
                    warnings.push(format!(
                        "quarantine requests go to `{}` (a quarantined_media_changes writer), which does not run the media repository; add your media worker to stream_writers.quarantined_media_changes",
                        w.name
                    ));
                }
            }
        }

        let pool_by_name = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), PoolId(i as u32)))
            .collect();
        problems.into_result(Topology {
            workers,
            pools,
            warnings,
            pool_by_name,
        })
    }
}

/// The listener that takes routed traffic (the first inbound one, preferring
/// one that serves the client API) and its resources.
fn pick_inbound(listeners: &[crate::config::Listener]) -> (Option<Endpoint>, Vec<String>) {
    let mut inbound = listeners.iter().filter(|l| l.is_inbound());
    let first = inbound.clone().next();
    match inbound.find(|l| l.serves("client")).or(first) {
        Some(l) => (Some(l.endpoint.clone()), l.resources.clone()),
        None => (None, Vec::new()),
    }
}
