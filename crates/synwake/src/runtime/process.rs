//! The `process` runtime: a local command listening on `$PORT`.
//!
//! Each instance runs in a cgroup of its own ([`super::cgroup`]; `memory`, `cpus` and
//! `pids` are enforced there) and in its own process group with PR_SET_PDEATHSIG. A stop
//! signals the members through pidfds and kills the cgroup, so a grandchild that left the
//! process group goes too; orphaned grandchildren reparented to synwake are reaped. A pid
//! file in the run directory (leader and cgroup paths) lets the next start clean up after
//! `kill -9`. Without a writable cgroup hierarchy (synwake not root) instances run in
//! their process group only and limits are refused.
//!
//! Instances are spawned with posix_spawn (no fork of the daemon, whose page tables a fork
//! copies on the worker that handles the wake) through a small static launcher that joins
//! the cgroup, switches the account, arms PR_SET_PDEATHSIG and execs the command in place.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use async_trait::async_trait;
use synwake_oci::WaitStatus;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use super::cgroup::{self, CgroupHost, InstanceCgroup, Limits};
use super::{ExitInfo, Instance, Runtime, StartError};
use crate::logs::OutputSink;
use crate::spec::{FunctionSpec, RuntimeKind, Watchdog};

/// The launcher binary built by build.rs from launcher/main.rs.
const LAUNCHER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/synwake-launcher"));

/// The daemon's variables a function still sees: where programs are, and locale/time zone.
const INHERITED_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];
/// PATH for functions when the daemon itself has none (e.g. started with `env -i`).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts functions as child processes.
pub struct ProcessRuntime {
    run_dir: PathBuf,
    /// The stdio watchdog, run in front of `watchdog = "stdio"` commands.
    watchdog: PathBuf,
    /// launcher/main.rs: arms PR_SET_PDEATHSIG and execs the command.
    launcher: PathBuf,
    /// Where functions' `secrets` are read from.
    secrets: Option<crate::secrets::SecretStore>,
    cgroups: Arc<CgroupHost>,
    /// Instance leaders not yet reaped by their own waiter: the orphan reaper skips them.
    leaders: Arc<Mutex<Leaders>>,
    reaper: Once,
    /// Join the cgroup2 cgroup with a write to `cgroup.procs` (a migration) instead of
    /// forking the instance into it: `SYNWAKE_CGROUP_JOIN=write`, for comparisons.
    join_by_write: bool,
}

impl ProcessRuntime {
    /// `run_dir` holds one pid file per live instance.
    pub fn new(run_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&run_dir)?;
        let watchdog = super::watchdog::install(&run_dir)?;
        let cgroups = CgroupHost::detect_for_daemon(&run_dir);
        if let Some(why) = cgroups.unavailable() {
            tracing::warn!(
                "process instances run without cgroups ({why}): a stop kills their process \
                 group only, and functions with memory, cpus or pids do not start"
            );
        }
        let launcher = super::watchdog::install_binary(&run_dir, "synwake-launcher", LAUNCHER)?;
        Ok(ProcessRuntime {
            run_dir,
            watchdog,
            launcher,
            secrets: None,
            cgroups: Arc::new(cgroups),
            leaders: Arc::default(),
            reaper: Once::new(),
            join_by_write: std::env::var("SYNWAKE_CGROUP_JOIN").as_deref() == Ok("write"),
        })
    }

    /// Reaps orphaned grandchildren on every SIGCHLD (see [`cgroup::reap_orphans`]).
    fn ensure_reaper(&self) {
        let Some(prefix) = self.cgroups.v2_prefix().map(str::to_string) else {
            return;
        };
        let leaders = self.leaders.clone();
        self.reaper.call_once(|| {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::child()) {
                Ok(mut sigchld) => {
                    tokio::spawn(async move {
                        while sigchld.recv().await.is_some() {
                            // Orphans come to us only if we are a subreaper (the oci runtime).
                            if cgroup::is_child_subreaper() {
                                reap_orphans(&prefix, &leaders);
                            }
                            // At most ~100 /proc scans a second, whatever the SIGCHLD rate.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    });
                }
                Err(e) => tracing::warn!("no SIGCHLD stream, orphans are not reaped: {e}"),
            }
        });
    }

    /// Functions with `secrets` get them from `store`.
    pub fn with_secrets(mut self, store: crate::secrets::SecretStore) -> Self {
        self.secrets = Some(store);
        self
    }

    /// `<run_dir>/secrets/<function>`: the function's private copy of its secrets.
    fn secrets_dir(&self, function: &str) -> PathBuf {
        self.run_dir.join("secrets").join(function)
    }

    /// Kills the process groups a crashed earlier run left behind (recognised by pid file
    /// and matching process start time, so a recycled pid is never touched).
    /// Instances with a cgroup: everything in this daemon's cgroups (and those the pid
    /// files name) is killed and the cgroups removed.
    pub fn cleanup_orphans(&self) -> usize {
        let mut killed = 0;
        let mut cgroup_paths = Vec::new();
        for e in std::fs::read_dir(&self.run_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("pid") {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(&path) {
                let named: Vec<PathBuf> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("cgroup "))
                    .map(PathBuf::from)
                    .collect();
                let first = text.lines().next().unwrap_or("");
                let mut it = first.split_whitespace();
                if !named.is_empty() {
                    cgroup_paths.extend(named);
                } else if let (Some(Ok(pid)), Some(start)) =
                    (it.next().map(str::parse::<i32>), it.next())
                {
                    if process_start_time(pid).as_deref() == Some(start)
                        || start.parse().is_ok_and(|s| group_has_member(pid, s))
                    {
                        tracing::warn!(
                            "killing process group {pid} left by an earlier synwake ({})",
                            path.display()
                        );
                        unsafe { libc::kill(-pid, libc::SIGKILL) };
                        killed += 1;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        // One instance has a directory per hierarchy: count it once, by its name.
        let mut instances = HashSet::new();
        for cg in self.cgroups.leftovers(&cgroup_paths) {
            let pids = cg.pids();
            let path = cg.paths().next().unwrap_or(Path::new("?"));
            if !pids.is_empty() {
                tracing::warn!(
                    "killing {} process(es) in cgroup {} left by an earlier synwake",
                    pids.len(),
                    path.display()
                );
                if instances.insert(path.file_name().map(|n| n.to_owned())) {
                    killed += 1;
                }
            }
            cg.kill();
            cg.remove_blocking(Duration::from_secs(5));
        }
        self.cgroups.remove_group_dirs();
        let swept = self.cgroups.sweep_stale();
        if swept > 0 {
            tracing::info!("removed {swept} empty instance cgroup(s) of synwakes long gone");
        }
        killed
    }
}

/// How long the launcher may take to fork the instance and name it (a loaded machine).
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an instance was not spawned.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    /// The launcher could not be run.
    #[error("{0}")]
    Launcher(#[source] std::io::Error),
    /// The launcher ran and did not fork the instance (its reason).
    #[error("{0}")]
    Refused(String),
}

/// An instance the launcher forked: a child of this daemon, not yet reaped.
struct Spawned {
    pid: i32,
    pidfd: OwnedFd,
    /// The launcher, exiting or exited: to be reaped, and the owner of the output pipes.
    launcher: tokio::process::Child,
    /// posix_spawn of the launcher, and then the wait for its fork's pid.
    launch: Duration,
    handoff: Duration,
}

/// Runs the launcher (posix_spawn) and takes the instance it forks: its pid comes back
/// through the launcher's stdin, a pipe. The instance is this daemon's child (the
/// launcher forks it with CLONE_PARENT), so its pid stays valid until it is reaped; the
/// caller keeps the orphan reaper off meanwhile ([`Starting`]).
async fn spawn_instance(mut cmd: Command) -> Result<Spawned, SpawnError> {
    let (reader, writer) = std::io::pipe().map_err(SpawnError::Launcher)?;
    cmd.stdin(Stdio::from(writer));
    let t0 = std::time::Instant::now();
    let launcher = cmd.spawn().map_err(SpawnError::Launcher)?;
    let launch = t0.elapsed();
    // Its copy of the pipe's write end: EOF once the launcher and the instance let go.
    drop(cmd);
    let reply = match tokio::time::timeout(HANDOFF_TIMEOUT, read_reply(reader)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no word from it in {HANDOFF_TIMEOUT:?}"),
        )),
    };
    let handoff = t0.elapsed() - launch;
    let line = match reply {
        Ok(line) => line,
        Err(e) => return give_up(launcher, format!("the launcher did not answer: {e}")),
    };
    if let Some(why) = line.strip_prefix('!') {
        return give_up(launcher, why.to_string());
    }
    let Ok(pid) = line.parse::<i32>() else {
        return give_up(
            launcher,
            "the launcher exited without starting the instance".into(),
        );
    };
    match cgroup::pidfd_open(pid) {
        Ok(pidfd) => Ok(Spawned {
            pid,
            pidfd,
            launcher,
            launch,
            handoff,
        }),
        Err(e) => {
            // SAFETY: our own unreaped child (CLONE_PARENT): the pid cannot be reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            give_up(launcher, format!("no pidfd for the instance: {e}"))
        }
    }
}

/// Stops (if still running) and reaps a launcher that did not hand over an instance.
fn give_up(mut launcher: tokio::process::Child, why: String) -> Result<Spawned, SpawnError> {
    let _ = launcher.start_kill();
    tokio::spawn(async move {
        let _ = launcher.wait().await;
    });
    Err(SpawnError::Refused(why))
}

/// The launcher's one-line answer (without the newline); empty on EOF.
async fn read_reply(reader: std::io::PipeReader) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = pipe.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Reaps the child behind `pidfd` once it exits. Dropped before that (the runtime going
/// away), it kills the child and reaps it on a thread of its own, as kill_on_drop would.
async fn wait_child(pidfd: OwnedFd) -> std::io::Result<WaitStatus> {
    struct Waiting(Option<AsyncFd<OwnedFd>>);
    impl Drop for Waiting {
        fn drop(&mut self) {
            let Some(fd) = self.0.take().map(AsyncFd::into_inner) else {
                return;
            };
            let _ = cgroup::pidfd_send_signal(&fd, libc::SIGKILL);
            let _ = std::thread::Builder::new()
                .name("instance-reap".into())
                .spawn(move || {
                    // SAFETY: zeroed siginfo is a valid out-parameter; the pidfd is ours.
                    unsafe {
                        let mut info: libc::siginfo_t = std::mem::zeroed();
                        libc::waitid(
                            libc::P_PIDFD,
                            std::os::fd::AsRawFd::as_raw_fd(&fd) as libc::id_t,
                            &mut info,
                            libc::WEXITED,
                        );
                    }
                });
        }
    }
    // SAFETY: the AsyncFd owns the pidfd, which stays open as long as it lives.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
    let mut waiting = Waiting(Some(registered));
    loop {
        let afd = waiting.0.as_ref().expect("set until reaped");
        let mut ready = afd.readable().await?;
        if let Some(status) = synwake_oci::waitid_pidfd(ready.get_inner())? {
            drop(ready);
            waiting.0 = None;
            return Ok(status);
        }
        ready.clear_ready();
    }
}

/// The `memory`, `cpus` and `pids` of a function.
fn limits_of(spec: &FunctionSpec) -> Limits {
    Limits {
        memory_bytes: spec.oci.memory_bytes,
        cpus: spec.oci.cpus,
        pids: spec.oci.pids,
    }
}

/// The instance leaders of this runtime, which only their own waiters reap.
#[derive(Default)]
struct Leaders {
    /// Leaders not yet reaped.
    pids: HashSet<i32>,
    /// Starts between the launcher's spawn and the instance's pid coming back: the new
    /// instance is already this daemon's child, under a pid not yet in `pids`.
    starting: usize,
    /// An orphan reap was skipped for a start in flight: to be done when it ends.
    deferred: bool,
}

/// [`cgroup::orphan_zombies`] + [`cgroup::reap_zombies`] without holding the leaders' lock
/// during the /proc scan. Skipped (and done when the last one ends) while a start is in
/// flight: its instance may have exited before its pid was known.
fn reap_orphans(prefix: &str, leaders: &Mutex<Leaders>) -> usize {
    let candidates = cgroup::orphan_zombies(prefix);
    if candidates.is_empty() {
        return 0;
    }
    let mut leaders = leaders.lock().unwrap();
    if leaders.starting > 0 {
        leaders.deferred = true;
        return 0;
    }
    let n = cgroup::reap_zombies(&candidates, &leaders.pids);
    if n > 0 {
        tracing::debug!("reaped {n} orphaned process(es) of process functions");
    }
    n
}

/// One start in flight (see [`Leaders::starting`]). Dropped before [`Starting::started`]
/// (the start failed, or its task was dropped), it kills the instance's cgroup, which
/// holds the instance from its birth.
struct Starting {
    leaders: Arc<Mutex<Leaders>>,
    prefix: Option<String>,
    cgroup: Option<Arc<InstanceCgroup>>,
    done: bool,
}

impl Starting {
    fn new(
        leaders: &Arc<Mutex<Leaders>>,
        prefix: Option<&str>,
        cgroup: Option<Arc<InstanceCgroup>>,
    ) -> Starting {
        leaders.lock().unwrap().starting += 1;
        Starting {
            leaders: leaders.clone(),
            prefix: prefix.map(str::to_string),
            cgroup,
            done: false,
        }
    }

    /// The instance is `pid`: from now on a leader, reaped by its own waiter only.
    fn started(mut self, pid: i32) {
        self.end(Some(pid));
    }

    /// No instance: whatever the launcher may have forked is killed with the cgroup
    /// (removed by the caller).
    fn failed(mut self) {
        if let Some(cg) = self.cgroup.take() {
            cg.kill();
        }
        self.end(None);
    }

    fn end(&mut self, pid: Option<i32>) {
        self.done = true;
        let reap = {
            let mut l = self.leaders.lock().unwrap();
            if let Some(pid) = pid {
                l.pids.insert(pid);
            }
            l.starting -= 1;
            l.starting == 0 && std::mem::take(&mut l.deferred)
        };
        if let (true, Some(prefix)) = (reap, self.prefix.clone()) {
            let leaders = self.leaders.clone();
            // Off the start path (a /proc scan); inline if the runtime is going away.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        reap_orphans(&prefix, &leaders);
                    });
                }
                Err(_) => {
                    reap_orphans(&prefix, &leaders);
                }
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(cg) = self.cgroup.take() {
            cg.kill();
            let _ = std::thread::Builder::new()
                .name("cgroup-cleanup".into())
                .spawn(move || cg.remove_blocking(Duration::from_secs(5)));
        }
        self.end(None);
    }
}

/// True if a process in group `pgid` started no earlier than the group's leader did: the
/// leader (a shell wrapper) may be gone while its children still run. A pgid is not reused
/// while any member lives, so such a member belongs to the recorded group.
fn group_has_member(pgid: i32, leader_start: u64) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
            // After the comm: state, ppid, pgrp (index 2) ... starttime (index 19).
            Some((
                f.get(2)?.parse::<i32>().ok()?,
                f.get(19)?.parse::<u64>().ok()?,
            ))
        })
        .any(|(pgrp, start)| pgrp == pgid && start >= leader_start)
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot.
fn process_start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19).map(str::to_string)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    async fn forget(&self, spec: &FunctionSpec) {
        let _ = std::fs::remove_dir_all(self.secrets_dir(&spec.name));
    }

    async fn prepare(&self, spec: &FunctionSpec) -> Result<(), StartError> {
        self.cgroups
            .check(&limits_of(spec))
            .map_err(|e| StartError::Invalid {
                function: spec.name.clone(),
                message: e.to_string(),
            })
    }

    async fn shutdown(&self) {
        self.cgroups.remove_group_dirs();
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        instance: u64,
        output: OutputSink,
    ) -> Result<Arc<dyn Instance>, StartError> {
        let spawn_err = |message: String| StartError::Spawn {
            function: spec.name.clone(),
            message,
        };
        if spec.command.is_empty() {
            return Err(spawn_err("no command configured".into()));
        }
        self.ensure_reaper();
        let run_as = super::user::resolve(spec.policy.user.as_deref())
            .map_err(|e| spawn_err(e.to_string()))?;
        let port = free_port().map_err(|e| spawn_err(format!("no free loopback port: {e}")))?;
        let command = match spec.watchdog {
            Watchdog::Http => spec.command.clone(),
            Watchdog::Stdio => super::watchdog::wrap(
                &self.watchdog.to_string_lossy(),
                &format!("127.0.0.1:{port}"),
                &spec.command,
            ),
        };
        let (program, args) = command.split_first().expect("checked non-empty");
        let secrets_dir = self.secrets_dir(&spec.name);
        if !spec.secrets.is_empty() {
            let store = self
                .secrets
                .as_ref()
                .ok_or_else(|| spawn_err("secrets are not available here".into()))?;
            store
                .materialize(&spec.secrets, &secrets_dir, 0o400)
                .map_err(|e| spawn_err(e.to_string()))?;
            if let Some(u) = &run_as {
                // The private copy belongs to the account the function runs as.
                chown_tree(&secrets_dir, u.uid, u.gid).map_err(|e| {
                    spawn_err(format!(
                        "cannot hand {} to uid {}: {e}",
                        secrets_dir.display(),
                        u.uid
                    ))
                })?;
            }
        }
        // A program found nowhere in the PATH the function gets is a clear start error
        // here. The launcher still searches PATH itself (execvp, after the account
        // switch): an entry synwake can see but the function's account cannot reach
        // (root's ~/.pyenv/shims) must be skipped, not chosen.
        let search_path = spec
            .env
            .get("PATH")
            .map(std::ffi::OsString::from)
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_else(|| DEFAULT_PATH.into());
        resolve_program(program, &search_path)
            .map_err(|e| spawn_err(format!("cannot run {program:?}: {e}")))?;
        let limits = limits_of(spec);
        // Last before the spawn: nothing after it can fail and leave the cgroup behind.
        let cgroup = if self.cgroups.unavailable().is_none() || limits != Limits::default() {
            Some(
                self.cgroups
                    .create(&format!("{}.{instance}", spec.name), &limits)
                    .map_err(|e| spawn_err(e.to_string()))?,
            )
        } else {
            None
        };
        // The launcher forks the instance into its cgroup and switches the account (std
        // would fork the daemon to do either).
        let mut cmd = Command::new(&self.launcher);
        cmd.arg(std::process::id().to_string()).arg(
            run_as
                .as_ref()
                .map_or("-".into(), |u| format!("{}:{}", u.uid, u.gid)),
        );
        if self.join_by_write {
            cmd.arg("--join-by-write");
        }
        cmd.args(cgroup.iter().flat_map(|c| c.paths()))
            .arg("--")
            .arg(program);
        // Functions get their spec's env, not the daemon's (an operator's exported
        // credentials, the service manager's variables); only these pass through.
        cmd.env_clear();
        for key in INHERITED_ENV {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", DEFAULT_PATH);
        }
        if let Some(u) = &run_as {
            if let Some(home) = &u.home {
                cmd.env("HOME", home);
            }
            if let Some(name) = &u.name {
                cmd.env("USER", name).env("LOGNAME", name);
            }
        }
        cmd.args(args)
            .envs(&spec.env)
            .env("PORT", port.to_string())
            .env("SYNWAKE_FUNCTION", &spec.name)
            .env("SYNWAKE_INSTANCE", instance.to_string())
            .env("SYNWAKE_SECRETS_DIR", &secrets_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.process_group(0);
        let cgroup = cgroup.map(Arc::new);
        // Until the instance's pid is known the orphan reaper waits: it cannot take a
        // just-exited instance (a child of ours from birth) for an orphan.
        let starting = Starting::new(&self.leaders, self.cgroups.v2_prefix(), cgroup.clone());
        let Spawned {
            pid,
            pidfd,
            mut launcher,
            launch,
            handoff,
        } = match spawn_instance(cmd).await {
            Ok(s) => {
                starting.started(s.pid);
                s
            }
            Err(e) => {
                starting.failed();
                if let Some(cg) = &cgroup {
                    cg.remove().await;
                }
                return Err(spawn_err(match e {
                    SpawnError::Launcher(e) => format!("cannot run {program:?}: {e}"),
                    SpawnError::Refused(why) => why,
                }));
            }
        };
        tracing::debug!(
            "{}: launcher spawned in {} us, forked pid {pid} {} us later",
            spec.name,
            launch.as_micros(),
            handoff.as_micros()
        );
        let pid_file = self.run_dir.join(format!("{}.{instance}.pid", spec.name));
        if let Some(start) = process_start_time(pid) {
            let mut text = format!("{pid} {start}\n");
            for p in cgroup.iter().flat_map(|c| c.paths()) {
                text.push_str(&format!("cgroup {}\n", p.display()));
            }
            // Not fsynced: it only matters until a reboot, and fsyncs on a busy disk took ms here.
            let _ = crate::state::write_replace(&pid_file, text.as_bytes());
        }
        for (stream, reader) in [
            (
                "stdout",
                launcher
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                "stderr",
                launcher
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
        ] {
            if let Some(r) = reader {
                let out = output.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        out.line(stream, line);
                    }
                });
            }
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        let leaders = self.leaders.clone();
        let exit_cgroup = cgroup.clone();
        // The launcher exits right after the handoff: reaped here, not left a zombie.
        tokio::spawn(async move {
            let _ = launcher.wait().await;
        });
        // The instance's own pidfd for signals; the waiter owns the first.
        let signal_fd = pidfd.try_clone().ok();
        tokio::spawn(async move {
            let waited = wait_child(pidfd).await;
            leaders.lock().unwrap().pids.remove(&pid);
            let status = match waited {
                Ok(WaitStatus::Exited(c)) => format!("exit status {c}"),
                Ok(WaitStatus::Signaled(libc::SIGKILL))
                    if exit_cgroup.as_ref().is_some_and(|c| c.oom_killed()) =>
                {
                    "killed: out of memory (the function's memory limit)".to_string()
                }
                Ok(WaitStatus::Signaled(sig)) => format!("killed by signal {sig}"),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(ExitInfo { status }));
        });
        Ok(Arc::new(ProcessInstance {
            pid,
            pidfd: signal_fd,
            cgroup,
            v2_prefix: self.cgroups.v2_prefix().map(str::to_string),
            leaders: self.leaders.clone(),
            cleaned: AtomicBool::new(false),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            exit: exit_rx,
            pid_file,
        }))
    }
}

/// One child process of the `process` runtime, with what it started.
pub struct ProcessInstance {
    pid: i32,
    /// The leader (signals never hit a reused pid).
    pidfd: Option<OwnedFd>,
    /// `None` only where cgroups are unavailable.
    cgroup: Option<Arc<InstanceCgroup>>,
    v2_prefix: Option<String>,
    leaders: Arc<Mutex<Leaders>>,
    /// Set once a stop has killed and removed the cgroup.
    cleaned: AtomicBool,
    addr: SocketAddr,
    exit: watch::Receiver<Option<ExitInfo>>,
    pid_file: PathBuf,
}

impl ProcessInstance {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// `sig` to every process of the instance: the cgroup's members, else the leader and
    /// (while the leader is unreaped, so the pgid cannot be reused) its process group.
    fn signal_all(&self, sig: i32) {
        if let Some(cg) = &self.cgroup {
            cg.signal_all(sig);
            return;
        }
        if let Some(fd) = &self.pidfd {
            let _ = cgroup::pidfd_send_signal(fd, sig);
        }
        if self.pid > 0 && !self.exited() {
            // SAFETY: plain kill(2) of our own child's process group.
            unsafe { libc::kill(-self.pid, sig) };
        }
    }

    /// SIGKILL to everything left; returns pidfds of members killed one by one.
    fn kill_all(&self) -> Vec<(i32, OwnedFd)> {
        match &self.cgroup {
            Some(cg) => cg.kill(),
            None => {
                self.signal_all(libc::SIGKILL);
                Vec::new()
            }
        }
    }

    /// Reaps what the kill left as zombies of this daemon, then removes the cgroup.
    async fn clean_up(&self, killed: Vec<(i32, OwnedFd)>) {
        if let Some(cg) = &self.cgroup {
            clean_up(
                cg,
                killed,
                self.pid,
                self.v2_prefix.as_deref(),
                &self.leaders,
            )
            .await;
        }
        self.cleaned.store(true, Ordering::Release);
    }
}

/// After a kill: waits (bounded) for the cgroup to empty, reaps the members that became
/// this daemon's zombies (never the leader: its waiter does), removes the cgroup.
async fn clean_up(
    cg: &InstanceCgroup,
    killed: Vec<(i32, OwnedFd)>,
    leader: i32,
    v2_prefix: Option<&str>,
    leaders: &Mutex<Leaders>,
) {
    if !cg.wait_empty(Duration::from_secs(5)).await {
        tracing::warn!("pid {leader}: processes of the instance outlive SIGKILL for 5 s");
    }
    reap_killed(&killed, leader, v2_prefix, leaders);
    cg.remove().await;
}

/// Reaps the killed members (and, with cgroup2, any orphan of ours in an instance
/// cgroup) that became this daemon's zombies; never the leader: its waiter does.
fn reap_killed(
    killed: &[(i32, OwnedFd)],
    leader: i32,
    v2_prefix: Option<&str>,
    leaders: &Mutex<Leaders>,
) {
    for (pid, fd) in killed {
        if *pid != leader && !leaders.lock().unwrap().pids.contains(pid) {
            cgroup::reap_pidfd(fd);
        }
    }
    if let Some(prefix) = v2_prefix {
        reap_orphans(prefix, leaders);
    }
}

#[async_trait]
impl Instance for ProcessInstance {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn describe(&self) -> String {
        format!("pid {}", self.pid)
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return info;
            }
            if rx.changed().await.is_err() {
                return ExitInfo {
                    status: "exited".into(),
                };
            }
        }
    }

    async fn stop(&self, grace: Duration) {
        if !self.exited() {
            self.signal_all(libc::SIGTERM);
            if tokio::time::timeout(grace, self.wait_exit()).await.is_err() {
                tracing::warn!(
                    "pid {} ignored SIGTERM for {grace:?}; sending SIGKILL",
                    self.pid
                );
            }
        }
        // Leftovers (a shell's children, or a process that ignored SIGTERM).
        let killed = self.kill_all();
        self.wait_exit().await;
        self.clean_up(killed).await;
        remove_quietly(&self.pid_file);
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        if self.cleaned.load(Ordering::Acquire) {
            return;
        }
        let killed = self.kill_all();
        remove_quietly(&self.pid_file);
        let Some(cg) = self.cgroup.take() else {
            return;
        };
        // Removing the cgroup waits for the killed processes: off the dropping thread, and
        // on a thread of its own so it finishes even if the async runtime is going away.
        let (v2_prefix, leaders, pid) = (self.v2_prefix.take(), self.leaders.clone(), self.pid);
        let _ = std::thread::Builder::new()
            .name("cgroup-cleanup".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !cg.is_empty() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                reap_killed(&killed, pid, v2_prefix.as_deref(), &leaders);
                cg.remove_blocking(Duration::from_secs(1));
            });
    }
}

/// `dir` and the files in it (one level: secrets are flat) owned by `uid:gid`.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for e in std::fs::read_dir(dir)? {
        std::os::unix::fs::lchown(e?.path(), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// `program` as a path: as given when it names a directory, else the first executable
/// file called that in `search_path` (execvp's lookup).
fn resolve_program(program: &str, search_path: &OsStr) -> std::io::Result<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        p.metadata()?;
        return Ok(p);
    }
    std::env::split_paths(search_path)
        .map(|dir| dir.join(program))
        .find(|p| !program.is_empty() && executable(p))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not found in PATH"))
}

fn remove_quietly(p: &Path) {
    let _ = std::fs::remove_file(p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogStore;
    use crate::spec::{OciSpec, Policy, Source};

    fn sleeper() -> FunctionSpec {
        FunctionSpec {
            name: "sleeper".into(),
            port: None,
            runtime: RuntimeKind::Process,
            // A bare name: found through PATH as execvp would.
            command: vec!["sleep".into(), "30".into()],
            env: Default::default(),
            readiness_path: None,
            max_instances: 1,
            max_concurrency: 0,
            policy: Policy::default(),
            oci: OciSpec::default(),
            labels: Default::default(),
            annotations: Default::default(),
            source: Source::Config,
            hosts: Vec::new(),
            tls_port: None,
            watchdog: Watchdog::Http,
            secrets: Vec::new(),
        }
    }

    fn output() -> OutputSink {
        OutputSink {
            store: Arc::new(LogStore::new()),
            function: "sleeper".into(),
            instance: "sleeper-1".into(),
        }
    }

    fn minor_faults_of_this_thread() -> i64 {
        // SAFETY: getrusage fills the zeroed struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut u);
            u.ru_minflt
        }
    }

    /// Alive and not a zombie.
    fn running(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            let state = s[s.rfind(')').unwrap() + 2..].chars().next();
            !matches!(state, Some('Z' | 'X'))
        })
    }

    /// A fork write-protects every private page of the daemon (the child shares them until
    /// it execs), so each page the daemon writes afterwards faults once: with a large
    /// daemon that is milliseconds of page-table copying on the worker that handles the
    /// wake, plus a fault storm after it. posix_spawn shares the address space instead.
    #[tokio::test(flavor = "current_thread")]
    async fn starting_an_instance_does_not_fork_the_daemon() {
        const LEN: usize = 64 << 20;
        let page = 4096;
        // SAFETY: a private anonymous mapping, unmapped at the end of the test.
        let mem = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            // Small pages, so a fork's write protection shows up as one fault per page.
            libc::madvise(p, LEN, libc::MADV_NOHUGEPAGE);
            std::slice::from_raw_parts_mut(p as *mut u8, LEN)
        };
        let touch = |mem: &mut [u8], v: u8| {
            for i in (0..LEN).step_by(page) {
                mem[i] = v;
            }
        };
        touch(mem, 1);
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path().to_path_buf()).unwrap();
        let inst = rt
            .start(&sleeper(), 1, output())
            .await
            .expect("sleep starts");
        let before = minor_faults_of_this_thread();
        touch(mem, 2);
        let faults = minor_faults_of_this_thread() - before;
        inst.stop(Duration::from_secs(1)).await;
        // SAFETY: the mapping made above; `mem` is not used after this.
        unsafe { libc::munmap(mem.as_mut_ptr() as *mut libc::c_void, LEN) };
        let pages = (LEN / page) as i64;
        assert!(
            faults < pages / 10,
            "{faults} page faults rewriting {pages} pages after a start: the start forked the daemon"
        );
    }

    /// The launcher arms PR_SET_PDEATHSIG: the instance dies with the thread that spawned
    /// it (for the daemon: a runtime worker, which lives as long as synwake).
    #[test]
    fn an_instance_dies_with_the_thread_that_started_it() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().to_path_buf();
        let pid = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let pid = rt.block_on(async {
                let prt = ProcessRuntime::new(run_dir).unwrap();
                let inst = prt
                    .start(&sleeper(), 1, output())
                    .await
                    .expect("sleep starts");
                let pid: i32 = inst.describe()[4..].parse().unwrap();
                // The launcher arms the signal after the spawn returns: wait for its exec.
                for _ in 0..500 {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                    if comm.is_ok_and(|c| c.trim() == "sleep") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Neither stop nor drop it: only the parent's death may end it.
                std::mem::forget(inst);
                pid
            });
            // Leaked too: dropping the runtime would drop the child with kill_on_drop.
            std::mem::forget(rt);
            pid
        })
        .join()
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let survived = running(pid);
        // SAFETY: kill and reap of this test's own child (group), whatever its state.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert!(
            !survived,
            "instance {pid} outlived the thread that started it"
        );
    }

    /// Waits (bounded) until `pid` runs `comm`: the launcher's steps before exec are done.
    async fn wait_exec(pid: i32, comm: &str) {
        for _ in 0..500 {
            let now = std::fs::read_to_string(format!("/proc/{pid}/comm"));
            if now.is_ok_and(|c| c.trim() == comm) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("pid {pid} never exec'd {comm}");
    }

    fn pid_of(inst: &Arc<dyn Instance>) -> i32 {
        inst.describe()[4..].parse().unwrap()
    }

    /// `Cpus_allowed_list` of /proc/<pid>/status.
    fn cpus_allowed(pid: &str) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Root, a cgroup2 mount and tracefs, or the rule for `test`.
    fn cgroup2_and_tracefs(test: &str, rt: &ProcessRuntime) -> bool {
        let missing = if !synwake_test_support::gate::is_root() {
            Some("not root".to_string())
        } else if rt.cgroups.v2_prefix().is_none() {
            Some(format!(
                "instances get no cgroup2 cgroup here: {}",
                rt.cgroups.describe()
            ))
        } else {
            synwake_test_support::cgroup_trace::Migrations::missing()
        };
        synwake_test_support::gate::can_run(test, missing)
    }

    /// An instance is forked straight into its cgroup2 cgroup (clone3 CLONE_INTO_CGROUP):
    /// no migration, which waits an RCU grace period (~10 ms a cold start) on a host whose
    /// cgroup2 mount lacks `favordynmods`. Only v1 cgroups (limits from v1 controllers on a
    /// hybrid host) are still joined with a write. The old join is the control: the
    /// counter sees its one migration.
    #[tokio::test]
    async fn an_instance_is_born_in_its_cgroup2_cgroup_without_a_migration() {
        use synwake_test_support::cgroup_trace::Migrations;
        let test = "an_instance_is_born_in_its_cgroup2_cgroup_without_a_migration";
        let dir = tempfile::tempdir().unwrap();
        let mut rt = ProcessRuntime::new(dir.path().to_path_buf()).unwrap();
        if !cgroup2_and_tracefs(test, &rt) {
            return;
        }
        let group = cgroup::group_name(dir.path());
        let trace = Migrations::start(&format!("synwake-clone3-{}", std::process::id()), &group)
            .expect("tracefs instance");
        let mut limited = sleeper();
        limited.oci.pids = Some(16);
        for (instance, spec, by_write) in [
            (1, sleeper(), false),
            (2, limited, false),
            (3, sleeper(), true),
        ] {
            rt.join_by_write = by_write;
            let inst = rt.start(&spec, instance, output()).await.expect("starts");
            let pid = pid_of(&inst);
            wait_exec(pid, "sleep").await;
            let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            let v2 = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("");
            assert!(
                v2.ends_with(&format!("/{group}/sleeper.{instance}")),
                "instance {instance} runs in {v2}"
            );
            // The launcher pins itself to one CPU for the fork; the instance is unpinned.
            assert_eq!(
                cpus_allowed(&pid.to_string()),
                cpus_allowed("self"),
                "instance {instance}"
            );
            inst.stop(Duration::from_secs(1)).await;
        }
        let events = trace.events();
        let into = |instance: u32, v2: bool| {
            events
                .iter()
                .filter(|m| {
                    m.dst_path
                        .ends_with(&format!("/{group}/sleeper.{instance}"))
                })
                .filter(|m| (m.dst_root == 0) == v2)
                .count()
        };
        assert_eq!(
            into(3, true),
            1,
            "the old join is one migration: {events:?}"
        );
        assert_eq!(into(1, true), 0, "no limits: {events:?}");
        assert_eq!(into(1, false), 0, "no limits: {events:?}");
        assert_eq!(into(2, true), 0, "with pids: {events:?}");
        // On a hybrid host `pids` is a v1 controller: that cgroup is still joined.
        let v1_pids = rt.cgroups.describe().contains("pids from v1");
        assert_eq!(
            into(2, false),
            usize::from(v1_pids),
            "with pids: {events:?}"
        );
    }

    /// An instance that exits at once is this daemon's child before its pid comes back
    /// from the launcher: the orphan reaper, scanning all the while, must not reap it
    /// first (its exit status would be lost: "wait failed").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_orphan_reaper_never_takes_an_instance_that_exits_at_once() {
        let test = "the_orphan_reaper_never_takes_an_instance_that_exits_at_once";
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path().to_path_buf()).unwrap();
        if !cgroup2_and_tracefs(test, &rt) {
            return;
        }
        let prefix = rt.cgroups.v2_prefix().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let scanner = {
            let (stop, leaders, prefix) = (stop.clone(), rt.leaders.clone(), prefix.clone());
            std::thread::spawn(move || {
                let mut reaped = 0;
                while !stop.load(Ordering::Relaxed) {
                    reaped += reap_orphans(&prefix, &leaders);
                }
                reaped
            })
        };
        let mut spec = sleeper();
        // Not executable: the instance fails its exec and exits 127 right away.
        spec.command = vec!["/etc/hostname".into()];
        let mut statuses = Vec::new();
        for i in 0..30 {
            let inst = rt.start(&spec, i, output()).await.expect("launcher runs");
            let exit = tokio::time::timeout(Duration::from_secs(10), inst.wait_exit())
                .await
                .expect("exits");
            statuses.push(exit.status);
        }
        stop.store(true, Ordering::Relaxed);
        let reaped = scanner.join().unwrap();
        let lost: Vec<&String> = statuses
            .iter()
            .filter(|s| *s != "exit status 127")
            .collect();
        assert!(lost.is_empty(), "{lost:?} (the reaper took {reaped})");
        assert_eq!(reaped, 0);
        rt.cgroups.remove_group_dirs();
    }

    /// A cgroup removed before the launcher enters it is a start error that says so, and
    /// the launcher is reaped.
    #[tokio::test]
    async fn a_cgroup_gone_before_the_fork_is_a_clear_error() {
        let test = "a_cgroup_gone_before_the_fork_is_a_clear_error";
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path().to_path_buf()).unwrap();
        if !cgroup2_and_tracefs(test, &rt) {
            return;
        }
        let cg = rt.cgroups.create("sleeper.9", &Limits::default()).unwrap();
        let path = cg.paths().next().unwrap().to_path_buf();
        cg.remove().await;
        let mut cmd = Command::new(&rt.launcher);
        cmd.arg(std::process::id().to_string())
            .arg("-")
            .arg(&path)
            .args(["--", "sleep", "30"])
            .stdout(Stdio::null());
        let err = match spawn_instance(cmd).await {
            Err(SpawnError::Refused(why)) => why,
            Err(e) => panic!("launcher did not run: {e}"),
            Ok(s) => panic!("pid {} started in a removed cgroup", s.pid),
        };
        assert!(
            err.contains(&path.display().to_string()) && err.contains("gone"),
            "{err}"
        );
        // The launcher exited (126) and its waiter task reaps it: no zombie stays. Other
        // tests in this process start launchers too, so only the zombies seen in the next
        // 100 ms (the launcher exits right after its refusal, so this one's are among them)
        // must go; later ones are theirs.
        let me = std::process::id().to_string();
        let zombie_launchers = || -> std::collections::HashSet<String> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|s| s.contains("(synwake-launch") && s.contains(") Z "))
                .filter(|s| s.split(") ").nth(1).and_then(|r| r.split(' ').nth(1)) == Some(&me))
                .filter_map(|s| s.split(' ').next().map(str::to_string))
                .collect()
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            seen.extend(zombie_launchers());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = || zombie_launchers().intersection(&seen).count();
        for _ in 0..200 {
            if left() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(left(), 0, "the launcher stays a zombie: {seen:?}");
        rt.cgroups.remove_group_dirs();
    }

    /// A command the function's account may not execute: the start succeeds (the exec is
    /// the instance's), the instance exits 127 with the reason in its log, and nothing of
    /// it is left (no process, no zombie, no cgroup).
    #[tokio::test]
    async fn a_command_the_account_cannot_run_exits_with_the_reason_and_leaves_nothing() {
        let test = "a_command_the_account_cannot_run_exits_with_the_reason_and_leaves_nothing";
        if !synwake_test_support::gate::can_run(
            test,
            (!synwake_test_support::gate::is_root()).then(|| "not root".to_string()),
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("root-only");
        std::fs::create_dir(&private).unwrap();
        let tool = private.join("tool");
        std::fs::write(&tool, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let rt = ProcessRuntime::new(dir.path().join("run")).unwrap();
        let mut spec = sleeper();
        spec.command = vec![tool.display().to_string()];
        let out = output();
        let store = out.store.clone();
        let inst = rt.start(&spec, 1, out).await.expect("the launcher runs");
        let pid = pid_of(&inst);
        let exit = tokio::time::timeout(Duration::from_secs(10), inst.wait_exit())
            .await
            .expect("exits");
        assert_eq!(exit.status, "exit status 127");
        let mut logged = String::new();
        for _ in 0..200 {
            logged = store
                .tail_of_instance("sleeper", "sleeper-1", 10)
                .join("\n");
            if logged.contains("cannot run") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            logged.contains("cannot run") && logged.contains("ermission denied"),
            "{logged}"
        );
        let cgroup_dirs: Vec<PathBuf> = rt
            .cgroups
            .leftovers(&[])
            .iter()
            .flat_map(|c| c.paths().map(Path::to_path_buf).collect::<Vec<_>>())
            .collect();
        drop(inst);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is left"
        );
        for _ in 0..200 {
            if cgroup_dirs.iter().all(|d| !d.exists()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            cgroup_dirs.iter().all(|d| !d.exists()),
            "{cgroup_dirs:?} left"
        );
        rt.cgroups.remove_group_dirs();
    }

    fn percentile(v: &mut [f64], p: f64) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    /// Spawn -> listening of synwake-fn (INIT_MS=25) through this runtime, the cgroup2
    /// cgroup entered at the fork or (`SYNWAKE_CGROUP_JOIN=write`'s way) by a write,
    /// alternating; and the daemon's wait for the launcher's fork (posix_spawn returned ->
    /// pid handed over). Root. `SYNWAKE_BENCH_STARTS` per mode (default 20):
    ///     cargo test --release -p synwake --lib -- --ignored bench_spawn_to_listening --nocapture
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn bench_spawn_to_listening() {
        let starts: usize = std::env::var("SYNWAKE_BENCH_STARTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let dir = tempfile::tempdir().unwrap();
        let mut rt = ProcessRuntime::new(dir.path().to_path_buf()).unwrap();
        assert!(
            rt.cgroups.v2_prefix().is_some(),
            "{}",
            rt.cgroups.describe()
        );
        let mut spec = sleeper();
        spec.command = vec![synwake_test_support::fn_bin().display().to_string()];
        spec.env.insert("INIT_MS".into(), "25".into());
        let mut listen = [Vec::new(), Vec::new()];
        let mut start_call = [Vec::new(), Vec::new()];
        let mut handoff = [Vec::new(), Vec::new()];
        for i in 0..starts * 2 {
            let by_write = i % 2 == 1;
            rt.join_by_write = by_write;
            let t0 = std::time::Instant::now();
            let inst = rt.start(&spec, i as u64, output()).await.expect("starts");
            let started = t0.elapsed();
            let addr = inst.addr();
            while std::net::TcpStream::connect(addr).is_err() {
                assert!(t0.elapsed() < Duration::from_secs(10), "never listened");
                std::thread::sleep(Duration::from_micros(200));
            }
            let m = usize::from(by_write);
            listen[m].push(t0.elapsed().as_secs_f64() * 1e3);
            start_call[m].push(started.as_secs_f64() * 1e6);
            inst.stop(Duration::from_secs(1)).await;
        }
        // The launcher's fork alone, into a fresh cgroup each time (the same two ways).
        for i in 0..starts * 2 {
            let by_write = i % 2 == 1;
            let cg = rt
                .cgroups
                .create(&format!("fork.{i}"), &Limits::default())
                .unwrap();
            let mut cmd = Command::new(&rt.launcher);
            cmd.arg(std::process::id().to_string()).arg("-");
            if by_write {
                cmd.arg("--join-by-write");
            }
            cmd.args(cg.paths())
                .args(["--", "sleep", "30"])
                .stdout(Stdio::null());
            let s = spawn_instance(cmd).await.expect("forks");
            handoff[usize::from(by_write)].push(s.handoff.as_secs_f64() * 1e6);
            let _ = cgroup::pidfd_send_signal(&s.pidfd, libc::SIGKILL);
            let _ = wait_child(s.pidfd).await;
            cg.kill();
            cg.remove().await;
        }
        rt.cgroups.remove_group_dirs();
        for (m, name) in ["forked into the cgroup", "joined by a write"]
            .iter()
            .enumerate()
        {
            println!(
                "{name}: spawn->listening p50 {:.2} p90 {:.2} ms; start() p50 {:.0} us; \
                 launcher spawned -> pid handed over p50 {:.0} p90 {:.0} us ({} starts)",
                percentile(&mut listen[m], 0.5),
                percentile(&mut listen[m], 0.9),
                percentile(&mut start_call[m], 0.5),
                percentile(&mut handoff[m], 0.5),
                percentile(&mut handoff[m], 0.9),
                listen[m].len()
            );
        }
    }

    #[test]
    fn programs_are_found_as_execvp_would() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let exe = bin.join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("data"), "").unwrap();
        let path = std::env::join_paths([dir.path().join("missing"), bin.clone()]).unwrap();
        assert_eq!(resolve_program("tool", &path).unwrap(), exe);
        assert_eq!(
            resolve_program("data", &path).unwrap_err().kind(),
            std::io::ErrorKind::NotFound,
            "a file without x bits is not a program"
        );
        assert!(resolve_program("nope", &path).is_err());
        assert!(resolve_program("", &path).is_err());
        assert_eq!(
            resolve_program("./rel/x", &path).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        let abs = exe.to_str().unwrap();
        assert_eq!(resolve_program(abs, OsStr::new("")).unwrap(), exe);
    }
}
