//! Connections to instances. HTTP/1.1 functions: our own client (gateway/h1.rs) over a
//! shared idle list per instance, taken newest first, and the private connections of one
//! client connection, for requests with a body; one reaper task closes idle ones of both
//! after `upstream_idle_timeout`. h2c functions: one HTTP/2 connection per instance and
//! serving runtime (gateway/h2c.rs), let go of by the same reaper. HTTP/1.1 Upgrade
//! requests: one pooled hyper client per connect timeout, since that is a property of its
//! connector.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::runtime::Id as RuntimeId;

use http::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::forwarded::Forwarded;
use super::h1::{self, Conn, Outgoing, UpstreamBody};
use super::h2c::{self, H2Conns};
use super::ForwardBody;
use crate::runtime::Instance;

pub type UpstreamClient = Client<HttpConnector, ForwardBody>;

/// Idle connections kept per instance in the shared list.
const SHARED_IDLE_MAX: usize = 256;
/// Idle private connections per instance of one client connection (more than one only for
/// HTTP/2 clients with concurrent uploads).
const PRIVATE_IDLE_MAX: usize = 4;

/// The upstream side of the proxy.
pub struct Upstream {
    idle_timeout: Duration,
    /// HTTP/1.1 connections any client's body-less requests use.
    shared: Arc<IdleConns>,
    /// The private lists of client connections that have used one, for the reaper (an
    /// entry goes when its client connection has closed).
    private: Arc<Mutex<Vec<Weak<IdleConns>>>>,
    reaper_started: AtomicBool,
    /// The connections to h2c instances.
    h2c: Arc<H2Conns>,
    /// The hyper clients for Upgrade, made on first use of each key.
    clients: RwLock<Vec<(Duration, Arc<UpstreamClient>)>>,
}

/// Which connections an HTTP/1.1 request may use.
pub enum Via<'a> {
    /// The shared idle list.
    Shared,
    /// Those of one client connection.
    Private(&'a PrivateConns),
    /// A new connection, closed after the exchange (a queued call's upload).
    Once,
}

/// Why a request could not be sent to an instance, or no response came back.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    H1(#[from] h1::Error),
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    H2c(#[from] h2c::Error),
}

impl Upstream {
    pub fn new(idle_timeout: Duration) -> Self {
        Upstream {
            idle_timeout,
            shared: Arc::new(IdleConns::new(SHARED_IDLE_MAX)),
            private: Arc::default(),
            reaper_started: AtomicBool::new(false),
            h2c: Arc::default(),
            clients: RwLock::new(Vec::new()),
        }
    }

    /// The hyper client for Upgrade requests to HTTP/1.1 functions.
    pub fn client(&self, connect_timeout: Duration) -> Arc<UpstreamClient> {
        let key = connect_timeout;
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
        let c = Arc::new(b.build(connector));
        clients.push((key, c.clone()));
        c
    }

    /// Sends `req` (path and query in its URI; hop-by-hop fields are left out, and the
    /// four `forwarded` ones replaced when given) to an HTTP/1.1 `instance` on a kept
    /// connection of `via`, else a new one. A kept connection that fails before a byte of
    /// the request left, or (for an idempotent request without a body) that the instance
    /// closed or reset before a byte of the response came, is given up and the request sent
    /// once more, on a new connection; `resent` is called then. The connection goes back
    /// to `via` once the response body was read to its end.
    pub async fn send_h1(
        &self,
        via: Via<'_>,
        instance: &Arc<dyn Instance>,
        connect_timeout: Duration,
        req: Request<ForwardBody>,
        forwarded: Option<Forwarded>,
        resent: impl Fn(),
    ) -> Result<Response<UpstreamBody>, SendError> {
        let addr = instance.addr();
        let mut out = Outgoing::new(req, addr, forwarded).await?;
        let pool = match via {
            Via::Shared => {
                self.start_reaper();
                Some(&self.shared)
            }
            Via::Private(p) => {
                // Once per client connection: after that, one relaxed load per request.
                if !p.reaped.load(Ordering::Relaxed) && !p.reaped.swap(true, Ordering::Relaxed) {
                    self.private.lock().unwrap().push(Arc::downgrade(&p.idle));
                    self.start_reaper();
                }
                Some(&p.idle)
            }
            Via::Once => None,
        };
        let mut kept = pool.and_then(|p| p.take(instance, self.idle_timeout));
        loop {
            let conn = match kept.take() {
                Some(c) => c,
                None => Conn::connect(addr, connect_timeout).await?,
            };
            let home = pool.map(|p| Home {
                pool: p.clone(),
                instance: Arc::downgrade(instance),
            });
            match h1::exchange(conn, out, home).await {
                Ok(resp) => return Ok(resp),
                // Closed by the instance while idle, before it saw the request: once more.
                Err((e, Some(back))) => {
                    tracing::debug!(
                        "{addr}: kept connection failed, request sent again on a new one: {e}"
                    );
                    resent();
                    out = back;
                }
                Err((e, None)) => return Err(e.into()),
            }
        }
    }

    /// Sends `req` (absolute URI) to an h2c `instance` as a stream on its HTTP/2
    /// connection; an extended CONNECT only if the instance enabled it.
    pub async fn send_h2c(
        &self,
        instance: &Arc<dyn Instance>,
        connect_timeout: Duration,
        req: Request<ForwardBody>,
    ) -> Result<Response<hyper::body::Incoming>, SendError> {
        self.start_reaper();
        Ok(self.h2c.send(instance, connect_timeout, req).await?)
    }

    /// One task per proxy closes idle connections past the bound (and those their instance
    /// closed, or to instances gone), shared and private, and lets go of idle h2c
    /// connections; it ends with the proxy.
    fn start_reaper(&self) {
        if self.reaper_started.load(Ordering::Relaxed)
            || self.reaper_started.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reaper_started.store(false, Ordering::Relaxed);
            return;
        };
        let pool = Arc::downgrade(&self.shared);
        let private = Arc::downgrade(&self.private);
        let h2c = Arc::downgrade(&self.h2c);
        let timeout = self.idle_timeout;
        // A connection closes at most a quarter of the bound (or 5 s) after it.
        let tick = (timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(5));
        rt.spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let (Some(pool), Some(private), Some(h2c)) =
                    (pool.upgrade(), private.upgrade(), h2c.upgrade())
                else {
                    return;
                };
                pool.reap(timeout);
                h2c.reap(timeout);
                // Reaped outside the registry's lock, so registering never waits for it.
                let lists: Vec<Arc<IdleConns>> = {
                    let mut private = private.lock().unwrap();
                    private.retain(|l| l.strong_count() > 0);
                    private.iter().filter_map(Weak::upgrade).collect()
                };
                for list in lists {
                    list.reap(timeout);
                }
            }
        });
    }
}

/// Idle HTTP/1.1 connections by instance and runtime, newest last: taken first (its
/// socket is warm), so the oldest are the ones that reach the idle bound. By runtime: a
/// socket's readiness comes from the I/O driver of the runtime it was made on, so it is
/// only used from there (with one runtime per serving thread, no cross-thread wake-ups).
pub struct IdleConns {
    max_per_instance: usize,
    slots: Mutex<HashMap<(usize, RuntimeId), Slot>>,
}

struct Slot {
    /// Held weakly: the allocation, never reused while held, is the instance's identity
    /// (its address may be reused by a later instance); its address is the slot's key.
    instance: Weak<dyn Instance>,
    conns: Vec<Conn>,
}

/// A pool key: the instance's allocation and the runtime whose I/O driver owns the socket.
pub(super) fn key_of(instance: *const dyn Instance, rt: RuntimeId) -> (usize, RuntimeId) {
    (instance as *const () as usize, rt)
}

/// The runtime the caller runs on (every caller is a task).
fn current_runtime() -> Option<RuntimeId> {
    tokio::runtime::Handle::try_current().ok().map(|h| h.id())
}

impl IdleConns {
    fn new(max_per_instance: usize) -> Self {
        IdleConns {
            max_per_instance,
            slots: Mutex::default(),
        }
    }

    /// The newest idle connection to `instance` that can take a request; the ones passed
    /// over (idle too long, closed by the instance) are closed.
    fn take(&self, instance: &Arc<dyn Instance>, idle_timeout: Duration) -> Option<Conn> {
        let mut stale = Vec::new();
        let found = {
            let rt = current_runtime()?;
            let mut slots = self.slots.lock().unwrap();
            let slot = slots.get_mut(&key_of(Arc::as_ptr(instance), rt))?;
            loop {
                let Some(mut c) = slot.conns.pop() else {
                    break None;
                };
                if c.idle_since.elapsed() < idle_timeout && c.usable() {
                    break Some(c);
                }
                stale.push(c);
            }
        };
        drop(stale);
        found
    }

    fn put(&self, instance: &Weak<dyn Instance>, conn: Conn) {
        let evicted = {
            let mut slots = self.slots.lock().unwrap();
            let slot = slots
                .entry(key_of(instance.as_ptr(), conn.runtime()))
                .or_insert_with(|| Slot {
                    instance: instance.clone(),
                    conns: Vec::new(),
                });
            let evicted = (slot.conns.len() >= self.max_per_instance).then(|| slot.conns.remove(0));
            slot.conns.push(conn);
            evicted
        };
        drop(evicted);
    }

    fn holds(&self, instance: &Arc<dyn Instance>) -> bool {
        let Some(rt) = current_runtime() else {
            return false;
        };
        self.slots
            .lock()
            .unwrap()
            .get(&key_of(Arc::as_ptr(instance), rt))
            .is_some_and(|s| !s.conns.is_empty())
    }

    /// Closes connections idle for `idle_timeout`, closed by their instance, or to an
    /// instance that is gone.
    fn reap(&self, idle_timeout: Duration) {
        let mut closing = Vec::new();
        {
            let mut slots = self.slots.lock().unwrap();
            slots.retain(|_, slot| {
                if slot.instance.strong_count() == 0 {
                    closing.append(&mut slot.conns);
                    return false;
                }
                let mut i = 0;
                while i < slot.conns.len() {
                    let c = &mut slot.conns[i];
                    if c.idle_since.elapsed() >= idle_timeout || !c.usable() {
                        closing.push(slot.conns.remove(i));
                    } else {
                        i += 1;
                    }
                }
                !slot.conns.is_empty()
            });
        }
        drop(closing);
    }
}

/// Where a connection goes when its exchange is over: the pool it came from (none:
/// closed). A plain struct, not a boxed trait object: no allocation per request.
pub struct Home {
    pool: Arc<IdleConns>,
    instance: Weak<dyn Instance>,
}

impl Home {
    pub fn put_back(&self, conn: Conn) {
        self.pool.put(&self.instance, conn);
    }
}

/// HTTP/1.1 connections to instances that only one client connection's requests use.
///
/// A request with a body goes on one: if the function leaves part of that body unread and
/// it is parsed as a further request, the answer can only reach the client that sent it
/// (on a shared connection it would reach another client). They are never shared; they
/// close with their client connection, or `upstream_idle_timeout` after their last use
/// (the shared list's reaper closes them too).
pub struct PrivateConns {
    idle: Arc<IdleConns>,
    /// Known to the reaper (registered on first use); false: it was never used.
    reaped: AtomicBool,
}

impl Default for PrivateConns {
    fn default() -> Self {
        PrivateConns {
            idle: Arc::new(IdleConns::new(PRIVATE_IDLE_MAX)),
            reaped: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for PrivateConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: usize = self
            .idle
            .slots
            .lock()
            .map(|s| s.values().map(|s| s.conns.len()).sum())
            .unwrap_or(0);
        f.debug_struct("PrivateConns").field("idle", &n).finish()
    }
}

impl PrivateConns {
    /// An idle connection to `instance` is kept here (then a body-less request uses it,
    /// so an HTTP/2 client's concurrent body-less streams still use the shared list).
    /// A client connection that never sent a body has none: no lock on the hot path.
    pub fn holds(&self, instance: &Arc<dyn Instance>) -> bool {
        self.reaped.load(Ordering::Relaxed) && self.idle.holds(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_states_the_idle_list_bounds() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        for row in [
            format!("| idle kept connections per instance (shared) | {SHARED_IDLE_MAX} |"),
            format!("| idle connections per instance private to one client connection | {PRIVATE_IDLE_MAX} |"),
        ] {
            assert!(readme.contains(&row), "README.md lacks {row:?}");
        }
    }
}
