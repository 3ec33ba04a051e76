//! The durable async queue against the real binary: every call answered 202 runs after a
//! kill -9 and restart (counted at the function), the bounds answer 429 with Retry-After,
//! 502s are retried and the callback gets the final status, and `X-Call-Id` reaches the
//! function.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use synwake_test_support::metrics::Metrics;
use synwake_test_support::*;

/// A `[[function]]` running synwake-fn with extra environment.
fn function_env(name: &str, env: &[(&str, String)], extra: &str) -> String {
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    function(name, &format!("env = {{ {} }}\n{extra}", env.join(", ")))
}

fn post_async(d: &Daemon, name: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    request(
        loopback(d.api),
        "POST",
        &format!("/async-function/{name}"),
        headers,
        Some(body),
    )
    .unwrap_or_else(|e| panic!("POST /async-function/{name}: {e}"))
}

/// Call ids the function logged, one line per request it received.
fn logged(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A directory the function (run as the unprivileged default user) can write its call
/// log into.
fn call_log_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

#[test]
fn accepted_calls_run_after_kill_9_and_restart() {
    let dir = call_log_dir();
    let log = dir.path().join("calls.txt");
    // A slow start keeps every call queued when synwake is killed.
    let mut d = Daemon::start(&function_env(
        "slow",
        &[
            ("INIT_MS", "4000".into()),
            ("CALL_LOG", log.display().to_string()),
        ],
        "",
    ));
    let body = random_bytes(1024, 7);
    let ids: Vec<String> = concurrently(8, |w| {
        (0..25)
            .map(|i| {
                let r = post_async(&d, "slow", &[("x-test", &format!("{w}-{i}"))], &body);
                assert_eq!(r.status, 202, "{}", r.text());
                r.header("x-call-id").expect("X-Call-Id").to_string()
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let accepted: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(accepted.len(), 200, "call ids are unique");
    let before = logged(&log).len();
    assert!(d
        .stop_with(libc::SIGKILL, Duration::from_secs(10))
        .is_some());
    assert!(
        before < 200,
        "all calls ran before the kill ({before}); the test proves nothing"
    );

    d.spawn();
    let all_ran = wait_until(Duration::from_secs(90), || {
        let seen: BTreeSet<String> = logged(&log).into_iter().collect();
        accepted.is_subset(&seen)
    });
    let seen: BTreeSet<String> = logged(&log).into_iter().collect();
    let missing: Vec<&String> = accepted.difference(&seen).collect();
    assert!(
        all_ran,
        "{} of 200 accepted calls never ran: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // Finished calls leave the queue: nothing is queued, the oldest age is 0.
    assert!(wait_until(Duration::from_secs(10), || {
        let m = Metrics(d.metrics());
        m.get("synwake_async_queued{function=\"slow\"}") == 0.0
            && m.get("synwake_async_oldest_age_seconds") == 0.0
    }));
    // And a restart after that runs none of them again.
    let ran = logged(&log).len();
    assert!(d
        .stop_with(libc::SIGTERM, Duration::from_secs(10))
        .is_some());
    d.spawn();
    std::thread::sleep(Duration::from_millis(500));
    let m = Metrics(d.metrics());
    assert_eq!(m.get("synwake_async_queued{function=\"slow\"}"), 0.0);
    assert_eq!(logged(&log).len(), ran);
}

#[test]
fn queue_bounds_answer_429_with_retry_after() {
    let mut body = function_env("a", &[("INIT_MS", "10000".into())], "");
    body += &function_env("b", &[("INIT_MS", "10000".into())], "");
    body += "[async]\nmax_queued = 5\nmax_queued_bytes = \"1Mi\"\n";
    let d = Daemon::start(&body);
    for i in 0..5 {
        let r = post_async(&d, "a", &[], b"x");
        assert_eq!(r.status, 202, "call {i}: {}", r.text());
    }
    let r = post_async(&d, "a", &[], b"x");
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "no Retry-After");
    assert!(r.text().contains("max_queued"), "{}", r.text());
    // The bound is per function; the byte bound is over all of them.
    let big = vec![b'y'; 600 << 10];
    let r = post_async(&d, "b", &[], &big);
    assert_eq!(r.status, 202, "{}", r.text());
    let r = post_async(&d, "b", &[], &big);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("max_queued_bytes"), "{}", r.text());
    let m = Metrics(d.metrics());
    assert_eq!(m.get("synwake_async_queued{function=\"a\"}"), 5.0);
    assert_eq!(m.get("synwake_async_queued{function=\"b\"}"), 1.0);
    assert!(m.get("synwake_async_queued_bytes") >= (600 << 10) as f64);
}

/// Callbacks received: (X-Call-Id, X-Function-Status, body).
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A callback receiver on a free loopback port; answers 200 to each POST.
fn callback_server() -> (u16, Received) {
    callback_server_failing(0)
}

/// A callback receiver that answers the first `fail_first` POSTs with 503, then 200;
/// every POST is recorded.
fn callback_server_failing(fail_first: usize) -> (u16, Received) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got: Received = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                let mut h = HashMap::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        h.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let n: usize = h
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; n];
                let _ = r.read_exact(&mut body);
                let seen = {
                    let mut g = g.lock().unwrap();
                    g.push((
                        h.get("x-call-id").cloned().unwrap_or_default(),
                        h.get("x-function-status").cloned().unwrap_or_default(),
                        body,
                    ));
                    g.len()
                };
                let answer: &[u8] = if seen <= fail_first {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                let mut s = s;
                let _ = s.write_all(answer);
            });
        }
    });
    (port, got)
}

#[test]
fn bad_gateway_is_retried_then_the_callback_gets_the_final_status() {
    let dir = call_log_dir();
    let (flaky_log, broken_log) = (dir.path().join("flaky.txt"), dir.path().join("broken.txt"));
    let mut body = function_env(
        "flaky",
        &[
            ("FAIL_FIRST", "2".into()),
            ("CALL_LOG", flaky_log.display().to_string()),
        ],
        "",
    );
    body += &function_env(
        "broken",
        &[
            ("FAIL_FIRST", "1000".into()),
            ("CALL_LOG", broken_log.display().to_string()),
        ],
        "",
    );
    body += "[async]\nmax_retries = 3\nretry_backoff = \"20ms\"\n";
    // The callback receiver is on loopback, which callbacks may reach only when allowed.
    let d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &body);
    let (port, got) = callback_server();
    let cb = format!("http://127.0.0.1:{port}/done");
    let flaky = post_async(&d, "flaky", &[("x-callback-url", &cb)], b"payload");
    assert_eq!(flaky.status, 202, "{}", flaky.text());
    let broken = post_async(&d, "broken", &[("x-callback-url", &cb)], b"payload");
    assert_eq!(broken.status, 202, "{}", broken.text());
    let (fid, bid) = (
        flaky.header("x-call-id").unwrap().to_string(),
        broken.header("x-call-id").unwrap().to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || got.lock().unwrap().len() >= 2),
        "callbacks: {:?}",
        got.lock().unwrap()
    );
    let got = got.lock().unwrap().clone();
    let status_of = |id: &str| {
        got.iter()
            .find(|(i, _, _)| i == id)
            .map(|(_, s, b)| (s.clone(), b.clone()))
    };
    // Two 502s, then the echo: the callback has the function's final answer.
    assert_eq!(
        status_of(&fid),
        Some(("200".to_string(), b"payload".to_vec()))
    );
    assert_eq!(status_of(&bid).map(|s| s.0), Some("502".to_string()));
    // Every attempt reached the function with the same X-Call-Id.
    assert_eq!(logged(&flaky_log), vec![fid.clone(); 3]);
    assert_eq!(logged(&broken_log), vec![bid.clone(); 4]);
    let m = Metrics(d.metrics());
    assert_eq!(
        m.get("synwake_async_retried_total{function=\"flaky\"}"),
        2.0
    );
    assert_eq!(
        m.get("synwake_async_retried_total{function=\"broken\"}"),
        3.0
    );
    assert_eq!(
        m.get("synwake_async_failed_total{function=\"broken\"}"),
        1.0
    );
}

#[test]
fn max_queued_is_per_function_from_config_and_annotation() {
    let mut body = function_env("own", &[("INIT_MS", "10000".into())], "max_queued = 2");
    body += &function_env("global", &[("INIT_MS", "10000".into())], "");
    body += "[async]\nmax_queued = 4\n";
    let d = Daemon::start(&body);
    let accepted = |name: &str, n: usize| -> usize {
        (0..n)
            .map(|_| post_async(&d, name, &[], b"x"))
            .take_while(|r| r.status == 202)
            .count()
    };
    assert_eq!(accepted("own", 10), 2, "config max_queued = 2");
    assert_eq!(accepted("global", 10), 4, "[async] max_queued = 4");
    let r = post_async(&d, "own", &[], b"x");
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("max_queued 2"), "{}", r.text());
    // Through the API: the annotation, range-checked at deploy.
    let deploy = |max_queued: &str| {
        d.api_json(
            "POST",
            "/system/functions",
            &serde_json::json!({
                "service": "api",
                "envProcess": fn_bin().display().to_string(),
                "envVars": { "INIT_MS": "10000" },
                "annotations": { "com.synwake.max-queued": max_queued },
            })
            .to_string(),
        )
    };
    for bad in ["0", "1000001", "-1", "lots"] {
        let r = deploy(bad);
        assert_eq!(r.status, 400, "max-queued {bad}: {}", r.text());
        assert!(
            r.text().contains("annotations.com.synwake.max-queued"),
            "{bad}: {}",
            r.text()
        );
    }
    let r = deploy("3");
    assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
    assert_eq!(accepted("api", 10), 3, "annotation max-queued = 3");
    let m = Metrics(d.metrics());
    assert_eq!(m.get("synwake_async_queued{function=\"own\"}"), 2.0);
    assert_eq!(m.get("synwake_async_queued{function=\"global\"}"), 4.0);
    assert_eq!(m.get("synwake_async_queued{function=\"api\"}"), 3.0);
}

#[test]
fn retry_counts_and_backoff_survive_kill_9_and_restart() {
    let dir = call_log_dir();
    let log = dir.path().join("broken.txt");
    let body = function_env(
        "broken",
        &[
            ("FAIL_FIRST", "1000".into()),
            ("CALL_LOG", log.display().to_string()),
        ],
        "",
    )
        + "[async]\nmax_retries = 3\nretry_backoff = \"1500ms\"\nretry_backoff_max = \"1500ms\"\n";
    let mut d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &body);
    let (port, got) = callback_server();
    let cb = format!("http://127.0.0.1:{port}/done");
    let r = post_async(&d, "broken", &[("x-callback-url", &cb)], b"payload");
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.header("x-call-id").unwrap().to_string();
    // Two failed attempts, both counted (and so recorded) before the kill.
    assert!(
        wait_until(Duration::from_secs(20), || {
            Metrics(d.metrics()).get("synwake_async_retried_total{function=\"broken\"}") >= 2.0
        }),
        "two retries never happened: {:?}",
        logged(&log)
    );
    std::thread::sleep(Duration::from_millis(300));
    d.stop_with(libc::SIGKILL, Duration::from_secs(10))
        .expect("SIGKILL ends synwake");
    let before = logged(&log).len();
    assert_eq!(before, 2, "attempts before the kill: {:?}", logged(&log));
    d.spawn();
    assert!(
        wait_until(Duration::from_secs(30), || !got.lock().unwrap().is_empty()),
        "no callback after the restart"
    );
    // 1 + max_retries attempts in all, not 2 + 1 + max_retries: the count was kept.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(logged(&log), vec![id.clone(); 4]);
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.as_str(), got[0].1.as_str()), (id.as_str(), "502"));
    let m = Metrics(d.metrics());
    assert_eq!(
        m.get("synwake_async_retried_total{function=\"broken\"}"),
        1.0
    );
    assert_eq!(m.get("synwake_async_queued{function=\"broken\"}"), 0.0);
}

#[test]
fn a_failing_callback_is_retried_with_backoff() {
    let body =
        function_env("echo", &[], "") + "[async]\nmax_retries = 3\nretry_backoff = \"20ms\"\n";
    let d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &body);
    // 503 twice, then 200: three POSTs of the same result.
    let (port, got) = callback_server_failing(2);
    let cb = format!("http://127.0.0.1:{port}/done");
    let r = post_async(&d, "echo", &[("x-callback-url", &cb)], b"payload");
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.header("x-call-id").unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(30), || got.lock().unwrap().len() >= 3),
        "callbacks: {:?}",
        got.lock().unwrap()
    );
    std::thread::sleep(Duration::from_millis(300));
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "a 200 ends the retries: {got:?}");
    for (i, s, b) in &got {
        assert_eq!(
            (i.as_str(), s.as_str(), b.as_slice()),
            (id.as_str(), "200", &b"payload"[..])
        );
    }
    // A callback that is down (nothing listens) is tried 1 + max_retries times, then the
    // call is finished anyway.
    let dead = format!("http://127.0.0.1:{}/done", free_port());
    let r = post_async(&d, "echo", &[("x-callback-url", &dead)], b"x");
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(30), || {
        Metrics(d.metrics()).get("synwake_async_queued{function=\"echo\"}") == 0.0
    }));
    assert!(
        d.log().contains("callback failed after 4 attempt(s)"),
        "{}",
        d.log()
    );
}

#[test]
fn running_calls_are_counted_per_function() {
    let body = function_env("busy", &[], "") + &function_env("idle", &[], "");
    let d = Daemon::start(&body);
    for _ in 0..3 {
        let r = request(
            loopback(d.api),
            "POST",
            "/async-function/busy/sleep/3000",
            &[],
            Some(b"x"),
        )
        .unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            Metrics(d.metrics()).get("synwake_async_running{function=\"busy\"}") == 3.0
        }),
        "{}",
        d.metrics()
    );
    let m = Metrics(d.metrics());
    assert_eq!(m.get("synwake_async_running{function=\"idle\"}"), 0.0);
    assert!(wait_until(Duration::from_secs(20), || {
        Metrics(d.metrics()).get("synwake_async_running{function=\"busy\"}") == 0.0
    }));
}

#[test]
fn a_hanging_callback_or_a_retry_wait_holds_no_worker() {
    let dir = call_log_dir();
    let (log, broken_log) = (dir.path().join("echo.txt"), dir.path().join("broken.txt"));
    let body = function_env("echo", &[("CALL_LOG", log.display().to_string())], "")
        + &function_env(
            "broken",
            &[
                ("FAIL_FIRST", "1000".into()),
                ("CALL_LOG", broken_log.display().to_string()),
            ],
            "",
        )
        + "[async]\nworkers = 1\nmax_retries = 3\nretry_backoff = \"20s\"\n";
    let d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &body);
    // Accepts and never answers: each callback attempt waits its full 30 s timeout.
    let hang = TcpListener::bind("127.0.0.1:0").unwrap();
    let cb = format!(
        "http://127.0.0.1:{}/done",
        hang.local_addr().unwrap().port()
    );
    let first = post_async(&d, "echo", &[("x-callback-url", &cb)], b"1");
    assert_eq!(first.status, 202, "{}", first.text());
    assert!(wait_until(Duration::from_secs(20), || logged(&log).len() == 1));
    // A call whose function fails waits 20 s before its retry.
    let r = post_async(&d, "broken", &[], b"2");
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(20), || logged(&broken_log)
        .len()
        == 1));
    // With the one worker held by neither, the next call runs at once.
    let second = post_async(&d, "echo", &[], b"3");
    assert_eq!(second.status, 202, "{}", second.text());
    let id = second.header("x-call-id").unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || logged(&log).contains(&id)),
        "the second call waited behind a callback or a retry: {:?}",
        logged(&log)
    );
    // The first call is still finishing its callback, counted as running.
    let m = Metrics(d.metrics());
    assert!(m.get("synwake_async_running{function=\"echo\"}") >= 1.0);
    drop(hang);
}
