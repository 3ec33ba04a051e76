//! HTTP/2 connections to `protocol = "h2c"` instances: one per instance and serving
//! runtime, every request to it a stream on that connection (hyper's
//! `client::conn::http2`). The instance's `SETTINGS_ENABLE_CONNECT_PROTOCOL` is read off
//! its connection preface, so an RFC 8441 extended CONNECT (WebSocket) is only sent to an
//! instance that enabled it: hyper and h2 send one either way and leave the refusal to
//! the peer.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Id as RuntimeId;
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;

use super::{h1, ForwardBody};
use crate::runtime::Instance;

/// Why a request could not be sent to an h2c instance, or no response came back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `h1::Error::Connect` or `ConnectTimeout`: the same TCP connect.
    #[error(transparent)]
    Connect(h1::Error),
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} sent no HTTP/2 SETTINGS within {}", humantime::format_duration(*.timeout))]
    NoSettings { addr: SocketAddr, timeout: Duration },
    /// RFC 8441 section 3: a client may send an extended CONNECT only to a peer that
    /// announced SETTINGS_ENABLE_CONNECT_PROTOCOL = 1.
    #[error("its HTTP/2 server did not enable the extended CONNECT protocol (SETTINGS_ENABLE_CONNECT_PROTOCOL, RFC 8441), so it cannot take a WebSocket over HTTP/2")]
    NoExtendedConnect,
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

/// A connection taken for one request.
#[derive(Clone)]
struct H2Conn {
    send: http2::SendRequest<ForwardBody>,
    /// The instance's SETTINGS_ENABLE_CONNECT_PROTOCOL, once its first SETTINGS arrived.
    extended_connect: watch::Receiver<Option<bool>>,
}

struct Slot {
    /// Held weakly: the allocation is the instance's identity (see `IdleConns`).
    instance: Weak<dyn Instance>,
    conn: Arc<OnceCell<H2Conn>>,
    last_used: Instant,
}

/// The HTTP/2 connections to h2c instances, by instance and runtime (a socket is only
/// used from the runtime whose I/O driver it is registered with).
#[derive(Default)]
pub struct H2Conns {
    slots: Mutex<HashMap<(usize, RuntimeId), Slot>>,
}

impl H2Conns {
    /// Sends `req` (absolute URI) to `instance` on its connection, made first if there is
    /// none (one connect for concurrent first requests). A request the connection closed
    /// under before it left goes once more, on a new connection. An extended CONNECT waits
    /// for the instance's SETTINGS and fails with `NoExtendedConnect` unless it enabled
    /// the protocol.
    pub async fn send(
        &self,
        instance: &Arc<dyn Instance>,
        connect_timeout: Duration,
        mut req: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, Error> {
        let extended = req.extensions().get::<hyper::ext::Protocol>().is_some();
        let addr = instance.addr();
        let mut retried = false;
        loop {
            let (cell, mut conn) = self.conn(instance, connect_timeout).await?;
            if extended && !extended_connect(&mut conn, addr, connect_timeout).await? {
                return Err(Error::NoExtendedConnect);
            }
            match conn.send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if !retried => {
                        tracing::debug!(
                            "{addr}: HTTP/2 connection closed before the request left: {}",
                            e.error()
                        );
                        self.forget(instance, &cell);
                        req = back;
                        retried = true;
                    }
                    _ => return Err(Error::Request(e.into_error())),
                },
            }
        }
    }

    /// The open connection to `instance` on this runtime, or a new one.
    async fn conn(
        &self,
        instance: &Arc<dyn Instance>,
        connect_timeout: Duration,
    ) -> Result<(Arc<OnceCell<H2Conn>>, H2Conn), Error> {
        let addr = instance.addr();
        for _ in 0..2 {
            let cell = {
                let key = key_of(instance);
                let mut slots = self.slots.lock().unwrap();
                let slot = slots.entry(key).or_insert_with(|| Slot {
                    instance: Arc::downgrade(instance),
                    conn: Arc::default(),
                    last_used: Instant::now(),
                });
                slot.last_used = Instant::now();
                slot.conn.clone()
            };
            let conn = cell
                .get_or_try_init(|| connect(addr, connect_timeout))
                .await
                .inspect_err(|_| self.forget(instance, &cell))?;
            if !conn.send.is_closed() {
                return Ok((cell.clone(), conn.clone()));
            }
            self.forget(instance, &cell);
        }
        let conn = connect(addr, connect_timeout).await?;
        Ok((Arc::default(), conn))
    }

    /// Drops the slot of `instance` if it still holds `cell` (a newer one stays).
    fn forget(&self, instance: &Arc<dyn Instance>, cell: &Arc<OnceCell<H2Conn>>) {
        let key = key_of(instance);
        let mut slots = self.slots.lock().unwrap();
        if slots.get(&key).is_some_and(|s| Arc::ptr_eq(&s.conn, cell)) {
            slots.remove(&key);
        }
    }

    /// Lets go of connections unused for `idle_timeout`, closed, or to instances gone.
    /// A connection closes once it is let go of and its last stream (an open WebSocket,
    /// a long gRPC stream) ended.
    pub fn reap(&self, idle_timeout: Duration) {
        let mut closing = Vec::new();
        self.slots.lock().unwrap().retain(|_, s| {
            let keep = s.instance.strong_count() > 0
                && s.last_used.elapsed() < idle_timeout
                && s.conn.get().is_none_or(|c| !c.send.is_closed());
            if !keep {
                closing.push(s.conn.clone());
            }
            keep
        });
        drop(closing);
    }
}

fn key_of(instance: &Arc<dyn Instance>) -> (usize, RuntimeId) {
    super::upstream::key_of(
        Arc::as_ptr(instance),
        tokio::runtime::Handle::current().id(),
    )
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<H2Conn, Error> {
    let tcp = h1::connect_tcp(addr, timeout)
        .await
        .map_err(Error::Connect)?;
    let (seen, extended_connect) = watch::channel(None);
    let io = TokioIo::new(PrefaceWatch::new(tcp, seen));
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(io)
        .await
        .map_err(|source| Error::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("{addr}: HTTP/2 connection: {e}");
        }
    });
    Ok(H2Conn {
        send,
        extended_connect,
    })
}

/// Whether the instance enabled the extended CONNECT protocol, waiting (bounded) for its
/// SETTINGS on a new connection.
async fn extended_connect(
    conn: &mut H2Conn,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<bool, Error> {
    let seen = tokio::time::timeout(timeout, conn.extended_connect.wait_for(Option::is_some));
    match seen.await {
        Ok(Ok(v)) => Ok(v.unwrap_or(false)),
        // The connection ended, or is not HTTP/2: the request fails on it.
        Ok(Err(_)) => Ok(true),
        Err(_) => Err(Error::NoSettings { addr, timeout }),
    }
}

/// The largest SETTINGS payload read (the default max frame size).
const MAX_SETTINGS_PAYLOAD: usize = 16_384;
const SETTINGS_ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_WINDOW_UPDATE: u8 = 0x8;

/// A socket that reads the server's SETTINGS as they pass to hyper: its preface (RFC 9113
/// section 3.4: a SETTINGS frame first) and any further SETTINGS, PING or WINDOW_UPDATE
/// frames before the first other frame, which ends the watch (a response to a request, so
/// the rest of the connection costs one branch per read).
struct PrefaceWatch {
    io: TcpStream,
    /// Bytes of a frame header, or of a SETTINGS frame, not complete yet.
    head: Vec<u8>,
    /// Payload bytes of a frame passed over still to come.
    skip: usize,
    enabled: Option<bool>,
    /// Told after each read that brought SETTINGS; None once the watch ended.
    seen: Option<watch::Sender<Option<bool>>>,
}

impl PrefaceWatch {
    fn new(io: TcpStream, seen: watch::Sender<Option<bool>>) -> Self {
        PrefaceWatch {
            io,
            head: Vec::new(),
            skip: 0,
            enabled: None,
            seen: Some(seen),
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) {
        loop {
            let passed = self.skip.min(bytes.len());
            self.skip -= passed;
            bytes = &bytes[passed..];
            if bytes.is_empty() {
                break;
            }
            // `head` holds the start of a frame not complete yet.
            let had = self.head.len();
            self.head.extend_from_slice(bytes);
            let used = match next_frame(&self.head) {
                Frame::Incomplete => break,
                Frame::Settings { len, enabled } => {
                    // Never turned off once on (RFC 8441 section 3).
                    self.enabled = Some(self.enabled == Some(true) || enabled);
                    9 + len
                }
                Frame::Setup { len } => {
                    self.skip = len;
                    9
                }
                Frame::Other => {
                    // Not SETTINGS first: not HTTP/2, so nothing is published (waiters see
                    // the sender dropped, and the request fails on the connection).
                    self.head = Vec::new();
                    if let (Some(seen), Some(_)) = (self.seen.take(), self.enabled) {
                        seen.send_replace(self.enabled);
                    }
                    return;
                }
            };
            self.head.clear();
            bytes = &bytes[used - had..];
        }
        if let (Some(seen), Some(_)) = (&self.seen, self.enabled) {
            seen.send_replace(self.enabled);
        }
    }
}

enum Frame {
    Incomplete,
    /// A SETTINGS frame (not an ACK) of `len` payload bytes, all in.
    Settings {
        len: usize,
        enabled: bool,
    },
    /// A SETTINGS ACK, PING or WINDOW_UPDATE with `len` payload bytes.
    Setup {
        len: usize,
    },
    /// Anything else, or a malformed SETTINGS frame (h2 fails the connection on it).
    Other,
}

/// The frame `head` starts with, as far as the extended CONNECT setting is concerned.
fn next_frame(head: &[u8]) -> Frame {
    let Some(&[l0, l1, l2, kind, flags, ..]) = head.get(..9) else {
        return Frame::Incomplete;
    };
    let len = u32::from_be_bytes([0, l0, l1, l2]) as usize;
    match kind {
        FRAME_SETTINGS if flags & 0x1 == 0 => {
            if !len.is_multiple_of(6) || len > MAX_SETTINGS_PAYLOAD {
                return Frame::Other;
            }
            let Some(payload) = head.get(9..9 + len) else {
                return Frame::Incomplete;
            };
            let mut enabled = false;
            for entry in payload.chunks_exact(6) {
                if u16::from_be_bytes([entry[0], entry[1]]) == SETTINGS_ENABLE_CONNECT_PROTOCOL {
                    enabled = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]) == 1;
                }
            }
            Frame::Settings { len, enabled }
        }
        FRAME_SETTINGS | FRAME_PING | FRAME_WINDOW_UPDATE => Frame::Setup { len },
        _ => Frame::Other,
    }
}

impl AsyncRead for PrefaceWatch {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.seen.is_some() {
            if let Poll::Ready(Ok(())) = r {
                let filled = buf.filled();
                if filled.len() == before {
                    // EOF: waiters see the sender dropped (with no SETTINGS, None).
                    this.seen = None;
                } else {
                    this.observe(&filled[before..]);
                }
            }
        }
        r
    }
}

impl AsyncWrite for PrefaceWatch {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)], flags: u8) -> Vec<u8> {
        let len = (entries.len() * 6) as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([FRAME_SETTINGS, flags, 0, 0, 0, 0]);
        for (id, v) in entries {
            f.extend(id.to_be_bytes());
            f.extend(v.to_be_bytes());
        }
        f
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, 0, 0, 0, 0, 1]);
        f.extend(payload);
        f
    }

    /// What a watch over a socket reading `bytes` in `chunk`-byte reads publishes, and
    /// whether it is still watching.
    async fn watched(bytes: &[u8], chunk: usize) -> (Option<bool>, bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tx, rx) = watch::channel(None);
        let mut w = PrefaceWatch::new(tcp, tx);
        for c in bytes.chunks(chunk) {
            w.observe(c);
        }
        let v = *rx.borrow();
        (v, w.seen.is_some())
    }

    #[tokio::test]
    async fn settings_seen_in_any_chunking_until_the_first_other_frame() {
        let on = settings(&[(0x3, 100), (0x8, 1)], 0);
        let off = settings(&[(0x3, 100)], 0);
        for chunk in [1, 2, 7, 9, 100] {
            assert_eq!(
                watched(&on, chunk).await,
                (Some(true), true),
                "chunk {chunk}"
            );
            assert_eq!(watched(&off, chunk).await, (Some(false), true));
            // Incomplete: nothing published yet.
            assert_eq!(watched(&on[..on.len() - 1], chunk).await.0, None);
            // Enabled by a second SETTINGS after a PING and a WINDOW_UPDATE (python-h2's
            // initiate_connection then update_settings).
            let mut later = off.clone();
            later.extend(frame(FRAME_PING, &[0; 8]));
            later.extend(frame(FRAME_WINDOW_UPDATE, &[0, 0, 1, 0]));
            later.extend(settings(&[], 1));
            later.extend(settings(&[(0x8, 1)], 0));
            assert_eq!(watched(&later, chunk).await, (Some(true), true));
            // Never off again once on; a HEADERS frame ends the watch.
            let mut ended = on.clone();
            ended.extend(settings(&[(0x8, 0)], 0));
            ended.extend(frame(0x1, &[0; 5]));
            ended.extend(settings(&[(0x8, 1)], 0));
            assert_eq!(watched(&ended, chunk).await, (Some(true), false));
            let mut ended = off.clone();
            ended.extend(frame(0x1, &[0; 5]));
            ended.extend(settings(&[(0x8, 1)], 0));
            assert_eq!(watched(&ended, chunk).await, (Some(false), false));
        }
        // Not a SETTINGS frame first (an HTTP/1.1 server's answer, say): not HTTP/2.
        assert_eq!(watched(&frame(0x7, &[0; 8]), 100).await, (None, false));
        assert_eq!(
            watched(b"HTTP/1.1 400 Bad Request\r\n", 5).await,
            (None, false)
        );
    }
}
