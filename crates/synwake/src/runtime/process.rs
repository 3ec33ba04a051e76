//! The `process` runtime: a local command listening on `$PORT`.
//!
//! Each instance runs in its own process group with PR_SET_PDEATHSIG, so it dies with
//! synwake; a pid file in the run directory lets the next start clean up after `kill -9`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

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
}

impl ProcessRuntime {
    /// `run_dir` holds one pid file per live instance.
    pub fn new(run_dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&run_dir)?;
        let watchdog = super::watchdog::install(&run_dir)?;
        Ok(ProcessRuntime {
            run_dir,
            watchdog,
            secrets: None,
        })
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
    pub fn cleanup_orphans(&self) -> usize {
        let mut killed = 0;
        let Ok(entries) = std::fs::read_dir(&self.run_dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("pid") {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(&path) {
                let mut it = text.split_whitespace();
                if let (Some(Ok(pid)), Some(start)) = (it.next().map(str::parse::<i32>), it.next())
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
        killed
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
            // std drops the supplementary groups (setgroups(0)) when root sets a uid.
            cmd.uid(u.uid).gid(u.gid);
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
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| spawn_err(format!("cannot run {program:?}: {e}")))?;
        let pid = child.id().unwrap_or(0) as i32;
        let pid_file = self.run_dir.join(format!("{}.{instance}.pid", spec.name));
        if let Some(start) = process_start_time(pid) {
            let _ = crate::state::write_atomic(&pid_file, format!("{pid} {start}\n").as_bytes());
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
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exit status {c}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "exited".to_string(),
                },
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(ExitInfo { status }));
        });
        Ok(Arc::new(ProcessInstance {
            pid,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            exit: exit_rx,
            pid_file,
        }))
    }
}

/// One child process of the `process` runtime.
pub struct ProcessInstance {
    pid: i32,
    addr: SocketAddr,
    exit: watch::Receiver<Option<ExitInfo>>,
    pid_file: PathBuf,
}

impl ProcessInstance {
    fn signal_group(&self, sig: i32) {
        if self.pid > 0 {
            // The whole group: a shell wrapper's children go too.
            unsafe { libc::kill(-self.pid, sig) };
        }
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
        if self.exit.borrow().is_none() {
            self.signal_group(libc::SIGTERM);
            if tokio::time::timeout(grace, self.wait_exit()).await.is_err() {
                tracing::warn!(
                    "pid {} ignored SIGTERM for {grace:?}; sending SIGKILL",
                    self.pid
                );
            }
        }
        // Leftovers in the group (or a process that ignored SIGTERM).
        self.signal_group(libc::SIGKILL);
        self.wait_exit().await;
        remove_quietly(&self.pid_file);
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        self.signal_group(libc::SIGKILL);
        remove_quietly(&self.pid_file);
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
