//! Minimal blocking HTTP/1.1 client: the timed load generator request (plain or over TLS)
//! and the management API calls. Kept tiny on purpose so the measured path is just
//! connect, (handshake,) write, read.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors from one HTTP exchange.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{stage} with {addr} failed")]
    Io {
        addr: SocketAddr,
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed response from {addr}: {reason}")]
    Malformed { addr: SocketAddr, reason: String },
    #[error("{name:?} is not a TLS server name: {reason}")]
    ServerName { name: String, reason: String },
    #[error("TLS setup with {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
}

/// A parsed response and how long it took.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// From just before connect() to the arrival of the response's last byte.
    pub elapsed: Duration,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Synwake-Cold-Start` header, if the gateway sent one.
    pub fn cold_start(&self) -> Option<bool> {
        self.header("x-synwake-cold-start").map(|v| v == "true")
    }
}

/// Sends one request over a fresh connection and reads the full response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    request_authorized(addr, method, path, body, timeout, None)
}

/// [`request`] with an `Authorization` header (the management API's basic auth).
pub fn request_authorized(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    authorization: Option<&str>,
) -> Result<Response, ClientError> {
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: synwake-bench\r\nAccept: */*\r\n"
    );
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut wire = req.into_bytes();
    wire.extend_from_slice(body);

    let io_err = |stage| {
        move |source| ClientError::Io {
            addr,
            stage,
            source,
        }
    };
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ClientError::Connect { addr, source })?;
    stream.set_nodelay(true).map_err(io_err("setsockopt"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io_err("setsockopt"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io_err("setsockopt"))?;
    stream
        .write_all(&wire)
        .map_err(io_err("writing the request"))?;
    let (status, headers, body) = read_response(&mut stream, addr)?;
    let elapsed = start.elapsed();
    Ok(Response {
        status,
        headers,
        body,
        elapsed,
    })
}

/// `GET path` over a fresh TLS connection to `addr` with SNI `server_name`, verifying
/// the server with `tls` (a full handshake unless `tls` resumes). `elapsed` runs from
/// just before connect() to the response's last byte, the handshake included.
pub fn get_tls(
    addr: SocketAddr,
    server_name: &str,
    path: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| {
        ClientError::ServerName {
            name: server_name.to_string(),
            reason: e.to_string(),
        }
    })?;
    let io_err = |stage| {
        move |source| ClientError::Io {
            addr,
            stage,
            source,
        }
    };
    let wire = format!(
        "GET {path} HTTP/1.1\r\nHost: {server_name}\r\nUser-Agent: synwake-bench\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let start = Instant::now();
    let sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ClientError::Connect { addr, source })?;
    sock.set_nodelay(true).map_err(io_err("setsockopt"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(io_err("setsockopt"))?;
    sock.set_write_timeout(Some(timeout))
        .map_err(io_err("setsockopt"))?;
    let conn = rustls::ClientConnection::new(tls, name).map_err(|e| ClientError::Tls {
        addr,
        reason: e.to_string(),
    })?;
    // The request goes out with the handshake's last flight, as a browser's does.
    let mut stream = rustls::StreamOwned::new(conn, sock);
    stream
        .write_all(wire.as_bytes())
        .map_err(io_err("the TLS handshake or writing the request"))?;
    let (status, headers, body) = read_response(&mut stream, addr)?;
    let elapsed = start.elapsed();
    Ok(Response {
        status,
        headers,
        body,
        elapsed,
    })
}

type Parsed = (u16, Vec<(String, String)>, Vec<u8>);

fn read_response(stream: &mut impl Read, addr: SocketAddr) -> Result<Parsed, ClientError> {
    let bad = |reason: &str| ClientError::Malformed {
        addr,
        reason: reason.to_string(),
    };
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).map_err(|source| ClientError::Io {
            addr,
            stage: "reading the response head",
            source,
        })?;
        if n == 0 {
            return Err(bad("connection closed before the end of the headers"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("non-UTF-8 headers"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = buf[head_end..].to_vec();
    let mut read_more = |stream: &mut dyn Read, body: &mut Vec<u8>| -> Result<usize, ClientError> {
        let n = stream.read(&mut chunk).map_err(|source| ClientError::Io {
            addr,
            stage: "reading the response body",
            source,
        })?;
        body.extend_from_slice(&chunk[..n]);
        Ok(n)
    };
    if let Some(len) = get("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        while body.len() < len {
            if read_more(stream, &mut body)? == 0 {
                return Err(bad("connection closed inside the body"));
            }
        }
        body.truncate(len);
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            if let Some(decoded) = decode_chunked(&body) {
                body = decoded;
                break;
            }
            if read_more(stream, &mut body)? == 0 {
                return Err(bad("connection closed inside a chunked body"));
            }
        }
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        while read_more(stream, &mut body)? > 0 {}
    }
    Ok((status, headers, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body; `None` while the terminating chunk has not arrived.
fn decode_chunked(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n")?;
        let size_str = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            return find(raw, b"\r\n").map(|_| out);
        }
        if raw.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunked_bodies_only_when_complete() {
        assert_eq!(
            decode_chunked(b"5\r\nhello\r\n0\r\n\r\n").unwrap(),
            b"hello"
        );
        assert!(decode_chunked(b"5\r\nhello\r\n").is_none());
        assert!(decode_chunked(b"5\r\nhel").is_none());
    }
}
