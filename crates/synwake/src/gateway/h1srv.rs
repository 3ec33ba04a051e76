//! The gateway's own HTTP/1.1 server side for the common request: a head parsed with
//! httparse from a buffer kept across requests, a small body read whole, the response
//! written by us. Everything else (HTTP/2, Upgrade, CONNECT, Expect, Transfer-Encoding,
//! large or incomplete bodies, `TE: trailers`, heads hyper would refuse) hands the
//! connection, with every byte read so far put back in front, to hyper's server for the
//! rest of its life; hyper then answers it as it always did (400, 431, 414 included).
//!
//! The response is encoded the way hyper's HTTP/1.1 server encodes it (status line,
//! headers in order, `content-length` or chunked from the body's size, `date`,
//! `connection: keep-alive`/`close` fix-ups for HTTP/1.0 clients and closing
//! connections), so a client cannot tell which of the two served it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::conn::{Activity, Expired, Limits, TrackedIo, MIN_HEADER_BYTES};
use super::hosts::ConnInfo;
use super::{ForwardBody, Proxy, ProxyBody, Route};

/// Request bodies up to this, when already read, are served here; others go to hyper.
const MAX_BODY: usize = 64 << 10;
/// Header fields parsed on the stack; a head with more goes to hyper (`max_headers`).
const STACK_HEADERS: usize = 100;
/// hyper answers 414 past this request-target length.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// Body chunks up to this are copied behind the head (one write); longer ones are
/// written from where they are.
const COPY_MAX: usize = 16 << 10;
/// Spare room the read buffer keeps for a read.
const READ_ROOM: usize = 8 << 10;

/// A request head served here, as offsets into the read buffer.
struct Head {
    len: usize,
    method: Method,
    path: (usize, usize),
    version: Version,
    headers: usize,
    content_length: usize,
    /// What the request says about the connection (HTTP/1.1: not `close`; HTTP/1.0:
    /// `keep-alive`), as hyper reads it.
    keep_alive: bool,
}

/// Header field offsets: name start, name end, value start, value end.
type Spans = [MaybeUninit<[u32; 4]>; STACK_HEADERS];

enum Parsed {
    Complete(Head),
    Partial,
    /// Not for this server: hyper's takes the connection.
    Hyper,
}

/// Whether a comma-separated header value lists `token` (as hyper checks it).
fn has_token(v: &[u8], token: &str) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses a head at the start of `buf`, deciding whether this server takes it.
fn parse(buf: &[u8], limits: &Limits, spans: &mut Spans) -> Parsed {
    if buf.starts_with(b"PRI * HTTP/2") {
        return Parsed::Hyper;
    }
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // hyper answers 431 once its buffer is full of an incomplete head.
            if buf.len() >= limits.max_header_bytes.max(MIN_HEADER_BYTES) {
                return Parsed::Hyper;
            }
            return Parsed::Partial;
        }
        // Malformed (400), too many fields for the stack (hyper applies the bound).
        Err(_) => return Parsed::Hyper,
    };
    if len > limits.max_header_bytes || req.headers.len() > limits.max_headers {
        return Parsed::Hyper;
    }
    let (Some(m), Some(path), Some(v)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    let Ok(method) = Method::from_bytes(m.as_bytes()) else {
        return Parsed::Hyper;
    };
    if method == Method::CONNECT || path.len() > MAX_URI_LEN {
        return Parsed::Hyper;
    }
    let http11 = v == 1;
    let base = buf.as_ptr() as usize;
    let off = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
    let mut keep_alive = http11;
    let mut close = false;
    let mut content_length = None;
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let value = h.value;
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Parsed::Hyper;
            }
            let Some(n) = std::str::from_utf8(value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&n| n <= MAX_BODY)
            else {
                return Parsed::Hyper;
            };
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(value, "upgrade") {
                return Parsed::Hyper;
            }
            if close || has_token(value, "close") {
                close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(value, "keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
            || (name.eq_ignore_ascii_case(b"te") && has_token(value, "trailers"))
        {
            return Parsed::Hyper;
        }
        let n = h.name.as_bytes();
        spans[i] = MaybeUninit::new([
            off(n),
            off(n) + n.len() as u32,
            off(value),
            off(value) + value.len() as u32,
        ]);
    }
    let p = off(path.as_bytes());
    Parsed::Complete(Head {
        len,
        method,
        path: (p as usize, p as usize + path.len()),
        version: if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        },
        headers: req.headers.len(),
        content_length: content_length.unwrap_or(0),
        keep_alive,
    })
}

/// The request from a parsed head (`bytes` starts with it) and its body; `None` when
/// hyper would refuse a part of it (it then answers the request itself).
fn request(
    head: &Head,
    bytes: &Bytes,
    spans: &Spans,
    body: Bytes,
    mut headers: HeaderMap,
) -> Option<Request<ForwardBody>> {
    let uri = Uri::from_maybe_shared(bytes.slice(head.path.0..head.path.1)).ok()?;
    headers.reserve(head.headers);
    for s in &spans[..head.headers] {
        // SAFETY: `parse` wrote the first `head.headers` spans.
        let [ns, ne, vs, ve] = unsafe { s.assume_init() };
        let name = HeaderName::from_bytes(&bytes[ns as usize..ne as usize]).ok()?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..ve as usize)).ok()?;
        headers.append(name, value);
    }
    let mut req = Request::new(ForwardBody::Read(Full::new(body)));
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = head.version;
    *req.headers_mut() = headers;
    Some(req)
}

/// Serves `io`'s requests until the connection closes (`None`), or one is for hyper's
/// server: then the connection, with what was read of it put back, is returned.
pub(super) async fn serve<IO>(
    mut io: TrackedIo<IO>,
    info: &ConnInfo,
    proxy: &Arc<Proxy>,
    route: &Route,
    activity: &Arc<Activity>,
    limits: &Limits,
    shutdown: &watch::Receiver<bool>,
) -> Option<TrackedIo<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_ROOM);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut spans: Spans = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    // The last response's header map, emptied: the next request's (as hyper reuses it).
    let mut spare = HeaderMap::new();
    // One timer and one shutdown wait for the whole connection (none per request).
    let expired = activity.expired(limits);
    tokio::pin!(expired);
    let mut stop_rx = shutdown.clone();
    let stop = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    let mut stopping = *shutdown.borrow();
    loop {
        // A complete head, or the connection ends or goes to hyper.
        let head = loop {
            if !buf.is_empty() {
                match parse(&buf, limits, &mut spans) {
                    Parsed::Complete(h) => break h,
                    Parsed::Partial => {}
                    Parsed::Hyper => return Some(io.put_back(buf.freeze())),
                }
            }
            if stopping && buf.is_empty() {
                let _ = io.shutdown().await;
                return None;
            }
            buf.reserve(READ_ROOM);
            tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
                why = &mut expired => {
                    if why == Expired::HeadTimeout {
                        tracing::debug!("{}: request head not complete within header_read_timeout; closed", info.peer);
                    }
                    return None;
                }
                _ = &mut stop, if !stopping => stopping = true,
            }
        };
        // The body, whole, from what is buffered or can be read at once; else hyper's
        // server streams it.
        let want = head.len + head.content_length;
        while buf.len() < want {
            buf.reserve(want - buf.len());
            let read = poll_fn(|cx| {
                Poll::Ready(tokio_util::io::poll_read_buf(
                    Pin::new(&mut io),
                    cx,
                    &mut buf,
                ))
            })
            .await;
            match read {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return None,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Some(io.put_back(buf.freeze())),
            }
        }
        let bytes = buf.split_to(head.len).freeze();
        let body = buf.split_to(head.content_length).freeze();
        let fields = std::mem::take(&mut spare);
        let Some(req) = request(&head, &bytes, &spans, body.clone(), fields) else {
            // hyper parses it again and answers it (400).
            return Some(io.put_back(rejoin(&[&bytes, &body, &buf])));
        };
        drop((bytes, body));
        let is_head = head.method == Method::HEAD;
        let guard = activity.request_started();
        let resp = {
            let handled = proxy.clone().handle(req, route, info);
            tokio::pin!(handled);
            tokio::select! {
                biased;
                resp = &mut handled => resp,
                // A client gone mid-request cancels it, as with hyper's server.
                _ = client_closed(&mut io, &mut buf) => return None,
            }
        };
        let keep_alive = head.keep_alive && !*shutdown.borrow();
        let http10 = head.version == Version::HTTP_10;
        let kept = write_response(
            &mut io, &mut out, &mut buf, &mut spare, resp, is_head, http10, keep_alive,
        )
        .await;
        drop(guard);
        match kept {
            Ok(true) if !*shutdown.borrow() => {}
            _ => {
                let _ = io.shutdown().await;
                return None;
            }
        }
    }
}

/// What was read, split for a request, as one buffer again.
fn rejoin(parts: &[&[u8]]) -> Bytes {
    let mut all = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        all.extend_from_slice(p);
    }
    all.freeze()
}

/// Resolves when the client closed its side while a request is in flight; reads at most
/// once (the bytes stay for the next head) and not at all with bytes already buffered.
async fn client_closed<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) {
    if buf.is_empty() {
        buf.reserve(READ_ROOM);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending::<()>().await
}

/// How a response body is framed to the client.
#[derive(Debug, PartialEq)]
enum Framing {
    /// No body is sent (none, or the request or status has none).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 client, length unknown).
    Close,
}

/// The body's length as hyper's server sees it: none (at its end), known, or not.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BodyLength {
    Known(u64),
    Unknown,
}

/// Writes `resp` to the client; whether the connection may serve another request.
#[allow(clippy::too_many_arguments)]
async fn write_response<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    out: &mut Vec<u8>,
    buf: &mut BytesMut,
    spare: &mut HeaderMap,
    resp: http::Response<ProxyBody>,
    is_head: bool,
    http10: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let (mut parts, mut body) = resp.into_parts();
    let length = if body.is_end_stream() {
        None
    } else {
        Some(
            body.size_hint()
                .exact()
                .map_or(BodyLength::Unknown, BodyLength::Known),
        )
    };
    out.clear();
    let (framing, last) = encode_head(out, &mut parts, length, is_head, http10, keep_alive);
    parts.headers.clear();
    *spare = parts.headers;
    if framing == Framing::Empty {
        drop(body);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(!last);
    }
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut whole = true;
    loop {
        // What the body has now goes out with the head; the write waits for the rest.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                }
                tokio::select! {
                    biased;
                    f = body.frame() => f,
                    _ = client_closed(io, buf) => return Ok(false),
                }
            }
        };
        let mut data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!("response body failed: {e}");
                whole = false;
                break;
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if d.is_empty() => continue,
                Ok(d) => d,
                // Trailers: a client that did not ask for them (`TE: trailers`) gets none.
                Err(_) => continue,
            },
        };
        if let Framing::Length(_) = framing {
            if data.len() as u64 > remaining {
                data.truncate(remaining as usize);
            }
            remaining -= data.len() as u64;
        }
        if framing == Framing::Chunked {
            put_hex(out, data.len());
            out.extend_from_slice(b"\r\n");
        }
        if data.len() <= COPY_MAX {
            out.extend_from_slice(&data);
        } else {
            io.write_all(out).await?;
            out.clear();
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if remaining == 0 {
            break;
        }
        if out.len() >= 4 * COPY_MAX {
            io.write_all(out).await?;
            out.clear();
        }
    }
    drop(body);
    match framing {
        Framing::Chunked if whole => out.extend_from_slice(b"0\r\n\r\n"),
        // Shorter than announced: the client learns it from the connection closing.
        Framing::Length(_) if remaining != 0 => whole = false,
        _ => {}
    }
    io.write_all(out).await?;
    io.flush().await?;
    Ok(whole && !last && framing != Framing::Close)
}

/// A chunk size, in upper-case hex as hyper writes it.
fn put_hex(out: &mut Vec<u8>, mut n: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

fn put_dec(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Encodes a response head as hyper's HTTP/1.1 server does; how the body is framed, and
/// whether the connection closes after it.
fn encode_head(
    dst: &mut Vec<u8>,
    parts: &mut http::response::Parts,
    mut length: Option<BodyLength>,
    is_head: bool,
    http10: bool,
    mut keep_alive: bool,
) -> (Framing, bool) {
    if parts.status.is_informational() {
        // hyper refuses a 1xx as a final response with a bare 500.
        parts.status = StatusCode::INTERNAL_SERVER_ERROR;
        parts.version = Version::HTTP_11;
        parts.headers.clear();
        parts.extensions.clear();
        length = None;
        keep_alive = false;
    }
    let conn_has = |h: &HeaderMap, t: &str| {
        h.get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), t))
    };
    if http10 {
        // An HTTP/1.0 client is answered in HTTP/1.0; keep-alive only when said.
        if !conn_has(&parts.headers, "keep-alive") {
            match parts.version {
                Version::HTTP_10 => keep_alive = false,
                Version::HTTP_11 if keep_alive => {
                    parts
                        .headers
                        .append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
                }
                _ => {}
            }
        }
        parts.version = Version::HTTP_10;
    } else if !keep_alive && !conn_has(&parts.headers, "close") {
        parts
            .headers
            .append(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let mut last = !keep_alive;

    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if parts.version == Version::HTTP_11 && parts.status == StatusCode::OK && reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(if parts.version == Version::HTTP_10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        dst.extend_from_slice(parts.status.as_str().as_bytes());
        dst.push(b' ');
        match reason {
            Some(r) => dst.extend_from_slice(r.as_bytes()),
            None => dst.extend_from_slice(
                parts
                    .status
                    .canonical_reason()
                    .unwrap_or("<none>")
                    .as_bytes(),
            ),
        }
        dst.extend_from_slice(b"\r\n");
    }

    let status = parts.status;
    let no_body_status = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_chunk = !is_head && !no_body_status;
    let can_have_length = !no_body_status;
    let mut framing = Framing::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    // A multi-valued field is written as one line; `open` is the name of one still open.
    let mut open: Option<HeaderName> = None;
    let mut must_chunk = false;
    let mut prev_len: Option<u64> = None;
    let close_open = |dst: &mut Vec<u8>, open: &mut Option<HeaderName>, must_chunk: bool| {
        if open.take().is_some() {
            dst.extend_from_slice(if must_chunk {
                b", chunked\r\n"
            } else {
                b"\r\n"
            });
        }
    };
    for (name, value) in parts.headers.iter() {
        if open.as_ref().is_some_and(|o| o != name) {
            close_open(dst, &mut open, must_chunk);
        }
        let continuing = open.as_ref() == Some(name);
        match *name {
            header::CONTENT_LENGTH => {
                if wrote_len && !continuing {
                    // After a transfer-encoding: hyper refuses the response.
                    dst.clear();
                    return internal_error(dst);
                }
                match length {
                    Some(BodyLength::Known(n)) => {
                        if !continuing {
                            framing = Framing::Length(n);
                            dst.extend_from_slice(b"content-length: ");
                            dst.extend_from_slice(value.as_bytes());
                            wrote_len = true;
                            open = Some(name.clone());
                        }
                        continue;
                    }
                    Some(BodyLength::Unknown) => {
                        let Some(n) = std::str::from_utf8(value.as_bytes())
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                        else {
                            // hyper refuses the response; the connection closes.
                            dst.clear();
                            return internal_error(dst);
                        };
                        match prev_len {
                            Some(p) if p != n => {
                                dst.clear();
                                return internal_error(dst);
                            }
                            Some(_) => continue,
                            None => {
                                framing = Framing::Length(n);
                                dst.extend_from_slice(b"content-length: ");
                                dst.extend_from_slice(value.as_bytes());
                                wrote_len = true;
                                open = Some(name.clone());
                                prev_len = Some(n);
                                continue;
                            }
                        }
                    }
                    None => {
                        if !is_head {
                            continue;
                        }
                    }
                }
                wrote_len = true;
            }
            header::TRANSFER_ENCODING => {
                if wrote_len && !continuing {
                    dst.clear();
                    return internal_error(dst);
                }
                if http10 || !can_chunk {
                    continue;
                }
                wrote_len = true;
                // The last coding must be chunked; hyper adds it if not.
                must_chunk = !value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if continuing {
                    dst.extend_from_slice(b", ");
                } else {
                    framing = Framing::Chunked;
                    dst.extend_from_slice(b"transfer-encoding: ");
                    open = Some(name.clone());
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            header::CONNECTION => {
                if !last && has_token(value.as_bytes(), "close") {
                    last = true;
                }
                if continuing {
                    dst.extend_from_slice(b", ");
                } else {
                    dst.extend_from_slice(b"connection: ");
                    open = Some(name.clone());
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            header::DATE => wrote_date = true,
            header::TRAILER => {
                if http10 || !can_chunk {
                    continue;
                }
                if continuing {
                    dst.extend_from_slice(b", ");
                } else {
                    dst.extend_from_slice(b"trailer: ");
                    open = Some(name.clone());
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            _ => {}
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    close_open(dst, &mut open, must_chunk);

    if !wrote_len {
        framing = match length {
            Some(BodyLength::Unknown) => {
                if http10 || !can_chunk {
                    Framing::Close
                } else {
                    dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Framing::Chunked
                }
            }
            None | Some(BodyLength::Known(0)) => {
                if can_have_length && !is_head {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(BodyLength::Known(n)) => {
                if can_have_length {
                    dst.extend_from_slice(b"content-length: ");
                    put_dec(dst, n);
                    dst.extend_from_slice(b"\r\n");
                    Framing::Length(n)
                } else {
                    Framing::Length(0)
                }
            }
        };
    }
    if !can_chunk || framing == Framing::Length(0) {
        framing = Framing::Empty;
    }
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        put_date(dst);
        dst.extend_from_slice(b"\r\n\r\n");
    } else {
        dst.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Close {
        last = true;
    }
    (framing, last)
}

/// hyper's answer to a response it cannot encode: a bare 500, and the connection closes.
fn internal_error(dst: &mut Vec<u8>) -> (Framing, bool) {
    dst.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\ndate: ");
    put_date(dst);
    dst.extend_from_slice(b"\r\n\r\n");
    (Framing::Empty, true)
}

thread_local! {
    /// The `date` value, formatted once per second per thread (as hyper caches it).
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

fn put_date(dst: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        dst.extend_from_slice(&d.1);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Context;

    fn spans() -> Spans {
        [const { MaybeUninit::uninit() }; STACK_HEADERS]
    }

    fn parsed(raw: &[u8]) -> Parsed {
        parse(raw, &Limits::default(), &mut spans())
    }

    #[test]
    fn plain_requests_are_ours_the_rest_hyper_s() {
        let ours = [
            &b"GET /a?b HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"HEAD / HTTP/1.0\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            b"GET / HTTP/1.1\r\nconnection: keep-alive, close\r\nte: gzip\r\n\r\n",
        ];
        for raw in ours {
            assert!(
                matches!(parsed(raw), Parsed::Complete(_)),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let hypers = [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"PRI * HTTP/2",
            b"CONNECT h:1 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nconnection: Upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 70000\r\n\r\n",
            b"GET / HTTP/1.1\r\nte: trailers\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET / HTTP/3.0\r\n\r\n",
        ];
        for raw in hypers {
            assert!(
                matches!(parsed(raw), Parsed::Hyper),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(parsed(b"GET / HTTP/1.1\r\nhost"), Parsed::Partial));
    }

    #[test]
    fn heads_past_the_limits_go_to_hyper_which_answers_431() {
        let limits = Limits {
            max_headers: 3,
            ..Limits::default()
        };
        let four = b"GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\n\r\n";
        assert!(matches!(parse(four, &limits, &mut spans()), Parsed::Hyper));
        assert!(matches!(
            parse(&four[..four.len() - 2], &limits, &mut spans()),
            Parsed::Partial
        ));
        let mut incomplete = b"GET / HTTP/1.1\r\nx: ".to_vec();
        incomplete.resize(Limits::default().max_header_bytes, b'a');
        assert!(matches!(parsed(&incomplete), Parsed::Hyper));
        let many: String = (0..STACK_HEADERS + 1)
            .map(|i| format!("h{i}: 1\r\n"))
            .collect();
        let limits = Limits {
            max_headers: 1000,
            ..Limits::default()
        };
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse(raw.as_bytes(), &limits, &mut spans()),
            Parsed::Hyper
        ));
    }

    #[test]
    fn request_keeps_method_target_version_and_fields_in_order() {
        let raw = Bytes::from_static(
            b"PUT /p?q=1 HTTP/1.0\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nconnection: keep-alive\r\n\r\n",
        );
        let mut sp = spans();
        let Parsed::Complete(head) = parse(&raw, &Limits::default(), &mut sp) else {
            panic!("not parsed");
        };
        assert!(head.keep_alive, "HTTP/1.0 asked for keep-alive");
        let req = request(
            &head,
            &raw.slice(..head.len),
            &sp,
            Bytes::new(),
            HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri(), "/p?q=1");
        assert_eq!(req.version(), Version::HTTP_10);
        let a: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert!(req.body().is_end_stream());
    }

    fn head_of(
        status: u16,
        headers: &[(&str, &str)],
        length: Option<BodyLength>,
        is_head: bool,
        http10: bool,
        keep_alive: bool,
    ) -> (String, Framing, bool) {
        let mut b = http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let mut dst = Vec::new();
        let (f, last) = encode_head(&mut dst, &mut parts, length, is_head, http10, keep_alive);
        let text = String::from_utf8(dst).unwrap();
        // The date is the one part that changes.
        let ours = text
            .find("date: ")
            .filter(|&i| text.get(i + 6 + 26..i + 6 + 29) == Some("GMT"));
        let text = match ours {
            Some(i) => format!("{}date: D{}", &text[..i], &text[i + 6 + 29..]),
            None => text,
        };
        (text, f, last)
    }

    #[test]
    fn heads_are_encoded_as_hyper_encodes_them() {
        use BodyLength::*;
        let (h, f, last) = head_of(200, &[("x-a", "1")], Some(Known(5)), false, false, true);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: D\r\n\r\n"
        );
        assert_eq!((f, last), (Framing::Length(5), false));
        let (h, f, _) = head_of(404, &[], Some(Unknown), false, false, true);
        assert_eq!(
            h,
            "HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\ndate: D\r\n\r\n"
        );
        assert_eq!(f, Framing::Chunked);
        // No body: an explicit zero length, except for HEAD, 204 and 304.
        let (h, f, _) = head_of(200, &[], None, false, false, true);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: D\r\n\r\n");
        assert_eq!(f, Framing::Empty);
        let (h, f, _) = head_of(200, &[], Some(Known(5)), true, false, true);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: D\r\n\r\n");
        assert_eq!(f, Framing::Empty, "HEAD has no body");
        let (h, f, _) = head_of(204, &[], Some(Known(5)), false, false, true);
        assert_eq!(h, "HTTP/1.1 204 No Content\r\ndate: D\r\n\r\n");
        assert_eq!(f, Framing::Empty);
        let (h, _, _) = head_of(304, &[("etag", "\"e\"")], Some(Unknown), false, false, true);
        assert_eq!(
            h,
            "HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\ndate: D\r\n\r\n"
        );
        // Closing: `connection: close` added, or a response's own close honoured.
        let (h, _, last) = head_of(200, &[], Some(Known(1)), false, false, false);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\ndate: D\r\n\r\n"
        );
        assert!(last);
        let (_, _, last) = head_of(200, &[("connection", "close")], None, false, false, true);
        assert!(last);
        // HTTP/1.0: answered in 1.0; keep-alive said when kept; unknown length closes.
        let (h, f, last) = head_of(200, &[], Some(Known(2)), false, true, true);
        assert_eq!(
            h,
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\ndate: D\r\n\r\n"
        );
        assert_eq!((f, last), (Framing::Length(2), false));
        let (h, f, last) = head_of(200, &[], Some(Unknown), false, true, false);
        assert_eq!(h, "HTTP/1.0 200 OK\r\ndate: D\r\n\r\n");
        assert_eq!((f, last), (Framing::Close, true));
        // A function's own date and length are kept where they were.
        let (h, f, _) = head_of(
            200,
            &[("date", "x"), ("content-length", "3"), ("a", "b")],
            Some(Known(3)),
            false,
            false,
            true,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 3\r\na: b\r\n\r\n"
        );
        assert_eq!(f, Framing::Length(3));
        let (h, _, _) = head_of(299, &[], None, false, false, true);
        assert_eq!(
            h,
            "HTTP/1.1 299 <none>\r\ncontent-length: 0\r\ndate: D\r\n\r\n"
        );
    }

    /// A body of `n` frames of `size` bytes, all ready at once, counting those taken.
    struct Counted {
        left: usize,
        size: usize,
        taken: Arc<AtomicUsize>,
        exact: bool,
    }

    impl Body for Counted {
        type Data = Bytes;
        type Error = super::super::BodyError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            self.taken.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
                b'x';
                self.size
            ])))))
        }
        fn size_hint(&self) -> hyper::body::SizeHint {
            if self.exact {
                hyper::body::SizeHint::with_exact((self.left * self.size) as u64)
            } else {
                hyper::body::SizeHint::default()
            }
        }
    }

    fn counted(n: usize, size: usize, exact: bool) -> (ProxyBody, Arc<AtomicUsize>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let body = Counted {
            left: n,
            size,
            taken: taken.clone(),
            exact,
        };
        (ProxyBody::boxed(body), taken)
    }

    #[tokio::test]
    async fn a_streamed_body_waits_for_a_slow_client() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let (body, taken) = counted(10_000, 1024, false);
        let writing = tokio::spawn(async move {
            let (mut out, mut buf) = (Vec::new(), BytesMut::new());
            let resp = http::Response::new(body);
            let mut spare = HeaderMap::new();
            write_response(
                &mut server,
                &mut out,
                &mut buf,
                &mut spare,
                resp,
                false,
                false,
                true,
            )
            .await
        });
        // Nothing read: the writer stops once the pipe and its buffer are full.
        let mut first = [0u8; 1];
        client.read_exact(&mut first).await.unwrap();
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let early = taken.load(Ordering::SeqCst);
        assert!(
            early < 200,
            "{early} of 10000 frames taken ahead of the client"
        );
        // Read all: chunked, every byte, and the connection kept.
        let mut all = Vec::new();
        read_until(&mut client, &mut all, b"\r\n0\r\n\r\n").await;
        let text = String::from_utf8_lossy(&all);
        assert!(
            text.starts_with("TTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"),
            "{}",
            &text[..80]
        );
        let body = &all[text.find("\r\n\r\n").unwrap() + 4..];
        let payload: usize = body
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"x"))
            .map(|l| l.len() - 1)
            .sum();
        assert_eq!(payload, 10_000 * 1024);
        assert!(writing.await.unwrap().unwrap(), "kept alive");
    }

    async fn read_until(r: &mut (impl AsyncRead + Unpin), all: &mut Vec<u8>, end: &[u8]) {
        let mut b = vec![0u8; 64 << 10];
        while !all.ends_with(end) {
            let n = r.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early");
            all.extend_from_slice(&b[..n]);
        }
    }

    #[tokio::test]
    async fn head_and_small_body_leave_in_one_write() {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let (body, _) = counted(1, 100, true);
        let mut out = Vec::new();
        let resp = http::Response::new(body);
        let kept = write_response(
            &mut server,
            &mut out,
            &mut BytesMut::new(),
            &mut HeaderMap::new(),
            resp,
            false,
            false,
            true,
        )
        .await
        .unwrap();
        assert!(kept);
        drop(server);
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.contains("content-length: 100\r\n"), "{text}");
        assert!(text.ends_with(&"x".repeat(100)), "{text}");
        // A body shorter than its announced length closes the connection.
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let (body, _) = counted(1, 100, false);
        let mut resp = http::Response::new(body);
        resp.headers_mut()
            .insert("content-length", HeaderValue::from_static("200"));
        let kept = write_response(
            &mut server,
            &mut out,
            &mut BytesMut::new(),
            &mut HeaderMap::new(),
            resp,
            false,
            false,
            true,
        )
        .await
        .unwrap();
        assert!(!kept);
        drop(server);
        all.clear();
        client.read_to_end(&mut all).await.unwrap();
    }

    #[tokio::test]
    async fn rewind_gives_back_the_bytes_read_first() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let io = TrackedIo::new(server, Arc::new(Activity::new()));
        let mut r = io.put_back(Bytes::from_static(b"hello"));
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
