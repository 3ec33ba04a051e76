//! `POST /async-function/<name>[/<path>]`, as OpenFaaS clients use it (`faas-cli invoke
//! --async`): the request is accepted at once (202, `X-Call-Id`) and run in the
//! background; with an `X-Callback-Url` header, the function's response is POSTed there
//! with `X-Call-Id` and `X-Function-Status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::gateway::{text_response, ProxyBody};
use crate::lifecycle::Lifecycle;

/// Bodies of queued calls are held in memory: bounded.
pub const MAX_ASYNC_BODY: usize = 16 << 20;

static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

type BytesClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> BytesClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Accepts the call and runs it in the background.
pub async fn accept(
    lc: &Lifecycle,
    client: &BytesClient,
    req: Request<Incoming>,
    rest: &str,
) -> Response<ProxyBody> {
    let (name, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if lc.get(name).is_none() {
        return text_response(
            StatusCode::NOT_FOUND,
            format!("function {} not found", crate::gateway::path::quote(name)),
        );
    }
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let path = format!("{path}{query}");
    let (parts, body) = req.into_parts();
    let callback = match parts.headers.get("x-callback-url").map(|v| v.to_str()) {
        None => None,
        Some(Ok(u)) => match u.parse::<Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") => Some(uri),
            _ => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid header `X-Callback-Url`: {u:?} is not an http:// URL"),
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
    let call_id = format!(
        "{:016x}",
        NEXT_CALL.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u64) << 40
    );
    let (lc, client, name) = (lc.clone(), client.clone(), name.to_string());
    tracing::debug!("async call {call_id} to {name} accepted");
    let (method, headers, id) = (parts.method, parts.headers, call_id.clone());
    tokio::spawn(async move {
        let (status, resp_headers, resp_body) =
            run(&lc, &client, &name, method, &path, headers, body).await;
        tracing::info!("async call {id} to {name}: {status}");
        if let Some(cb) = callback {
            let mut req = Request::builder().method(Method::POST).uri(cb.clone());
            for (k, v) in resp_headers.iter() {
                if k == http::header::CONTENT_TYPE {
                    req = req.header(k, v);
                }
            }
            let req = req
                .header("x-call-id", id.as_str())
                .header("x-function-status", status.as_u16().to_string())
                .header("x-function-name", name.as_str())
                .body(Full::new(resp_body));
            match req {
                Ok(req) => match tokio::time::timeout(Duration::from_secs(30), client.request(req))
                    .await
                {
                    Ok(Ok(r)) => {
                        tracing::debug!("async call {id}: callback {cb} answered {}", r.status())
                    }
                    Ok(Err(e)) => tracing::warn!(
                        "async call {id}: callback {cb} failed: {}",
                        crate::error_chain(&e)
                    ),
                    Err(_) => tracing::warn!("async call {id}: callback {cb} timed out"),
                },
                Err(e) => tracing::warn!("async call {id}: callback request: {e}"),
            }
        }
    });
    let mut r = text_response(StatusCode::ACCEPTED, format!("call {call_id} accepted"));
    if let Ok(v) = HeaderValue::from_str(&call_id) {
        r.headers_mut().insert("x-call-id", v);
    }
    r
}

/// Runs one queued call: waits for an instance like any request, then sends it.
async fn run(
    lc: &Lifecycle,
    client: &BytesClient,
    name: &str,
    method: Method,
    path: &str,
    mut headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    let lease = match lc.acquire(name).await {
        Ok(l) => l,
        Err(e) => {
            let resp = crate::gateway::acquire_error_response(&e);
            return (resp.status(), HeaderMap::new(), Bytes::from(e.to_string()));
        }
    };
    let addr = lease.instance.addr();
    crate::gateway::strip_hop_by_hop(&mut headers);
    // The body is re-sent whole; the callback is ours to call, not the function's.
    for h in ["x-callback-url", "content-length", "transfer-encoding"] {
        headers.remove(h);
    }
    let uri: Uri = match format!("http://{addr}{path}").parse() {
        Ok(u) => u,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                HeaderMap::new(),
                Bytes::from(e.to_string()),
            )
        }
    };
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(h) = req.headers_mut() {
        *h = headers;
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                HeaderMap::new(),
                Bytes::from(e.to_string()),
            )
        }
    };
    let m = lc.metrics();
    let result = match client.request(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            match body.collect().await {
                Ok(b) => (parts.status, parts.headers, b.to_bytes()),
                Err(e) => (
                    StatusCode::BAD_GATEWAY,
                    HeaderMap::new(),
                    Bytes::from(crate::error_chain(&e)),
                ),
            }
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            HeaderMap::new(),
            Bytes::from(format!(
                "function {name}: the instance failed the request: {}",
                crate::error_chain(&e)
            )),
        ),
    };
    m.invocations.inc(&[name, result.0.as_str()]);
    drop(lease);
    result
}
