//! The forward path against the real binary, as an attacker or a careless client would
//! use it: upstream connection reuse, dot segments, echoed input, broken request bodies;
//! and async calls through the same path as sync ones.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use synwake_test_support::metrics::Metrics;

/// A function that leaves GET bodies unread parses an attacker's body as its next request;
/// the answer to that must never reach another client.
#[test]
fn body_ignoring_function_never_answers_one_client_with_anothers_bytes() {
    let d = Daemon::start(&function(
        "f",
        "env = { IGNORE_BODY = \"1\" }\nidle_timeout = \"60s\"",
    ));
    assert_eq!(d.call("f", "/pid").status, 200);
    let smuggled = b"GET /sleep/0 HTTP/1.1\r\nHost: x\r\n\r\n";
    let (victims, poisoned) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    concurrently(8, |i| {
        for _ in 0..400 {
            if Instant::now() > deadline {
                break;
            }
            if i % 2 == 0 {
                let _ = request(
                    loopback(d.shared),
                    "GET",
                    "/function/f/",
                    &[],
                    Some(smuggled),
                );
            } else {
                let r = d.call("f", "/pid");
                victims.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 || r.text().trim().parse::<i32>().is_err() {
                    poisoned.fetch_add(1, Ordering::Relaxed);
                    eprintln!("victim got {} {:?}", r.status, r.text());
                }
            }
        }
    });
    let (victims, poisoned) = (victims.into_inner(), poisoned.into_inner());
    eprintln!("{victims} victim requests, {poisoned} poisoned");
    assert!(victims >= 50, "only {victims} victim requests ran");
    assert_eq!(
        poisoned, 0,
        "{poisoned} of {victims} victims got a wrong answer"
    );
}

#[test]
fn dot_segments_are_resolved_before_routing_and_forwarding() {
    let d = Daemon::start(&function("f", ""));
    // Climbing out of /function/f/ leaves the function's prefix: no function is there.
    for path in [
        "/function/f/../../system/info",
        "/function/f/%2e%2e/%2E%2e/system/info",
        "/function/f/.%2e/x",
    ] {
        let r = get(d.shared, path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(!r.text().contains("hello from"), "{path} reached f");
        // On the API port the resolved path is routed like any other: no system call
        // answers without its own checks, and nothing reaches the function.
        let r = get(d.api, path);
        assert!(!r.text().contains("hello from"), "{path} reached f via API");
    }
    // Inside the function the resolved path is what it sees (synwake-fn echoes POSTs, so
    // ask for /pid by a detour instead).
    let r = get(d.shared, "/function/f/a/./b/../../pid");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().trim().parse::<i32>().is_ok(), "{}", r.text());
    let r = get(d.shared, "/function/x/../f/%2e/pid");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().trim().parse::<i32>().is_ok(), "{}", r.text());
}

#[test]
fn unknown_function_name_is_quoted_bounded_and_escaped() {
    let d = Daemon::start(&function("f", ""));
    let long = "a".repeat(60_000);
    let r = get(d.shared, &format!("/function/{long}/"));
    assert_eq!(r.status, 404);
    assert!(r.body.len() < 512, "404 body is {} bytes", r.body.len());
    let r = get(d.shared, &format!("/elsewhere/{long}"));
    assert_eq!(r.status, 404);
    assert!(
        r.body.len() < 512,
        "no-route body is {} bytes",
        r.body.len()
    );
    // Control characters from the request are escaped, not echoed raw.
    let r = get(d.shared, "/function/a%0d%0aX-Evil:%201/");
    assert_eq!(r.status, 404);
    assert!(!r.text().contains('\r'), "{:?}", r.text());
}

#[test]
fn malformed_chunked_body_is_the_clients_400() {
    let d = Daemon::start(&function("f", ""));
    assert_eq!(d.call("f", "/pid").status, 200);
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /function/f/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-hex\r\n\r\n",
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("request body"), "{text}");
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_function_invocations_total{function=\"f\",code=\"502\"}"
        ),
        None,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "synwake_function_invocations_total{function=\"f\",code=\"400\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        !d.log().contains("failed the request"),
        "blamed on the instance:\n{}",
        d.log()
    );
    // The instance is untouched and still answers.
    assert_eq!(d.call("f", "/pid").status, 200);
}

/// The headers a function saw, as synwake-fn's /headers lists them, sorted, without the
/// lines in `except`.
fn seen_headers(listing: &[u8], except: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(listing)
        .lines()
        .filter(|l| !except.iter().any(|e| l.starts_with(&format!("{e}:"))))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// An async call goes through the gateway's forward path: the function sees exactly the
/// headers a sync call gets (forwarded headers, hop-by-hop stripped), it is counted in the
/// same metrics, and the function's `timeout` applies to it (504, retried).
#[test]
fn async_calls_get_the_same_headers_and_metrics_as_sync_ones() {
    let mut body = function("f", "idle_timeout = \"60s\"");
    body += &function("slow", "idle_timeout = \"60s\"\ntimeout = \"300ms\"");
    body += "[async]\nmax_retries = 1\nretry_backoff = \"20ms\"\n";
    let d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &body);
    let cb = Receiver::start();
    let cb_url = format!("http://127.0.0.1:{}/done", cb.port);
    let sent: &[(&str, &str)] = &[
        ("x-test", "1"),
        ("x-forwarded-for", "203.0.113.9"),
        ("connection", "x-private"),
        ("x-private", "secret"),
        ("content-type", "text/plain"),
    ];
    let sync = request(
        loopback(d.api),
        "POST",
        "/function/f/headers",
        sent,
        Some(b"payload"),
    )
    .unwrap();
    assert_eq!(sync.status, 200, "{}", sync.text());
    let mut async_headers = sent.to_vec();
    async_headers.push(("x-callback-url", &cb_url));
    let accepted = request(
        loopback(d.api),
        "POST",
        "/async-function/f/headers",
        &async_headers,
        Some(b"payload"),
    )
    .unwrap();
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let slow = request(
        loopback(d.api),
        "POST",
        "/async-function/slow/sleep/3000",
        &[("x-callback-url", &cb_url)],
        Some(b"x"),
    )
    .unwrap();
    assert_eq!(slow.status, 202, "{}", slow.text());
    let got = cb.wait(2, Duration::from_secs(30));
    assert_eq!(got.len(), 2, "callbacks: {got:?}");
    let call_id = |r: &Resp| r.header("x-call-id").unwrap().to_string();
    let of = |id: &str| {
        got.iter()
            .find(|r| r.header("x-call-id") == Some(id))
            .unwrap_or_else(|| panic!("no callback for {id}: {got:?}"))
    };
    let f = of(&call_id(&accepted));
    assert_eq!(f.header("x-function-status"), Some("200"));
    let sync_seen = seen_headers(&sync.body, &[]);
    assert!(
        sync_seen.contains(&"x-forwarded-for: 203.0.113.9, 127.0.0.1".to_string())
            && sync_seen
                .iter()
                .any(|l| l.starts_with("forwarded: for=127.0.0.1;proto=http"))
            && !sync_seen.iter().any(|l| l.starts_with("x-private:")),
        "sync call: {sync_seen:?}"
    );
    assert_eq!(
        seen_headers(&f.body, &["x-call-id"]),
        sync_seen,
        "the async call reached the function with other headers than the sync one"
    );
    // The function's timeout bounds every attempt: 504, retried once, then the callback.
    let s = of(&call_id(&slow));
    assert_eq!(
        s.header("x-function-status"),
        Some("504"),
        "{}",
        String::from_utf8_lossy(&s.body)
    );
    let m = Metrics(d.metrics());
    assert_eq!(
        m.get("synwake_function_invocations_total{function=\"f\",code=\"200\"}"),
        2.0
    );
    assert_eq!(
        m.get("synwake_function_request_duration_seconds_count{function=\"f\"}"),
        2.0
    );
    assert_eq!(
        m.get("synwake_function_invocations_total{function=\"slow\",code=\"504\"}"),
        2.0
    );
}

/// Sends one keep-alive request on `s` and reads the response (content-length framed).
fn exchange(s: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(&[head.as_bytes(), body].concat()).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 8192];
    loop {
        let n = s.read(&mut b).unwrap();
        assert!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&b[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let status = head[9..12].parse().unwrap_or(0);
            return (status, buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

fn accepted_connections(s: &mut TcpStream) -> u64 {
    let (status, body) = exchange(s, "GET", "/function/f/connections", b"");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body).trim().parse().unwrap()
}

/// Requests with a body go on an upstream connection private to their client connection,
/// which stays open for that client's next requests (it used to be closed after each).
#[test]
fn requests_with_a_body_keep_their_upstream_connection() {
    let d = Daemon::start(&function("f", "idle_timeout = \"60s\""));
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let before = accepted_connections(&mut s);
    for i in 0..20 {
        let body = format!("upload {i} {}", "x".repeat(1000));
        let (status, echoed) = exchange(&mut s, "POST", "/function/f/", body.as_bytes());
        assert_eq!(status, 200);
        assert_eq!(echoed, body.as_bytes(), "request {i} got another answer");
    }
    let after = accepted_connections(&mut s);
    assert!(
        after <= before + 2,
        "20 uploads on one client connection opened {} upstream connections",
        after - before
    );
}

/// The same attack as above from ONE keep-alive client connection: the unread bodies stay
/// on that client's private upstream connection, so other clients never see their answers.
#[test]
fn body_smuggled_on_a_kept_connection_reaches_only_its_sender() {
    let d = Daemon::start(&function(
        "f",
        "env = { IGNORE_BODY = \"1\" }\nidle_timeout = \"60s\"",
    ));
    assert_eq!(d.call("f", "/pid").status, 200);
    let smuggled = b"GET /sleep/0 HTTP/1.1\r\nHost: x\r\n\r\n";
    let (victims, poisoned) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    concurrently(8, |i| {
        if i % 2 == 0 {
            let Ok(mut s) = TcpStream::connect(loopback(d.shared)) else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            for _ in 0..400 {
                if Instant::now() > deadline {
                    break;
                }
                // The answers to the smuggled requests may come back here: the sender's own.
                let head = format!(
                    "GET /function/f/ HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                    smuggled.len()
                );
                if s.write_all(&[head.as_bytes(), smuggled].concat()).is_err() {
                    break;
                }
                let mut b = [0u8; 4096];
                if !matches!(s.read(&mut b), Ok(n) if n > 0) {
                    break;
                }
            }
        } else {
            for _ in 0..400 {
                if Instant::now() > deadline {
                    break;
                }
                let r = d.call("f", "/pid");
                victims.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 || r.text().trim().parse::<i32>().is_err() {
                    poisoned.fetch_add(1, Ordering::Relaxed);
                    eprintln!("victim got {} {:?}", r.status, r.text());
                }
            }
        }
    });
    let (victims, poisoned) = (victims.into_inner(), poisoned.into_inner());
    eprintln!("{victims} victim requests, {poisoned} poisoned");
    assert!(victims >= 50, "only {victims} victim requests ran");
    assert_eq!(
        poisoned, 0,
        "{poisoned} of {victims} victims got a wrong answer"
    );
}

/// A response framed two ways (Content-Length and Transfer-Encoding), with a bad or two
/// different lengths, or with a head over the bound, is refused with a 502 naming the
/// function and the reason, and the connection it came on is never used again.
#[test]
fn hostile_upstream_responses_get_502_and_their_connection_is_dropped() {
    let d = Daemon::start(&function("f", "idle_timeout = \"60s\""));
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (kind, reason) in [
        ("cl-te", "both Content-Length and Transfer-Encoding"),
        ("bad-length", "bad Content-Length"),
        ("two-lengths", "conflicting Content-Length"),
        ("big-head", "larger than 65536 bytes"),
    ] {
        // The one pooled upstream connection, then the bad answer on it.
        let before = accepted_connections(&mut s);
        let (status, body) = exchange(&mut s, "GET", &format!("/function/f/bad/{kind}"), b"");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{kind}: {body}");
        assert!(
            body.contains("function f") && body.contains(reason),
            "{kind}: {body}"
        );
        let after = accepted_connections(&mut s);
        assert_eq!(
            after,
            before + 1,
            "{kind}: the connection that carried it was used again"
        );
    }
}

/// A chunked response streams through decoded (extension and trailer dropped for an
/// HTTP/1.1 client that did not ask for trailers); a chunk-size line past the bound cuts
/// the response off instead of buffering it.
#[test]
fn chunked_responses_stream_and_an_endless_chunk_line_is_cut() {
    let d = Daemon::start(&function("f", "idle_timeout = \"60s\""));
    let r = d.call("f", "/bad/chunked");
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    let cut = request(
        loopback(d.shared),
        "GET",
        "/function/f/bad/chunk-line",
        &[],
        None,
    );
    assert!(
        cut.is_err(),
        "the endless chunk-size line came through: {:?}",
        cut.map(|r| r.body.len())
    );
    // The function itself is fine; the next request gets a new connection.
    assert_eq!(d.call("f", "/pid").status, 200);
}

/// A pooled connection the function closed while it was idle is not used: the next
/// request goes on a new connection and succeeds.
#[test]
fn a_pooled_connection_the_function_closed_is_not_used() {
    let d = Daemon::start(&function("f", "idle_timeout = \"60s\""));
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for round in 0..3 {
        let before = accepted_connections(&mut s);
        let (status, body) = exchange(&mut s, "GET", "/function/f/bad/close", b"");
        assert_eq!((status, body.as_slice()), (200, &b"closing\n"[..]));
        // Its FIN reaches synwake while the connection sits in the pool.
        std::thread::sleep(Duration::from_millis(200));
        let after = accepted_connections(&mut s);
        assert_eq!(after, before + 1, "round {round}");
    }
}

/// A function that answers an upload without reading it: the answer reaches the client
/// while the upload is still going (our client keeps writing the body as the response
/// comes in), not a 504 after the function's timeout.
#[test]
fn an_answer_before_the_upload_was_read_reaches_the_client() {
    let d = Daemon::start(&function(
        "f",
        "env = { IGNORE_BODY = \"1\" }\ntimeout = \"20s\"\nidle_timeout = \"60s\"",
    ));
    assert_eq!(d.call("f", "/pid").status, 200);
    // Larger than loopback's socket buffers together, so the upload cannot just sit in them.
    let size = 32 << 20;
    let mut s = TcpStream::connect(loopback(d.shared)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let head = format!("GET /function/f/ HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..(size / chunk.len()) {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("hello from f") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("hello from f"),
        "no answer within {:?}: {text:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    drop(s);
    let _ = writer.join();
}

/// A function that closes (FIN) or resets a kept connection just as synwake sends the next
/// request on it (its own idle close racing synwake's reuse): a request that is safe to send
/// again (idempotent method, no body) goes once more on a new connection and gets its
/// answer, counted in `synwake_upstream_resends_total`; a POST is never sent twice and gets
/// a 502 naming the function.
#[test]
fn a_kept_connection_closed_under_a_request_resends_only_idempotent_ones() {
    let d = Daemon::start(&format!(
        "{}{}",
        function("f", "idle_timeout = \"60s\""),
        function("g", "")
    ));
    let resends_of = |name: &str| {
        Metrics(d.metrics()).get(&format!(
            "synwake_upstream_resends_total{{function=\"{name}\"}}"
        )) as u64
    };
    let resends = || resends_of("f");
    let fresh = || {
        let s = TcpStream::connect(loopback(d.shared)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut expected = 0;
    for kind in ["drop-next", "reset-next"] {
        for method in ["GET", "DELETE", "PUT"] {
            let mut s = fresh();
            let before = accepted_connections(&mut s);
            // The newest shared connection answers this, then dies under the next request.
            let (status, body) = exchange(&mut s, "GET", &format!("/function/f/bad/{kind}"), b"");
            assert_eq!((status, body.as_slice()), (200, &b"kept\n"[..]), "{kind}");
            let (status, body) = exchange(&mut s, method, "/function/f/connections", b"");
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "{kind} {method}: {body}");
            expected += 1;
            assert_eq!(resends(), expected, "{kind} {method}: not counted once");
            if method != "PUT" {
                // PUT echoes its (empty) body; the others name the connection they came on.
                assert_eq!(
                    body.trim().parse::<u64>().unwrap(),
                    before + 1,
                    "{kind} {method}: not answered on a new connection"
                );
            }
        }
        // A body-less POST on the shared list, and an upload on the client connection's
        // private one: both may have had effects, so neither is sent again.
        let mut s = fresh();
        exchange(&mut s, "GET", &format!("/function/f/bad/{kind}"), b"");
        let (status, body) = exchange(&mut s, "POST", "/function/f/connections", b"");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{kind} body-less POST: {body}");
        assert!(body.contains("function f"), "{kind}: {body}");
        let mut s = fresh();
        let (status, _) = exchange(&mut s, "POST", &format!("/function/f/bad/{kind}"), b"up");
        assert_eq!(status, 200, "{kind} upload");
        let (status, body) = exchange(&mut s, "POST", "/function/f/", b"again");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{kind} upload: {body}");
        assert!(body.contains("function f"), "{kind}: {body}");
        assert_eq!(resends(), expected, "{kind}: a POST was sent again");
    }
    // A new connection's failure is never resent: g's first request (on a connection
    // made for it) crashes its instance.
    let (status, body) = exchange(&mut fresh(), "GET", "/function/g/crash", b"");
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(resends_of("g"), 0, "a new connection's failure was resent");
}
