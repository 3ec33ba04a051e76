//! The `process` runtime: a local command listening on `$PORT`.
//!
//! Each instance runs in a cgroup of its own ([`super::cgroup`]; `memory`, `cpus` and
//! `pids` are enforced there) and in its own process group with PR_SET_PDEATHSIG. A stop
//! signals the members through pidfds and kills the cgroup, so a grandchild that left the
//! process group goes too; orphaned grandchildren reparented to synwake are reaped. A pid
//! file in the run directory (leader and cgroup paths) lets the next start clean up after
//! `kill -9`. Without a writable cgroup hierarchy (synwake not root) instances run in
//! their process group only and limits are refused.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use super::cgroup::{self, CgroupHost, InstanceCgroup, Limits};
use super::{ExitInfo, Instance, Runtime, StartError};
use crate::logs::OutputSink;
use crate::spec::{FunctionSpec, RuntimeKind, Watchdog};

/// Starts functions as child processes.
/// The daemon's variables a function still sees: where programs are, and locale/time zone.
const INHERITED_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];
/// PATH for functions when the daemon itself has none (e.g. started with `env -i`).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ProcessRuntime {
    run_dir: PathBuf,
    /// The stdio watchdog, run in front of `watchdog = "stdio"` commands.
    watchdog: PathBuf,
    /// Where functions' `secrets` are read from.
    secrets: Option<crate::secrets::SecretStore>,
    cgroups: Arc<CgroupHost>,
    /// Instance leaders not yet reaped by their own waiter: the orphan reaper skips them.
    leaders: Arc<Mutex<HashSet<i32>>>,
    reaper: Once,
}

impl ProcessRuntime {
    /// `run_dir` holds one pid file per live instance.
    pub fn new(run_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&run_dir)?;
        let watchdog = super::watchdog::install(&run_dir)?;
        let cgroups = CgroupHost::detect(&run_dir);
        if let Some(why) = cgroups.unavailable() {
            tracing::warn!(
                "process instances run without cgroups ({why}): a stop kills their process \
                 group only, and functions with memory, cpus or pids do not start"
            );
        }
        Ok(ProcessRuntime {
            run_dir,
            watchdog,
            secrets: None,
            cgroups: Arc::new(cgroups),
            leaders: Arc::default(),
            reaper: Once::new(),
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
        for cg in self.cgroups.leftovers(&cgroup_paths) {
            let pids = cg.pids();
            if !pids.is_empty() {
                tracing::warn!(
                    "killing {} process(es) in cgroup {} left by an earlier synwake",
                    pids.len(),
                    cg.paths().next().unwrap_or(Path::new("?")).display()
                );
                killed += 1;
            }
            cg.kill();
            cg.remove_blocking(Duration::from_secs(5));
        }
        self.cgroups.remove_group_dirs();
        killed
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

/// [`cgroup::orphan_zombies`] + [`cgroup::reap_zombies`] without holding the leaders' lock during the /proc scan.
fn reap_orphans(prefix: &str, leaders: &Mutex<HashSet<i32>>) -> usize {
    let candidates = cgroup::orphan_zombies(prefix);
    if candidates.is_empty() {
        return 0;
    }
    // Under the lock a leader that just spawned (and exited) is known: never reaped here.
    let leaders = leaders.lock().unwrap();
    let n = cgroup::reap_zombies(&candidates, &leaders);
    if n > 0 {
        tracing::debug!("reaped {n} orphaned process(es) of process functions");
    }
    n
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
        let limits = limits_of(spec);
        // Last before the spawn: nothing after it can fail and leave the cgroup behind.
        let mut cgroup = if self.cgroups.unavailable().is_none() || limits != Limits::default() {
            Some(
                self.cgroups
                    .create(&format!("{}.{instance}", spec.name), &limits)
                    .map_err(|e| spawn_err(e.to_string()))?,
            )
        } else {
            None
        };
        let mut cmd = Command::new(program);
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
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let procs_fds = cgroup.as_ref().map(|c| c.procs_fds()).unwrap_or_default();
        let ids = run_as.as_ref().map(|u| (u.uid, u.gid));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Into the cgroup first, while still root (before anything can fork).
                cgroup::join_from_child(&procs_fds)?;
                if let Some((uid, gid)) = ids {
                    // What std's uid()/gid() do, after the cgroup move: no supplementary groups.
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                libc::setpgid(0, 0);
                // After setuid: a credential change clears the parent-death signal.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let spawned = {
            // Held across spawn: the reaper cannot take a just-exited leader for an orphan.
            let mut leaders = self.leaders.lock().unwrap();
            cmd.spawn().inspect(|c| {
                if let Some(pid) = c.id() {
                    leaders.insert(pid as i32);
                }
            })
        };
        if let Some(cg) = &mut cgroup {
            cg.close_procs();
        }
        let cgroup = cgroup.map(Arc::new);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.kill();
                    cg.remove().await;
                }
                return Err(spawn_err(format!("cannot run {program:?}: {e}")));
            }
        };
        let pid = child.id().unwrap_or(0) as i32;
        // Not reaped before the exit waiter below runs, so this is the leader.
        let pidfd = cgroup::pidfd_open(pid).ok();
        let pid_file = self.run_dir.join(format!("{}.{instance}.pid", spec.name));
        if let Some(start) = process_start_time(pid) {
            let mut text = format!("{pid} {start}\n");
            for p in cgroup.iter().flat_map(|c| c.paths()) {
                text.push_str(&format!("cgroup {}\n", p.display()));
            }
            let _ = crate::state::write_atomic(&pid_file, text.as_bytes());
        }
        for (stream, reader) in [
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                "stderr",
                child
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
        tokio::spawn(async move {
            let waited = child.wait().await;
            leaders.lock().unwrap().remove(&pid);
            let status = match waited {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exit status {c}"),
                    (None, Some(libc::SIGKILL))
                        if exit_cgroup.as_ref().is_some_and(|c| c.oom_killed()) =>
                    {
                        "killed: out of memory (the function's memory limit)".to_string()
                    }
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "exited".to_string(),
                },
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(ExitInfo { status }));
        });
        Ok(Arc::new(ProcessInstance {
            pid,
            pidfd,
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
    leaders: Arc<Mutex<HashSet<i32>>>,
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
    leaders: &Mutex<HashSet<i32>>,
) {
    if !cg.wait_empty(Duration::from_secs(5)).await {
        tracing::warn!("pid {leader}: processes of the instance outlive SIGKILL for 5 s");
    }
    for (pid, fd) in &killed {
        if *pid != leader && !leaders.lock().unwrap().contains(pid) {
            cgroup::reap_pidfd(fd);
        }
    }
    if let Some(prefix) = v2_prefix {
        reap_orphans(prefix, leaders);
    }
    cg.remove().await;
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
        // Removing the cgroup waits for the killed processes: off the dropping thread.
        let (v2_prefix, leaders, pid) = (self.v2_prefix.take(), self.leaders.clone(), self.pid);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                clean_up(&cg, killed, pid, v2_prefix.as_deref(), &leaders).await;
            });
        } else {
            cg.remove_blocking(Duration::from_secs(1));
        }
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

fn remove_quietly(p: &Path) {
    let _ = std::fs::remove_file(p);
}
