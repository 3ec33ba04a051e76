//! The gateway's own HTTP/1.1 server side, against the real binary: what a client sees on
//! the wire (HEAD, HTTP/1.0, keep-alive off, chunked responses, 400), and the hand-off to
//! hyper's server in the middle of a connection with pipelined requests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(loopback(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// One response read from `s`: its head (lower-case field names) and its body, framed by
/// content-length or chunked (`no_body`: a HEAD's answer).
struct Answer {
    status_line: String,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn field(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn read_answer(s: &mut TcpStream, pending: &mut Vec<u8>, no_body: bool) -> Answer {
    let mut b = [0u8; 8192];
    let end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "closed before a response head");
        pending.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..end]).into_owned();
    pending.drain(..end + 4);
    let (status_line, head) = head.split_once("\r\n").unwrap_or((&head, ""));
    let mut a = Answer {
        status_line: status_line.to_string(),
        head: head.to_string(),
        body: Vec::new(),
    };
    let mut fill = |pending: &mut Vec<u8>, want: usize| {
        while pending.len() < want {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "closed inside a body");
            pending.extend_from_slice(&b[..n]);
        }
    };
    if no_body {
        return a;
    }
    if a.field("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                let want = pending.len() + 1;
                fill(pending, want);
            };
            let size = std::str::from_utf8(&pending[..line_end]).unwrap();
            let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
            pending.drain(..line_end + 2);
            if size == 0 {
                // No trailers are sent to a client that did not ask for them.
                fill(pending, 2);
                assert_eq!(&pending[..2], b"\r\n", "trailers sent unasked");
                pending.drain(..2);
                return a;
            }
            fill(pending, size + 2);
            a.body.extend_from_slice(&pending[..size]);
            pending.drain(..size + 2);
        }
    }
    let len: usize = a
        .field("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    fill(pending, len);
    a.body = pending.drain(..len).collect();
    a
}

/// Whether the server closes `s` with nothing more to read.
fn closed(s: &mut TcpStream, pending: &[u8]) -> bool {
    if !pending.is_empty() {
        return false;
    }
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

#[test]
fn pipelined_requests_keep_their_order_across_the_hand_off_to_hyper() {
    let d = Daemon::start(&function("f", ""));
    let mut s = connect(d.shared);
    // Ours, then a chunked upload (hyper's from then on), then two more, in one write.
    let all = concat!(
        "GET /function/f/pid HTTP/1.1\r\nhost: x\r\n\r\n",
        "POST /function/f/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "POST /function/f/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
        "GET /function/f/headers HTTP/1.1\r\nhost: x\r\nx-last: 1\r\n\r\n",
    );
    s.write_all(all.as_bytes()).unwrap();
    let mut pending = Vec::new();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.status_line, "HTTP/1.1 200 OK");
    let pid: i32 = a.text().trim().parse().unwrap();
    assert!(pid > 0, "{}", a.text());
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.text(), "hello world");
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.text(), "abc");
    let a = read_answer(&mut s, &mut pending, false);
    assert!(a.text().contains("x-last: 1"), "{}", a.text());
    // Still kept alive after the hand-off.
    s.write_all(b"GET /function/f/pid HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.text().trim().parse::<i32>().unwrap(), pid);
}

#[test]
fn bad_heads_get_400_and_big_ones_431_after_served_requests() {
    let d = Daemon::start(&function("f", ""));
    let mut s = connect(d.shared);
    let mut pending = Vec::new();
    s.write_all(b"GET /function/f/ HTTP/1.1\r\nhost: x\r\n\r\nGET /function/f/ HTTP/1.1\r\nbad header\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_answer(&mut s, &mut pending, false).status_line,
        "HTTP/1.1 200 OK"
    );
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.status_line, "HTTP/1.1 400 Bad Request");
    assert!(closed(&mut s, &pending), "closed after a malformed head");

    let mut s = connect(d.shared);
    pending.clear();
    s.write_all(b"GET /function/f/ HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_answer(&mut s, &mut pending, false).status_line,
        "HTTP/1.1 200 OK"
    );
    let big = format!(
        "GET /function/f/ HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    s.write_all(big.as_bytes()).unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(
        a.status_line,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}

#[test]
fn head_http10_and_connection_close_are_answered_as_hyper_answers_them() {
    let d = Daemon::start(&function("f", ""));
    let mut s = connect(d.shared);
    let mut pending = Vec::new();
    // HEAD: the length of the GET's body, no body; the next answer follows at once.
    // (/bad/close: synwake-fn sends a body even to HEAD, then closes its connection.)
    s.write_all(b"HEAD /function/f/bad/close HTTP/1.1\r\nhost: x\r\n\r\nGET /function/f/ HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let a = read_answer(&mut s, &mut pending, true);
    assert_eq!(a.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        a.field("content-length").as_deref(),
        Some("8"),
        "{}",
        a.head
    );
    assert!(a.field("x-synwake-cold-start").is_some(), "{}", a.head);
    assert!(a.field("date").is_some(), "{}", a.head);
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.text(), "hello from f\n");
    assert_eq!(a.field("x-synwake-cold-start").as_deref(), Some("false"));

    // HTTP/1.0 without keep-alive: answered in 1.0, then closed.
    let mut s = connect(d.shared);
    pending.clear();
    s.write_all(b"GET /function/f/ HTTP/1.0\r\n\r\n").unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.status_line, "HTTP/1.0 200 OK");
    assert_eq!(a.field("connection"), None, "{}", a.head);
    assert!(closed(&mut s, &pending));
    // HTTP/1.0 with keep-alive: said so, and kept.
    let mut s = connect(d.shared);
    s.write_all(b"GET /function/f/ HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.field("connection").as_deref(), Some("keep-alive"));
    s.write_all(b"GET /function/f/ HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_answer(&mut s, &mut pending, false).text(),
        "hello from f\n"
    );
    // HTTP/1.1 asking to close: `connection: close`, then closed.
    let mut s = connect(d.shared);
    s.write_all(b"GET /function/f/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.field("connection").as_deref(), Some("close"));
    assert!(closed(&mut s, &pending));
}

#[test]
fn a_chunked_response_is_passed_on_chunked_without_its_trailer() {
    let d = Daemon::start(&function("f", ""));
    let mut s = connect(d.shared);
    let mut pending = Vec::new();
    s.write_all(b"GET /function/f/bad/chunked HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.status_line, "HTTP/1.1 200 OK");
    assert_eq!(a.field("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(a.field("content-length"), None);
    assert_eq!(a.text(), "hello world");
    // A body bigger than one chunk of the copy limit, kept alive after.
    let body = "z".repeat(40_000);
    write!(
        s,
        "POST /function/f/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let a = read_answer(&mut s, &mut pending, false);
    assert_eq!(a.text(), body);
}
