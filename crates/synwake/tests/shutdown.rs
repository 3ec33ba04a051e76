//! No child outlives synwake: SIGTERM drains in-flight requests and stops every instance;
//! after `kill -9` the next start cleans up what the crashed run left, grandchildren too.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The parent pid of `pid`, from /proc/<pid>/stat.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Kills a process a failed assertion would otherwise leak. Only used for processes that
/// are our children (reparented to this subreaper), so the pid cannot have been reused.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            signal(self.0, libc::SIGKILL);
        }
    }
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    let mut d = Daemon::start(&function("f", "stop_grace = \"2s\""));
    let pid = d.call("f", "/pid").pid();
    let shared = d.shared;
    let in_flight = std::thread::spawn(move || {
        request(loopback(shared), "GET", "/function/f/sleep/500", &[], None)
    });
    std::thread::sleep(Duration::from_millis(150));
    let signalled = Instant::now();
    signal(d.pid(), libc::SIGTERM);

    // New connections are refused while the old request drains.
    assert!(
        wait_until(Duration::from_millis(300), || request(
            loopback(shared),
            "GET",
            "/function/f/",
            &[],
            None
        )
        .is_err()),
        "shared port still accepts after SIGTERM"
    );
    let r = in_flight.join().unwrap().expect("in-flight request");
    assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "exit after SIGTERM"
    );
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(!alive(pid), "instance {pid} outlived synwake");
    assert!(d.instance_pids().is_empty(), "pid files left behind");
}

#[test]
fn kill_9_then_restart_leaves_no_instance_of_the_old_run() {
    let mut d = Daemon::start(&function("f", ""));
    let pid = d.call("f", "/pid").pid();
    assert_eq!(ppid(pid), Some(d.pid()));
    d.stop_with(libc::SIGKILL, Duration::from_secs(5))
        .expect("daemon dies on SIGKILL");
    let by_pdeathsig = wait_until(Duration::from_secs(1), || !alive(pid));
    eprintln!("instance gone by PDEATHSIG alone: {by_pdeathsig}");

    d.spawn();
    assert!(
        wait_until(Duration::from_secs(2), || !alive(pid)),
        "instance {pid} of the killed run still runs after the restart"
    );
    let fresh = d.call("f", "/pid").pid();
    assert_ne!(fresh, pid);
    assert_eq!(d.instance_pids(), [fresh], "stale pid files not cleaned");
}

#[test]
fn kill_9_then_restart_cleans_up_a_grandchild() {
    // The instance is a shell whose child serves: the group, not only the shell, must go.
    // Become a subreaper and reap the shell ourselves, as systemd would on a real host:
    // pid 1 of this test machine never reaps, and a zombie shell would make the cleanup look
    // right for the wrong reason (its /proc entry still matches the pid file).
    // SAFETY: plain prctl on this process; orphans of the killed daemon reparent to us.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let cmd = format!("{:?} & wait", fn_bin().display().to_string());
    let mut d = Daemon::start(&format!(
        "[[function]]\nname = \"wrapped\"\ncommand = [\"sh\", \"-c\", {cmd:?}]\nstop_grace = \"2s\"\n"
    ));
    let grandchild = d.call("wrapped", "/pid").pid();
    let _leak_guard = KillOnDrop(grandchild);
    let shell = ppid(grandchild).expect("grandchild has a parent");
    assert_ne!(
        shell,
        d.pid(),
        "synwake-fn should run under sh, not synwake"
    );
    assert_eq!(ppid(shell), Some(d.pid()));

    d.stop_with(libc::SIGKILL, Duration::from_secs(5))
        .expect("daemon dies on SIGKILL");
    assert!(
        wait_until(Duration::from_secs(1), || !alive(shell)),
        "the shell (direct child) survived kill -9 of synwake: PDEATHSIG missing"
    );
    // SAFETY: waits for one specific pid that is our child now.
    let reaped = unsafe { libc::waitpid(shell, std::ptr::null_mut(), 0) };
    assert_eq!(reaped, shell, "reaping the dead shell");
    assert!(
        alive(grandchild),
        "grandchild died without help; nothing to test"
    );
    // PDEATHSIG does not reach the grandchild; the restart has to.
    d.spawn();
    assert!(
        wait_until(Duration::from_secs(2), || !alive(grandchild)),
        "grandchild {grandchild} of the killed run still runs after the restart"
    );

    // And a clean SIGTERM stops the whole group as well.
    let grandchild = d.call("wrapped", "/pid").pid();
    let status = d.stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
    assert!(
        !alive(grandchild),
        "grandchild {grandchild} outlived SIGTERM"
    );
}
