//! One client connection: HTTP/1.1 or HTTP/2 (prior knowledge, or ALPN on TLS) on the same
//! port through hyper-util's auto server, with the gateway's limits and timeouts.
//!
//! Timeouts are kept per connection by watching its activity (bytes read, requests in
//! flight) instead of hyper's own header timer, which also runs while a keep-alive
//! connection is merely idle: a request head must be complete within
//! `header_read_timeout` of its first byte (of the accept for a new connection), and a
//! connection with nothing in flight is closed after `client_idle_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::h1srv;
use super::hosts::ConnInfo;
use super::listeners::Handler;
use super::GuardedBody;

/// Client connection limits and timeouts (`[gateway]`), documented in the README.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// A request head (request line and headers) must arrive within this (slowloris).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub client_idle_timeout: Duration,
    /// Open client connections across all listeners; more wait in the accept backlog.
    pub max_connections: usize,
    /// Request head size (HTTP/1.1) or header list size (HTTP/2); more gets 431.
    pub max_header_bytes: usize,
    /// Header fields in one request (HTTP/1.1); more gets 431.
    pub max_headers: usize,
    /// Idle pooled connections to instances are closed after this.
    pub upstream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            client_idle_timeout: Duration::from_secs(60),
            max_connections: 8192,
            max_header_bytes: 64 << 10,
            max_headers: 100,
            upstream_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// hyper's HTTP/1.1 read buffer cannot be smaller than this.
pub const MIN_HEADER_BYTES: usize = 8192;

/// hyper's own bound on header fields when none is set. Set explicitly, hyper builds two
/// vectors of that many fields for every request head (6 KiB written per request); at its
/// default it parses into uninitialised arrays, with the same 431 past the bound.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// The server half of the gateway's HTTP: built once, shared by every connection.
pub struct Server {
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
}

impl Server {
    pub fn new(limits: Limits) -> Arc<Self> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
        if limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            builder.http1().max_headers(limits.max_headers);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            // WebSocket over HTTP/2 (RFC 8441), sent on to the function as HTTP/1.1 Upgrade.
            .enable_connect_protocol()
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Arc::new(Server { builder, limits })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves one connection until it closes, times out, or finishes its in-flight
    /// requests at shutdown. A proxy listener's HTTP/1.1 requests are served by our own
    /// server ([`h1srv`]) until one needs hyper's; hyper's serves the rest (and HTTP/2).
    pub async fn serve<IO>(
        &self,
        io: IO,
        info: ConnInfo,
        handler: Handler,
        shutdown: watch::Receiver<bool>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = TrackedIo::new(io, activity.clone());
        let io = match &handler.proxy {
            Some((proxy, route)) => {
                let own = h1srv::serve(io, &info, proxy, route, &activity, &self.limits, &shutdown);
                match own.await {
                    Some(rewound) => rewound,
                    None => return,
                }
            }
            None => io,
        };
        self.serve_hyper(io, info, handler, activity, shutdown)
            .await
    }

    async fn serve_hyper<IO>(
        &self,
        io: TrackedIo<IO>,
        info: ConnInfo,
        handler: Handler,
        activity: Arc<Activity>,
        mut shutdown: watch::Receiver<bool>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let act = activity.clone();
        let peer = info.peer;
        let svc = service_fn(move |req| {
            let guard = act.request_started();
            let resp = handler.call(req, info.clone());
            async move {
                let resp = resp.await;
                Ok::<_, std::convert::Infallible>(resp.map(|inner| GuardedBody::new(inner, guard)))
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            expired = activity.expired(&self.limits) => {
                if expired == Expired::HeadTimeout {
                    tracing::debug!("{peer}: request head not complete within header_read_timeout; closed");
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                conn.as_mut().graceful_shutdown();
            }
        }
        // Idle or shutting down: let what is in flight finish (bounded by the drain).
        let _ = conn.await;
    }
}

#[derive(Debug, PartialEq)]
pub(super) enum Expired {
    HeadTimeout,
    Idle,
}

/// What a connection is doing, shared by its IO, its requests and its timer.
pub(super) struct Activity {
    base: Instant,
    inflight: AtomicUsize,
    /// Nanoseconds after `base` when the last request finished.
    idle_since: AtomicU64,
    /// Nanoseconds after `base` + 1 when a request head began; 0: none is being read.
    head_since: AtomicU64,
    /// HTTP/2 (the preface was read): frames between requests are not a request head.
    h2: AtomicBool,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            base: Instant::now(),
            inflight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection owes its first request head from the accept on.
            head_since: AtomicU64::new(1),
            h2: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub(super) fn request_started(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    fn bytes_read(&self) {
        if self.inflight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.now() + 1, Ordering::Relaxed);
        }
    }

    /// When the connection times out as things stand, and why; `None` while busy.
    fn deadline(&self, limits: &Limits) -> Option<(u64, Expired)> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 && !self.h2.load(Ordering::Relaxed) {
            let d = head - 1 + limits.header_read_timeout.as_nanos() as u64;
            return Some((d, Expired::HeadTimeout));
        }
        let idle = self.idle_since.load(Ordering::Relaxed);
        Some((
            idle + limits.client_idle_timeout.as_nanos() as u64,
            Expired::Idle,
        ))
    }

    /// Resolves when the connection has timed out.
    /// The state changes without waking the timer (no cost per request), and a new
    /// deadline is at least the shorter timeout away, so sleeping a quarter of that at a
    /// time is late by at most a quarter.
    pub(super) async fn expired(&self, limits: &Limits) -> Expired {
        let step = limits
            .header_read_timeout
            .min(limits.client_idle_timeout)
            .max(Duration::from_millis(4))
            / 4;
        loop {
            let now = self.now();
            let wait = match self.deadline(limits) {
                Some((d, why)) if d <= now => return why,
                Some((d, _)) => Duration::from_nanos(d - now).min(step),
                None => step,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One request in flight, until its response body is finished or dropped.
pub(super) struct InflightGuard(Arc<Activity>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now(), Ordering::Relaxed);
        a.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's stream, noting when bytes of a new request head arrive. Bytes our own
/// server read before handing the connection to hyper's are put back in front
/// ([`TrackedIo::put_back`]); they were noted when first read.
pub(super) struct TrackedIo<IO> {
    io: IO,
    activity: Arc<Activity>,
    first_read: bool,
    pre: bytes::Bytes,
}

impl<IO> TrackedIo<IO> {
    pub(super) fn new(io: IO, activity: Arc<Activity>) -> Self {
        TrackedIo {
            io,
            activity,
            first_read: true,
            pre: bytes::Bytes::new(),
        }
    }

    /// `pre` is read again before anything more from the stream.
    pub(super) fn put_back(mut self, pre: bytes::Bytes) -> Self {
        debug_assert!(self.pre.is_empty(), "bytes put back once");
        self.pre = pre;
        self
    }
}

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2";

impl<IO: AsyncRead + Unpin> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            bytes::Buf::advance(&mut self.pre, n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            if self.first_read {
                self.first_read = false;
                let n = read.len().min(H2_PREFACE_START.len());
                if read[..n] == H2_PREFACE_START[..n] {
                    self.activity.h2.store(true, Ordering::Relaxed);
                }
            }
            self.activity.bytes_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TrackedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_the_connection_state() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            client_idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let a = Arc::new(Activity::new());
        let (d, why) = a.deadline(&limits).unwrap();
        assert_eq!(why, Expired::HeadTimeout);
        assert_eq!(
            d, 10_000_000_000,
            "a new connection owes its head from the accept"
        );
        let g = a.request_started();
        assert!(
            a.deadline(&limits).is_none(),
            "busy connections do not time out"
        );
        drop(g);
        assert_eq!(a.deadline(&limits).unwrap().1, Expired::Idle);
        a.bytes_read();
        assert_eq!(a.deadline(&limits).unwrap().1, Expired::HeadTimeout);
        a.h2.store(true, Ordering::Relaxed);
        assert_eq!(
            a.deadline(&limits).unwrap().1,
            Expired::Idle,
            "HTTP/2 frames between requests are not a request head"
        );
    }
}
