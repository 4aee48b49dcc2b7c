//! The command line: `check` and `route` explain what the edge makes of a
//! Synapse configuration. The binary only calls [`main`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;

use crate::balancing::AllUp;
use crate::config::Endpoint;
use crate::state::{EdgeState, RequestView, Sources};

#[derive(Parser, Debug)]
#[command(
    name = "synapse-edge",
    version,
    about = "The public edge for Synapse homeservers split into workers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load the configuration and show workers, pools and warnings.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Explain where one request would go.
    Route {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// A request header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// The client address (used when the request carries no better key).
        #[arg(long, default_value = "127.0.0.1")]
        client: IpAddr,
        /// The request method, e.g. GET.
        method: String,
        /// The request target as on the wire: path and query.
        target: String,
    },
}

/// Where the configuration comes from; shared by every command.
#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Synapse config file or folder of *.yaml files (repeatable, in
    /// `--config-path` order): homeserver.yaml and the worker files.
    #[arg(long = "synapse-config", value_name = "PATH", required = true)]
    pub synapse_config: Vec<PathBuf>,
    /// The edge's own config file (pools, routes...).
    #[arg(long = "config", value_name = "EDGE_YAML")]
    pub config: Option<PathBuf>,
    /// A route table to use instead of the built-in one.
    #[arg(long, value_name = "ROUTES_YAML")]
    pub routes: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn sources(&self) -> Sources {
        Sources {
            synapse: self.synapse_config.clone(),
            edge: self.config.clone(),
            routes: self.routes.clone(),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, json } => check(&config, json),
        Command::Route {
            config,
            json,
            headers,
            client,
            method,
            target,
        } => route(&config, json, &headers, client, &method, &target),
    }
}

fn load(config: &ConfigArgs) -> Result<EdgeState, ExitCode> {
    EdgeState::load(&config.sources()).map_err(|e| {
        eprint!("synapse-edge: {e}");
        ExitCode::from(2)
    })
}

#[derive(Serialize)]
struct CheckReport<'a> {
    ok: bool,
    synapse_routes_version: &'a str,
    routes: usize,
    workers: Vec<WorkerReport<'a>>,
    pools: Vec<PoolReport<'a>>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct WorkerReport<'a> {
    name: &'a str,
    app: &'a str,
    inbound: Option<String>,
    replication: Option<String>,
    streams: Vec<&'static str>,
    roles: &'a [String],
    routed: bool,
}

#[derive(Serialize)]
struct PoolReport<'a> {
    name: &'a str,
    members: Vec<&'a str>,
    source: String,
}

fn check(config: &ConfigArgs, json: bool) -> ExitCode {
    let state = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let topo = &state.topology;
    let mut warnings = topo.warnings.clone();
    // Routes whose first-choice pool is empty are served by a fallback.
    let mut fallbacks: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for r in state.routes.routes() {
        let Some(first) = r.pool_chain.first() else {
            continue;
        };
        let served_by = &topo.pool(r.pool).name;
        if first != served_by {
            fallbacks
                .entry((first, served_by))
                .or_default()
                .push(&r.name);
        }
    }
    for ((empty, by), names) in fallbacks {
        warnings.push(format!(
            "pool `{empty}` has no workers: `{by}` serves its routes ({})",
            names.join(", ")
        ));
    }
    let report = CheckReport {
        ok: true,
        synapse_routes_version: &state.routes.synapse_version,
        routes: state.routes.routes().len() - 1,
        workers: topo
            .workers
            .iter()
            .map(|w| WorkerReport {
                name: &w.name,
                app: &w.app,
                inbound: w.inbound.as_ref().map(Endpoint::to_string),
                replication: w.replication.as_ref().map(Endpoint::to_string),
                streams: w.streams.iter().map(|s| s.name()).collect(),
                roles: &w.roles,
                routed: w.inbound.is_some(),
            })
            .collect(),
        pools: topo
            .pools
            .iter()
            .map(|p| PoolReport {
                name: &p.name,
                members: p
                    .members
                    .iter()
                    .map(|&id| topo.worker(id).name.as_str())
                    .collect(),
                source: p.source.to_string(),
            })
            .collect(),
        warnings,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "configuration OK: {} workers, {} pools, {} routes (Synapse {} worker docs)",
        report.workers.len(),
        report.pools.len(),
        report.routes,
        report.synapse_routes_version
    );
    println!("\nworkers:");
    for w in &report.workers {
        let inbound = w
            .inbound
            .as_deref()
            .unwrap_or("(no inbound listener: not routed)");
        println!("  {:<20} {inbound}", w.name);
        if !w.streams.is_empty() {
            println!("  {:<20}   writes: {}", "", w.streams.join(", "));
        }
        if !w.roles.is_empty() {
            println!("  {:<20}   roles: {}", "", w.roles.join(", "));
        }
    }
    println!("\npools:");
    for p in &report.pools {
        let members = if p.members.is_empty() {
            "(empty: falls back)".to_string()
        } else {
            p.members.join(", ")
        };
        println!("  {:<32} {members}   [{}]", p.name, p.source);
    }
    if !report.warnings.is_empty() {
        println!("\nwarnings:");
        for w in &report.warnings {
            println!("  - {w}");
        }
    }
    ExitCode::SUCCESS
}

#[derive(Serialize)]
struct RouteReport<'a> {
    route: &'a str,
    pool: &'a str,
    key: String,
    key_kind: String,
    worker: Option<&'a str>,
    upstream: Option<String>,
    candidates: Vec<&'a str>,
    long_poll: bool,
}

fn route(
    config: &ConfigArgs,
    json: bool,
    headers: &[String],
    client: IpAddr,
    method: &str,
    target: &str,
) -> ExitCode {
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        eprintln!("synapse-edge: `{method}` is not an HTTP method");
        return ExitCode::from(2);
    };
    if !target.starts_with('/') {
        eprintln!(
            "synapse-edge: the target must be a path as sent on the wire, e.g. /_matrix/client/v3/sync?since=s1"
        );
        return ExitCode::from(2);
    }
    let mut map = HeaderMap::new();
    for h in headers {
        let parsed = h.split_once(':').and_then(|(n, v)| {
            Some((
                HeaderName::from_bytes(n.trim().as_bytes()).ok()?,
                HeaderValue::from_str(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some((n, v)) => {
                map.append(n, v);
            }
            None => {
                eprintln!("synapse-edge: cannot read header `{h}`; write it as 'Name: value'");
                return ExitCode::from(2);
            }
        }
    }
    let state = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let req = RequestView {
        method: &method,
        target,
        headers: &map,
        client,
    };
    let d = state.decide(&req, &AllUp);
    let topo = &state.topology;
    let worker = d.worker.map(|id| topo.worker(id));
    let report = RouteReport {
        route: &d.route.name,
        pool: &d.pool.name,
        key: d.key.describe(),
        key_kind: d.route.key.to_string(),
        worker: worker.map(|w| w.name.as_str()),
        upstream: worker
            .and_then(|w| w.inbound.as_ref())
            .map(Endpoint::to_string),
        candidates: state
            .candidates(&d)
            .iter()
            .map(|&id| topo.worker(id).name.as_str())
            .collect(),
        long_poll: d.route.long_poll,
    };
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!("route:     {}", report.route);
        println!("pool:      {}", report.pool);
        println!("key:       {} ({})", report.key, report.key_kind);
        println!("worker:    {}", report.worker.unwrap_or("(none up)"));
        println!("upstream:  {}", report.upstream.as_deref().unwrap_or("-"));
        println!("failover:  {}", report.candidates.join(" > "));
    }
    ExitCode::SUCCESS
}
