//! Process instances in cgroups: a stop (and a restart after kill -9) kills what left the
//! process group, orphaned grandchildren are reaped instead of staying zombies, and
//! `memory`, `cpus` and `pids` are enforced. Privileged (root, writable cgroups): runs
//! under CI=true, skips loudly otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::gate::{can_run, is_root};
use common::*;

fn can_run_here(test: &str) -> bool {
    let missing = if !is_root() {
        Some("not root (cgroups are created by a root synwake)".to_string())
    } else if !Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.procs").exists()
        && !Path::new("/sys/fs/cgroup/freezer").is_dir()
    {
        Some("no cgroup2 or v1 freezer hierarchy mounted".to_string())
    } else {
        None
    };
    can_run(test, missing)
}

/// A directory any user may write (process functions run as `nobody`), removed on drop.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        Scratch(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Waits (bounded) for `name` to hold a complete line and returns it trimmed.
    fn read_line(&self, name: &str) -> String {
        let path = self.path(name);
        let mut text = String::new();
        wait_until(Duration::from_secs(20), || {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            text.ends_with('\n')
        });
        assert!(text.ends_with('\n'), "{} never written", path.display());
        text.trim().to_string()
    }
}

/// A `[[function]]` running `script` in `sh -c` and then exec'ing the test function.
fn sh_function(name: &str, script: &str, extra: &str) -> String {
    let fn_bin = fn_bin().display().to_string();
    format!(
        "[[function]]\nname = {name:?}\ncommand = [\"sh\", \"-c\", {:?}]\nstop_grace = \"200ms\"\n{extra}\n",
        format!("{script}; exec {fn_bin}")
    )
}

/// Fields of /proc/<pid>/stat after the command: (state, ppid, pgrp).
fn stat(pid: i32) -> Option<(String, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    Some((f[0].to_string(), f[1].parse().ok()?, f[2].parse().ok()?))
}

/// Zombie children of `parent`.
fn zombies_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|(s, pp, _)| s == "Z" && pp == parent))
        .collect()
}

/// The v2 (or membership) cgroup directory of `pid`, if it is in one below the root.
fn cgroup_dir_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    };
    (rel != "/").then(|| Path::new(root).join(rel.trim_start_matches('/')))
}

fn scale_to_zero(d: &Daemon, name: &str) {
    let r = d.api_json(
        "POST",
        &format!("/system/scale-function/{name}"),
        &format!(r#"{{"serviceName":"{name}","replicas":0}}"#),
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

/// Calls `/pid` and returns the leader's pid.
fn leader_pid(d: &Daemon, name: &str) -> i32 {
    let r = d.call(name, "/pid");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), d.log());
    r.text().trim().parse().expect("pid")
}

#[test]
fn a_stop_kills_a_grandchild_that_left_the_process_group_and_removes_the_cgroup() {
    let test = "a_stop_kills_a_grandchild_that_left_the_process_group_and_removes_the_cgroup";
    if !can_run_here(test) {
        return;
    }
    let s = Scratch::new();
    let name = format!("cgstop{}", std::process::id());
    let script = format!("setsid sleep 600 & echo $! > {}", s.path("gc").display());
    let d = Daemon::start(&sh_function(&name, &script, ""));
    let leader = leader_pid(&d, &name);
    let gc: i32 = s.read_line("gc").parse().unwrap();
    let (_, _, pgrp) = stat(gc).expect("grandchild runs");
    assert_eq!(pgrp, gc, "setsid: the grandchild leads a group of its own");
    let cgroup = cgroup_dir_of(leader);
    assert_eq!(
        cgroup_dir_of(gc),
        cgroup,
        "grandchild shares the leader's cgroup"
    );

    scale_to_zero(&d, &name);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(gc)),
        "the grandchild outside the process group survived the stop"
    );
    let cgroup = cgroup.expect("the instance ran in a cgroup of its own");
    assert!(
        wait_until(Duration::from_secs(5), || !cgroup.exists()),
        "{} left behind",
        cgroup.display()
    );
    assert_eq!(zombies_of(d.pid()), Vec::<i32>::new(), "zombies left");
    // And the function still starts afterwards.
    assert_ne!(leader_pid(&d, &name), leader);
}

#[test]
fn after_kill_9_of_synwake_the_restart_kills_a_grandchild_that_left_the_process_group() {
    let test = "after_kill_9_of_synwake_the_restart_kills_a_grandchild_that_left_the_process_group";
    if !can_run_here(test) {
        return;
    }
    let s = Scratch::new();
    let name = format!("cgcrash{}", std::process::id());
    let script = format!("setsid sleep 600 & echo $! > {}", s.path("gc").display());
    // With a limit: a cgroup in two hierarchies on a hybrid host, still one instance.
    let mut d = Daemon::start(&sh_function(&name, &script, "pids = 64"));
    leader_pid(&d, &name);
    let gc: i32 = s.read_line("gc").parse().unwrap();
    d.stop_with(libc::SIGKILL, Duration::from_secs(5))
        .expect("SIGKILL ends synwake");
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(gc), "precondition: the crash leaves the grandchild");
    d.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || !alive(gc)),
        "the restarted synwake left the grandchild running"
    );
    let log = d.log();
    assert!(
        log.contains("left by an earlier synwake")
            && log.contains("cleaned up 1 instance(s) left by an earlier synwake"),
        "cleanup not logged as one instance:\n{log}"
    );
}

#[test]
fn orphaned_grandchildren_are_reaped_while_the_instance_runs() {
    let test = "orphaned_grandchildren_are_reaped_while_the_instance_runs";
    if !can_run_here(test) {
        return;
    }
    let s = Scratch::new();
    let name = format!("cgorphan{}", std::process::id());
    // The inner shell exits at once: its sleep is orphaned and reparented to synwake.
    let script = format!(
        "sh -c 'sleep 1.5 & echo $! > {}'",
        s.path("orphan").display()
    );
    let d = Daemon::start(&sh_function(&name, &script, ""));
    leader_pid(&d, &name);
    let orphan: i32 = s.read_line("orphan").parse().unwrap();
    let parent = stat(orphan).map(|(_, pp, _)| pp);
    assert_eq!(
        parent,
        Some(d.pid()),
        "precondition: synwake (a child subreaper as root) adopted the orphan"
    );
    // It exits after 1.5 s; a zombie would keep its /proc entry.
    assert!(
        wait_until(Duration::from_secs(10), || stat(orphan).is_none()),
        "orphan left as {:?}",
        stat(orphan)
    );
    assert_eq!(zombies_of(d.pid()), Vec::<i32>::new());
    // The instance itself is untouched.
    assert_eq!(d.call(&name, "/pid").status, 200);
}

#[test]
fn memory_cpus_and_pids_are_enforced_for_process_functions() {
    let test = "memory_cpus_and_pids_are_enforced_for_process_functions";
    if !can_run_here(test) {
        return;
    }
    let s = Scratch::new();
    let py = "/usr/bin/python3";
    // 40 forks against pids = 16; 200 MiB against memory = 64Mi; 1 s busy against 0.05 CPU.
    std::fs::write(
        s.path("forks.py"),
        "import os, signal, time\nkids = []\nfor i in range(40):\n    try:\n        pid = os.fork()\n    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    kids.append(pid)\nfor k in kids:\n    os.kill(k, signal.SIGKILL)\n    os.waitpid(k, 0)\nprint(len(kids))\n",
    )
    .unwrap();
    std::fs::write(
        s.path("alloc.py"),
        "b = bytearray(200 << 20)\nprint('allocated')\n",
    )
    .unwrap();
    std::fs::write(
        s.path("spin.py"),
        "import time\nc, w = time.process_time(), time.time()\nwhile time.time() - w < 1.5:\n    pass\nprint((time.process_time() - c) / (time.time() - w))\n",
    )
    .unwrap();
    let p = |f: &str| s.path(f).display().to_string();
    let script = format!(
        "{py} {} > {}; {py} {} > {} 2>/dev/null; echo rc=$? >> {}; {py} {} > {}",
        p("forks.py"),
        p("forks"),
        p("alloc.py"),
        p("alloc"),
        p("alloc"),
        p("spin.py"),
        p("spin"),
    );
    let name = format!("cglimits{}", std::process::id());
    // The leader itself over the memory limit: killed by the OOM killer, and said so.
    let hog = format!("oom{}", std::process::id());
    let hog_fn = format!(
        "[[function]]\nname = {hog:?}\ncommand = [{py:?}, {:?}]\nmemory = \"32Mi\"\n",
        p("alloc.py")
    );
    let d = Daemon::start(&format!(
        "{}{hog_fn}",
        sh_function(
            &name,
            &script,
            "memory = \"64Mi\"\ncpus = 0.05\npids = 16\nstart_timeout = \"60s\""
        )
    ));
    leader_pid(&d, &name);

    let forks: u32 = s.read_line("forks").parse().unwrap();
    let alloc = std::fs::read_to_string(s.path("alloc")).unwrap();
    let spin: f64 = s.read_line("spin").parse().unwrap();
    let seen = format!(
        "{forks} of 40 forks under pids = 16; 200 MiB under memory = 64Mi: {alloc:?}; \
         a busy loop used {spin:.3} of a CPU under cpus = 0.05"
    );
    assert!((1..=16).contains(&forks), "{seen}");
    assert!(
        !alloc.contains("allocated") && alloc.contains("rc=137"),
        "{seen}"
    );
    // Twice the quota: a loaded machine only lowers the share, never raises it.
    assert!(spin < 0.1, "{seen}");

    let r = d.call(&hog, "/");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        d.log().contains("killed: out of memory"),
        "OOM kill not reported: {}",
        r.text()
    );
}

/// A cgroup2 cgroup for a daemon to start in (and the root controller the test enabled),
/// removed with everything below it on drop.
struct DelegatedCgroup {
    dir: PathBuf,
    root: PathBuf,
    controller: String,
    enabled_at_root: bool,
    /// One such test at a time: they share the root's `cgroup.subtree_control`.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static ROOT_CONTROL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for DelegatedCgroup {
    fn drop(&mut self) {
        // Bounded: the daemon (stopped before this drop) may still be leaving its leaf.
        wait_until(Duration::from_secs(10), || {
            for group in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if group.file_type().is_ok_and(|t| t.is_dir()) {
                    for inst in std::fs::read_dir(group.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        if inst.file_type().is_ok_and(|t| t.is_dir()) {
                            let _ = std::fs::remove_dir(inst.path());
                        }
                    }
                    let _ = std::fs::remove_dir(group.path());
                }
            }
            std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists()
        });
        if self.enabled_at_root {
            // Fails (EBUSY) if someone else now uses it below the root: then it stays.
            let _ = std::fs::write(
                self.root.join("cgroup.subtree_control"),
                format!("-{}", self.controller),
            );
        }
    }
}

fn words(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A fresh non-root cgroup2 cgroup (`cgroup2-<pid>-<tag>`) offering one controller, the
/// controller enabled at the root for it if needed; `None` (loudly) where there is none.
fn delegated_cgroup(test: &str, tag: &str) -> Option<DelegatedCgroup> {
    let serial = ROOT_CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|r| r.join("cgroup.subtree_control").exists());
    let offered = root
        .as_ref()
        .map(|r| words(&r.join("cgroup.controllers")))
        .unwrap_or_default();
    let (Some(root), Some(controller)) = (root, offered.first().cloned()) else {
        can_run(test, Some("no cgroup2 root offering a controller".into()));
        return None;
    };
    let root_control = root.join("cgroup.subtree_control");
    let enabled_at_root = !words(&root_control).contains(&controller);
    if enabled_at_root {
        std::fs::write(&root_control, format!("+{controller}")).expect("enable at the root");
    }
    let cg = DelegatedCgroup {
        dir: root.join(format!("cgroup2-{}-{tag}", std::process::id())),
        root,
        controller,
        enabled_at_root,
        _serial: serial,
    };
    std::fs::create_dir(&cg.dir).expect("test cgroup");
    assert!(words(&cg.dir.join("cgroup.controllers")).contains(&cg.controller));
    Some(cg)
}

#[test]
fn in_a_cgroup2_cgroup_with_processes_synwake_moves_into_a_leaf_and_hands_controllers_down() {
    let test =
        "in_a_cgroup2_cgroup_with_processes_synwake_moves_into_a_leaf_and_hands_controllers_down";
    if !can_run_here(test) {
        return;
    }
    let Some(cg) = delegated_cgroup(test, "leaf") else {
        return;
    };
    let controller = cg.controller.clone();
    let name = format!("cgdeleg{}", std::process::id());
    let d = Daemon::start_in_cgroup(&function(&name, ""), cg.dir.clone());
    // The daemon (every thread) left its cgroup for the leaf, which let it hand down.
    assert_eq!(
        cgroup_dir_of(d.pid()),
        Some(cg.dir.join("daemon")),
        "{}",
        d.log()
    );
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap();
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("cgroup")).unwrap_or_default();
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("");
        assert!(
            rel.ends_with("/daemon"),
            "thread {:?} in {rel}",
            t.file_name()
        );
    }
    assert_eq!(
        words(&cg.dir.join("cgroup.procs")),
        Vec::<String>::new(),
        "own cgroup still holds processes"
    );
    assert!(
        words(&cg.dir.join("cgroup.subtree_control")).contains(&controller),
        "{controller} not enabled in the daemon's own cgroup"
    );
    let leader = leader_pid(&d, &name);
    let inst = cgroup_dir_of(leader).expect("the instance runs in a cgroup of its own");
    let group = inst.parent().expect("group dir");
    assert_eq!(group.parent(), Some(cg.dir.as_path()), "{}", inst.display());
    assert!(group
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("synwake-")));
    assert!(
        words(&inst.join("cgroup.controllers")).contains(&controller),
        "the instance's cgroup lacks {controller}: {:?}",
        words(&inst.join("cgroup.controllers"))
    );
    scale_to_zero(&d, &name);
    assert!(
        wait_until(Duration::from_secs(10), || !inst.exists()),
        "{} left behind",
        inst.display()
    );
    drop(d);
}

#[test]
fn when_other_processes_share_its_cgroup2_cgroup_synwake_moves_back_and_changes_nothing() {
    let test =
        "when_other_processes_share_its_cgroup2_cgroup_synwake_moves_back_and_changes_nothing";
    if !can_run_here(test) {
        return;
    }
    let Some(cg) = delegated_cgroup(test, "busy") else {
        return;
    };
    // Another process in the same cgroup keeps it busy (no-internal-processes rule).
    struct Sleeper(std::process::Child);
    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sleeper = Sleeper(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep"),
    );
    std::fs::write(cg.dir.join("cgroup.procs"), sleeper.0.id().to_string()).expect("join");
    let name = format!("cgbusy{}", std::process::id());
    let d = Daemon::start_in_cgroup(&function(&name, ""), cg.dir.clone());
    assert_eq!(cgroup_dir_of(d.pid()), Some(cg.dir.clone()), "{}", d.log());
    assert!(!cg.dir.join("daemon").exists(), "leaf left behind");
    assert_eq!(
        words(&cg.dir.join("cgroup.subtree_control")),
        Vec::<String>::new()
    );
    assert!(d.log().contains("other processes in it?"), "{}", d.log());
    // Membership and kill still work: the instance gets its cgroup below.
    let leader = leader_pid(&d, &name);
    let inst = cgroup_dir_of(leader).expect("the instance runs in a cgroup of its own");
    assert_eq!(inst.parent().and_then(Path::parent), Some(cg.dir.as_path()));
    drop(d);
    drop(sleeper);
}
