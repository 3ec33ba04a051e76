//! A tiny blocking HTTP/1.1 client: one request per connection (`Connection: close`),
//! Content-Length, chunked and read-to-close bodies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::proc::loopback;

/// A response from [`request`].
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// From the first byte written to the last byte read.
    pub elapsed: Duration,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The pid in a synwake-fn `/pid` answer.
    pub fn pid(&self) -> i32 {
        assert_eq!(self.status, 200, "GET /pid: {}", self.text());
        self.text().trim().parse().expect("pid body")
    }
}

/// GET `path` on a loopback port; panics on I/O errors.
pub fn get(port: u16, path: &str) -> Resp {
    request(loopback(port), "GET", path, &[], None)
        .unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"))
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    request_on(stream, method, path, headers, body)
}

/// One HTTP/1.1 request (`Connection: close`) on an already connected stream, which may
/// have been opened, idle, long before.
pub fn request_on(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let t0 = Instant::now();
    let addr = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(bad("connection closed in headers".into()));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| bad(format!("bad chunk size: {e}")))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length".into()))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if method != "HEAD" && status != 204 && status != 304 {
        r.read_to_end(&mut body)?;
    }
    Ok(Resp {
        status,
        headers,
        body,
        elapsed: t0.elapsed(),
    })
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// `Basic base64(user:password)`, the management API's credential.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// The API password a daemon generated into `state_dir` (`None` before it exists).
pub fn generated_password(state_dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join("api-password"))
        .ok()
        .map(|p| p.trim().to_string())
}
