//! Availability under floods: the soft fd limit is raised to the hard one, and with a
//! 1024-fd limit 1,100 idle connections on the public port leave the management API and
//! instance starts working, with accept failures logged once, not per failure.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// `Max open files` (soft, hard) of a running process.
fn nofile_of(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let mut nums = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (nums.next().unwrap(), nums.next().unwrap())
}

#[test]
fn the_soft_fd_limit_is_raised_to_the_hard_limit() {
    let d = Daemon::start_limited("", "", Some((1024, 4096)));
    assert_eq!(nofile_of(d.pid()), (4096, 4096));
}

#[test]
fn api_and_instance_starts_survive_1100_idle_connections_at_a_1024_fd_limit() {
    let mut d = Daemon::start_limited("", &function("f", ""), Some((1024, 1024)));
    assert_eq!(nofile_of(d.pid()), (1024, 1024));
    // 1,100 clients connect and send nothing (each accepted one holds a daemon fd).
    let mut held: Vec<TcpStream> = Vec::new();
    let mut refused = 0;
    for _ in 0..1100 {
        match TcpStream::connect_timeout(&loopback(d.shared), Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    assert!(
        held.len() >= 1000,
        "only {} connected ({refused} failed)",
        held.len()
    );
    // Let the daemon accept all it will.
    std::thread::sleep(Duration::from_millis(500));

    // The control plane still answers...
    let r = request(loopback(d.api), "GET", "/healthz", &[], None).expect("API answers");
    assert_eq!(r.status, 200);
    // ...and an instance still starts (pipes, sockets and a child need fds too).
    let r = d.api_json(
        "POST",
        "/system/scale-function/f",
        r#"{"serviceName":"f","replicas":1}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(15), || d.available("f") == 1),
        "no instance started: {}",
        d.status("f")
    );

    // Once the flood ends the public port serves again.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || request(
            loopback(d.shared),
            "GET",
            "/function/f/pid",
            &[],
            None
        )
        .is_ok_and(|r| r.status == 200)),
        "public port does not serve after the flood"
    );
    d.stop_with(libc::SIGTERM, Duration::from_secs(10));
    let log = d.log();
    let accept_lines = log.lines().filter(|l| l.contains("accept on")).count();
    assert!(
        accept_lines <= 2,
        "{accept_lines} accept failure lines:\n{log}"
    );
    assert!(
        log.contains("at its connection limit"),
        "the pause at the budget is not logged:\n{log}"
    );
}
