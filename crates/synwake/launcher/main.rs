//! synwake's launcher for process functions: joins the instance's cgroups, switches to the
//! function's account, arms PR_SET_PDEATHSIG, checks that synwake is still its parent,
//! then execs the function's command in its own place (same pid, same process group).
//!
//! synwake starts it with posix_spawn (vfork semantics) instead of forking its own, much
//! larger address space: a fork copies every page table of the daemon on the worker that
//! handles the wake, and write-protects all its memory. Built by build.rs as a static,
//! std-only binary.
//!
//! Usage: `synwake-launcher PARENT_PID UID:GID|- [CGROUP_DIR...] -- PROGRAM [ARGS...]`
//! (PROGRAM a path, or a bare name looked up in this process's PATH by execvp after the
//! account switch, so entries the account cannot reach are skipped; `-` keeps the current
//! account).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;

const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: u64 = 9;
const EPERM: i32 = 1;

extern "C" {
    fn prctl(option: i32, ...) -> i32;
    fn getppid() -> i32;
    fn setgroups(size: usize, list: *const u32) -> i32;
    fn setgid(gid: u32) -> i32;
    fn setuid(uid: u32) -> i32;
}

fn fail(what: &str) -> ! {
    eprintln!("synwake-launcher: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(126);
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
    let cgroups: Vec<_> = args.by_ref().take_while(|a| a != "--").collect();
    let (Some(parent), Some(account), Some(program)) = (parent, account, args.next()) else {
        eprintln!("usage: synwake-launcher PARENT_PID UID:GID|- [CGROUP_DIR...] -- PROGRAM [ARGS...]");
        std::process::exit(2);
    };
    // Into the cgroups first, while still root, before the function can fork.
    for dir in &cgroups {
        let procs = std::path::Path::new(dir).join("cgroup.procs");
        let joined = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(b"0"));
        if let Err(e) = joined {
            eprintln!("synwake-launcher: joining {}: {e}", procs.display());
            std::process::exit(126);
        }
    }
    // SAFETY: plain syscall wrappers from the C library this binary is linked with.
    unsafe {
        if let Some((uid, gid)) = account {
            // No supplementary groups of root's; EPERM only when not privileged to drop them.
            if setgroups(0, std::ptr::null()) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(EPERM)
            {
                fail("setgroups");
            }
            if setgid(gid) != 0 {
                fail("setgid");
            }
            if setuid(uid) != 0 {
                fail("setuid");
            }
        }
        // After the switch: a credential change clears the parent-death signal.
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
