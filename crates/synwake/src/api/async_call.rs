//! `POST /async-function/<name>[/<path>]`, as OpenFaaS clients use it (`faas-cli invoke
//! --async`): the call is written to the durable queue (`async_store`) and only then
//! answered 202 with `X-Call-Id`; it runs in the background, at least once, also across a
//! crash and restart of synwake. The function gets `X-Call-Id` (to deduplicate); 502, 503,
//! 504 and connection failures are retried with backoff up to `max_retries`, then an
//! `X-Callback-Url` gets the final response with `X-Call-Id` and `X-Function-Status`
//! (the callback itself is retried with the same backoff). Retry counts are on disk, so a
//! restart neither resets them nor the backoff. Bounded: `max_queued` calls per function
//! (the function's own `max_queued` or `[async] max_queued`) and `max_queued_bytes` in
//! all, beyond that 429.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::async_store::{CallStore, StoreError, StoredCall};
use super::callback::CallbackPolicy;
use crate::config::AsyncSection;
use crate::gateway::{text_response, ConnInfo, ForwardBody, Origin, Proxy, ProxyBody};
use crate::lifecycle::{AcquireError, Lifecycle};
use crate::metrics::Snapshot;

/// Largest body of one async call, and of a function's answer to it (kept for the callback).
pub const MAX_ASYNC_BODY: usize = 16 << 20;
/// How long a callback may take.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The queue: the log on disk, the bounds, the delivery workers and their counters.
#[derive(Clone)]
pub struct AsyncQueue {
    inner: Arc<Inner>,
}

struct Inner {
    lc: Lifecycle,
    /// Calls reach functions through the same forward path as the gateway's requests.
    proxy: Arc<Proxy>,
    store: CallStore,
    callbacks: CallbackPolicy,
    cfg: AsyncSection,
    counts: Mutex<Counts>,
    /// Calls being sent at once, over all functions.
    workers: tokio::sync::Semaphore,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Counts {
    /// Accepted, not finished (running included).
    queued: HashMap<String, usize>,
    bytes: u64,
    /// id -> acceptance time (ms since the epoch); ids grow with time, so the first is
    /// the oldest.
    accepted: BTreeMap<u64, u64>,
    retried: HashMap<String, u64>,
    failed: HashMap<String, u64>,
    /// Calls being sent now (or their callback), per function.
    running: HashMap<String, u64>,
}

/// What sending a call once came to.
pub enum Outcome {
    Answered {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// synwake is stopping: the call stays queued and runs after the restart.
    ShuttingDown,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The bytes a call holds in memory against `max_queued_bytes`.
fn call_bytes(c: &StoredCall) -> u64 {
    (c.body.len()
        + c.path.len()
        + c.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()) as u64
}

impl AsyncQueue {
    /// Opens the queue in `dir` and starts every call a previous run accepted and did
    /// not finish.
    pub fn start(
        dir: &Path,
        proxy: Arc<Proxy>,
        cfg: AsyncSection,
        callbacks: CallbackPolicy,
    ) -> Result<AsyncQueue, StoreError> {
        let (store, pending) = CallStore::open(dir)?;
        // Unique across restarts: above every id on disk and above the clock in us.
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let next = pending.last().map_or(0, |c| c.id + 1).max(micros);
        let q = AsyncQueue {
            inner: Arc::new(Inner {
                lc: proxy.lifecycle().clone(),
                proxy,
                store,
                callbacks,
                workers: tokio::sync::Semaphore::new(cfg.workers),
                cfg,
                counts: Mutex::new(Counts::default()),
                next_id: AtomicU64::new(next),
            }),
        };
        if !pending.is_empty() {
            tracing::info!(
                "async queue: {} call(s) accepted before the restart and not finished; running them",
                pending.len()
            );
        }
        for call in pending {
            let _ = q.reserve(&call, None); // not enforced: never refused
            q.spawn(call);
        }
        Ok(q)
    }

    /// Counts a call against the bounds; an error (and nothing counted) when it does not
    /// fit and `max_queued` (the function's bound) is given.
    fn reserve(&self, call: &StoredCall, max_queued: Option<usize>) -> Result<(), String> {
        let size = call_bytes(call);
        let mut c = self.inner.counts.lock().unwrap();
        let queued = c.queued.get(&call.function).copied().unwrap_or(0);
        if let Some(max_queued) = max_queued {
            if queued >= max_queued {
                return Err(format!(
                    "function {} already has {queued} queued async calls (max_queued {max_queued})",
                    call.function
                ));
            }
            if c.bytes + size > self.inner.cfg.max_queued_bytes {
                return Err(format!(
                    "the async queue holds {} bytes; this call's {size} would pass max_queued_bytes {}",
                    c.bytes, self.inner.cfg.max_queued_bytes
                ));
            }
        }
        *c.queued.entry(call.function.clone()).or_default() += 1;
        c.bytes += size;
        c.accepted.insert(call.id, call.accepted_ms);
        Ok(())
    }

    fn release(&self, call: &StoredCall) {
        let mut c = self.inner.counts.lock().unwrap();
        if let Some(n) = c.queued.get_mut(&call.function) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.queued.remove(&call.function);
            }
        }
        c.bytes = c.bytes.saturating_sub(call_bytes(call));
        c.accepted.remove(&call.id);
    }

    /// Accepts the call: 202 once it is on disk, 429 beyond the bounds.
    pub async fn accept(
        &self,
        req: Request<Incoming>,
        rest: &str,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let (name, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let Some(function) = self.inner.lc.get(name) else {
            return text_response(StatusCode::NOT_FOUND, format!("function {name} not found"));
        };
        let max_queued = function
            .spec()
            .policy
            .max_queued
            .map_or(self.inner.cfg.max_queued, |n| n as usize);
        drop(function);
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let path = format!("{path}{query}");
        let (parts, body) = req.into_parts();
        let callback = match parts.headers.get("x-callback-url").map(|v| v.to_str()) {
            None => None,
            // Refused before anything is queued or connected to; names are checked again
            // on the address the callback connects to.
            Some(Ok(u)) => match self.inner.callbacks.check_url(u) {
                Ok(()) => Some(u.to_string()),
                Err(e) => {
                    return text_response(
                        StatusCode::BAD_REQUEST,
                        format!("invalid header `X-Callback-Url`: {e}"),
                    )
                }
            },
            Some(Err(_)) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "invalid header `X-Callback-Url`: not text",
                )
            }
        };
        let body = match Limited::new(body, MAX_ASYNC_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "async call to {name}: body unreadable or over {MAX_ASYNC_BODY} bytes: {e}"
                    ),
                )
            }
        };
        let mut headers = parts.headers;
        crate::gateway::strip_hop_by_hop(&mut headers);
        // Set now and kept with the call: the client's connection is gone when it runs.
        crate::gateway::forwarded::set_forwarded(&mut headers, conn);
        // The body is re-sent whole; the callback and the call id are ours to set.
        for h in [
            "x-callback-url",
            "content-length",
            "transfer-encoding",
            "x-call-id",
        ] {
            headers.remove(h);
        }
        let call = StoredCall {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            accepted_ms: now_ms(),
            function: name.to_string(),
            method: parts.method.as_str().to_string(),
            path,
            callback,
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body,
            attempts: 0,
            retry_at_ms: 0,
        };
        if let Err(why) = self.reserve(&call, Some(max_queued)) {
            let mut r = text_response(StatusCode::TOO_MANY_REQUESTS, why);
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        // Nothing is accepted that cannot be kept: the 202 follows the fsync.
        let call = match self.inner.store.append(&call).await {
            Ok(shared) => shared,
            Err(e) => {
                self.release(&call);
                tracing::error!("async call to {name} refused: {e}");
                let mut r = text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("async call to {name} not accepted: cannot keep it: {e}"),
                );
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
                return r;
            }
        };
        let call_id = format!("{:016x}", call.id);
        tracing::debug!("async call {call_id} to {name} accepted");
        self.spawn(call);
        let mut r = text_response(StatusCode::ACCEPTED, format!("call {call_id} accepted"));
        if let Ok(v) = HeaderValue::from_str(&call_id) {
            r.headers_mut().insert("x-call-id", v);
        }
        r
    }

    fn spawn(&self, call: StoredCall) {
        let q = self.clone();
        tokio::spawn(async move { q.run_call(call).await });
    }

    /// Sends a call with retries, then its callback, then marks it done.
    async fn run_call(&self, call: StoredCall) {
        let inner = &self.inner;
        // A call that failed before a restart waits out the rest of its backoff first.
        let wait_ms = call.retry_at_ms.saturating_sub(now_ms());
        if wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(wait_ms).min(inner.cfg.retry_backoff_max))
                .await;
        }
        let id = format!("{:016x}", call.id);
        let mut attempt = call.attempts;
        let (status, headers, body) = loop {
            // A worker per attempt: backoff waits and callbacks hold none, so a failing
            // function or a slow callback URL cannot stall other functions' calls.
            let outcome = {
                let Ok(_permit) = inner.workers.acquire().await else {
                    return;
                };
                let _running = RunningGuard::new(self, &call.function);
                deliver(&inner.proxy, &call, &id).await
            };
            match outcome {
                Outcome::ShuttingDown => {
                    tracing::info!(
                        "async call {id}: synwake is stopping; it runs after the restart"
                    );
                    return;
                }
                Outcome::Answered {
                    status,
                    headers,
                    body,
                } => {
                    let retryable = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                    if !retryable || attempt >= inner.cfg.max_retries {
                        break (status, headers, body);
                    }
                }
            }
            attempt += 1;
            *inner
                .counts
                .lock()
                .unwrap()
                .retried
                .entry(call.function.clone())
                .or_default() += 1;
            let backoff = backoff(&inner.cfg, attempt);
            inner
                .store
                .attempt(call.id, attempt, now_ms() + backoff.as_millis() as u64);
            tracing::debug!("async call {id}: attempt {attempt} failed; retrying in {backoff:?}");
            tokio::time::sleep(backoff).await;
        };
        tracing::info!(
            "async call {id} to {}: {status} after {} attempt(s)",
            call.function,
            attempt + 1
        );
        if !status.is_success() {
            *inner
                .counts
                .lock()
                .unwrap()
                .failed
                .entry(call.function.clone())
                .or_default() += 1;
        }
        if let Some(cb) = &call.callback {
            let _running = RunningGuard::new(self, &call.function);
            callback(
                &inner.callbacks,
                &inner.cfg,
                cb,
                &id,
                &call.function,
                status,
                &headers,
                body,
            )
            .await;
        }
        inner.store.done(call.id);
        self.release(&call);
    }

    /// The queue's series for /metrics.
    pub fn metrics(&self) -> Snapshot {
        let c = self.inner.counts.lock().unwrap();
        let mut m = Snapshot::default();
        m.gauge_per_function(
            "synwake_async_queued",
            "Async calls accepted and not finished (running included).",
            c.queued.iter().map(|(k, v)| (k.as_str(), *v as i64)),
        );
        m.counter_per_function(
            "synwake_async_retried",
            "Async call attempts retried after 502/503/504 or a connection failure.",
            c.retried.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        m.gauge_per_function(
            "synwake_async_running",
            "Async calls being sent now (or their callback).",
            c.running.iter().map(|(k, v)| (k.as_str(), *v as i64)),
        );
        m.counter_per_function(
            "synwake_async_failed",
            "Async calls whose final status (after retries) was not 2xx.",
            c.failed.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        let oldest = c
            .accepted
            .values()
            .next()
            .map_or(0.0, |ms| now_ms().saturating_sub(*ms) as f64 / 1000.0);
        m.gauge(
            "synwake_async_queued_bytes",
            "Bytes of the async calls held (bounded by max_queued_bytes).",
            c.bytes as i64,
        );
        m.gauge_f64(
            "synwake_async_oldest_age_seconds",
            "Age of the oldest async call not finished; 0 when none.",
            oldest,
        );
        m.counter(
            "synwake_async_log_syncs",
            "Group writes of the queue file (one fdatasync each, shared by the calls waiting).",
            self.inner.store.syncs(),
        );
        m
    }
}

/// The delay before retry number `attempt` (1-based): doubling, capped.
fn backoff(cfg: &AsyncSection, attempt: u32) -> Duration {
    cfg.retry_backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(cfg.retry_backoff_max)
}

/// Counts one call in `synwake_async_running{function}` while it lives.
struct RunningGuard<'a> {
    q: &'a AsyncQueue,
    function: &'a str,
}

impl<'a> RunningGuard<'a> {
    fn new(q: &'a AsyncQueue, function: &'a str) -> Self {
        *q.inner
            .counts
            .lock()
            .unwrap()
            .running
            .entry(function.to_string())
            .or_default() += 1;
        RunningGuard { q, function }
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut c = self.q.inner.counts.lock().unwrap();
        if let Some(n) = c.running.get_mut(self.function) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.running.remove(self.function);
            }
        }
    }
}

/// Sends one call once through the gateway's forward path (waits for an instance like any
/// request; same headers, timeout, crash handling and metrics), with `X-Call-Id`. The one
/// place a queued call reaches a function.
pub async fn deliver(proxy: &Proxy, call: &StoredCall, call_id: &str) -> Outcome {
    let answered = |status, body: String| Outcome::Answered {
        status,
        headers: HeaderMap::new(),
        body: Bytes::from(body),
    };
    let name = call.function.as_str();
    let method = Method::from_bytes(call.method.as_bytes()).unwrap_or(Method::POST);
    let mut req = Request::builder().method(method);
    if let Some(h) = req.headers_mut() {
        for (k, v) in &call.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                h.append(k, v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(call_id) {
            h.insert("x-call-id", v);
        }
    }
    let req = match req.body(ForwardBody::Queued(Full::new(call.body.clone()))) {
        Ok(r) => r,
        Err(e) => return answered(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let resp = match proxy
        .invoke(
            req,
            name,
            crate::gateway::FnPath::Given(call.path.clone()),
            Origin::Queued,
        )
        .await
    {
        Ok(resp) => resp,
        Err(AcquireError::ShuttingDown { .. }) => return Outcome::ShuttingDown,
        Err(e) => return answered(crate::gateway::acquire_error_status(&e), e.to_string()),
    };
    // The lease is held by the body until it is read to the end (or dropped).
    let (parts, body) = resp.into_parts();
    match Limited::new(body, MAX_ASYNC_BODY).collect().await {
        Ok(b) => Outcome::Answered {
            status: parts.status,
            headers: parts.headers,
            body: b.to_bytes(),
        },
        Err(e) => answered(
            StatusCode::BAD_GATEWAY,
            format!(
                "function {name}: its answer failed or is over {MAX_ASYNC_BODY} bytes: {}",
                crate::error_chain(e.as_ref())
            ),
        ),
    }
}

/// POSTs the final response to the caller's callback URL; a connection failure, a
/// timeout or 429/502/503/504 is retried like the call (`max_retries`, the same backoff),
/// a URL the callback rules refuse is not.
#[allow(clippy::too_many_arguments)]
async fn callback(
    policy: &CallbackPolicy,
    cfg: &AsyncSection,
    url: &str,
    id: &str,
    function: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) {
    let mut attempt = 0u32;
    loop {
        let mut req = Request::builder().method(Method::POST).uri(url);
        if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let req = match req
            .header("x-call-id", id)
            .header("x-function-status", status.as_u16().to_string())
            .header("x-function-name", function)
            .body(Full::new(body.clone()))
        {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!("async call {id}: callback request: {e}");
                return;
            }
        };
        let failure = match tokio::time::timeout(
            CALLBACK_TIMEOUT,
            policy.send(url, req, Duration::from_secs(5)),
        )
        .await
        {
            Ok(Ok(r)) if !retryable_callback_status(r.status()) => {
                tracing::debug!("async call {id}: callback answered {}", r.status());
                return;
            }
            Ok(Ok(r)) => format!("answered {}", r.status()),
            Ok(Err(e)) => {
                let refused = e
                    .downcast_ref::<super::callback::CallbackError>()
                    .is_some_and(|e| !matches!(e, super::callback::CallbackError::Resolve { .. }));
                if refused {
                    tracing::warn!("async call {id}: callback refused: {e}");
                    return;
                }
                crate::error_chain(e.as_ref())
            }
            Err(_) => "timed out".to_string(),
        };
        if attempt >= cfg.max_retries {
            tracing::warn!(
                "async call {id}: callback failed after {} attempt(s): {failure}",
                attempt + 1
            );
            return;
        }
        attempt += 1;
        let wait = backoff(cfg, attempt);
        tracing::debug!("async call {id}: callback {failure}; retrying in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

fn retryable_callback_status(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}
