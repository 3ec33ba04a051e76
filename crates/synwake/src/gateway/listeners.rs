//! Accept loops: one per listening socket (plain HTTP or TLS), with graceful drain on
//! shutdown. The set of per-function ports (plain and TLS) follows deploys and removals
//! live. Accepted connections are served on the [`Serving`] threads when there are some.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::conn::{Limits, Server};
use super::hosts::ConnInfo;
use super::tls::{HandshakeError, TlsEdge};
use super::{Proxy, ProxyBody, Route};
use crate::fdlimit::LogOnce;
use crate::lifecycle::{Lifecycle, Trigger};

pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;
type HandlerFn = dyn Fn(Request<Incoming>, ConnInfo) -> HandlerFuture + Send + Sync;

/// Serves the requests of a listener's connections.
#[derive(Clone)]
pub struct Handler {
    /// A request hyper's server parsed.
    hyper: Arc<HandlerFn>,
    /// The proxy and route, when the listener's plain HTTP/1.1 requests are served by our
    /// own server ([`super::h1srv`]) and go to the proxy without a boxed future.
    pub(super) proxy: Option<(Arc<Proxy>, Route)>,
}

impl Handler {
    /// A handler for hyper's server only.
    pub fn new(
        f: impl Fn(Request<Incoming>, ConnInfo) -> HandlerFuture + Send + Sync + 'static,
    ) -> Self {
        Handler {
            hyper: Arc::new(f),
            proxy: None,
        }
    }

    pub fn call(&self, req: Request<Incoming>, conn: ConnInfo) -> HandlerFuture {
        (self.hyper)(req, conn)
    }
}

/// Runs for every accepted connection, before anything is read from it.
pub type OnAccept = Option<Arc<dyn Fn() + Send + Sync>>;

/// How a listener's connections start: straight into HTTP, or through a TLS handshake.
#[derive(Clone)]
pub enum Transport {
    Plain,
    /// `wake_by_sni`: the shared TLS port wakes the function claiming the server name
    /// before the handshake is answered, and refuses names nothing serves.
    Tls {
        edge: Arc<TlsEdge>,
        proxy: Arc<Proxy>,
        wake_by_sni: bool,
    },
}

/// Open connections across all listeners, for draining and for `max_connections`.
#[derive(Clone)]
pub struct Connections {
    open: Arc<AtomicUsize>,
    /// One permit per open connection; without one, a connection waits in the backlog.
    admit: Arc<Semaphore>,
    server: Arc<Server>,
    /// Where accepted connections are served; `None`: on the accepting runtime.
    serving: Option<Arc<Serving>>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections::new(Limits::default())
    }
}

impl Connections {
    pub fn new(limits: Limits) -> Self {
        Connections {
            open: Arc::default(),
            admit: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            server: Server::new(limits),
            serving: None,
        }
    }

    /// The same, with connections served on `serving`'s threads.
    pub fn served_on(mut self, serving: Arc<Serving>) -> Self {
        self.serving = Some(serving);
        self
    }

    /// The same drain count and server, with admission of its own: the API stays
    /// reachable while the function ports are at `max_connections`. Its connections stay
    /// on the accepting runtime (deploys and removals are not the hot path).
    pub fn with_own_limit(&self, max: usize) -> Self {
        Connections {
            open: self.open.clone(),
            admit: Arc::new(Semaphore::new(max.max(1))),
            server: self.server.clone(),
            serving: None,
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits until every connection closed, or `timeout` passed. Returns those still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.open()
    }
}

struct OpenGuard(Arc<AtomicUsize>, #[allow(dead_code)] OwnedSemaphorePermit);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until `shutdown` turns true; each connection then finishes its
/// in-flight request and closes. `on_accept` runs for every accepted connection.
pub async fn serve_listener(
    listener: TcpListener,
    handler: Handler,
    on_accept: OnAccept,
    shutdown: watch::Receiver<bool>,
    conns: Connections,
) {
    serve_transport(
        listener,
        Transport::Plain,
        handler,
        on_accept,
        shutdown,
        conns,
    )
    .await
}

/// [`serve_listener`] for plain or TLS connections.
pub async fn serve_transport(
    listener: TcpListener,
    transport: Transport,
    handler: Handler,
    on_accept: OnAccept,
    mut shutdown: watch::Receiver<bool>,
    conns: Connections,
) {
    let mut accept_failures = LogOnce::new(Duration::from_secs(10));
    let mut at_limit = LogOnce::new(Duration::from_secs(10));
    loop {
        if conns.admit.available_permits() == 0 {
            if let Some(more) = at_limit.hit(std::time::Instant::now()) {
                tracing::warn!(
                    "{:?}: at its connection limit (max_connections, capped by the fd limit); not accepting until one closes ({more} more such pauses since the last line)",
                    listener.local_addr().ok()
                );
            }
        }
        // At max_connections, stop accepting: new connections wait in the kernel's backlog.
        let permit = tokio::select! {
            p = conns.admit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and say so once.
                    if let Some(more) = accept_failures.hit(std::time::Instant::now()) {
                        tracing::warn!(
                            "accept on {:?}: {e} ({more} more accept failures since the last line)",
                            listener.local_addr().ok()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        if let Some(f) = &on_accept {
            f();
        }
        let _ = stream.set_nodelay(true);
        conns.open.fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard(conns.open.clone(), permit);
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let transport = transport.clone();
        let accepted = Instant::now();
        let server = conns.server.clone();
        let serve = move |stream: TcpStream| async move {
            let _guard = guard;
            match transport {
                Transport::Plain => {
                    server
                        .serve(stream, ConnInfo::plain(peer), handler, shutdown)
                        .await
                }
                Transport::Tls {
                    edge,
                    proxy,
                    wake_by_sni,
                } => {
                    let hello = |name: Option<&str>| {
                        !wake_by_sni || sni_admits(&proxy, &edge, name, accepted)
                    };
                    match edge.handshake(stream, accepted, hello).await {
                        Ok(h) => {
                            let info = ConnInfo::tls(peer, h.server_name);
                            server.serve(h.stream, info, handler, shutdown).await
                        }
                        Err(e @ HandshakeError::UnknownName(_)) => {
                            tracing::info!("TLS from {peer}: {e}")
                        }
                        Err(e) => tracing::debug!("TLS from {peer}: {e}"),
                    }
                }
            }
        };
        match &conns.serving {
            Some(serving) => serving.spawn(stream, serve),
            None => {
                tokio::spawn(serve(stream));
            }
        }
    }
}

/// Threads that serve client connections, each running a single-threaded runtime: a
/// connection's requests, their upstream calls and the responses are polled on one thread
/// (no work stealing, no wake-ups across threads on the hot path). A new connection goes
/// to the thread serving the fewest.
pub struct Serving {
    threads: Vec<ServingThread>,
}

struct ServingThread {
    handle: tokio::runtime::Handle,
    /// Connections this thread serves now.
    open: Arc<AtomicUsize>,
    /// Dropped with the `Serving`: the thread's runtime then ends, and its tasks with it.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Serving {
    /// Starts `threads` (at least one) serving threads. They run until the `Serving` is
    /// dropped (the daemon drops it after its instances stopped: an instance dies with the
    /// thread that started it, PR_SET_PDEATHSIG).
    pub fn start(threads: usize) -> std::io::Result<Arc<Serving>> {
        let mut out = Vec::new();
        for i in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("synwake-serve-{i}"))
                .spawn(move || {
                    let _ = rt.block_on(stopped);
                })?;
            out.push(ServingThread {
                handle,
                open: Arc::default(),
                _stop: stop,
            });
        }
        Ok(Arc::new(Serving { threads: out }))
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Serves `stream` with `serve` on the least busy thread.
    fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let t = self
            .threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
            .expect("at least one serving thread");
        // The stream leaves this runtime's reactor for the serving thread's.
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("handing a connection to a serving thread: {e}");
                return;
            }
        };
        t.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenOn(t.open.clone());
        t.handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!("registering a connection on a serving thread: {e}"),
            }
        });
    }
}

/// Counts a connection on its serving thread until it closes.
struct OpenOn(Arc<AtomicUsize>);
impl Drop for OpenOn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `sni` trigger: wakes the function claiming `name` (before the server answers the
/// ClientHello). Admits names a function claims or a certificate covers, and clients
/// without SNI (they get the default certificate); refuses the rest, waking nothing.
fn sni_admits(proxy: &Proxy, edge: &TlsEdge, name: Option<&str>, at: Instant) -> bool {
    let Some(name) = name else { return true };
    if let Some(function) = proxy.host_table().lookup(name) {
        proxy.lifecycle().wake(function, Trigger::Sni, at);
        return true;
    }
    edge.certs.covers(name)
}

/// Handler for a gateway route.
pub fn proxy_handler(proxy: Arc<Proxy>, route: Route) -> Handler {
    let (p, r) = (proxy.clone(), route.clone());
    let mut h = Handler::new(
        move |req: Request<Incoming>, conn: ConnInfo| -> HandlerFuture {
            let proxy = p.clone();
            let route = r.clone();
            Box::pin(async move {
                proxy
                    .handle(req.map(super::ForwardBody::Client), &route, &conn)
                    .await
            })
        },
    );
    h.proxy = Some((proxy, route));
    h
}

/// The listeners on functions' own ports, kept in step with the deployed functions.
pub struct PortListeners {
    proxy: Arc<Proxy>,
    wake_on_accept: bool,
    host: std::net::IpAddr,
    shutdown: watch::Receiver<bool>,
    conns: Connections,
    /// port -> (function, task); plain and TLS ports alike.
    open: HashMap<u16, (String, JoinHandle<()>)>,
    /// The lifecycle change version the listeners last matched.
    synced: watch::Sender<u64>,
}

impl PortListeners {
    /// Function ports are bound on the shared listener's address.
    pub fn new(
        proxy: Arc<Proxy>,
        wake_on_accept: bool,
        host: std::net::IpAddr,
        shutdown: watch::Receiver<bool>,
        conns: Connections,
    ) -> Self {
        PortListeners {
            proxy,
            wake_on_accept,
            host,
            shutdown,
            conns,
            open: HashMap::new(),
            synced: watch::channel(0).0,
        }
    }

    /// Tells which lifecycle change version the listeners have caught up with, so a deploy
    /// can return only once its port accepts connections.
    pub fn synced(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    /// Opens and closes listeners to match the lifecycle's functions. Bind failures are
    /// logged with the function and port, and retried on the next change.
    pub async fn sync(&mut self) {
        let lc: Lifecycle = self.proxy.lifecycle().clone();
        let version = *lc.subscribe_changes().borrow();
        // port -> (function, is TLS)
        let wanted: HashMap<u16, (String, bool)> = lc
            .specs()
            .iter()
            .flat_map(|s| {
                let plain = s.port.map(|p| (p, (s.name.clone(), false)));
                let tls = s.tls_port.map(|p| (p, (s.name.clone(), true)));
                plain.into_iter().chain(tls)
            })
            .collect();
        self.open.retain(|port, (name, task)| {
            let keep = wanted.get(port).map(|w| &w.0) == Some(name);
            if !keep {
                task.abort();
                tracing::info!("closed port {port} of function {name}");
            }
            keep
        });
        for (port, (name, tls)) in wanted {
            if self.open.contains_key(&port) {
                continue;
            }
            let transport = match (tls, self.proxy.tls()) {
                (false, _) => Transport::Plain,
                (true, Some(edge)) => Transport::Tls {
                    edge: edge.clone(),
                    proxy: self.proxy.clone(),
                    wake_by_sni: false,
                },
                (true, None) => {
                    tracing::error!(
                        "function {name}: tls_port {port} needs a [[certificate]]; not listening"
                    );
                    continue;
                }
            };
            let addr = SocketAddr::new(self.host, port);
            let listener = match bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("function {name}: cannot listen on its port {addr}: {e}");
                    continue;
                }
            };
            let route = Route::Port(Arc::from(name.as_str()));
            let on_accept: OnAccept = if self.wake_on_accept {
                let lc = lc.clone();
                let name = name.clone();
                Some(Arc::new(move || lc.wake_on_accept(&name, Instant::now())))
            } else {
                None
            };
            let task = tokio::spawn(serve_transport(
                listener,
                transport,
                proxy_handler(self.proxy.clone(), route),
                on_accept,
                self.shutdown.clone(),
                self.conns.clone(),
            ));
            tracing::info!(
                "function {name} listens on its own {} port {addr}",
                if tls { "HTTPS" } else { "HTTP" }
            );
            self.open.insert(port, (name, task));
        }
        self.synced.send_replace(version);
    }

    /// Keeps syncing until shutdown.
    pub async fn run(mut self) {
        let mut changes = self.proxy.lifecycle().subscribe_changes();
        let mut shutdown = self.shutdown.clone();
        loop {
            self.sync().await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
        }
    }
}

/// Binds with SO_REUSEADDR and a deep accept backlog (SYN bursts are expected here).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One keep-alive request; the body is the name of the thread that served it.
    async fn served_by(conn: &mut TcpStream) -> String {
        conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if body.len() >= len {
                    return body.trim().to_string();
                }
            }
        }
    }

    #[tokio::test]
    async fn connections_go_to_the_least_busy_serving_thread_and_stay_there() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Handler::new(
            |_req: Request<Incoming>, _conn: ConnInfo| -> HandlerFuture {
                Box::pin(async {
                    let name = std::thread::current().name().unwrap_or("?").to_string();
                    super::super::text_response(StatusCode::OK, name)
                })
            },
        );
        let (stop, shutdown) = watch::channel(false);
        let conns = Connections::default().served_on(Serving::start(2).unwrap());
        let accept = tokio::spawn(serve_listener(
            listener,
            handler,
            None,
            shutdown,
            conns.clone(),
        ));
        let mut a = TcpStream::connect(addr).await.unwrap();
        let on_a = served_by(&mut a).await;
        let mut b = TcpStream::connect(addr).await.unwrap();
        let on_b = served_by(&mut b).await;
        assert!(on_a.starts_with("synwake-serve-"), "served on {on_a:?}");
        assert!(on_b.starts_with("synwake-serve-"), "served on {on_b:?}");
        assert_ne!(on_a, on_b, "the second connection went to the idle thread");
        assert_eq!(
            served_by(&mut a).await,
            on_a,
            "a connection stays on its thread"
        );
        assert_eq!(conns.open(), 2);
        // Shutdown still drains connections on the serving threads.
        stop.send_replace(true);
        drop((a, b));
        assert_eq!(conns.drain(Duration::from_secs(5)).await, 0);
        accept.abort();
    }
}
