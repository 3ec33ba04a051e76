//! The forward path against the real binary, as an attacker or a careless client would
//! use it: upstream connection reuse, dot segments, echoed input, broken request bodies.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

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
