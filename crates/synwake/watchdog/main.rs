//! synwake's built-in watchdog for `watchdog = "stdio"` functions (OpenFaaS "classic"
//! mode): an HTTP/1.1 server that runs the function's command once per request, the request
//! body on its stdin, its stdout as the response, the request's headers as `Http_*`
//! environment variables; a non-zero exit answers 500 with the command's stderr.
//!
//! Built by build.rs as a static, std-only binary, so it also runs inside images without a
//! libc (it is bind-mounted into containers read-only).
//!
//! Usage: `synwake-watchdog --listen ADDR -- COMMAND [ARGS...]`

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Request heads larger than this are refused (431).
const MAX_HEAD: usize = 64 << 10;
/// Request bodies larger than this are refused (413).
const MAX_BODY: u64 = 64 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, command) = match parse_args(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("synwake-watchdog: {e}");
            eprintln!("usage: synwake-watchdog --listen ADDR -- COMMAND [ARGS...]");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("synwake-watchdog: listening on {listen}: {e}");
            std::process::exit(1);
        }
    };
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let command = command.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &command);
        });
    }
}

fn parse_args(args: &[String]) -> Result<(String, Vec<String>), String> {
    let mut listen = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--listen" => {
                listen = args.get(i + 1).cloned();
                i += 2;
            }
            "--" => {
                let command = args[i + 1..].to_vec();
                if command.is_empty() {
                    return Err("no command after --".into());
                }
                return Ok((listen.ok_or("--listen is required")?, command));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Err("no -- COMMAND".into())
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    close: bool,
}

/// One connection: requests until the client closes or asks to.
fn serve(conn: TcpStream, command: &[String]) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let req = match read_head(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                let status = if e.kind() == io::ErrorKind::OutOfMemory {
                    "431 Request Header Fields Too Large"
                } else {
                    "400 Bad Request"
                };
                respond(&mut out, status, "text/plain", e.to_string().as_bytes(), true)?;
                return Ok(());
            }
        };
        let body = match read_body(&mut reader, &req) {
            Ok(b) => b,
            Err(e) => {
                let status = if e.kind() == io::ErrorKind::FileTooLarge {
                    "413 Content Too Large"
                } else {
                    "400 Bad Request"
                };
                respond(&mut out, status, "text/plain", e.to_string().as_bytes(), true)?;
                return Ok(());
            }
        };
        let path = req.target.split('?').next().unwrap_or("/");
        if path == "/_/health" {
            respond(&mut out, "200 OK", "text/plain", b"OK", req.close)?;
        } else {
            let (status, ctype, bytes) = run(command, &req, body);
            respond(&mut out, status, &ctype, &bytes, req.close)?;
        }
        if req.close {
            return Ok(());
        }
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request head cut short"));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "request head too large"));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // stray CRLF between requests
            }
            break;
        }
        lines.push(line);
    }
    let mut first = lines[0].split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request line"));
    };
    let mut headers = Vec::new();
    for l in &lines[1..] {
        let Some((k, v)) = l.split_once(':') else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad header line"));
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let conn_hdr = header(&headers, "connection").map(|v| v.to_ascii_lowercase());
    let close = conn_hdr.as_deref() == Some("close")
        || (version == "HTTP/1.0" && conn_hdr.as_deref() != Some("keep-alive"));
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        close,
    }))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::FileTooLarge, "request body too large")
}

fn read_body(r: &mut BufReader<TcpStream>, req: &Request) -> io::Result<Vec<u8>> {
    let chunked = header(&req.headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            r.read_line(&mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size_hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            if body.len() as u64 + size > MAX_BODY {
                return Err(too_large());
            }
            r.by_ref().take(size).read_to_end(&mut body)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = header(&req.headers, "content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        if len > MAX_BODY {
            return Err(too_large());
        }
        r.by_ref().take(len).read_to_end(&mut body)?;
        if (body.len() as u64) < len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body cut short"));
        }
    }
    Ok(body)
}

/// `content-type` -> `Http_Content_Type`, as OpenFaaS's classic watchdog names them.
fn env_name(header: &str) -> String {
    let words: Vec<String> = header
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect();
    format!("Http_{}", words.join("_"))
}

/// Runs the command for one request: (status line, content type, body).
fn run(command: &[String], req: &Request, body: Vec<u8>) -> (&'static str, String, Vec<u8>) {
    let (path, query) = match req.target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (req.target.as_str(), ""),
    };
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("Http_Method", &req.method)
        .env("Http_Path", path)
        .env("Http_Query", query)
        .env("Http_ContentLength", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &req.headers {
        let name = env_name(k);
        // Only names a shell can read; the method, path and query are set above.
        if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !matches!(name.as_str(), "Http_Method" | "Http_Path" | "Http_Query")
        {
            cmd.env(name, v);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("synwake-watchdog: starting {:?}: {e}", command[0]);
            return (
                "500 Internal Server Error",
                "text/plain".into(),
                format!("cannot start {:?}: {e}\n", command[0]).into_bytes(),
            );
        }
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Written from a thread: a command that prints before reading all of stdin must not
    // deadlock against us.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let output = child.wait_with_output();
    let _ = writer.join();
    let ctype = std::env::var("content_type").unwrap_or_else(|_| "text/plain; charset=utf-8".into());
    match output {
        Ok(o) if o.status.success() => {
            if !o.stderr.is_empty() {
                let _ = io::stderr().write_all(&o.stderr);
            }
            ("200 OK", ctype, o.stdout)
        }
        Ok(o) => {
            let mut msg = o.stderr;
            if msg.is_empty() {
                msg = format!("{:?} exited with {}\n", command[0], o.status).into_bytes();
            }
            let _ = io::stderr().write_all(&msg);
            ("500 Internal Server Error", "text/plain; charset=utf-8".into(), msg)
        }
        Err(e) => (
            "500 Internal Server Error",
            "text/plain".into(),
            format!("waiting for {:?}: {e}\n", command[0]).into_bytes(),
        ),
    }
}

fn respond(out: &mut TcpStream, status: &str, ctype: &str, body: &[u8], close: bool) -> io::Result<()> {
    out.set_write_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}
