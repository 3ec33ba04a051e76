//! Connections to instances: one pooled client per (protocol, connect timeout), since the
//! connect timeout and HTTP/2 are properties of the client's connector and pool; and the
//! private HTTP/1.1 connections of one client connection, for requests with a body.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::ForwardBody;
use crate::runtime::Instance;
use crate::spec::Protocol;

pub type UpstreamClient = Client<HttpConnector, ForwardBody>;

type Key = (Protocol, Duration);

/// The pooled clients, made on first use of each key (a handful at most).
pub struct Upstream {
    idle_timeout: Duration,
    clients: RwLock<Vec<(Key, Arc<UpstreamClient>)>>,
}

impl Upstream {
    pub fn new(idle_timeout: Duration) -> Self {
        Upstream {
            idle_timeout,
            clients: RwLock::new(Vec::new()),
        }
    }

    /// Idle connections to instances are closed (pooled) or not reused (private) after it.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    pub fn client(&self, protocol: Protocol, connect_timeout: Duration) -> Arc<UpstreamClient> {
        let key = (protocol, connect_timeout);
        if let Some((_, c)) = self.clients.read().unwrap().iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let mut clients = self.clients.write().unwrap();
        if let Some((_, c)) = clients.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(256);
        if protocol == Protocol::H2c {
            b.http2_only(true);
        }
        let c = Arc::new(b.build(connector));
        clients.push((key, c.clone()));
        c
    }
}

/// Why a request could not be sent to an instance, or no response came back.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no connection within {}", humantime::format_duration(*.timeout))]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

type PrivateSender = http1::SendRequest<ForwardBody>;

/// HTTP/1.1 connections to instances that only one client connection's requests use.
///
/// A request with a body goes on one: if the function leaves part of that body unread and
/// it is parsed as a further request, the answer can only reach the client that sent it
/// (on a pooled connection it would reach another client). They are never pooled; they
/// close with their client connection, which `client_idle_timeout` bounds.
#[derive(Default)]
pub struct PrivateConns {
    idle: Mutex<Vec<PrivateConn>>,
}

/// More than one only for HTTP/2 clients with concurrent uploads.
const PRIVATE_IDLE_MAX: usize = 4;

struct PrivateConn {
    /// Which instance it goes to (held weakly: the allocation, never reused while held, is
    /// the instance's identity; its address may be reused by a later instance).
    instance: Weak<dyn Instance>,
    sender: PrivateSender,
    since: Instant,
}

impl std::fmt::Debug for PrivateConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.idle.lock().map(|v| v.len()).unwrap_or(0);
        f.debug_struct("PrivateConns").field("idle", &n).finish()
    }
}

fn same_instance(w: &Weak<dyn Instance>, a: &Arc<dyn Instance>) -> bool {
    std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(a))
}

impl PrivateConns {
    /// An idle connection to `instance` that can take a request now is kept here (so an
    /// HTTP/2 client's concurrent body-less streams use the pool, not new connections).
    pub fn holds(&self, instance: &Arc<dyn Instance>) -> bool {
        self.idle
            .lock()
            .unwrap()
            .iter()
            .any(|c| same_instance(&c.instance, instance) && c.sender.is_ready())
    }

    /// An idle connection to `instance` that can take a request now; connections to other
    /// (older) instances, closed ones and those idle past `idle_timeout` are dropped.
    fn take(&self, instance: &Arc<dyn Instance>, idle_timeout: Duration) -> Option<PrivateSender> {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|c| {
            same_instance(&c.instance, instance)
                && !c.sender.is_closed()
                && c.since.elapsed() < idle_timeout
        });
        // Not ready: the previous exchange has not finished on the wire (a function still
        // not reading an upload); a new connection is opened instead of waiting on it.
        let i = idle.iter().position(|c| c.sender.is_ready())?;
        Some(idle.swap_remove(i).sender)
    }

    fn put(&self, instance: Weak<dyn Instance>, sender: PrivateSender) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() >= PRIVATE_IDLE_MAX {
            idle.remove(0);
        }
        idle.push(PrivateConn {
            instance,
            sender,
            since: Instant::now(),
        });
    }
}

/// Sends `req` (its URI absolute: `http://<addr><path>`) on a private connection of
/// `conns` to `instance`, a kept one when there is one. The connection goes back to
/// `conns` when the response body has been read to its end.
pub async fn send_private(
    conns: &Arc<PrivateConns>,
    instance: &Arc<dyn Instance>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    mut req: Request<ForwardBody>,
) -> Result<(Response<Incoming>, GiveBack), SendError> {
    let addr = instance.addr();
    // A connection to one origin speaks origin-form.
    let origin_form = req
        .uri()
        .path_and_query()
        .map(|p| Uri::from(p.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    *req.uri_mut() = origin_form;
    if !req.headers().contains_key(http::header::HOST) {
        if let Ok(v) = http::HeaderValue::from_str(&addr.to_string()) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    let kept = conns.take(instance, idle_timeout);
    let reused = kept.is_some();
    let mut sender = match kept {
        Some(s) => s,
        None => connect(addr, connect_timeout).await?,
    };
    let resp = match sender.try_send_request(req).await {
        Ok(r) => r,
        // A kept connection the function closed meanwhile: the request was not sent, so it
        // goes once more on a new connection.
        Err(mut e) if reused && e.message().is_some() => {
            let req = e.take_message().expect("checked");
            sender = connect(addr, connect_timeout).await?;
            sender.send_request(req).await?
        }
        Err(e) => return Err(e.into_error().into()),
    };
    let back = GiveBack(Some((conns.clone(), Arc::downgrade(instance), sender)));
    Ok((resp, back))
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<PrivateSender, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
        Err(_) => return Err(SendError::ConnectTimeout { addr, timeout }),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the connection closes or every sender is gone.
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("connection to {addr}: {e}");
        }
    });
    Ok(sender)
}

/// Hands a private connection back to its client connection; dropped unused, the
/// connection closes.
pub struct GiveBack(Option<(Arc<PrivateConns>, Weak<dyn Instance>, PrivateSender)>);

impl GiveBack {
    fn give(&mut self) {
        if let Some((conns, instance, sender)) = self.0.take() {
            conns.put(instance, sender);
        }
    }
}

/// A private connection's response body: the connection is given back once the body has
/// been read to its end, never when it was cut short (its rest would still be on the wire).
pub struct PrivateBody {
    inner: Incoming,
    back: GiveBack,
}

impl PrivateBody {
    pub fn new(inner: Incoming, back: GiveBack) -> Self {
        PrivateBody { inner, back }
    }
}

impl Body for PrivateBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            self.back.give();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PrivateBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) is never polled.
        if self.inner.is_end_stream() {
            self.back.give();
        }
    }
}
