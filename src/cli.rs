//! The command line: `check` and `route` explain what the edge makes of a
//! Synapse configuration. The binary only calls [`main`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;

use crate::balancing::AllUp;
use crate::config::Endpoint;
use crate::config::{EdgeConfig, LogFormat};
use crate::front::ListenerRole;
use crate::listeners::{ListenAddr, ListenerSpec, ServerSettings, Threaded};
use crate::proxy::Proxy;
use crate::request::RequestHeaders;
use crate::state::{EdgeState, RequestView, Sources};
use crate::tls::{CertSpec, CertStore};

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
    /// Run the edge in front of the workers.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Run the edge on the guide's topology with stand-in workers.
    Demo {
        /// Where the demo edge listens.
        #[arg(long, default_value = "127.0.0.1:8008")]
        listen: SocketAddr,
        /// Where /metrics and the status page are served.
        #[arg(long, default_value = "127.0.0.1:9108")]
        metrics: SocketAddr,
        /// Only write the demo's Synapse config into this folder and exit
        /// (the load benchmark puts its own workers on those sockets).
        #[arg(long, value_name = "DIR", hide = true)]
        write_config: Option<PathBuf>,
    },
    /// Load the configuration and show workers, pools and warnings.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate the worker deployment (Synapse worker config, log configs,
    /// compose file, edge.yaml) from one topology file.
    Generate {
        /// The topology file (see examples/topology.yaml).
        #[arg(long, value_name = "TOPOLOGY_YAML")]
        topology: PathBuf,
        /// The folder to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Overwrite files whose contents differ.
        #[arg(long)]
        force: bool,
    },
    /// Run one stand-in worker on a Unix socket (for benchmarks and tests).
    #[command(hide = true)]
    Standin {
        /// The worker name it reports.
        #[arg(long)]
        name: String,
        /// The Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// A TCP address to listen on as well (the load benchmark's
        /// no-proxy baseline reaches the same worker there).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
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

/// Quick-start listeners; when any is given, they replace edge.yaml's.
#[derive(Args, Debug, Clone, Default)]
pub struct ListenArgs {
    /// Plain-HTTP address serving everything (repeatable). Default, without
    /// listeners here or in edge.yaml: 127.0.0.1:8008.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Also listen on this Unix socket (plain HTTP).
    #[arg(long, value_name = "PATH")]
    pub listen_unix: Option<PathBuf>,
    /// TLS address serving everything (repeatable); needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    pub listen_tls: Vec<SocketAddr>,
    /// PEM certificate chain for --listen-tls.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --listen-tls.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Serve /metrics, /status and /status.json here (replaces edge.yaml's
    /// `metrics_listen`).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Serving threads (replaces edge.yaml's `threads`; default: CPUs).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
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
        Command::Run { config, listen } => run(&config, &listen),
        Command::Demo {
            write_config: Some(dir),
            ..
        } => match crate::demo::write_config(&dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "synapse-edge: cannot write the demo config into {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            listen, metrics, ..
        } => demo(listen, metrics),
        Command::Standin {
            name,
            socket,
            listen,
        } => standin(&name, &socket, listen),
        Command::Generate {
            topology,
            out,
            force,
        } => generate(&topology, &out, force),
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
    routes_table: Vec<RouteEntry<'a>>,
}

#[derive(Serialize)]
struct RouteEntry<'a> {
    #[serde(flatten)]
    route: &'a crate::routes::Route,
    /// The pool that serves the route under this topology.
    pool_name: &'a str,
    members: Vec<&'a str>,
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
    // The certificates `run` would serve must load too.
    if let Some(tls) = &state.edge.tls
        && let Err(e) = CertStore::load(tls.certificates.clone())
    {
        eprintln!(
            "synapse-edge: cannot load TLS certificates: {e}\n    fix: point `tls.certificates` at a readable PEM chain and its matching key"
        );
        return ExitCode::from(2);
    }
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
        routes_table: state
            .routes
            .routes()
            .iter()
            .map(|r| RouteEntry {
                route: r,
                pool_name: &topo.pool(r.pool).name,
                members: topo
                    .pool(r.pool)
                    .members
                    .iter()
                    .map(|&id| topo.worker(id).name.as_str())
                    .collect(),
            })
            .collect(),
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
    let headers = RequestHeaders::Map(map);
    let req = RequestView {
        method: &method,
        target,
        headers: &headers,
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
            .candidates(d.pool, d.key_hash)
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // After the subscriber: the access log asks it once, here.
    crate::access_log::init(format);
}

/// The runtime for signals, health checks, reloads and the metrics
/// listener; requests are served by `listeners::Threaded`'s own threads.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("synapse-edge: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// One start-up line: listeners, workers and pools.
fn startup_line(state: &EdgeState, specs: &[ListenerSpec], addrs: &[ListenAddr]) {
    let topo = &state.topology;
    // Bound addresses come in the order of the specs.
    let listeners: Vec<String> = specs
        .iter()
        .zip(addrs)
        .map(|(spec, addr)| match (addr, &spec.tls) {
            (ListenAddr::Tcp(a), Some(_)) => format!("https://{a}"),
            _ => addr.to_string(),
        })
        .collect();
    let routed: Vec<&str> = topo
        .workers
        .iter()
        .filter(|w| w.inbound.is_some())
        .map(|w| w.name.as_str())
        .collect();
    let pools: Vec<String> = topo
        .pools
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| format!("{}={}", p.name, p.members.len()))
        .collect();
    let limits = crate::process::prepared();
    tracing::info!(
        listeners = %listeners.join(" "),
        workers = %routed.join(","),
        pools = %pools.join(" "),
        routes = state.routes.routes().len() - 1,
        open_files_limit = limits.map_or(0, |p| p.open_files),
        descriptor_table = limits.map_or(0, |p| p.reserved),
        worker_writes = %match crate::upstream::batch::supported() {
            Ok(()) => "batched (io_uring)".to_string(),
            Err(e) => format!("one system call each (io_uring refused: {e})"),
        },
        "synapse-edge serving"
    );
    if let Some(p) = limits.filter(|p| p.open_files < crate::process::LOW_OPEN_FILES) {
        tracing::warn!(
            open_files_limit = p.open_files,
            "the open-file limit is low for a homeserver's edge: each client connection and each \
             request waiting on a worker holds a descriptor; raise the hard limit (systemd \
             LimitNOFILE=, docker --ulimit nofile=, ulimit -Hn) to {} or more",
            crate::process::LOW_OPEN_FILES
        );
    }
}

/// Serves until SIGTERM or Ctrl-C; SIGHUP reloads `sources` (when given).
async fn serve_until_stopped(
    state: EdgeState,
    specs: Vec<ListenerSpec>,
    sources: Option<crate::state::Sources>,
    certs: Option<Arc<CertStore>>,
    metrics: Option<SocketAddr>,
    threads: Option<usize>,
) -> ExitCode {
    let settings = ServerSettings::from_config(&state.edge);
    let watch_every = state
        .edge
        .tls
        .as_ref()
        .map_or(std::time::Duration::from_secs(10), |t| t.watch_interval);
    let proxy = Arc::new(Proxy::new(state));
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let running = match Threaded::start(proxy.clone(), &specs, settings, threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("synapse-edge: {e}");
            return ExitCode::from(2);
        }
    };
    startup_line(&proxy.snapshot().state, &specs, &running.addrs);
    let mut background = Vec::new();
    if let Some(addr) = metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "metrics and status page at http://{addr}/metrics and /status");
                let sampler = Arc::new(crate::status::Sampler::default());
                background.push(tokio::spawn(crate::status::sample_loop(
                    proxy.clone(),
                    sampler.clone(),
                )));
                background.push(tokio::spawn(crate::status::serve(
                    l,
                    proxy.clone(),
                    sampler,
                )));
            }
            Err(e) => {
                eprintln!("synapse-edge: cannot listen for metrics on {addr}: {e}");
                running.stop().await;
                return ExitCode::from(2);
            }
        }
    }
    let health = tokio::spawn(crate::proxy::health_loop(proxy.clone()));
    let reloads = sources.map(|s| tokio::spawn(reload_on_sighup(proxy.clone(), s, certs.clone())));
    let cert_watch = certs.map(|c| tokio::spawn(crate::tls::watch(c, watch_every)));
    stop_signal().await;
    running.stop().await;
    health.abort();
    for task in reloads.into_iter().chain(cert_watch).chain(background) {
        task.abort();
    }
    // The serving threads have ended: their last access lines go out
    // before the process does.
    crate::access_log::flush();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGHUP: read and validate the whole configuration again; install it only
/// if it is usable, otherwise keep serving the running one.
async fn reload_on_sighup(
    proxy: Arc<Proxy>,
    sources: crate::state::Sources,
    certs: Option<Arc<CertStore>>,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload is unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        if let Some(c) = &certs {
            crate::tls::reload_logged(c);
        }
        let loaded = tokio::task::spawn_blocking({
            let sources = sources.clone();
            move || EdgeState::load(&sources)
        })
        .await;
        match loaded {
            Ok(Ok(state)) => {
                proxy
                    .metrics()
                    .reloads
                    .with_label_values(&["success"])
                    .inc();
                let workers = state.topology.workers.len();
                let routes = state.routes.routes().len() - 1;
                proxy.install(state);
                tracing::info!(workers, routes, "configuration reloaded");
            }
            Ok(Err(e)) => {
                proxy
                    .metrics()
                    .reloads
                    .with_label_values(&["failure"])
                    .inc();
                tracing::error!(
                    "reload refused, still serving the previous configuration: {}",
                    e.to_string().trim_end()
                );
            }
            Err(e) => tracing::error!(error = %e, "reload failed"),
        }
    }
}

fn run(config: &ConfigArgs, listen: &ListenArgs) -> ExitCode {
    let state = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    init_logging(state.edge.log_format);
    let state_threads = state.edge.threads;
    let metrics_addr = match listen.metrics {
        Some(a) => Some(a),
        None => match state
            .edge
            .metrics_listen
            .as_deref()
            .map(str::parse::<SocketAddr>)
        {
            Some(Ok(a)) => Some(a),
            Some(Err(_)) => {
                eprintln!(
                    "synapse-edge: edge.yaml: `metrics_listen` is not an address\n    fix: write host:port, e.g. 127.0.0.1:9108"
                );
                return ExitCode::from(2);
            }
            None => None,
        },
    };
    let (specs, certs) = match listener_specs(&state.edge, listen) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("synapse-edge: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(serve_until_stopped(
        state,
        specs,
        Some(config.sources()),
        certs,
        metrics_addr,
        listen.threads.or(state_threads),
    ))
}

/// The listeners to open: the command line's when it names any, else
/// edge.yaml's (`listeners`, `listen`, `listen_unix`), else 127.0.0.1:8008.
fn listener_specs(
    edge: &EdgeConfig,
    cli: &ListenArgs,
) -> Result<(Vec<ListenerSpec>, Option<Arc<CertStore>>), String> {
    let cert_specs = match (&cli.tls_cert, &cli.tls_key, &edge.tls) {
        (Some(cert), Some(key), _) => vec![CertSpec {
            cert: cert.clone(),
            key: key.clone(),
            names: Vec::new(),
        }],
        (_, _, Some(tls)) => tls.certificates.clone(),
        _ => Vec::new(),
    };
    let certs = if cert_specs.is_empty() {
        None
    } else {
        Some(Arc::new(
            CertStore::load(cert_specs)
                .map_err(|e| {
            format!("cannot load TLS certificates: {e}\n    fix: point --tls-cert/--tls-key or `tls.certificates` at a readable PEM chain and its matching key")
        })?,
        ))
    };
    let tls_config = certs
        .as_ref()
        .map(|c| crate::tls::server_config(c.clone()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let mut specs = Vec::new();
    let from_cli =
        !cli.listen.is_empty() || !cli.listen_tls.is_empty() || cli.listen_unix.is_some();
    if from_cli {
        specs.extend(
            cli.listen
                .iter()
                .map(|a| ListenerSpec::plain(ListenAddr::Tcp(*a))),
        );
        for a in &cli.listen_tls {
            specs.push(ListenerSpec {
                addr: ListenAddr::Tcp(*a),
                role: Arc::new(ListenerRole::default()),
                tls: tls_config.clone(),
            });
        }
        if let Some(p) = &cli.listen_unix {
            specs.push(ListenerSpec::plain(ListenAddr::Unix(p.clone())));
        }
    } else {
        for l in &edge.listeners {
            // Validated when edge.yaml was loaded.
            let addr = l
                .listen
                .parse()
                .map_err(|_| format!("`{}` is not an address", l.listen))?;
            let hsts = match &l.hsts {
                Some(h) => Some(
                    http::HeaderValue::from_str(h)
                        .map_err(|_| format!("hsts `{h}` is not a header value"))?,
                ),
                None => None,
            };
            specs.push(ListenerSpec {
                addr: ListenAddr::Tcp(addr),
                role: Arc::new(ListenerRole {
                    name: String::new(),
                    serves: l.serve.clone(),
                    hsts,
                    redirect_https: l.redirect_https,
                    acme_challenge_dir: l.acme_challenge_dir.clone(),
                    proxy_protocol: l.proxy_protocol,
                }),
                tls: if l.tls { tls_config.clone() } else { None },
            });
        }
        for a in &edge.listen {
            let addr = a.parse().map_err(|_| format!("`{a}` is not an address"))?;
            specs.push(ListenerSpec::plain(ListenAddr::Tcp(addr)));
        }
        if let Some(p) = &edge.listen_unix {
            specs.push(ListenerSpec::plain(ListenAddr::Unix(p.clone())));
        }
    }
    if specs.is_empty() {
        specs.push(ListenerSpec::plain(ListenAddr::Tcp(SocketAddr::from((
            [127, 0, 0, 1],
            8008,
        )))));
    }
    Ok((specs, certs))
}

fn demo(listen: SocketAddr, metrics: SocketAddr) -> ExitCode {
    init_logging(LogFormat::Text);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let dir = match tempfile::Builder::new()
            .prefix("synapse-edge-demo")
            .tempdir()
        {
            Ok(d) => d,
            Err(e) => {
                eprintln!("synapse-edge: cannot create the demo folder: {e}");
                return ExitCode::FAILURE;
            }
        };
        let paths = match crate::demo::write_config(dir.path()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("synapse-edge: cannot write the demo config: {e}");
                return ExitCode::FAILURE;
            }
        };
        let _standins = match crate::demo::start_standins(dir.path()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("synapse-edge: cannot start the stand-in workers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let sources = crate::state::Sources {
            synapse: paths,
            ..Default::default()
        };
        let state = match EdgeState::load(&sources) {
            Ok(s) => s,
            Err(e) => {
                eprint!("synapse-edge: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "synapse-edge demo: stand-in workers for the guide's topology in {}\n\
             Synapse config: {}/homeserver.yaml and {}/workers\n\
             Try (each answer names its worker):\n  {}\n\
             Metrics: http://{metrics}/metrics   status page: http://{metrics}/status\n\
             Ctrl-C stops the demo and removes the folder.\n",
            dir.path().display(),
            dir.path().display(),
            dir.path().display(),
            crate::demo::curl_examples(&format!("http://{listen}"))
        );
        serve_until_stopped(
            state,
            vec![ListenerSpec::plain(ListenAddr::Tcp(listen))],
            None,
            None,
            Some(metrics),
            None,
        )
        .await
    })
}

fn standin(name: &str, socket: &std::path::Path, listen: Option<SocketAddr>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let _worker = match crate::standin::StandIn::start_unix(name, socket) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("synapse-edge: cannot listen on {}: {e}", socket.display());
                return ExitCode::FAILURE;
            }
        };
        let _tcp = match listen {
            Some(addr) => match crate::standin::StandIn::start_tcp(name, addr).await {
                Ok((s, _)) => Some(s),
                Err(e) => {
                    eprintln!("synapse-edge: cannot listen on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        stop_signal().await;
        ExitCode::SUCCESS
    })
}

fn generate(topology: &std::path::Path, out: &std::path::Path, force: bool) -> ExitCode {
    let plan = match crate::generate::Plan::load(topology) {
        Ok(p) => p,
        Err(e) => {
            eprint!("synapse-edge: {e}");
            eprintln!("nothing was written");
            return ExitCode::from(2);
        }
    };
    match crate::generate::write(&plan, out, force) {
        Ok(outcome) if !outcome.conflicts.is_empty() && !force => {
            eprintln!(
                "synapse-edge: these files exist with other contents and were not changed (nothing was written):"
            );
            for f in &outcome.conflicts {
                eprintln!("  {}", out.join(f).display());
            }
            eprintln!("    fix: review them, then run again with --force to replace them");
            ExitCode::from(1)
        }
        Ok(outcome) => {
            for f in &outcome.written {
                println!("wrote     {}", out.join(f).display());
            }
            for f in &outcome.unchanged {
                println!("unchanged {}", out.join(f).display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("synapse-edge: cannot write into {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
