//! Accept loops: one per listening socket, with graceful drain on shutdown. The set of
//! per-function ports follows deploys and removals live.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Proxy, ProxyBody, Route};
use crate::lifecycle::Lifecycle;

pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;
/// Serves one request of a connection.
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> HandlerFuture + Send + Sync>;

/// Open connections across all listeners, for draining.
#[derive(Clone, Default)]
pub struct Connections {
    open: Arc<AtomicUsize>,
}

impl Connections {
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

struct OpenGuard(Arc<AtomicUsize>);
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
    on_accept: Option<Arc<dyn Fn() + Send + Sync>>,
    mut shutdown: watch::Receiver<bool>,
    conns: Connections,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept on {:?}: {e}", listener.local_addr().ok());
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
        let guard = OpenGuard(conns.open.clone());
        let handler = handler.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let svc = service_fn(move |req| {
                let h = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(h(req, peer).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Handler for a gateway route.
pub fn proxy_handler(proxy: Arc<Proxy>, route: Route) -> Handler {
    Arc::new(move |req, peer| {
        let proxy = proxy.clone();
        let route = route.clone();
        Box::pin(async move { proxy.handle(req, &route, peer).await })
    })
}

/// The listeners on functions' own ports, kept in step with the deployed functions.
pub struct PortListeners {
    proxy: Arc<Proxy>,
    wake_on_accept: bool,
    host: std::net::IpAddr,
    shutdown: watch::Receiver<bool>,
    conns: Connections,
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
        let wanted: HashMap<u16, String> = lc
            .specs()
            .iter()
            .filter_map(|s| s.port.map(|p| (p, s.name.clone())))
            .collect();
        self.open.retain(|port, (name, task)| {
            let keep = wanted.get(port) == Some(name);
            if !keep {
                task.abort();
                tracing::info!("closed port {port} of function {name}");
            }
            keep
        });
        for (port, name) in wanted {
            if self.open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.host, port);
            let listener = match bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("function {name}: cannot listen on its port {addr}: {e}");
                    continue;
                }
            };
            let route = Route::Port(Arc::from(name.as_str()));
            let on_accept: Option<Arc<dyn Fn() + Send + Sync>> = if self.wake_on_accept {
                let lc = lc.clone();
                let name = name.clone();
                Some(Arc::new(move || lc.wake_on_accept(&name, Instant::now())))
            } else {
                None
            };
            let task = tokio::spawn(serve_listener(
                listener,
                proxy_handler(self.proxy.clone(), route),
                on_accept,
                self.shutdown.clone(),
                self.conns.clone(),
            ));
            tracing::info!("function {name} listens on its own port {addr}");
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
