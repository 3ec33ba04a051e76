//! HTTP/1.1 exchanges with instances, run in the request's own task (no connection task to
//! hand the request to): the request head goes out in one write (with the first piece of
//! the body when it is there), the response head is parsed with httparse, a small
//! fixed-length body is read whole, and anything else streams with the connection held by
//! the body until its last byte. The instance is untrusted: every length is bounded and a
//! response whose framing is ambiguous is refused, never passed on.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::forwarded::Forwarded;
use super::upstream::Home;
use super::ForwardBody;

/// A response head (status line and header fields) larger than this is refused.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// A response with more header fields than this is refused.
pub const MAX_HEADERS: usize = 100;
/// Chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// All trailer fields of a chunked response together.
const MAX_TRAILER_BYTES: usize = 16 << 10;
const MAX_TRAILERS: usize = 32;
/// Interim (1xx) responses before the final one.
const MAX_INTERIM: usize = 8;
/// A body of at most this many bytes (Content-Length) is read whole, so the connection is
/// free again before the client has seen a byte.
const WHOLE_BODY_MAX: u64 = 64 << 10;
/// Read size; the buffer grows by this when it is nearly full.
const READ_CHUNK: usize = 16 << 10;

/// What went wrong in an exchange with an instance. Messages never quote the instance's
/// bytes (it is untrusted); they name what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr}: no connection within {}", humantime::format_duration(*.timeout))]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("writing the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    #[error("the instance closed the connection before the response was complete")]
    Closed,
    #[error("invalid response from the instance: {0}")]
    Invalid(&'static str),
    #[error("the response head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the response has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("the client's request body failed: {0}")]
    ClientBody(#[source] hyper::Error),
    #[error("the request body did not match its Content-Length")]
    BodyLength,
}

/// One HTTP/1.1 connection to an instance, between exchanges.
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet used; empty between exchanges on a sound connection.
    buf: BytesMut,
    /// When it was last handed back (pool bookkeeping).
    pub idle_since: Instant,
    /// It carried an exchange before (so a failed first write may be retried elsewhere).
    reused: bool,
    /// The runtime whose I/O driver the socket is registered with.
    runtime: tokio::runtime::Id,
}

/// A TCP connection to an instance (no Nagle), within `timeout`; h2c's too.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Error> {
    let io = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(Error::Connect { addr, source }),
        Err(_) => return Err(Error::ConnectTimeout { addr, timeout }),
    };
    let _ = io.set_nodelay(true);
    Ok(io)
}

impl Conn {
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Error> {
        let io = connect_tcp(addr, timeout).await?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            idle_since: Instant::now(),
            reused: false,
            runtime: tokio::runtime::Handle::current().id(),
        })
    }

    pub fn runtime(&self) -> tokio::runtime::Id {
        self.runtime
    }

    /// An idle connection can take a request: the instance has neither closed it nor sent
    /// bytes unasked. Costs no system call unless the socket became readable since the
    /// last response was read (tokio clears readiness after a short read).
    pub fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // EOF, unasked bytes or an error; Pending means readiness was stale.
            Poll::Ready(Ok(())) => read_more(&mut self.io, &mut self.buf, &mut cx).is_pending(),
        }
    }
}

fn read_more(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

fn put_field(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Fields for this hop only (RFC 9110 7.6.1), whoever forwards the message.
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    http::header::TRAILER,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
];

/// [`HOP_BY_HOP`], and the framing, which is ours: a body is decoded from the framing it
/// came with and framed anew.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONTENT_LENGTH || name == TRANSFER_ENCODING || HOP_BY_HOP.contains(name)
}

/// The fields `Connection` names (hop-by-hop too); no allocation without any.
pub(crate) fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for v in headers.get_all(CONNECTION) {
        for token in v.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive") {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(token) {
                named.push(n);
            }
        }
    }
    named
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// A request ready to go on any connection: its encoded head, the bytes after it and the
/// rest of the body. Nothing in it belongs to a connection, so when it failed before any
/// byte left, it goes out again on another one.
pub struct Outgoing {
    /// The encoded head; `head_sent` of its bytes are out.
    head: Vec<u8>,
    head_sent: usize,
    /// Body bytes after the head.
    pending: VecDeque<Bytes>,
    body: Option<ForwardBody>,
    framing: Framing,
    /// Body bytes the Content-Length still promises.
    remaining: u64,
    /// Bytes written so far (0: the request was never sent).
    written: usize,
    head_request: bool,
    /// Safe to send again once written (RFC 9110 9.2.2: an idempotent method, and no
    /// body): then the head is all there is, and it stays in `head` when it leaves.
    replayable: bool,
}

impl Outgoing {
    /// Encodes `req` (its URI's path and query are the target) for an instance at `addr`.
    /// The first piece of the body is taken if it is there already, so a small upload
    /// leaves in the same write as the head.
    pub async fn new(
        req: Request<ForwardBody>,
        addr: SocketAddr,
        forwarded: Option<Forwarded>,
    ) -> Result<Outgoing, Error> {
        let (parts, body) = req.into_parts();
        let framing = if body.is_end_stream() {
            Framing::Empty
        } else {
            match body.size_hint().exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            }
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = Vec::with_capacity(192 + parts.headers.len() * 48);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        if !parts.headers.contains_key(HOST) {
            use std::io::Write;
            let _ = write!(head, "host: {addr}\r\n");
        }
        let named = connection_named(&parts.headers);
        for (name, value) in &parts.headers {
            if is_hop_by_hop(name)
                || named.contains(name)
                || (forwarded.is_some() && Forwarded::replaces(name))
            {
                // gRPC needs `te: trailers` end to end: the one TE value kept.
                if name == TE && value.as_bytes().eq_ignore_ascii_case(b"trailers") {
                    head.extend_from_slice(b"te: trailers\r\n");
                }
                continue;
            }
            put_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(f) = &forwarded {
            head.extend_from_slice(b"x-forwarded-for: ");
            f.write_xff(&mut head);
            head.extend_from_slice(b"\r\n");
            put_field(&mut head, b"x-forwarded-proto", f.proto.as_bytes());
            if let Some(h) = &f.host {
                put_field(&mut head, b"x-forwarded-host", h.as_bytes());
            }
            head.extend_from_slice(b"forwarded: ");
            f.write_forwarded(&mut head);
            head.extend_from_slice(b"\r\n");
        }
        match framing {
            Framing::Length(n) => {
                use std::io::Write;
                let _ = write!(head, "content-length: {n}\r\n");
            }
            Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Empty
                if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                    || parts.headers.contains_key(CONTENT_LENGTH) =>
            {
                head.extend_from_slice(b"content-length: 0\r\n")
            }
            Framing::Empty => {}
        }
        head.extend_from_slice(b"\r\n");
        let mut out = Outgoing {
            head,
            head_sent: 0,
            pending: VecDeque::new(),
            body: (framing != Framing::Empty).then_some(body),
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            written: 0,
            head_request: parts.method == Method::HEAD,
            replayable: framing == Framing::Empty && parts.method.is_idempotent(),
        };
        if out.body.is_some() {
            // One look at the body: what is there now goes out with the head.
            let first = std::future::poll_fn(|cx| match out.poll_body(cx) {
                Poll::Ready(r) => Poll::Ready(r),
                Poll::Pending => Poll::Ready(Ok(())),
            });
            first.await?;
        }
        Ok(out)
    }

    /// Everything was written.
    fn done(&self) -> bool {
        self.head_sent == self.head.len() && self.pending.is_empty() && self.body.is_none()
    }

    /// Makes a replayable request that went out whole ready to go again from its first
    /// byte; false (and unchanged) for any other.
    fn rewind(&mut self) -> bool {
        if !self.replayable || self.head_sent != self.head.len() {
            return false;
        }
        self.head_sent = 0;
        self.written = 0;
        true
    }

    /// Takes one frame of the body into `pending`.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => self.push_data(data),
                Err(frame) => self.finish(frame.into_trailers().ok()),
            },
            Some(Err(e)) => {
                self.body = None;
                Err(Error::ClientBody(e))
            }
            None => self.finish(None),
        }
        .into()
    }

    fn push_data(&mut self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            Framing::Length(_) => {
                let n = data.len() as u64;
                if n > self.remaining {
                    return Err(Error::BodyLength);
                }
                self.remaining -= n;
                self.pending.push_back(data);
            }
            Framing::Chunked => {
                self.pending
                    .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                self.pending.push_back(data);
                self.pending.push_back(Bytes::from_static(b"\r\n"));
            }
            Framing::Empty => {}
        }
        Ok(())
    }

    fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), Error> {
        self.body = None;
        match self.framing {
            Framing::Length(_) if self.remaining != 0 => return Err(Error::BodyLength),
            Framing::Chunked => {
                let mut end = b"0\r\n".to_vec();
                for (name, value) in trailers.iter().flatten() {
                    end.extend_from_slice(name.as_str().as_bytes());
                    end.extend_from_slice(b": ");
                    end.extend_from_slice(value.as_bytes());
                    end.extend_from_slice(b"\r\n");
                }
                end.extend_from_slice(b"\r\n");
                self.pending.push_back(Bytes::from(end));
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes what there is, taking more of the body, until all is out or the socket or
    /// the body has to wait.
    fn poll_write(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            let head = &self.head[self.head_sent..];
            if head.is_empty() && self.pending.is_empty() {
                if self.body.is_none() {
                    return Poll::Ready(Ok(()));
                }
                ready!(self.poll_body(cx))?;
                continue;
            }
            let n = {
                let mut iov = [IoSlice::new(&[]); 16];
                let mut k = 0;
                let pieces = std::iter::once(head)
                    .filter(|h| !h.is_empty())
                    .chain(self.pending.iter().map(|b| &b[..]));
                for (slot, b) in iov.iter_mut().zip(pieces) {
                    *slot = IoSlice::new(b);
                    k += 1;
                }
                match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &iov[..k])) {
                    Ok(0) => {
                        return Poll::Ready(Err(Error::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Err(Error::Write(e))),
                }
            };
            self.written += n;
            let from_head = n.min(self.head.len() - self.head_sent);
            self.head_sent += from_head;
            let mut left = n - from_head;
            while left > 0 {
                let front = self
                    .pending
                    .front_mut()
                    .expect("written bytes were pending");
                if front.len() <= left {
                    left -= front.len();
                    self.pending.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
    }
}

/// How a response body is framed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes the connection.
    Close,
}

struct Head {
    parts: http::response::Parts,
    framing: BodyFraming,
    /// The connection may carry another exchange after this one.
    reusable: bool,
}

/// Parses a complete response head at the start of `buf` and removes it from there;
/// `Ok(None)`: not complete yet.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    // Uninitialised: filling 100 empty fields for every response costs more than parsing it.
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut raw);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err(Error::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(Error::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
        Err(_) => return Err(Error::Invalid("malformed response head")),
    };
    let code = resp.code.unwrap_or(0);
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("bad status code"))?;
    // Where each name and value sits, so the values can share the head's buffer.
    let base = buf.as_ptr() as usize;
    // u32: a head is at most MAX_HEAD_BYTES.
    let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let n = resp.headers.len();
    for (slot, h) in at.iter_mut().zip(resp.headers.iter()) {
        let name = (h.name.as_ptr() as usize - base) as u32;
        let value = (h.value.as_ptr() as usize - base) as u32;
        *slot = (
            name,
            name + h.name.len() as u32,
            value,
            value + h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    // Room for the one field forward adds (X-Synwake-Cold-Start) without a regrow.
    let mut headers = HeaderMap::with_capacity(n + 1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encodings = 0;
    let span =
        |&(a, b, c, d): &(u32, u32, u32, u32)| (a as usize, b as usize, c as usize, d as usize);
    let mut close = version == Version::HTTP_10;
    // Fields the response's Connection names are hop-by-hop too (left out below).
    let mut named: Vec<&[u8]> = Vec::new();
    for (n0, n1, v0, v1) in at[..n].iter().map(span) {
        if head[n0..n1].eq_ignore_ascii_case(b"connection") {
            named.extend(head[v0..v1].split(|&b| b == b',').map(<[u8]>::trim_ascii));
        }
    }
    for (n0, n1, v0, v1) in at[..n].iter().map(span) {
        let name =
            HeaderName::from_bytes(&head[n0..n1]).map_err(|_| Error::Invalid("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| Error::Invalid("bad header value"))?;
        if name == CONTENT_LENGTH {
            for item in value.as_bytes().split(|&b| b == b',') {
                let n =
                    parse_length(item.trim_ascii()).ok_or(Error::Invalid("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Invalid("conflicting Content-Length values"));
                }
                length = Some(n);
            }
        } else if name == TRANSFER_ENCODING {
            transfer_encodings += 1;
            chunked = value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked");
            // Only the body is passed on, decoded; the client gets its own framing.
            continue;
        } else if name == CONNECTION {
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        // Content-Length stays: the client's framing of a HEAD or 304 answer is it.
        if name != CONTENT_LENGTH && is_hop_by_hop(&name)
            || named
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_str().as_bytes()))
        {
            continue;
        }
        headers.append(name, value);
    }
    if transfer_encodings > 0 && length.is_some() {
        // RFC 9112 6.1: a sender must not send both; a message with both is a smuggling
        // attempt or a broken framing, and either way not passed on.
        return Err(Error::Invalid("both Content-Length and Transfer-Encoding"));
    }
    if transfer_encodings > 1 || (transfer_encodings == 1 && !chunked) {
        return Err(Error::Invalid("Transfer-Encoding other than chunked"));
    }
    let interim = status.is_informational();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::Invalid("switched protocols unasked"));
    }
    let framing = if head_request
        || interim
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // A body-less status with body framing: whatever follows is not trusted.
        close |= chunked || (status == StatusCode::NO_CONTENT && length.is_some_and(|l| l > 0));
        BodyFraming::Empty
    } else if chunked {
        BodyFraming::Chunked
    } else if let Some(n) = length {
        BodyFraming::Length(n)
    } else {
        BodyFraming::Close
    };
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        framing,
        reusable: !close && framing != BodyFraming::Close,
    }))
}

/// 1 to 19 ASCII digits (no sign, no overflow).
fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Parses a chunk-size line (without its CRLF): hex digits, then optional extensions.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    if line.contains(&b'\n') || line.contains(&b'\r') {
        return None;
    }
    let size = match line.iter().position(|&b| b == b';') {
        Some(i) => &line[..i],
        None => line,
    };
    let size = size.trim_ascii_end();
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

/// The instance closed (EOF) or reset the connection, as a close of an idle connection
/// does; anything else (a timeout, a malformed answer) is not a lost race.
fn closed_unanswered(e: &Error) -> bool {
    match e {
        Error::Closed => true,
        Error::Read(e) | Error::Write(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Sends `out` on `conn` and reads the response head (and a small body whole). When a
/// connection that was reused fails, the request comes back to be sent on another one if
/// no byte of it left, or if it is safe to resend (idempotent, no body) and the instance
/// closed or reset the connection before a byte of the response came: its own idle close
/// raced our reuse, so it never saw the request.
pub async fn exchange(
    mut conn: Conn,
    mut out: Outgoing,
    home: Option<Home>,
) -> Result<Response<UpstreamBody>, (Error, Option<Outgoing>)> {
    let mut write_failed: Option<Error> = None;
    let mut interim = 0;
    let mut answered = false;
    let head = std::future::poll_fn(|cx| {
        if write_failed.is_none() && !out.done() {
            if let Poll::Ready(Err(e)) = out.poll_write(&mut conn.io, cx) {
                if out.written == 0 || matches!(e, Error::ClientBody(_) | Error::BodyLength) {
                    return Poll::Ready(Err(e));
                }
                // The instance may have answered early and closed; read what it said.
                write_failed = Some(e);
            }
        }
        loop {
            match parse_head(&mut conn.buf, out.head_request) {
                Ok(Some(h)) if h.parts.status.is_informational() => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Poll::Ready(Err(Error::Invalid("too many interim responses")));
                    }
                    continue;
                }
                Ok(Some(h)) => return Poll::Ready(Ok(h)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            match ready!(read_more(&mut conn.io, &mut conn.buf, cx)) {
                Ok(0) => return Poll::Ready(Err(write_failed.take().unwrap_or(Error::Closed))),
                Ok(_) => answered = true,
                Err(e) => return Poll::Ready(Err(write_failed.take().unwrap_or(Error::Read(e)))),
            }
        }
    })
    .await;
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            let again = conn.reused
                && !matches!(e, Error::ClientBody(_) | Error::BodyLength)
                && (out.written == 0 || (!answered && closed_unanswered(&e) && out.rewind()));
            return Err((e, again.then_some(out)));
        }
    };
    let reusable = head.reusable && write_failed.is_none();
    let mut stream = Streaming {
        conn: Some(conn),
        out: (!out.done()).then_some(out),
        state: match head.framing {
            BodyFraming::Empty => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkSize,
            BodyFraming::Close => State::Close,
        },
        reusable,
        home,
    };
    let body = match head.framing {
        BodyFraming::Empty => {
            stream.finish();
            UpstreamBody::Whole(None)
        }
        BodyFraming::Length(n) if n <= WHOLE_BODY_MAX => {
            let n = n as usize;
            let whole = std::future::poll_fn(|cx| stream.poll_buffered(n, cx)).await;
            if let Err(e) = whole {
                return Err((e, None));
            }
            let conn = stream.conn.as_mut().expect("open until finished");
            let data = conn.buf.split_to(n).freeze();
            stream.finish();
            UpstreamBody::Whole((!data.is_empty()).then_some(data))
        }
        _ => UpstreamBody::Stream(Box::new(stream)),
    };
    Ok(Response::from_parts(head.parts, body))
}

/// A response body from an instance: read whole already, or streaming from its connection.
pub enum UpstreamBody {
    Whole(Option<Bytes>),
    Stream(Box<Streaming>),
}

/// The body being read from the connection; the request body may still be going out
/// (the instance answered before it read all of it).
pub struct Streaming {
    conn: Option<Conn>,
    out: Option<Outgoing>,
    state: State,
    reusable: bool,
    home: Option<Home>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Close,
    Done,
}

impl Streaming {
    /// The exchange is over: the connection goes home when nothing of it is left on the
    /// wire, else it closes.
    fn finish(&mut self) {
        self.state = State::Done;
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let clean = self.reusable && self.out.is_none() && conn.buf.is_empty();
        self.out = None;
        if let (true, Some(home)) = (clean, self.home.take()) {
            conn.reused = true;
            conn.idle_since = Instant::now();
            home.put_back(conn);
        }
    }

    /// Keeps the request body going out, if any is left; a failure there only means the
    /// connection is not reused (the instance has answered already).
    fn drive_out(&mut self, cx: &mut Context<'_>) {
        if let (Some(out), Some(conn)) = (self.out.as_mut(), self.conn.as_mut()) {
            match out.poll_write(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => self.out = None,
                Poll::Ready(Err(_)) => {
                    self.out = None;
                    self.reusable = false;
                }
                Poll::Pending => {}
            }
        }
    }

    /// Reads until `n` bytes are buffered.
    fn poll_buffered(&mut self, n: usize, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.drive_out(cx);
        let conn = self.conn.as_mut().expect("open until finished");
        while conn.buf.len() < n {
            if conn.buf.capacity() < n {
                conn.buf.reserve(n - conn.buf.len());
            }
            match ready!(read_more(&mut conn.io, &mut conn.buf, cx)) {
                Ok(0) => return Poll::Ready(Err(Error::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Error::Read(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Done;
        self.conn = None;
        self.out = None;
        Poll::Ready(Some(Err(e)))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.drive_out(cx);
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::ChunkData(left) if !buf.is_empty() => {
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    let left = left - n;
                    match self.state {
                        State::Length(_) if left == 0 => self.finish(),
                        State::Length(_) => self.state = State::Length(left),
                        _ if left == 0 => self.state = State::ChunkEnd,
                        _ => self.state = State::ChunkData(left),
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Close if !buf.is_empty() => {
                    let data = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize => {
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
                    if let Some(i) = window.windows(2).position(|w| w == b"\r\n") {
                        let Some(size) = parse_chunk_size(&buf[..i]) else {
                            return self.fail(Error::Invalid("bad chunk size line"));
                        };
                        buf.advance(i + 2);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        continue;
                    }
                    if buf.len() >= MAX_CHUNK_LINE {
                        return self.fail(Error::Invalid("chunk size line too long"));
                    }
                }
                State::ChunkEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return self.fail(Error::Invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                    continue;
                }
                State::Trailers if buf.starts_with(b"\r\n") => {
                    buf.advance(2);
                    self.finish();
                    return Poll::Ready(None);
                }
                State::Trailers => {
                    let window = &buf[..buf.len().min(MAX_TRAILER_BYTES)];
                    if let Some(i) = window.windows(4).position(|w| w == b"\r\n\r\n") {
                        let mut raw = [httparse::EMPTY_HEADER; MAX_TRAILERS];
                        let trailers = match httparse::parse_headers(&buf[..i + 4], &mut raw) {
                            Ok(httparse::Status::Complete((_, fields))) => {
                                let mut map = HeaderMap::with_capacity(fields.len());
                                for f in fields {
                                    let (Ok(name), Ok(value)) = (
                                        HeaderName::from_bytes(f.name.as_bytes()),
                                        HeaderValue::from_bytes(f.value),
                                    ) else {
                                        return self.fail(Error::Invalid("bad trailer field"));
                                    };
                                    map.append(name, value);
                                }
                                map
                            }
                            _ => return self.fail(Error::Invalid("bad trailer fields")),
                        };
                        buf.advance(i + 4);
                        self.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    if buf.len() >= MAX_TRAILER_BYTES {
                        return self.fail(Error::Invalid("trailer fields too large"));
                    }
                }
                _ => {}
            }
            // More bytes are needed.
            match ready!(read_more(&mut conn.io, &mut conn.buf, cx)) {
                Ok(0) if self.state == State::Close => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(Error::Closed),
                Ok(_) => {}
                Err(e) => return self.fail(Error::Read(e)),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.get_mut() {
            UpstreamBody::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Stream(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Whole(data) => data.is_none(),
            UpstreamBody::Stream(s) => s.state == State::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            UpstreamBody::Stream(s) => match s.state {
                State::Length(n) => SizeHint::with_exact(n),
                State::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> Result<Option<Head>, Error> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_head(&mut buf, head_request)
    }

    fn framing(raw: &str) -> BodyFraming {
        head(raw, false).unwrap().unwrap().framing
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            BodyFraming::Length(5)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"),
            BodyFraming::Length(7)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), BodyFraming::Close);
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n"),
            BodyFraming::Empty
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"),
            BodyFraming::Empty
        );
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Empty);
        assert_eq!(
            h.parts.headers["content-length"], "9",
            "a HEAD answer keeps its length"
        );
        assert!(h.reusable);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        ] {
            assert!(head(raw, false).is_err(), "accepted {raw:?}");
        }
    }

    #[test]
    fn response_head_is_bounded() {
        let partial = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(head(&partial, false), Err(Error::HeadTooLarge)));
        assert!(matches!(head("HTTP/1.1 200 OK\r\nx: a", false), Ok(None)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(head(&raw, false), Err(Error::TooManyHeaders)));
    }

    #[test]
    fn connection_close_and_http_1_0_are_not_reused() {
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(!h.unwrap().unwrap().reusable);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false);
        assert!(!h.unwrap().unwrap().reusable);
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b"5 ;name=value"), Some(5));
        for bad in [&b""[..], b"x", b"-1", b"12345678901234567", b"5\n", b" 5"] {
            assert_eq!(parse_chunk_size(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn request_head_leaves_hop_by_hop_fields_out_and_writes_forwarded_ones() {
        let req = Request::builder()
            .method("GET")
            .uri("/p?q=1")
            .header("host", "h.example")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("upgrade", "h2c")
            .header("x-forwarded-for", "10.0.0.9")
            .header("x-forwarded-proto", "gopher")
            .header("x-kept", "yes")
            .body(ForwardBody::Queued(http_body_util::Full::new(Bytes::new())))
            .unwrap();
        let conn = super::super::ConnInfo::plain("192.0.2.7:5555".parse().unwrap());
        let f = Forwarded::of(req.headers(), &conn);
        let out = Outgoing::new(req, "127.0.0.1:9".parse().unwrap(), Some(f))
            .await
            .unwrap();
        let head = String::from_utf8(out.head.clone()).unwrap();
        let mut lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines.remove(0), "GET /p?q=1 HTTP/1.1");
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                "",
                "",
                "forwarded: for=192.0.2.7;proto=http;host=\"h.example\"",
                "host: h.example",
                "te: trailers",
                "x-forwarded-for: 10.0.0.9, 192.0.2.7",
                "x-forwarded-host: h.example",
                "x-forwarded-proto: http",
                "x-kept: yes",
            ]
        );
    }

    #[tokio::test]
    async fn only_idempotent_requests_without_a_body_are_replayable() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cases = [
            ("GET", "", true),
            ("HEAD", "", true),
            ("OPTIONS", "", true),
            ("TRACE", "", true),
            ("PUT", "", true),
            ("DELETE", "", true),
            ("POST", "", false),
            ("PATCH", "", false),
            ("GET", "a body", false),
            ("PUT", "a body", false),
        ];
        for (method, body, replayable) in cases {
            let req = Request::builder()
                .method(method)
                .uri("/")
                .body(ForwardBody::Queued(http_body_util::Full::new(
                    Bytes::from_static(body.as_bytes()),
                )))
                .unwrap();
            let mut out = Outgoing::new(req, addr, None).await.unwrap();
            assert_eq!(out.replayable, replayable, "{method} {body:?}");
            let head = out.head.clone();
            let mut io = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            std::future::poll_fn(|cx| out.poll_write(&mut io, cx))
                .await
                .unwrap();
            assert!(out.done() && out.written >= head.len());
            // Sent whole, it can go again from its first byte.
            assert_eq!(out.rewind(), replayable, "{method} {body:?}");
            if replayable {
                assert_eq!((out.written, out.head_sent, &out.head), (0, 0, &head));
                assert!(!out.rewind(), "rewound twice");
            }
        }
    }

    #[test]
    fn the_readme_states_these_limits() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        for row in [
            format!(
                "| response head (status line and header fields) | {} KiB |",
                MAX_HEAD_BYTES >> 10
            ),
            format!("| response header fields | {MAX_HEADERS} |"),
            format!("| interim (1xx) responses before the final one | {MAX_INTERIM} |"),
            format!(
                "| chunk-size line of a chunked body (extensions included) | {} KiB |",
                MAX_CHUNK_LINE >> 10
            ),
            format!(
                "| trailer fields of a chunked body | {} KiB and {MAX_TRAILERS} fields |",
                MAX_TRAILER_BYTES >> 10
            ),
            format!(
                "| body read whole before the client gets the head | Content-Length up to {} KiB |",
                WHOLE_BODY_MAX >> 10
            ),
        ] {
            assert!(readme.contains(&row), "README.md lacks {row:?}");
        }
    }

    #[test]
    fn response_hop_by_hop_fields_are_left_out() {
        let raw = "HTTP/1.1 200 OK\r\nconnection: x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\nupgrade: h2c\r\nx-kept: 1\r\ncontent-length: 0\r\n\r\n";
        let h = head(raw, false).unwrap().unwrap();
        let mut names: Vec<&str> = h.parts.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
    }
}
