//! Every error status of the gateway, from the real binary: each body names the function
//! and the cause.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn unknown_function_is_404_naming_it() {
    let d = Daemon::start(&function("f", ""));
    let r = d.call("no-such-fn", "/x");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no-such-fn"), "{}", r.text());
    // Outside /function/ on the shared port there is no route either.
    let r = get(d.shared, "/elsewhere");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("/function/<name>/"), "{}", r.text());
}

#[test]
fn exit_at_start_is_502_with_status_and_stderr() {
    let d = Daemon::start(&function("dies", "env = { EXIT_AT_START = \"7\" }"));
    let r = d.call("dies", "/");
    let body = r.text();
    assert_eq!(r.status, 502, "{body}");
    assert!(body.contains("dies"), "names the function: {body}");
    assert!(body.contains("exit status 7"), "{body}");
    assert!(
        body.contains("synwake-fn: exiting at start as asked (EXIT_AT_START=7)"),
        "carries the function's stderr: {body}"
    );
    assert!(d.instance_pids().is_empty());
    // The next request tries again (and fails the same way), it does not hang.
    let again = d.call("dies", "/");
    assert_eq!(again.status, 502, "{}", again.text());
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_function_invocations_total{function=\"dies\",code=\"502\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn start_timeout_is_504() {
    let d = Daemon::start(&function(
        "slow",
        "env = { INIT_MS = \"3000\" }\nstart_timeout = \"300ms\"\nstop_grace = \"1s\"",
    ));
    let r = d.call("slow", "/");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("slow"), "{}", r.text());
    assert!(r.text().contains("start_timeout"), "{}", r.text());
    assert!(
        r.elapsed >= Duration::from_millis(300) && r.elapsed < Duration::from_millis(2000),
        "504 after {:?}, start_timeout is 300 ms",
        r.elapsed
    );
    // The instance that was too slow does not stay behind.
    assert!(
        wait_until(Duration::from_secs(3), || d.instance_pids().is_empty()),
        "pid files: {:?}",
        d.instance_pids()
    );
}

#[test]
fn over_max_pending_is_503_with_retry_after() {
    let d = Daemon::start(&function(
        "busy",
        "env = { INIT_MS = \"1000\" }\nmax_pending = 2",
    ));
    let answers = concurrently(5, |_| d.call("busy", "/"));
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        (ok, refused.len()),
        (2, 3),
        "statuses: {:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in refused {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.text().contains("busy"), "{}", r.text());
        assert!(r.text().contains("max_pending"), "{}", r.text());
        assert!(
            r.elapsed < Duration::from_millis(900),
            "refused only after {:?}; refusal should not wait for the start",
            r.elapsed
        );
    }
}

#[test]
fn crash_mid_request_is_502_and_next_request_gets_a_new_instance() {
    let d = Daemon::start(&function("crashy", ""));
    let mut pid = d.call("crashy", "/pid").pid();
    // Several rounds: the request right after a crash races the daemon noticing the exit.
    for round in 0..5 {
        let r = d.call("crashy", "/crash");
        assert_eq!(r.status, 502, "round {round}: {}", r.text());
        assert!(r.text().contains("crashy"), "{}", r.text());
        let next = d.call("crashy", "/pid");
        assert_eq!(
            next.status,
            200,
            "round {round}: request right after the crash: {}",
            next.text()
        );
        let fresh = next.pid();
        assert_ne!(
            pid, fresh,
            "round {round}: answered by the crashed instance"
        );
        assert!(!alive(pid));
        assert_eq!(next.header("x-synwake-cold-start"), Some("true"));
        pid = fresh;
    }
}
