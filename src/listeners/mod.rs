//! Client-facing listeners: accept connections on TCP addresses and Unix
//! sockets, complete PROXY headers and TLS handshakes, then serve HTTP/1.x
//! with the edge's own server ([`h1`]) and HTTP/2 (by ALPN, or a cleartext
//! client's preface) with hyper's; close connections that sit idle, and
//! drain on shutdown.

pub mod h1;

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use prometheus::IntGauge;
use tokio_rustls::TlsAcceptor;

use crate::front::ListenerRole;
use crate::proxy::{ClientConn, Proxy};
use crate::request::ClientRequest;
use h1::{ClientIo, Ended};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "http://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listener to open: where, what for, and with which TLS configuration.
#[derive(Clone)]
pub struct ListenerSpec {
    pub addr: ListenAddr,
    pub role: Arc<ListenerRole>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ListenerSpec {
    /// Plain HTTP serving everything.
    pub fn plain(addr: ListenAddr) -> ListenerSpec {
        ListenerSpec {
            addr,
            role: Arc::new(ListenerRole::default()),
            tls: None,
        }
    }
}

/// A bound listening socket.
pub enum BoundSocket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound listener with its role.
pub struct Bound {
    socket: BoundSocket,
    role: Arc<ListenerRole>,
    tls: Option<TlsAcceptor>,
}

impl Bound {
    /// Binds `copies` sockets for one TCP listener with SO_REUSEPORT, so
    /// that each serving thread accepts on its own (as Nginx workers do);
    /// a Unix listener is bound once. Call outside any runtime is fine:
    /// the sockets are turned into tokio ones by the thread that serves them.
    pub fn bind_std(spec: &ListenerSpec, copies: usize) -> io::Result<Vec<StdBound>> {
        let role = |name: String| {
            let mut role = (*spec.role).clone();
            role.name = name;
            Arc::new(role)
        };
        match &spec.addr {
            ListenAddr::Tcp(addr) => {
                let mut out: Vec<StdBound> = Vec::new();
                let mut addr = *addr;
                for _ in 0..copies.max(1) {
                    let sock = socket2::Socket::new(
                        socket2::Domain::for_address(addr),
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    sock.set_reuse_address(true)?;
                    sock.set_reuse_port(true)?;
                    sock.set_nonblocking(true)?;
                    sock.bind(&addr.into())?;
                    sock.listen(1024)?;
                    let listener: std::net::TcpListener = sock.into();
                    // Port 0: the copies share the port the first one got.
                    addr = listener.local_addr()?;
                    out.push(StdBound {
                        socket: StdSocket::Tcp(listener),
                        role: role(addr.to_string()),
                        tls: spec.tls.clone(),
                    });
                }
                Ok(out)
            }
            ListenAddr::Unix(p) => {
                if std::fs::symlink_metadata(p).is_ok()
                    && std::os::unix::net::UnixStream::connect(p).is_err()
                {
                    std::fs::remove_file(p)?;
                }
                let listener = std::os::unix::net::UnixListener::bind(p)?;
                listener.set_nonblocking(true)?;
                Ok(vec![StdBound {
                    socket: StdSocket::Unix(listener, p.clone()),
                    role: role(format!("unix:{}", p.display())),
                    tls: None,
                }])
            }
        }
    }

    /// The address actually bound (the port, when asked for port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match &self.socket {
            BoundSocket::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            BoundSocket::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
        }
    }
}

/// A listener bound outside a runtime, waiting for the thread that serves it.
pub struct StdBound {
    socket: StdSocket,
    role: Arc<ListenerRole>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

enum StdSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl StdBound {
    /// The address bound.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match &self.socket {
            StdSocket::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            StdSocket::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
        }
    }

    /// Registers the socket with the current runtime.
    fn into_tokio(self) -> io::Result<Bound> {
        let socket = match self.socket {
            StdSocket::Tcp(l) => BoundSocket::Tcp(TcpListener::from_std(l)?),
            StdSocket::Unix(l, p) => BoundSocket::Unix(UnixListener::from_std(l)?, p),
        };
        Ok(Bound {
            socket,
            role: self.role,
            tls: self.tls.map(TlsAcceptor::from),
        })
    }
}

/// An edge served by `threads` OS threads, each with its own single-thread
/// runtime and its own SO_REUSEPORT copy of every TCP listener: no work
/// stealing or cross-thread wakeups on the request path (Nginx's model).
pub struct Threaded {
    pub addrs: Vec<ListenAddr>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Threaded {
    pub fn start(
        proxy: Arc<Proxy>,
        specs: &[ListenerSpec],
        settings: ServerSettings,
        threads: usize,
    ) -> io::Result<Threaded> {
        let threads = threads.max(1);
        let mut per_thread: Vec<Vec<StdBound>> = (0..threads).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for spec in specs {
            let a = &spec.addr;
            let copies = Bound::bind_std(spec, threads)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            if let Some(first) = copies.first() {
                addrs.push(first.local_addr()?);
            }
            for (i, b) in copies.into_iter().enumerate() {
                per_thread[i].push(b);
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        for (i, bound) in per_thread.into_iter().enumerate() {
            let proxy = proxy.clone();
            let settings = settings.clone();
            let mut stop_rx = stop_rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("edge-{i}"))
                .spawn(move || {
                    crate::upstream::set_serving_thread(i + 1);
                    // tokio's own event interval (61 task polls between looks
                    // for I/O): 8 had given a tighter tail behind hyper's
                    // server, but with the edge's own it only cost CPU
                    // (BENCHMARKS.md, fourth session).
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a serving thread");
                            return;
                        }
                    };
                    // Every task of this runtime is polled on this thread:
                    // its requests to workers can be written together.
                    // (Why not, if not: the start-up line says, once.)
                    if let Err(e) = crate::upstream::batch::enable() {
                        tracing::debug!(error = %e, "io_uring refused: requests to workers are written one system call each");
                    }
                    rt.block_on(async move {
                        let mut listeners = Vec::new();
                        for b in bound {
                            match b.into_tokio() {
                                Ok(l) => listeners.push(l),
                                Err(e) => tracing::error!(error = %e, "cannot register a listener"),
                            }
                        }
                        serve(listeners, proxy, settings, async move {
                            let _ = stop_rx.wait_for(|s| *s).await;
                        })
                        .await;
                    });
                })?;
            handles.push(handle);
        }
        Ok(Threaded {
            addrs,
            stop,
            threads: handles,
        })
    }

    /// Stops accepting, drains every thread, waits for them.
    pub async fn stop(self) {
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        let _ = self.stop.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_header_size: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub client_idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

/// The default limit on a request's header lines (hyper's and httparse's
/// usual figure).
const DEFAULT_MAX_HEADERS: usize = 100;

/// What one connection is doing, for the idle timeout.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    last_done_ms: AtomicU64,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// When the connection may be closed for idleness if nothing happens.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + idle
        } else {
            self.start + Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed)) + idle
        }
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.start.elapsed().as_millis() as u64;
        self.0.last_done_ms.store(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the proxy on bound listeners until `shutdown` completes, then
/// stops accepting and lets in-flight requests finish (up to the drain
/// timeout).
pub async fn serve(
    listeners: Vec<Bound>,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_size as u32)
        .max_concurrent_streams(256);
    let h2 = Arc::new(h2);
    let settings = Arc::new(settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    for listener in listeners {
        let ctx = ConnContext {
            h2: h2.clone(),
            proxy: proxy.clone(),
            settings: settings.clone(),
            stop: stop_rx.clone(),
        };
        tracker.spawn(accept_loop(listener, ctx, tracker.clone()));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    tracker.close();
    if tokio::time::timeout(settings.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?settings.drain_timeout, "drain timeout reached; closing remaining connections");
    }
}

#[derive(Clone)]
struct ConnContext {
    h2: Arc<http2::Builder<TokioExecutor>>,
    proxy: Arc<Proxy>,
    settings: Arc<ServerSettings>,
    stop: watch::Receiver<bool>,
}

async fn accept_loop(listener: Bound, ctx: ConnContext, tracker: TaskTracker) {
    let mut stop = ctx.stop.clone();
    loop {
        let accepted = tokio::select! {
            a = accept(&listener.socket) => a,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    peer: peer.ip().to_canonical(),
                    role: listener.role.clone(),
                    tls: listener.tls.clone(),
                };
                tracker.spawn(start_tcp_conn(stream, conn, ctx.clone()));
            }
            Ok(Accepted::Unix(stream)) => {
                let client = ClientConn::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    "http",
                    listener.role.clone(),
                );
                tracker.spawn(serve_conn(stream, client, ctx.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let BoundSocket::Unix(_, path) = &listener.socket {
        let _ = std::fs::remove_file(path);
    }
}

/// A TCP connection before its first request: PROXY header and TLS to go.
struct Conn {
    peer: IpAddr,
    role: Arc<ListenerRole>,
    tls: Option<TlsAcceptor>,
}

/// Reads a PROXY protocol header if the listener expects one, completes the
/// TLS handshake if it has TLS, then serves HTTP. Both steps are bounded by
/// the header-read timeout, against clients that connect and stall.
async fn start_tcp_conn(mut stream: tokio::net::TcpStream, conn: Conn, ctx: ConnContext) {
    let deadline = ctx.settings.header_read_timeout;
    let mut peer = conn.peer;
    if conn.role.proxy_protocol {
        let trusted = ctx.proxy.snapshot().state.edge.trusted_proxies.clone();
        if !trusted.is_empty() && !trusted.iter().any(|n| n.contains(&peer)) {
            tracing::warn!(%peer, "PROXY protocol from an untrusted peer refused");
            return;
        }
        match tokio::time::timeout(deadline, crate::front::read_proxy_header(&mut stream)).await {
            Ok(Ok(Some(addr))) => peer = addr,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "bad PROXY protocol header");
                return;
            }
            Err(_) => {
                count_client_timeout(&ctx.proxy, "header_read");
                return;
            }
        }
    }
    match conn.tls {
        None => {
            let client = ClientConn::new(peer, "http", conn.role);
            serve_conn(stream, client, ctx).await;
        }
        // Boxed: a TLS connection's state is twice a plain one's, and
        // inline every plain connection's task would be sized for it.
        Some(acceptor) => Box::pin(serve_tls(stream, acceptor, peer, conn.role, ctx)).await,
    }
}

async fn serve_tls(
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    peer: IpAddr,
    role: Arc<ListenerRole>,
    ctx: ConnContext,
) {
    match tokio::time::timeout(ctx.settings.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            ctx.proxy.metrics().tls_handshakes.inc();
            let client = ClientConn::new(peer, "https", role);
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                Box::pin(serve_h2(tls, client, ctx)).await;
            } else {
                serve_conn(tls, client, ctx).await;
            }
        }
        Ok(Err(e)) => {
            ctx.proxy.metrics().tls_handshake_errors.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            ctx.proxy.metrics().tls_handshake_errors.inc();
            tracing::debug!(%peer, "TLS handshake timed out");
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &BoundSocket) -> io::Result<Accepted> {
    match listener {
        BoundSocket::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        BoundSocket::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Serves HTTP/1.x, or HTTP/2 if the client's first bytes are its preface.
async fn serve_conn<I: ClientIo>(io: I, client: ClientConn, ctx: ConnContext) {
    let ended = h1::serve(
        io,
        client.clone(),
        &ctx.proxy,
        &ctx.settings,
        ctx.stop.clone(),
    )
    .await;
    if let Ended::Http2(io, read) = ended {
        // Boxed: hyper's HTTP/2 connection state would otherwise size
        // every HTTP/1 connection's task.
        Box::pin(serve_h2(Rewind { read, io }, client, ctx)).await;
    }
}

/// Serves HTTP/2 with hyper until the connection ends, idles out, or the
/// edge stops.
async fn serve_h2<I>(io: I, client: ClientConn, ctx: ConnContext)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_done_ms: AtomicU64::new(0),
    });
    let svc = {
        let activity = activity.clone();
        let proxy = ctx.proxy.clone();
        // Counted as open from its first request, as HTTP/1 connections
        // are; the count ends when the connection drops its service.
        let open: OnceLock<OpenConnection> = OnceLock::new();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            open.get_or_init(|| OpenConnection::count(&proxy, &client, "h2"));
            let guard = activity.begin();
            let proxy = proxy.clone();
            let client = client.clone();
            // Boxed: hyper moves each stream's future several times on its
            // way into a task of its own, and the proxy's future is large.
            Box::pin(async move {
                let resp = proxy.handle(ClientRequest::from_h2(req), &client).await;
                drop(guard);
                Ok::<_, Infallible>(resp)
            })
        })
    };
    let conn = ctx.h2.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut stop = ctx.stop.clone();
    let mut closing = false;
    let idle_timeout = ctx.settings.client_idle_timeout;
    // One timer for the connection's life, armed at the idle deadline as it
    // was and re-armed when it fires early. The deadline only ever moves
    // later, so this is exact. (It replaced a timer made and dropped at each
    // wake of this task, a few per request: 1% of the HTTP/2 profile, though
    // no difference an A/B could see.)
    let idle = tokio::time::sleep_until(activity.idle_deadline(idle_timeout));
    tokio::pin!(idle);
    loop {
        tokio::select! {
            // The connection first: it is what wakes this task nearly
            // always (and no random branch order to draw per wake).
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                break;
            }
            () = idle.as_mut(), if !closing => {
                let due = activity.idle_deadline(idle_timeout);
                if due <= Instant::now() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    idle.as_mut().reset(due);
                }
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Counts a client connection closed for being too slow
/// (`synapse_edge_client_timeouts_total{kind}`): `header_read` for a request
/// head or PROXY header not complete in time, `send_stall` for a client that
/// stopped reading its answer.
pub(crate) fn count_client_timeout(proxy: &Proxy, kind: &str) {
    proxy
        .metrics()
        .client_timeouts
        .with_label_values(&[kind])
        .inc();
}

/// A client connection counted in `synapse_edge_client_connections` (by
/// listener, protocol and TLS) for as long as this lives.
pub(crate) struct OpenConnection(IntGauge);

impl OpenConnection {
    pub(crate) fn count(proxy: &Proxy, client: &ClientConn, protocol: &str) -> OpenConnection {
        let tls = if client.scheme == "https" {
            "true"
        } else {
            "false"
        };
        let g = proxy.metrics().client_connections.with_label_values(&[
            &client.role.name,
            protocol,
            tls,
        ]);
        g.inc();
        OpenConnection(g)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection with what was already read from it put back in front.
struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl ServerSettings {
    pub fn from_config(edge: &crate::config::EdgeConfig) -> ServerSettings {
        ServerSettings {
            max_header_size: edge
                .limits
                .max_header_size
                .map_or(64 << 10, |b| b.0 as usize),
            max_headers: edge.limits.max_headers.unwrap_or(DEFAULT_MAX_HEADERS),
            header_read_timeout: edge.timeouts.header_read,
            client_idle_timeout: edge.timeouts.client_idle,
            drain_timeout: edge.timeouts.drain,
        }
    }
}

/// A running edge (for the CLI, the demo and tests).
pub struct Running {
    /// The addresses actually bound.
    pub addrs: Vec<ListenAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Binds every address, then serves in the background.
    pub async fn start(
        proxy: Arc<Proxy>,
        specs: &[ListenerSpec],
        settings: ServerSettings,
    ) -> io::Result<Running> {
        let mut bound = Vec::new();
        let mut local = Vec::new();
        for spec in specs {
            let a = &spec.addr;
            let b = Bound::bind_std(spec, 1)
                .and_then(|mut v| v.pop().ok_or_else(|| io::Error::other("nothing bound")))
                .and_then(StdBound::into_tokio)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            local.push(b.local_addr()?);
            bound.push(b);
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(bound, proxy, settings, async move {
            let _ = rx.await;
        }));
        Ok(Running {
            addrs: local,
            stop: Some(tx),
            task,
        })
    }

    /// The first TCP address bound.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addrs.iter().find_map(|a| match a {
            ListenAddr::Tcp(s) => Some(*s),
            ListenAddr::Unix(_) => None,
        })
    }

    /// Stops accepting, drains, and waits until done.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}
