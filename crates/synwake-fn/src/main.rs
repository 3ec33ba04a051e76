//! `synwake-fn`: a dependency-free HTTP/1.1 function used by synwake's tests and benchmark.
//!
//! Environment:
//! - `PORT` (required unless `LISTEN_ADDR` is set): listen on 127.0.0.1:$PORT.
//! - `LISTEN_ADDR`: full socket address to listen on instead.
//! - `INIT_MS`: sleep this long before listening (a function with a known start time).
//! - `EXIT_AT_START`: exit with this status before listening (a function that fails to start).
//! - `IGNORE_BODY`: leave the bodies of GET requests unread, as careless functions do (the
//!   next request is then parsed from the body's bytes).
//! - `CALL_LOG`: append each request's `X-Call-Id` (or `-`) as one line to this file.
//! - `FAIL_FIRST`: answer the first N requests of this process with 502.
//!
//! Requests:
//! - `POST` anything: echoes the body back.
//! - `GET /crash`: the process exits mid-request (the client sees a closed connection).
//! - `GET /sleep/<ms>`: answers after `<ms>` milliseconds.
//! - `GET /pid`: answers with the process id.
//! - `GET /connections`: answers with the number of connections this process accepted.
//! - `GET /headers`: answers with the request headers it got, one `name: value` a line.
//! - `GET /ids`: the process's `Uid:`, `Gid:` and `Groups:` lines from /proc/self/status.
//! - `GET /bad/<kind>`: a hostile or unusual response, for the proxy's defences (see
//!   `bad_response`); `GET /bad/close` answers normally, then closes the connection;
//!   `/bad/drop-next` (any method) answers with keep-alive, then reads the next request's
//!   head on that connection and closes it unanswered, `/bad/reset-next` resets it as soon
//!   as the next request arrives (a function's idle close racing a reused connection).
//! - anything else: `hello from <SYNWAKE_FUNCTION>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Requests served by this process (for `FAIL_FIRST`).
static SERVED: AtomicU64 = AtomicU64::new(0);
/// Connections accepted by this process (for `GET /connections`).
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

fn main() {
    if let Ok(code) = std::env::var("EXIT_AT_START") {
        eprintln!("synwake-fn: exiting at start as asked (EXIT_AT_START={code})");
        std::process::exit(code.parse().unwrap_or(1));
    }
    let init_ms: u64 = std::env::var("INIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if init_ms > 0 {
        std::thread::sleep(Duration::from_millis(init_ms));
    }
    let addr = match (std::env::var("LISTEN_ADDR"), std::env::var("PORT")) {
        (Ok(a), _) => a,
        (_, Ok(p)) => format!("127.0.0.1:{p}"),
        _ => {
            eprintln!("synwake-fn: set PORT or LISTEN_ADDR");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("synwake-fn: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("synwake-fn: listening on {addr} after {init_ms} ms init");
    for stream in listener.incoming().flatten() {
        ACCEPTED.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            let _ = serve(stream);
        });
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let name = std::env::var("SYNWAKE_FUNCTION").unwrap_or_else(|_| "synwake-fn".into());
    let ignore_body = std::env::var_os("IGNORE_BODY").is_some();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut content_length = 0usize;
        let mut call_id = String::from("-");
        let mut chunked = false;
        let mut close = false;
        let mut seen = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                seen.push_str(&format!("{k}: {v}\n"));
                match k.as_str() {
                    "content-length" => content_length = v.parse().unwrap_or(0),
                    "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                    "connection" => close = v.eq_ignore_ascii_case("close"),
                    "x-call-id" => call_id = v.to_string(),
                    _ => {}
                }
            }
        }
        let body = if ignore_body && method == "GET" {
            Vec::new()
        } else if chunked {
            read_chunked(&mut reader)?
        } else {
            let mut b = vec![0; content_length];
            reader.read_exact(&mut b)?;
            b
        };
        if let Ok(log) = std::env::var("CALL_LOG") {
            // One write of one short line with O_APPEND: lines of parallel requests do not mix.
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = f.write_all(format!("{call_id}\n").as_bytes());
            }
        }
        let fail_first: u64 = std::env::var("FAIL_FIRST")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if SERVED.fetch_add(1, Ordering::SeqCst) < fail_first {
            out.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 5\r\n\r\nfail\n")?;
            continue;
        }
        if let Some(kind) = path.strip_prefix("/bad/") {
            out.write_all(&bad_response(kind))?;
            match kind {
                "close" => return Ok(()),
                "drop-next" => {
                    // The next head is read, then the connection closes unanswered (FIN).
                    let mut h = String::new();
                    while reader.read_line(&mut h)? > 0 && h != "\r\n" && h != "\n" {
                        h.clear();
                    }
                    return Ok(());
                }
                "reset-next" => {
                    // Closing with the next request unread makes the kernel send a RST.
                    out.peek(&mut [0u8; 1])?;
                    return Ok(());
                }
                _ => continue,
            }
        }
        // /sleep/ and /headers answer any method (async calls are POSTs); other POSTs echo.
        let resp: Vec<u8> = if let Some(ms) = path.strip_prefix("/sleep/") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            b"slept\n".to_vec()
        } else if path == "/headers" {
            seen.into_bytes()
        } else if method == "POST" || method == "PUT" {
            body
        } else if path == "/crash" {
            eprintln!("synwake-fn: crashing on request as asked");
            std::process::exit(3);
        } else if path == "/pid" {
            format!("{}\n", std::process::id()).into_bytes()
        } else if path == "/connections" {
            format!("{}\n", ACCEPTED.load(Ordering::SeqCst)).into_bytes()
        } else if path == "/ids" {
            std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:")
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>()
                .into_bytes()
        } else {
            format!("hello from {name}\n").into_bytes()
        };
        // Head and body in one write (one syscall, one segment on a NODELAY socket).
        let mut msg = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n{}\r\n",
            resp.len(),
            if close { "connection: close\r\n" } else { "" }
        )
        .into_bytes();
        msg.extend_from_slice(&resp);
        out.write_all(&msg)?;
        if close {
            return Ok(());
        }
    }
}

/// Responses a careless or hostile function may send.
fn bad_response(kind: &str) -> Vec<u8> {
    let ok = "HTTP/1.1 200 OK\r\n";
    match kind {
        // Framed two ways at once (request smuggling on a shared connection).
        "cl-te" => format!(
            "{ok}content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .into_bytes(),
        "bad-length" => format!("{ok}content-length: -1\r\n\r\n").into_bytes(),
        "two-lengths" => {
            format!("{ok}content-length: 2\r\ncontent-length: 3\r\n\r\nabc").into_bytes()
        }
        // A head of 70 KiB.
        "big-head" => format!(
            "{ok}x-big: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(70 << 10)
        )
        .into_bytes(),
        // A valid chunked body with an extension and a trailer: "hello world".
        "chunked" => format!(
            "{ok}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n"
        )
        .into_bytes(),
        // A chunk-size line that never ends.
        "chunk-line" => format!(
            "{ok}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n{}",
            "f".repeat(10 << 10)
        )
        .into_bytes(),
        // Answered, then the connection closes (a function's own idle timeout).
        "close" => format!("{ok}content-length: 8\r\n\r\nclosing\n").into_bytes(),
        // Kept alive, and the next request on this connection is never answered.
        "drop-next" | "reset-next" => format!("{ok}content-length: 5\r\n\r\nkept\n").into_bytes(),
        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nbad\n".to_vec(),
    }
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}
