//! synwake's launcher for process functions. synwake posix_spawns it (vfork semantics, so
//! the daemon's large address space is never forked). The launcher forks the instance with
//! clone3(CLONE_INTO_CGROUP | CLONE_PARENT): the instance is born in its cgroup2 cgroup (no
//! migration, which waits an RCU grace period without `favordynmods`) as a child of
//! synwake, not of the launcher, on the launcher's CPU (pinned for the fork, so it runs at
//! once while the launcher waits for its exec: CLONE_VFORK). The launcher then writes the
//! instance's pid to synwake and exits; the instance, back on all its CPUs, joins its v1
//! cgroups (those still need a write to `cgroup.procs`),
//! switches to the function's account, arms PR_SET_PDEATHSIG, checks that synwake is still
//! its parent and execs the function's command. Built by build.rs as a static, std-only
//! binary.
//!
//! Usage: `synwake-launcher PARENT_PID UID:GID|- [--join-by-write] [CGROUP_DIR...] --
//! PROGRAM [ARGS...]`, with fd 0 the write end of a pipe to synwake: one line, the
//! instance's pid, or `!` and why it could not be started. PROGRAM is a path, or a bare
//! name looked up in PATH by execvp after the account switch (so entries the account
//! cannot reach are skipped); `-` keeps the current account. `--join-by-write` joins the
//! cgroup2 cgroup with a write too (the old way, for comparisons).

use std::ffi::{c_char, CString, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: u64 = 9;
const EPERM: i32 = 1;
const EAGAIN: i32 = 11;
const ENOENT: i32 = 2;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
const ENOSYS: i32 = 38;
const E2BIG: i32 = 7;
const O_RDONLY: i32 = 0;
const O_DIRECTORY: i32 = 0o200000;
const O_CLOEXEC: i32 = 0o2000000;
const CLONE_VFORK: u64 = 0x0000_4000;
const CLONE_PARENT: u64 = 0x0000_8000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const SYS_CLONE3: i64 = 435;
const SYS_CLONE: i64 = 56;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `struct clone_args` of clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `struct statfs` on x86_64 and aarch64: only `f_type` (the first field) is read.
#[repr(C)]
struct StatFs {
    f_type: i64,
    rest: [u64; 15],
}

extern "C" {
    fn prctl(option: i32, ...) -> i32;
    fn getppid() -> i32;
    fn setgroups(size: usize, list: *const u32) -> i32;
    fn setgid(gid: u32) -> i32;
    fn setuid(uid: u32) -> i32;
    fn setpgid(pid: i32, pgid: i32) -> i32;
    fn open(path: *const c_char, flags: i32, ...) -> i32;
    fn fstatfs(fd: i32, buf: *mut StatFs) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn syscall(number: i64, ...) -> i64;
    fn sched_getaffinity(pid: i32, size: usize, mask: *mut u64) -> i32;
    fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
    fn sched_getcpu() -> i32;
}

/// A CPU set (up to 1024 CPUs).
type CpuMask = [u64; 16];

/// Pins this process to the CPU it runs on, so the instance is forked onto it (inherited)
/// and runs as soon as this process waits (CLONE_VFORK) instead of queueing behind a busy
/// task on another CPU (fork balancing: measured 6 ms on a loaded 2-CPU VM). Returns the
/// mask to restore in the instance.
fn pin_to_this_cpu() -> Option<CpuMask> {
    let mut all: CpuMask = [0; 16];
    // SAFETY: a buffer of the size given.
    if unsafe { sched_getaffinity(0, size_of::<CpuMask>(), all.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: no arguments.
    let cpu = unsafe { sched_getcpu() };
    if cpu < 0 || cpu as usize >= 64 * all.len() {
        return None;
    }
    let mut one: CpuMask = [0; 16];
    one[cpu as usize / 64] = 1 << (cpu % 64);
    // SAFETY: a mask of the size given.
    (unsafe { sched_setaffinity(0, size_of::<CpuMask>(), one.as_ptr()) } == 0).then_some(all)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// In the instance, before exec: its output goes to the function's log.
fn fail(what: &str) -> ! {
    eprintln!("synwake-launcher: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(126);
}

/// Tells synwake why the instance was not started, and exits.
fn refuse(to_synwake: &mut std::fs::File, why: &str) -> ! {
    let _ = writeln!(to_synwake, "!{why}");
    std::process::exit(126);
}

fn join(dir: &OsString) -> std::io::Result<()> {
    let procs = std::path::Path::new(dir).join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(procs)
        .and_then(|mut f| f.write_all(b"0"))
}

/// Opens a cgroup directory; `Some(fd)` if it is in the cgroup2 hierarchy.
fn open_cgroup2(dir: &OsString) -> std::io::Result<Option<OwnedFd>> {
    let path = CString::new(dir.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: a NUL-terminated path; the fd returned is ours.
    let fd = unsafe { open(path.as_ptr(), O_RDONLY | O_DIRECTORY | O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut st = StatFs {
        f_type: 0,
        rest: [0; 15],
    };
    // SAFETY: a valid fd and a buffer of struct statfs's size.
    if unsafe { fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_type == CGROUP2_SUPER_MAGIC).then_some(fd))
}

/// Forks this (small, single-threaded) process with synwake as the child's parent, into
/// `cgroup` if given; this process waits until the child has exec'd or exited
/// (CLONE_VFORK, without CLONE_VM: the child has its own copy of the memory). Returns
/// the child's pid (0 in the child) or the errno.
fn clone_for_synwake(cgroup: Option<&OwnedFd>) -> Result<i64, i32> {
    let mut args = CloneArgs {
        flags: CLONE_PARENT | CLONE_VFORK,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: no new stack and no CLONE_VM: a fork, which a single-threaded process may
    // do; the args struct lives across the call. exit_signal must be 0 with CLONE_PARENT
    // (the child gets this process's, SIGCHLD).
    let rc = unsafe { syscall(SYS_CLONE3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    if rc >= 0 {
        return Ok(rc);
    }
    Err(errno())
}

/// The same without clone3 (Linux before 5.3).
fn clone_legacy() -> Result<i64, i32> {
    // SAFETY: a fork (no CLONE_VM, no new stack) of a single-threaded process.
    let rc = unsafe { syscall(SYS_CLONE, CLONE_PARENT | CLONE_VFORK, 0u64, 0u64, 0u64, 0u64) };
    if rc >= 0 {
        Ok(rc)
    } else {
        Err(errno())
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let parent = args.next().and_then(|p| p.to_str()?.parse::<i32>().ok());
    let account = args.next().and_then(|a| match a.to_str()? {
        "-" => Some(None),
        ids => {
            let (u, g) = ids.split_once(':')?;
            Some(Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        }
    });
    let mut dirs: Vec<_> = args.by_ref().take_while(|a| a != "--").collect();
    let by_write = dirs.first().is_some_and(|d| d == "--join-by-write");
    if by_write {
        dirs.remove(0);
    }
    let (Some(parent), Some(account), Some(program)) = (parent, account, args.next()) else {
        eprintln!(
            "usage: synwake-launcher PARENT_PID UID:GID|- [--join-by-write] [CGROUP_DIR...] \
             -- PROGRAM [ARGS...]"
        );
        std::process::exit(2);
    };
    // SAFETY: fd 0 is the pipe synwake gave this process; owned by this File from here.
    let mut to_synwake = unsafe { std::fs::File::from_raw_fd(0) };
    // The cgroup2 directory (at most one) is entered at birth; v1 ones are joined.
    let mut v2: Option<(OwnedFd, &OsString)> = None;
    let mut joins: Vec<&OsString> = Vec::new();
    for dir in &dirs {
        match open_cgroup2(dir) {
            Ok(Some(fd)) if !by_write && v2.is_none() => v2 = Some((fd, dir)),
            Ok(_) => joins.push(dir),
            Err(e) if e.raw_os_error() == Some(ENOENT) => refuse(
                &mut to_synwake,
                &format!("cgroup {} is gone (removed before the start)", dir.to_string_lossy()),
            ),
            Err(e) => refuse(
                &mut to_synwake,
                &format!("cgroup {}: {e}", dir.to_string_lossy()),
            ),
        }
    }
    let cpus = pin_to_this_cpu();
    let mut forked = clone_for_synwake(v2.as_ref().map(|(fd, _)| fd));
    if let (Err(ENOSYS | E2BIG | EINVAL), Some((_, dir))) = (forked, &v2) {
        // A kernel without CLONE_INTO_CGROUP (before 5.7): join it as the v1 ones.
        joins.insert(0, dir);
        forked = clone_for_synwake(None);
    }
    if forked == Err(ENOSYS) {
        forked = clone_legacy();
    }
    let pid = match forked {
        Ok(pid) => pid,
        Err(e) => {
            let why = std::io::Error::from_raw_os_error(e);
            let place = v2.as_ref().map_or(String::new(), |(_, d)| {
                format!(" in cgroup {}", d.to_string_lossy())
            });
            let hint = match e {
                EAGAIN => " (the function's pids limit, or the system's, is reached)",
                ENODEV => " (the cgroup was removed)",
                _ => "",
            };
            refuse(
                &mut to_synwake,
                &format!("cannot fork the instance{place}: {why}{hint}"),
            )
        }
    };
    if pid > 0 {
        // The launcher: synwake (the instance's parent) takes over from here.
        if writeln!(to_synwake, "{pid}").is_err() {
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    // The instance: back on every CPU it may use. Its stdin is /dev/null, not synwake's pipe.
    // SAFETY: plain syscall wrappers from the C library this binary is linked with.
    unsafe {
        if let Some(all) = &cpus {
            if sched_setaffinity(0, size_of::<CpuMask>(), all.as_ptr()) != 0 {
                fail("sched_setaffinity");
            }
        }
        let null = open(c"/dev/null".as_ptr(), O_RDONLY | O_CLOEXEC);
        if null < 0 || dup2(null, 0) != 0 {
            fail("/dev/null as stdin");
        }
        std::mem::forget(to_synwake);
        // Its own process group (synwake's fallbacks signal the group by the leader's pid).
        if setpgid(0, 0) != 0 {
            fail("setpgid");
        }
    }
    // Into the remaining cgroups while still root, before the function can fork.
    for dir in joins {
        if let Err(e) = join(dir) {
            eprintln!(
                "synwake-launcher: joining {}/cgroup.procs: {e}",
                dir.to_string_lossy()
            );
            std::process::exit(126);
        }
    }
    // SAFETY: plain syscall wrappers from the C library this binary is linked with.
    unsafe {
        if let Some((uid, gid)) = account {
            // No supplementary groups of root's; EPERM only when not privileged to drop them.
            if setgroups(0, std::ptr::null()) != 0 && errno() != EPERM {
                fail("setgroups");
            }
            if setgid(gid) != 0 {
                fail("setgid");
            }
            if setuid(uid) != 0 {
                fail("setuid");
            }
        }
        // After the switch: a credential change clears the parent-death signal. The parent
        // is the synwake thread that spawned the launcher (CLONE_PARENT).
        if prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 {
            fail("PR_SET_PDEATHSIG");
        }
        // synwake died before the signal was armed: do not run the function unowned.
        if getppid() != parent {
            std::process::exit(1);
        }
    }
    let e = Command::new(&program).args(args).exec();
    eprintln!("synwake: cannot run {program:?}: {e}");
    std::process::exit(127);
}
