//! Connections to workers: hyper clients over Unix sockets (hyperlocal) and
//! TCP, with keep-alive pools per worker, so steady traffic opens no new
//! connections.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyperlocal::UnixConnector;

use crate::body::RequestBody;
use crate::config::{Endpoint, UpstreamPool};
use crate::metrics::Metrics;
use crate::topology::{Topology, WorkerId};

/// A Unix-socket connector that gives up after the connect timeout.
#[derive(Debug, Clone, Copy)]
pub struct UnixConnect {
    timeout: Duration,
}

impl tower::Service<Uri> for UnixConnect {
    type Response = hyperlocal::UnixStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<hyperlocal::UnixStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            // A full listen backlog answers a non-blocking connect with
            // EAGAIN: the worker is busy, not gone. Try again (as a
            // blocking connect would wait) until the connect timeout.
            let connect = async {
                let mut pause = Duration::from_millis(1);
                loop {
                    match tower::Service::call(&mut UnixConnector, uri.clone()).await {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(50));
                        }
                        r => return r,
                    }
                }
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
        })
    }
}

/// Where a worker's requests are sent: the URI scheme and authority that
/// select its connection pool.
#[derive(Debug, Clone)]
struct Target {
    scheme: Scheme,
    authority: Authority,
    unix: bool,
}

impl Target {
    fn of(endpoint: &Endpoint) -> Option<Target> {
        match endpoint {
            // hyperlocal reads the socket path from a hex-encoded host.
            Endpoint::Unix(path) => {
                let hex: String = path
                    .as_os_str()
                    .as_encoded_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                Some(Target {
                    scheme: Scheme::try_from("unix").ok()?,
                    authority: Authority::try_from(format!("{hex}:0")).ok()?,
                    unix: true,
                })
            }
            Endpoint::Tcp { .. } => Some(Target {
                scheme: Scheme::HTTP,
                authority: Authority::try_from(endpoint.to_string()).ok()?,
                unix: false,
            }),
        }
    }
}

/// Why a request did not get a response from its worker.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: the worker could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The worker's address could not be formed (unusable socket path).
    #[error("unusable upstream address")]
    BadTarget,
    /// The request failed after (part of) it was sent.
    #[error("{0}")]
    Failed(String),
}

impl UpstreamError {
    /// Whether the worker surely received nothing of the request.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::BadTarget)
    }
}

/// Counts connections opened to each worker (and failed connects), naming
/// the worker from the connection's authority.
#[derive(Clone)]
pub struct Counting<C> {
    inner: C,
    names: Arc<ArcSwap<HashMap<Authority, String>>>,
    metrics: Arc<Metrics>,
}

impl<C> tower::Service<Uri> for Counting<C>
where
    C: tower::Service<Uri> + Send + 'static,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
    C::Error: Send + 'static,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let worker = uri
            .authority()
            .and_then(|a| self.names.load().get(a).cloned())
            .unwrap_or_else(|| "unknown".to_string());
        let metrics = self.metrics.clone();
        let fut = self.inner.call(uri);
        Box::pin(async move {
            let r = fut.await;
            match &r {
                Ok(_) => metrics
                    .upstream_connections
                    .with_label_values(&[&worker])
                    .inc(),
                Err(_) => metrics
                    .upstream_connect_errors
                    .with_label_values(&[&worker])
                    .inc(),
            }
            r
        })
    }
}

/// The pooled HTTP clients, shared by every topology a reload installs, so
/// idle connections to workers survive reloads.
pub struct Clients {
    unix: Client<Counting<UnixConnect>, RequestBody>,
    tcp: Client<Counting<HttpConnector>, RequestBody>,
    names: Arc<ArcSwap<HashMap<Authority, String>>>,
}

impl Clients {
    pub fn new(connect_timeout: Duration, pool: &UpstreamPool, metrics: Arc<Metrics>) -> Clients {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_worker)
            // Host is the client's, never the socket's.
            .set_host(false);
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let names = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let counting = |inner| Counting {
            inner,
            names: names.clone(),
            metrics: metrics.clone(),
        };
        Clients {
            unix: builder.build(counting(UnixConnect {
                timeout: connect_timeout,
            })),
            tcp: builder.build(Counting {
                inner: http,
                names: names.clone(),
                metrics: metrics.clone(),
            }),
            names,
        }
    }
}

/// Where each worker of one topology is reached.
#[derive(Clone)]
pub struct Upstreams {
    clients: Arc<Clients>,
    targets: Vec<Option<Target>>,
}

impl Upstreams {
    pub fn new(topology: &Topology, clients: Arc<Clients>) -> Upstreams {
        let targets: Vec<Option<Target>> = topology
            .workers
            .iter()
            .map(|w| w.inbound.as_ref().and_then(Target::of))
            .collect();
        // Connections are named after the workers of the newest topology.
        let mut names = (**clients.names.load()).clone();
        for (w, t) in topology.workers.iter().zip(&targets) {
            if let Some(t) = t {
                names.insert(t.authority.clone(), w.name.clone());
            }
        }
        clients.names.store(Arc::new(names));
        Upstreams { clients, targets }
    }

    /// Sends a request (its URI only needs the path and query) to a worker.
    pub async fn send(
        &self,
        worker: WorkerId,
        path_and_query: PathAndQuery,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let Some(Some(target)) = self.targets.get(worker.0 as usize) else {
            return Err(UpstreamError::BadTarget);
        };
        let uri = Uri::builder()
            .scheme(target.scheme.clone())
            .authority(target.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| UpstreamError::BadTarget)?;
        *req.uri_mut() = uri;
        let result = if target.unix {
            self.clients.unix.request(req).await
        } else {
            self.clients.tcp.request(req).await
        };
        result.map_err(|e| {
            if e.is_connect() {
                UpstreamError::Connect(error_chain(&e))
            } else {
                UpstreamError::Failed(error_chain(&e))
            }
        })
    }
}

/// An error with its causes, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
