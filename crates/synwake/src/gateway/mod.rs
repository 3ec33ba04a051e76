//! HTTP reverse proxy: the shared port (`/function/<name>/<path>`) and each function's own
//! port. A request goes through three phases, each in its own function below:
//!
//! 1. route    — which function (host name claim, path prefix or the port it came in on);
//! 2. acquire  — wait, bounded, for a ready instance (the lifecycle starts one if needed);
//! 3. forward  — stream the request to the instance and its response back, holding the
//!    instance's lease until the last byte of the response.
//!
//! Errors say who failed (synwake, the function's start, the instance) and carry the
//! function name.

pub mod conn;
pub mod forwarded;
pub mod h1;
mod h1srv;
pub mod h2c;
pub mod hosts;
pub mod listeners;
pub mod path;
pub mod tls;
pub mod upstream;

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::lifecycle::{AcquireError, Lease, Lifecycle};
use crate::metrics::{ByCode, ByFunction, FunctionName};
use crate::runtime::StartError;
use crate::spec::Protocol;
pub use hosts::{ConnInfo, HostTable};
pub use listeners::{serve_listener, PortListeners};

/// A response body the gateway sends a client. An instance's response and synwake's own
/// answers are not boxed (one allocation less per request); other bodies are.
pub enum ProxyBody {
    Full(Full<Bytes>),
    /// An instance's response, holding its lease until the last byte.
    Instance(GuardedBody<FromInstance, Lease>),
    Boxed(BoxBody<Bytes, BodyError>),
}

impl ProxyBody {
    pub fn boxed(body: impl Body<Data = Bytes, Error = BodyError> + Send + Sync + 'static) -> Self {
        ProxyBody::Boxed(BoxBody::new(body))
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyBody::Full(_) => "ProxyBody::Full",
            ProxyBody::Instance(_) => "ProxyBody::Instance",
            ProxyBody::Boxed(_) => "ProxyBody::Boxed",
        })
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|n| match n {}),
            ProxyBody::Instance(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Instance(b) => b.is_end_stream(),
            ProxyBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Instance(b) => b.size_hint(),
            ProxyBody::Boxed(b) => b.size_hint(),
        }
    }
}

/// Why a response body failed: hyper's client (h2c, Upgrade) or ours (HTTP/1.1).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Upstream(#[from] h1::Error),
}

pub const COLD_START_HEADER: &str = "x-synwake-cold-start";

/// Builds a plain-text response whose body names what went wrong.
pub fn text_response(status: StatusCode, body: impl Into<String>) -> Response<ProxyBody> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body))
        .expect("static response")
}

pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::Full(Full::new(b.into()))
}

/// Which function a connection's requests are for.
#[derive(Clone, Debug)]
pub enum Route {
    /// Shared port: a function claiming the host name (SNI, else Host), else the one
    /// named by the `/function/<name>` path prefix.
    Shared,
    /// A function's own port: every path goes to it.
    Port(Arc<str>),
}

/// The proxy shared by every listener.
pub struct Proxy {
    lifecycle: Lifecycle,
    upstream: upstream::Upstream,
    /// Upgraded connections (WebSocket) open now.
    tunnels: Arc<AtomicUsize>,
    /// Host claims as of a lifecycle change version.
    hosts: RwLock<(u64, Arc<HostTable>)>,
    /// Set once when the gateway terminates TLS.
    tls: OnceLock<Arc<tls::TlsEdge>>,
}

impl Proxy {
    /// `upstream_idle_timeout`: idle pooled connections to instances are closed after it.
    pub fn new(lifecycle: Lifecycle, upstream_idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Proxy {
            lifecycle,
            upstream: upstream::Upstream::new(upstream_idle_timeout),
            tunnels: Arc::default(),
            hosts: RwLock::new((u64::MAX, Arc::default())),
            tls: OnceLock::new(),
        })
    }

    /// Turns TLS on for the listeners made from this proxy (once, at start-up).
    pub fn set_tls(&self, edge: Arc<tls::TlsEdge>) {
        let _ = self.tls.set(edge);
    }

    pub fn tls(&self) -> Option<&Arc<tls::TlsEdge>> {
        self.tls.get()
    }

    pub fn tls_enabled(&self) -> bool {
        self.tls.get().is_some()
    }

    /// The current host claims (rebuilt after a deploy, update or removal).
    pub fn host_table(&self) -> Arc<HostTable> {
        let version = *self.lifecycle.subscribe_changes().borrow();
        {
            let cached = self.hosts.read().unwrap();
            if cached.0 == version {
                return cached.1.clone();
            }
        }
        let specs = self.lifecycle.specs();
        let table = Arc::new(HostTable::build(specs.iter().map(|s| &**s)));
        *self.hosts.write().unwrap() = (version, table.clone());
        table
    }

    /// Pipes an upgraded client connection to the upgraded upstream one, holding the
    /// instance's lease (so `idle_timeout` never stops it) until either side closes.
    fn tunnel(&self, client: OnUpgrade, upstream: OnUpgrade, lease: Lease) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        let guard = TunnelGuard(self.tunnels.clone());
        tokio::spawn(async move {
            let (_guard, function) = (guard, lease.spec().name.clone());
            match tokio::try_join!(client, upstream) {
                Ok((c, u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!("function {function}: upgraded connection: {e}");
                    }
                }
                Err(e) => tracing::debug!("function {function}: upgrade failed: {e}"),
            }
            drop(lease);
        });
    }

    /// Waits until every upgraded connection closed, or `timeout` passed; returns those
    /// still open (they close when synwake exits).
    pub async fn drain_tunnels(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.tunnels.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.tunnels.load(Ordering::Relaxed)
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Serves one request end to end; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<ForwardBody>,
        route: &Route,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let routed = match self.route_by_host(route, &req, conn) {
            Ok(Some(f)) => route_request(&Route::Port(f), req.uri()),
            Ok(None) => route_request(route, req.uri()),
            Err(resp) => Err(resp),
        };
        let (function, path) = match routed {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        match self
            .invoke(req, &function, path, Origin::Client(conn))
            .await
        {
            Ok(resp) => {
                // Affinity learns which function a client calls on the shared ports.
                if matches!(route, Route::Shared) {
                    self.lifecycle.record_client(conn.peer.ip(), &function);
                }
                resp
            }
            Err(e) => acquire_error_response(&e),
        }
    }

    /// Phases 2 and 3 for a routed request, from a client or from the async queue: the
    /// one place a request reaches a function. Counted in the invocation and duration
    /// metrics unless the function is unknown or removed (any path could create a series
    /// then) or, for a queued call, synwake is stopping (the call stays queued).
    pub async fn invoke(
        &self,
        req: Request<ForwardBody>,
        function: &str,
        path: FnPath,
        origin: Origin<'_>,
    ) -> Result<Response<ProxyBody>, AcquireError> {
        let arrived = Instant::now();
        let counted = |name: &FunctionName, status: StatusCode| {
            let m = self.lifecycle.metrics();
            m.invocations.inc(&ByCode::new(name, status.as_u16()));
            m.request_duration
                .observe(&ByFunction::new(name), arrived.elapsed().as_secs_f64());
        };
        match self.lifecycle.acquire(function).await {
            Ok(lease) => {
                let name = lease.metric_name().clone();
                let resp = self.forward(req, lease, path, origin).await;
                counted(&name, resp.status());
                Ok(resp)
            }
            Err(e @ (AcquireError::UnknownFunction { .. } | AcquireError::Removed { .. })) => {
                Err(e)
            }
            Err(e @ AcquireError::ShuttingDown { .. }) if matches!(origin, Origin::Queued) => {
                Err(e)
            }
            Err(e) => {
                counted(&function.into(), acquire_error_status(&e));
                Err(e)
            }
        }
    }

    /// Phase 1 on the shared ports: the function claiming the connection's SNI name (TLS)
    /// or the request's Host. A request whose Host names another claimed function than
    /// its TLS server name is refused (421), so a certificate for one name cannot front
    /// another function.
    #[allow(clippy::result_large_err)] // the error is the response itself
    fn route_by_host(
        &self,
        route: &Route,
        req: &Request<ForwardBody>,
        conn: &ConnInfo,
    ) -> Result<Option<Arc<str>>, Response<ProxyBody>> {
        if !matches!(route, Route::Shared) {
            return Ok(None);
        }
        if req.headers().get_all(http::header::HOST).iter().count() > 1 {
            return Err(text_response(
                StatusCode::BAD_REQUEST,
                "more than one Host header",
            ));
        }
        let table = self.host_table();
        if table.is_empty() {
            return Ok(None);
        }
        let host = hosts::request_host(req);
        let by_host = host.as_deref().and_then(|h| table.lookup(h)).cloned();
        let Some(sni) = conn.server_name.as_deref() else {
            return Ok(by_host);
        };
        let by_sni = table.lookup(sni).cloned();
        match (&by_sni, &by_host) {
            (s, Some(h)) if s.as_ref() != Some(h) => Err(text_response(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "host {:?} is not served on this TLS connection (server name {sni:?}); open a connection for that name",
                    host.unwrap_or_default()
                ),
            )),
            _ => Ok(by_sni),
        }
    }

    async fn forward(
        &self,
        mut req: Request<ForwardBody>,
        lease: Lease,
        path: FnPath,
        origin: Origin<'_>,
    ) -> Response<ProxyBody> {
        let spec = lease.spec().clone();
        let function = &spec.name;
        let addr = lease.instance.addr();
        // HTTP/1.1 Upgrade (WebSocket): passed through to HTTP/1.1 functions.
        // Read once: an HTTP/1.1 function gets it as asked, an h2c one as extended CONNECT.
        let upgrade_header = upgrade_asked(req.headers());
        let mut upgrade = upgrade_header.clone().filter(|_| {
            spec.policy.protocol == Protocol::Http1 && req.version() == http::Version::HTTP_11
        });
        // WebSocket over HTTP/2 (RFC 8441): an extended CONNECT, sent on as it is to an h2c
        // function and as an HTTP/1.1 WebSocket handshake to an HTTP/1.1 one; the stream
        // is piped to the upgraded upstream connection or stream.
        let extended_connect = req.method() == http::Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some();
        if extended_connect {
            if let Err(resp) = websocket_over_h2(&mut req, spec.policy.protocol) {
                return resp;
            }
            if spec.policy.protocol == Protocol::Http1 {
                upgrade = Some(HeaderValue::from_static("websocket"));
            }
        }
        // An HTTP/1.1 WebSocket handshake to an h2c function: sent on as an RFC 8441
        // extended CONNECT; the client gets its 101 and Sec-WebSocket-Accept from synwake.
        let ws_accept =
            if spec.policy.protocol == Protocol::H2c && req.version() == http::Version::HTTP_11 {
                match websocket_to_h2(&mut req, upgrade_header.as_ref()) {
                    Ok(accept) => accept,
                    Err(resp) => return resp,
                }
            } else {
                None
            };
        let client_upgrade = (upgrade.is_some() || extended_connect || ws_accept.is_some())
            .then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // h2c, Upgrade and plain CONNECT go through hyper's clients (they want an absolute
        // URI); all else is ours.
        let own_h1 = spec.policy.protocol == Protocol::Http1
            && upgrade.is_none()
            && parts.method != http::Method::CONNECT;
        let policy = &spec.policy;
        let h2c = policy.protocol == Protocol::H2c;
        // Our client gets the request's own path and query as it is (shared, not copied).
        let asked = match path {
            FnPath::AsAsked if own_h1 => parts.uri.path_and_query().cloned(),
            _ => None,
        };
        let uri = if let Some(pq) = asked {
            Uri::from(pq)
        } else {
            let path = path.as_str(&parts.uri);
            let target = if own_h1 {
                path.parse()
            } else if h2c {
                // The function sees the client's host as `:authority` (as HTTP/1.1 functions
                // see its Host); the connection goes to the instance whatever it names.
                let host = parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
                    .or_else(|| parts.uri.authority().cloned());
                match host {
                    Some(host) => format!("http://{host}{path}").parse(),
                    None => format!("http://{addr}{path}").parse(),
                }
            } else {
                format!("http://{addr}{path}").parse()
            };
            match target {
                Ok(u) => u,
                Err(e) => {
                    return text_response(
                        StatusCode::BAD_REQUEST,
                        format!("function {function}: invalid request path {path:?}: {e}"),
                    )
                }
            }
        };
        // HTTP/2 clients name the host in the URI, not in a Host header.
        if !parts.headers.contains_key(http::header::HOST) {
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        parts.uri = uri;
        parts.version = if h2c {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        // Our encoder leaves out the hop-by-hop fields and writes the forwarded ones itself
        // (no header map edits on the hot path).
        let mut forwarded = None;
        if own_h1 {
            if let Origin::Client(conn) = origin {
                forwarded = Some(forwarded::Forwarded::of(&parts.headers, conn));
            }
        } else {
            // gRPC needs `te: trailers` end to end; it is the one TE value HTTP/2 allows.
            let te_trailers = parts
                .headers
                .get(http::header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            strip_hop_by_hop(&mut parts.headers);
            if let Origin::Client(conn) = origin {
                forwarded::set_forwarded(&mut parts.headers, conn);
            }
            if te_trailers {
                parts
                    .headers
                    .insert(http::header::TE, HeaderValue::from_static("trailers"));
            }
            if h2c {
                // In `:authority` now (HTTP/2 servers may refuse a Host that differs).
                parts.headers.remove(http::header::HOST);
            }
        }
        if let Some(protocol) = &upgrade {
            parts.headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            parts
                .headers
                .insert(http::header::UPGRADE, protocol.clone());
        }
        // A function may answer without reading the body; what it left unread would be
        // parsed as the next request on a shared connection and its answer handed to
        // another client. So a client's body goes on a connection private to its client
        // connection (kept for its later requests), and a queued call's body on one of its
        // own (closed after it); never on a shared one.
        let with_body = !h2c && !body.is_end_stream();
        let via = match origin {
            Origin::Client(conn) if with_body || conn.private.holds(&lease.instance) => {
                upstream::Via::Private(&conn.private)
            }
            Origin::Queued if with_body => upstream::Via::Once,
            _ => upstream::Via::Shared,
        };
        if with_body && !own_h1 {
            parts
                .headers
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        let cold = lease.cold;
        let req = Request::from_parts(parts, body);
        let sent = tokio::time::timeout(policy.timeout, async {
            if own_h1 {
                let resent = || {
                    let m = self.lifecycle.metrics();
                    m.upstream_resends
                        .inc(&ByFunction::new(lease.metric_name()));
                };
                let resp = self
                    .upstream
                    .send_h1(
                        via,
                        &lease.instance,
                        policy.connect_timeout,
                        req,
                        forwarded,
                        resent,
                    )
                    .await?;
                // Not boxed here: the lease's wrapper below is the one box.
                Ok::<_, upstream::SendError>(resp.map(FromInstance::Ours))
            } else if h2c {
                let resp = self
                    .upstream
                    .send_h2c(&lease.instance, policy.connect_timeout, req)
                    .await?;
                Ok(resp.map(FromInstance::Hyper))
            } else {
                let client = self.upstream.client(policy.connect_timeout);
                Ok(client.request(req).await?.map(FromInstance::Hyper))
            }
        })
        .await;
        let Ok(sent) = sent else {
            tracing::info!(
                "function {function}: no response within timeout {}",
                humantime::format_duration(policy.timeout)
            );
            let mut r = text_response(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "function {function}: no response within its timeout of {}",
                    humantime::format_duration(policy.timeout)
                ),
            );
            r.headers_mut().insert(
                HeaderName::from_static(COLD_START_HEADER),
                HeaderValue::from_static(if cold { "true" } else { "false" }),
            );
            return r;
        };
        // An h2c function accepts an extended CONNECT with 200 (RFC 8441 section 5).
        let connect_sent = h2c && (extended_connect || ws_accept.is_some());
        let switched = |s: StatusCode| {
            s == StatusCode::SWITCHING_PROTOCOLS || (connect_sent && s == StatusCode::OK)
        };
        match sent {
            Ok(mut resp) if switched(resp.status()) => {
                let Some(client_upgrade) = client_upgrade else {
                    return text_response(
                        StatusCode::BAD_GATEWAY,
                        format!("function {function}: switched protocols unasked"),
                    );
                };
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let (mut parts, _) = resp.into_parts();
                if extended_connect {
                    // An HTTP/2 client is answered 200; the handshake's HTTP/1.1 headers
                    // are hop-by-hop (RFC 8441 section 5).
                    parts.status = StatusCode::OK;
                    parts.version = http::Version::HTTP_2;
                    strip_hop_by_hop(&mut parts.headers);
                    parts.headers.remove(http::header::SEC_WEBSOCKET_ACCEPT);
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                } else if let Some(accept) = ws_accept {
                    // An HTTP/1.1 client is answered 101 for its handshake (RFC 6455 4.2.2).
                    parts.status = StatusCode::SWITCHING_PROTOCOLS;
                    parts.version = http::Version::HTTP_11;
                    strip_hop_by_hop(&mut parts.headers);
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    let h = &mut parts.headers;
                    h.insert(
                        http::header::CONNECTION,
                        HeaderValue::from_static("upgrade"),
                    );
                    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
                    h.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept);
                }
                parts.headers.insert(
                    HeaderName::from_static(COLD_START_HEADER),
                    HeaderValue::from_static(if cold { "true" } else { "false" }),
                );
                self.tunnel(client_upgrade, upstream_upgrade, lease);
                Response::from_parts(parts, full(Bytes::new()))
            }
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                if !own_h1 {
                    // Ours leaves them out while parsing.
                    strip_hop_by_hop(&mut parts.headers);
                }
                parts.headers.insert(
                    HeaderName::from_static(COLD_START_HEADER),
                    HeaderValue::from_static(if cold { "true" } else { "false" }),
                );
                let body = ProxyBody::Instance(GuardedBody::new(body, lease));
                Response::from_parts(parts, body)
            }
            Err(e @ upstream::SendError::H2c(h2c::Error::NoExtendedConnect)) => text_response(
                StatusCode::NOT_IMPLEMENTED,
                format!("function {function}: {e}"),
            ),
            Err(e) if client_body_failed(&e) => {
                let detail = crate::error_chain(&e);
                tracing::debug!("function {function}: the client's request body failed: {detail}");
                let mut r = text_response(
                    StatusCode::BAD_REQUEST,
                    format!("function {function}: the request body could not be read (malformed chunked encoding or the client closed the connection): {detail}"),
                );
                r.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                r
            }
            Err(e) => {
                // A crash: let the lifecycle drop the instance before the client sees the
                // 502, so a client retrying at once gets a fresh instance.
                if let Ok(exit) =
                    tokio::time::timeout(Duration::from_millis(100), lease.instance.wait_exit())
                        .await
                {
                    self.lifecycle.instance_exited(&lease, exit);
                }
                let detail = crate::error_chain(&e);
                tracing::warn!(
                    "function {function}: instance {} failed the request: {detail}",
                    lease.instance.describe()
                );
                let mut r = text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("function {function}: the instance failed while handling the request (crashed or closed the connection): {detail}"),
                );
                r.headers_mut().insert(
                    HeaderName::from_static(COLD_START_HEADER),
                    HeaderValue::from_static(if cold { "true" } else { "false" }),
                );
                r
            }
        }
    }
}

/// The one namespace OpenFaaS clients may name: `/function/<name>.openfaas-fn/`.
const NAMESPACE_SUFFIX: &str = ".openfaas-fn";

/// The path and query a function is sent.
#[derive(Debug)]
pub enum FnPath {
    /// The request's own: nothing to resolve or strip, so it is not copied.
    AsAsked,
    Given(String),
}

impl FnPath {
    fn as_str<'a>(&'a self, uri: &'a Uri) -> &'a str {
        match self {
            FnPath::AsAsked => uri.path_and_query().map_or("/", |pq| pq.as_str()),
            FnPath::Given(p) => p,
        }
    }
}

/// Phase 1: which function, and the path to send it (dot segments resolved first, so
/// routing and the function see the same path).
#[allow(clippy::result_large_err)] // the error is the response itself, built once per bad request
fn route_request(route: &Route, uri: &Uri) -> Result<(Arc<str>, FnPath), Response<ProxyBody>> {
    let Some(resolved) = path::resolve_dot_segments(uri.path()) else {
        return Err(text_response(
            StatusCode::BAD_REQUEST,
            format!(
                "request path {} does not start with /",
                path::quote(uri.path())
            ),
        ));
    };
    let with_query = |p: &str| match uri.query() {
        Some(q) => format!("{p}?{q}"),
        None => p.to_string(),
    };
    match route {
        // On its own port a function gets the path as asked unless a dot segment went.
        Route::Port(name) => match resolved {
            Cow::Borrowed(_) if uri.path_and_query().is_some() => {
                Ok((name.clone(), FnPath::AsAsked))
            }
            _ => Ok((name.clone(), FnPath::Given(with_query(&resolved)))),
        },
        Route::Shared => {
            let Some(rest) = resolved.strip_prefix("/function/") else {
                return Err(text_response(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no route for {}: functions are served under /function/<name>/",
                        path::quote(&resolved)
                    ),
                ));
            };
            let (name, tail) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let name = name.strip_suffix(NAMESPACE_SUFFIX).unwrap_or(name);
            if name.is_empty() {
                return Err(text_response(
                    StatusCode::NOT_FOUND,
                    "no function named in the path /function/<name>/",
                ));
            }
            if crate::spec::validate_name(name).is_err() {
                return Err(text_response(
                    StatusCode::NOT_FOUND,
                    format!("function {} not found", path::quote(name)),
                ));
            }
            Ok((name.into(), FnPath::Given(with_query(tail))))
        }
    }
}

/// Checks that an RFC 8441 extended CONNECT asks for a WebSocket, and turns it into the
/// HTTP/1.1 WebSocket handshake for an HTTP/1.1 function (method GET, a fresh
/// `Sec-WebSocket-Key`; the version, subprotocols and extensions the client asked for are
/// kept); an h2c function gets it as it is. Else the response refusing it.
#[allow(clippy::result_large_err)] // the error is the response itself
fn websocket_over_h2(
    req: &mut Request<ForwardBody>,
    protocol: Protocol,
) -> Result<(), Response<ProxyBody>> {
    let asked = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if !asked.eq_ignore_ascii_case("websocket") {
        return Err(text_response(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "extended CONNECT for protocol {}: only websocket is supported",
                path::quote(&asked)
            ),
        ));
    }
    if protocol == Protocol::H2c {
        return Ok(());
    }
    let mut key = [0u8; 16];
    if let Err(e) = getrandom::fill(&mut key) {
        return Err(text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no random WebSocket key: {e}"),
        ));
    }
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    *req.method_mut() = http::Method::GET;
    let h = req.headers_mut();
    h.insert(
        http::header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).expect("base64 is a header value"),
    );
    h.entry(http::header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
    Ok(())
}

/// Turns an HTTP/1.1 WebSocket handshake (a GET asking `Upgrade: websocket`) for an h2c
/// function into an RFC 8441 extended CONNECT, and gives the `Sec-WebSocket-Accept` the
/// client is to get; None for any other request (sent on as it is). A handshake without
/// a valid `Sec-WebSocket-Key` is refused.
#[allow(clippy::result_large_err)] // the error is the response itself
fn websocket_to_h2(
    req: &mut Request<ForwardBody>,
    asked: Option<&HeaderValue>,
) -> Result<Option<HeaderValue>, Response<ProxyBody>> {
    if req.method() != http::Method::GET
        || !asked.is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return Ok(None);
    }
    let key = req.headers_mut().remove(http::header::SEC_WEBSOCKET_KEY);
    // 16 random bytes, base64 (RFC 6455 4.1).
    let key = key.filter(|k| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes())
            .is_ok_and(|b| b.len() == 16)
    });
    let Some(key) = key else {
        return Err(text_response(
            StatusCode::BAD_REQUEST,
            "WebSocket handshake without a valid Sec-WebSocket-Key (16 bytes, base64)",
        ));
    };
    *req.method_mut() = http::Method::CONNECT;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    Ok(Some(websocket_accept(key.as_bytes())))
}

/// `Sec-WebSocket-Accept` for a handshake's key (RFC 6455 4.2.2).
fn websocket_accept(key: &[u8]) -> HeaderValue {
    use base64::Engine;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(ctx.finish());
    HeaderValue::from_str(&accept).expect("base64 is a header value")
}

/// The `Upgrade` protocol a request asks for (`Connection: upgrade` and `Upgrade: ...`).
fn upgrade_asked(h: &http::HeaderMap) -> Option<HeaderValue> {
    let asked = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| h.get(http::header::UPGRADE).cloned())
        .flatten()
}

/// Where a request to forward came from.
#[derive(Clone, Copy)]
pub enum Origin<'a> {
    /// A client connection: the forwarded headers are set from it.
    Client(&'a ConnInfo),
    /// The async queue: the forwarded headers were set when the call was accepted (the
    /// client's connection is gone by the time it runs).
    Queued,
}

/// A request body to forward: a client's, streamed (hyper's server) or read whole (ours),
/// or a queued call's, held whole.
pub enum ForwardBody {
    Client(Incoming),
    Read(Full<Bytes>),
    Queued(Full<Bytes>),
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ForwardBody::Client(b) => Pin::new(b).poll_frame(cx),
            ForwardBody::Read(b) | ForwardBody::Queued(b) => {
                Pin::new(b).poll_frame(cx).map_err(|n| match n {})
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Client(b) => b.is_end_stream(),
            ForwardBody::Read(b) | ForwardBody::Queued(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Client(b) => b.size_hint(),
            ForwardBody::Read(b) | ForwardBody::Queued(b) => b.size_hint(),
        }
    }
}

/// A response body from an instance: from our HTTP/1.1 client or hyper's.
pub enum FromInstance {
    Ours(h1::UpstreamBody),
    Hyper(Incoming),
}

impl Body for FromInstance {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            FromInstance::Ours(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            FromInstance::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FromInstance::Ours(b) => b.is_end_stream(),
            FromInstance::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FromInstance::Ours(b) => b.size_hint(),
            FromInstance::Hyper(b) => b.size_hint(),
        }
    }
}

/// Counts a tunnel as open until it is dropped.
struct TunnelGuard(Arc<AtomicUsize>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The upstream request failed because the client's body did (hyper calls an error of the
/// body it was given a user error), not because of the instance.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let ours = match err.downcast_ref::<upstream::SendError>() {
            Some(upstream::SendError::H1(e)) => Some(e),
            _ => err.downcast_ref::<h1::Error>(),
        };
        if matches!(ours, Some(h1::Error::ClientBody(_) | h1::Error::BodyLength))
            || err
                .downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_user())
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Phase 2 failures as responses.
pub fn acquire_error_response(e: &AcquireError) -> Response<ProxyBody> {
    let status = acquire_error_status(e);
    let mut r = text_response(status, e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// The status a phase 2 failure is answered (and counted) with.
pub fn acquire_error_status(e: &AcquireError) -> StatusCode {
    match e {
        AcquireError::UnknownFunction { .. } => StatusCode::NOT_FOUND,
        AcquireError::StartFailed(StartError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
        AcquireError::StartFailed(_) => StatusCode::BAD_GATEWAY,
        AcquireError::Overloaded { .. }
        | AcquireError::ShuttingDown { .. }
        | AcquireError::Saturated { .. } => StatusCode::SERVICE_UNAVAILABLE,
        AcquireError::Removed { .. } => StatusCode::NOT_FOUND,
    }
}

/// Removes the fields for this hop only (for hyper's client; ours leaves them out while
/// encoding and parsing, with the same list).
pub(crate) fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    for n in h1::connection_named(h) {
        h.remove(n);
    }
    for n in &h1::HOP_BY_HOP {
        h.remove(n);
    }
}

/// A body that holds `guard` (an instance's lease, a connection's in-flight count) until
/// the body is finished or dropped.
pub struct GuardedBody<B, G> {
    inner: B,
    _guard: G,
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_route_splits_name_and_path() {
        let uri: Uri = "/function/hello/a/b?x=1".parse().unwrap();
        let (f, p) = route_request(&Route::Shared, &uri).unwrap();
        assert_eq!((&*f, p.as_str(&uri)), ("hello", "/a/b?x=1"));
        let uri: Uri = "/function/hello".parse().unwrap();
        assert_eq!(
            route_request(&Route::Shared, &uri).unwrap().1.as_str(&uri),
            "/"
        );
        let uri: Uri = "/other".parse().unwrap();
        assert_eq!(
            route_request(&Route::Shared, &uri).unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn own_port_keeps_path() {
        let uri: Uri = "/x?y".parse().unwrap();
        let (f, p) = route_request(&Route::Port("f".into()), &uri).unwrap();
        assert_eq!((&*f, p.as_str(&uri)), ("f", "/x?y"));
        assert!(matches!(p, FnPath::AsAsked));
        // A resolved dot segment is a new path; an absolute-form URI keeps its path.
        let uri: Uri = "/a/../x?y".parse().unwrap();
        let (_, p) = route_request(&Route::Port("f".into()), &uri).unwrap();
        assert!(matches!(&p, FnPath::Given(g) if g == "/x?y"));
        let uri: Uri = "http://h/x?y".parse().unwrap();
        let (_, p) = route_request(&Route::Port("f".into()), &uri).unwrap();
        assert_eq!(p.as_str(&uri), "/x?y");
    }

    #[test]
    fn websocket_accept_is_rfc6455s() {
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none() && h.get("connection").is_none());
        assert!(h.get("x-keep").is_some());
    }
}
