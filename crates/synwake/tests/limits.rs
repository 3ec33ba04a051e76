//! Timeouts and limits of the gateway, against the real binary: upstream response timeout,
//! header limits, slowloris, idle client connections, max_connections, idle upstream pool.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Sends one keep-alive GET on `s` and reads the response head and its content-length body.
fn keepalive_get(s: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    read_response(s)
}

/// Sends one keep-alive POST of `body` on `s` and reads the response.
fn keepalive_post(s: &mut TcpStream, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    read_response(s)
}

/// Reads one response head and its content-length body from `s`.
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = text[9..12].parse().unwrap_or(0);
                return Ok((status, text[end + 4..end + 4 + len].to_string()));
            }
        }
    }
}

/// Waits for the peer to close `s`; returns how long it took, or `None` past `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t0.elapsed()),
            Err(_) => return None,
        }
    }
}

#[test]
fn function_that_never_answers_gets_504_naming_it_after_timeout() {
    let d = Daemon::start(&function("stuck", "timeout = \"300ms\""));
    assert_eq!(d.call("stuck", "/pid").status, 200);
    let r = d.call("stuck", "/sleep/5000");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("stuck"), "{}", r.text());
    assert!(r.text().contains("timeout"), "{}", r.text());
    assert!(
        r.elapsed >= Duration::from_millis(300) && r.elapsed < Duration::from_millis(3000),
        "504 after {:?}",
        r.elapsed
    );
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_function_invocations_total{function=\"stuck\",code=\"504\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn timeout_annotation_applies_to_deployed_functions() {
    let d = Daemon::start("");
    let body = format!(
        r#"{{"service":"late","envProcess":{:?},"annotations":{{"com.synwake.timeout":"250ms","com.synwake.protocol":"http1"}}}}"#,
        fn_bin().display().to_string()
    );
    let r = d.api_json("POST", "/system/functions", &body);
    assert!(r.status < 300, "{}", r.text());
    let r = d.call("late", "/sleep/3000");
    assert_eq!(r.status, 504, "{}", r.text());
    let bad = body.replace("http1", "spdy");
    let r = d.api_json("PUT", "/system/functions", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("com.synwake.protocol"), "{}", r.text());
}

#[test]
fn oversized_or_too_many_headers_get_431() {
    let d = Daemon::start(&function("f", ""));
    let big = "x".repeat(70_000);
    let r = request(
        loopback(d.shared),
        "GET",
        "/function/f/",
        &[("x-big", &big)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    let names: Vec<String> = (0..120).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let r = request(loopback(d.shared), "GET", "/function/f/", &many, None).unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    // Within the limits the same request goes through.
    let r = request(loopback(d.shared), "GET", "/function/f/", &many[..50], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // A max_headers other than hyper's own default (100) is set on hyper: 20 are too many.
    let d = Daemon::start_with("max_headers = 10", &function("f", ""));
    let r = request(loopback(d.shared), "GET", "/function/f/", &many[..20], None).unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    let r = request(loopback(d.shared), "GET", "/function/f/", &many[..5], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn slowloris_connections_are_closed_while_normal_requests_keep_their_latency() {
    let d = Daemon::start_with("header_read_timeout = \"500ms\"", &function("f", ""));
    let median = |d: &Daemon| {
        let mut t: Vec<Duration> = (0..30).map(|_| d.call("f", "/").elapsed).collect();
        t.sort();
        t[15]
    };
    assert_eq!(d.call("f", "/").status, 200);
    let before = median(&d);
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
            s.write_all(b"GET /function/f/ HT").unwrap();
            s
        })
        .collect();
    let during = median(&d);
    eprintln!("median {before:?} before, {during:?} with 200 slowloris connections");
    assert!(
        during < before * 4 + Duration::from_millis(5),
        "median {during:?} under slowloris, {before:?} before"
    );
    for s in &mut slow[..20] {
        let t = closed_within(s, Duration::from_secs(5));
        assert!(t.is_some(), "slowloris connection still open after 5 s");
    }
    // A request that completes its head in time is not cut off by the same timer.
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        keepalive_get(&mut s, "/function/f/sleep/800").unwrap().0,
        200
    );
}

#[test]
fn idle_keepalive_connection_closed_after_client_idle_timeout_busy_one_not() {
    let d = Daemon::start_with("client_idle_timeout = \"400ms\"", &function("f", ""));
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A response that takes longer than the idle timeout is not cut off.
    assert_eq!(
        keepalive_get(&mut s, "/function/f/sleep/900").unwrap(),
        (200, "slept\n".into())
    );
    assert_eq!(keepalive_get(&mut s, "/function/f/pid").unwrap().0, 200);
    let t = closed_within(&mut s, Duration::from_secs(5)).expect("idle connection stays open");
    assert!(
        t >= Duration::from_millis(300),
        "closed after {t:?}, before client_idle_timeout"
    );
}

#[test]
fn beyond_max_connections_new_connections_wait_and_are_served() {
    let d = Daemon::start_with("max_connections = 2", &function("f", ""));
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(keepalive_get(&mut s, "/function/f/pid").unwrap().0, 200);
            s
        })
        .collect();
    // The third connects (the kernel's backlog) but is not served while two are open.
    let mut third = TcpStream::connect(loopback(d.shared)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(third, "GET /function/f/pid HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut b = [0u8; 256];
    let waited = third.read(&mut b);
    assert!(waited.is_err(), "served beyond max_connections: {waited:?}");
    held.pop();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = third.read(&mut b).expect("served once a connection closed");
    assert!(
        String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&b[..n])
    );
}

/// Sockets the process holds open (its listener and its connections).
fn sockets(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn idle_pooled_upstream_connections_are_closed_after_a_bound() {
    let d = Daemon::start_with(
        "upstream_idle_timeout = \"300ms\"",
        &function("f", "idle_timeout = \"60s\""),
    );
    let pid = d.call("f", "/pid").pid();
    assert!(
        wait_until(Duration::from_secs(2), || sockets(pid) >= 2),
        "the pooled connection is not there"
    );
    assert!(
        wait_until(Duration::from_secs(5), || sockets(pid) == 1),
        "pooled connection still open: {} sockets",
        sockets(pid)
    );
    assert!(alive(pid), "the instance itself keeps running");
}

/// The upstream connection an upload used is private to its client connection; it is
/// closed after `upstream_idle_timeout` too while that client connection stays open (it
/// was only not reused after the bound, and stayed open until the client left).
#[test]
fn idle_private_upstream_connections_are_closed_after_a_bound() {
    let d = Daemon::start_with(
        "upstream_idle_timeout = \"300ms\"",
        &function("f", "idle_timeout = \"60s\""),
    );
    let pid = d.call("f", "/pid").pid();
    assert!(
        wait_until(Duration::from_secs(5), || sockets(pid) == 1),
        "the shared connection stayed open: {} sockets",
        sockets(pid)
    );
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for round in 0..2 {
        let (status, body) = keepalive_post(&mut s, "/function/f/", "upload").unwrap();
        assert_eq!((status, body.as_str()), (200, "upload"), "round {round}");
        assert!(
            wait_until(Duration::from_secs(2), || sockets(pid) >= 2),
            "round {round}: the private connection is not there"
        );
        assert!(
            wait_until(Duration::from_secs(5), || sockets(pid) == 1),
            "round {round}: private connection still open: {} sockets",
            sockets(pid)
        );
    }
    // The client connection outlived its private upstream connection and still works.
    let (status, body) = keepalive_post(&mut s, "/function/f/", "again").unwrap();
    assert_eq!((status, body.as_str()), (200, "again"));
}
