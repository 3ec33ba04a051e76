//! `synwake up` on free loopback ports with its own config and state dir. Every daemon
//! is stopped in `Drop` (SIGTERM, then SIGKILL), and its log is printed when a test fails.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bins::synwake_bin;
use crate::http::{basic_auth, generated_password, get, request, Resp};
use crate::proc::{free_port, loopback, signal, wait_until};

/// One running `synwake up`.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub shared: u16,
    pub api: u16,
    /// The API password when it is not the generated one (see [`Daemon::password`]).
    pub password_override: Option<String>,
    /// RLIMIT_NOFILE (soft, hard) the daemon starts with; `None` inherits the test's.
    pub nofile: Option<(u64, u64)>,
    /// A cgroup2 directory the daemon joins (its `cgroup.procs`) before exec.
    pub cgroup: Option<PathBuf>,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config with `body` (sections after `[gateway]`) and starts the daemon.
    pub fn start(body: &str) -> Daemon {
        Daemon::start_with("", body)
    }

    /// [`Daemon::start`] with more `[gateway]` keys (`gateway`: TOML lines).
    pub fn start_with(gateway: &str, body: &str) -> Daemon {
        Self::start_limited(gateway, body, None)
    }

    /// [`Daemon::start_with`] with RLIMIT_NOFILE (soft, hard) for the daemon.
    pub fn start_limited(gateway: &str, body: &str, nofile: Option<(u64, u64)>) -> Daemon {
        let mut d = Self::configure(gateway, body, nofile);
        d.spawn();
        d
    }

    /// [`Daemon::start`] with the daemon started in cgroup2 directory `cgroup`.
    pub fn start_in_cgroup(body: &str, cgroup: PathBuf) -> Daemon {
        let mut d = Self::configure("", body, None);
        d.cgroup = Some(cgroup);
        d.spawn();
        d
    }

    /// Config and state dir, not started.
    fn configure(gateway: &str, body: &str, nofile: Option<(u64, u64)>) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        // Open like /var/lib: process functions run as nobody and exec the stdio watchdog
        // from <state>/run (the API password file stays 0600).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod the daemon's temp dir");
        let shared = free_port();
        let api = free_port();
        let config = dir.path().join("synwake.toml");
        // 5 s unless the test sets its own.
        let drain = if gateway.contains("drain_timeout") {
            ""
        } else {
            "drain_timeout = \"5s\"\n"
        };
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:{shared}\"\napi_listen = \"127.0.0.1:{api}\"\nstate_dir = {:?}\n{drain}{gateway}\n\n[probe]\nmode = \"off\"\n\n{body}",
            dir.path().join("state").display().to_string()
        );
        std::fs::write(&config, text).expect("write config");
        Daemon {
            dir,
            config,
            shared,
            api,
            password_override: None,
            nofile,
            cgroup: None,
            child: None,
        }
    }

    /// Starts (again) on the same config, ports and state dir.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let mut cmd = Command::new(synwake_bin());
        cmd.arg("up")
            .arg("--config")
            .arg(&self.config)
            .env("SYNWAKE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some((soft, hard)) = self.nofile {
            // SAFETY: setrlimit is async-signal-safe; the struct lives on the child's stack.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(dir) = &self.cgroup {
            let procs =
                std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .expect("cgroup path");
            // SAFETY: open/write/close are async-signal-safe; `procs` outlives the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if ok {
                        Ok(())
                    } else {
                        Err(err)
                    }
                });
            }
        }
        let child = cmd.spawn().expect("spawn synwake up");
        self.child = Some(child);
        let api = loopback(self.api);
        let up = wait_until(Duration::from_secs(15), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("synwake exited early ({status}):\n{}", self.log());
            }
            request(api, "GET", "/healthz", &[], None).is_ok_and(|r| r.status == 200)
        });
        assert!(up, "synwake not healthy after 15 s:\n{}", self.log());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> Option<ExitStatus> {
        signal(self.pid(), sig);
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the daemon to exit; past it, kills it and returns `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET on the shared port, `/function/<name><path>`.
    pub fn call(&self, name: &str, path: &str) -> Resp {
        get(self.shared, &format!("/function/{name}{path}"))
    }

    /// The API password: the one generated into the state dir at first start, unless the
    /// test configured its own.
    pub fn password(&self) -> String {
        if let Some(p) = &self.password_override {
            return p.clone();
        }
        generated_password(&self.state_dir()).unwrap_or_else(|| {
            panic!(
                "no generated API password in {}",
                self.state_dir().display()
            )
        })
    }

    /// `Authorization` header value for the API's admin.
    pub fn auth(&self) -> String {
        basic_auth("admin", &self.password())
    }

    /// GET on the API port, authenticated as admin.
    pub fn api_get(&self, path: &str) -> Resp {
        let auth = self.auth();
        request(
            loopback(self.api),
            "GET",
            path,
            &[("authorization", &auth)],
            None,
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// A JSON request on the API port, authenticated as admin.
    pub fn api_json(&self, method: &str, path: &str, body: &str) -> Resp {
        let auth = self.auth();
        request(
            loopback(self.api),
            method,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            Some(body.as_bytes()),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The function's status from GET /system/function/<name>.
    pub fn status(&self, name: &str) -> serde_json::Value {
        let r = self.api_get(&format!("/system/function/{name}"));
        assert_eq!(r.status, 200, "status of {name}: {}", r.text());
        serde_json::from_slice(&r.body).expect("status JSON")
    }

    pub fn available(&self, name: &str) -> u64 {
        self.status(name)["availableReplicas"]
            .as_u64()
            .expect("availableReplicas")
    }

    pub fn metrics(&self) -> String {
        let r = self.api_get("/metrics");
        assert_eq!(r.status, 200);
        r.text()
    }

    /// Pids from the process runtime's pid files (one per live instance).
    pub fn instance_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = std::fs::read_dir(self.state_dir().join("run"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|t| t.split_whitespace().next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        pids.sort();
        pids
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some()
            && self
                .stop_with(libc::SIGTERM, Duration::from_secs(5))
                .is_none()
        {
            eprintln!("synwake ignored SIGTERM for 5 s; killed it");
        }
        if std::thread::panicking() {
            eprintln!("---- synwake log ----\n{}---- end ----", self.log());
        }
    }
}
