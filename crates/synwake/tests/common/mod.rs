//! Fixtures for the integration tests: the real `synwake` binary on free loopback ports
//! with its own config and state dir, the `synwake-fn` test function, and a tiny blocking
//! HTTP/1.1 client. Every daemon is stopped in `Drop` (SIGTERM, then SIGKILL).

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The `synwake` binary cargo built for this test run.
pub fn synwake_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_synwake"))
}

/// The `synwake-fn` binary from the same target directory, built once if missing (it is
/// another package, so cargo gives no CARGO_BIN_EXE for it).
pub fn fn_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let synwake = synwake_bin();
        let profile_dir = synwake.parent().expect("binary has a directory");
        let bin = profile_dir.join("synwake-fn");
        if !bin.exists() {
            // <target>/<profile>/synwake -> build into the same <target> and profile.
            let target_dir = profile_dir.parent().expect("profile dir has a parent");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "synwake-fn"])
                .env("CARGO_TARGET_DIR", target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build -p synwake-fn");
            assert!(status.success(), "cargo build -p synwake-fn failed");
        }
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// A loopback port nobody listens on right now. Never hands out the same port twice
/// within one test binary, so parallel tests cannot collide with each other.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind :0")
            .port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A `[[function]]` table running synwake-fn; `extra` is more TOML lines for the table.
pub fn function(name: &str, extra: &str) -> String {
    format!(
        "[[function]]\nname = \"{name}\"\ncommand = [{:?}]\n{extra}\n",
        fn_bin().display().to_string()
    )
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to 5 s for something to accept connections on a loopback port.
pub fn wait_listening(port: u16) -> bool {
    wait_until(Duration::from_secs(5), || {
        TcpStream::connect_timeout(&loopback(port), Duration::from_secs(1)).is_ok()
    })
}

/// True while `pid` exists and is not a zombie (an orphan's zombie may wait for a reaper).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !stat[i + 1..].trim_start().starts_with(['Z', 'X']),
            None => true,
        },
        Err(_) => false,
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: plain syscall on a pid this test started.
    unsafe { libc::kill(pid, sig) };
}

/// One running `synwake up`.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub shared: u16,
    pub api: u16,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config with `body` (sections after `[gateway]`) and starts the daemon.
    pub fn start(body: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = free_port();
        let api = free_port();
        let config = dir.path().join("synwake.toml");
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:{shared}\"\napi_listen = \"127.0.0.1:{api}\"\nstate_dir = {:?}\ndrain_timeout = \"5s\"\n\n[probe]\nmode = \"off\"\n\n{body}",
            dir.path().join("state").display().to_string()
        );
        std::fs::write(&config, text).expect("write config");
        let mut d = Daemon {
            dir,
            config,
            shared,
            api,
            child: None,
        };
        d.spawn();
        d
    }

    /// Starts (again) on the same config, ports and state dir.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let child = Command::new(synwake_bin())
            .arg("up")
            .arg("--config")
            .arg(&self.config)
            .env("SYNWAKE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn synwake up");
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

    pub fn api_get(&self, path: &str) -> Resp {
        get(self.api, path)
    }

    pub fn api_json(&self, method: &str, path: &str, body: &str) -> Resp {
        request(
            loopback(self.api),
            method,
            path,
            &[("content-type", "application/json")],
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

/// A response from [`request`].
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// From the first byte written to the last byte read.
    pub elapsed: Duration,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The pid in a synwake-fn `/pid` answer.
    pub fn pid(&self) -> i32 {
        assert_eq!(self.status, 200, "GET /pid: {}", self.text());
        self.text().trim().parse().expect("pid body")
    }
}

/// GET `path` on a loopback port; panics on I/O errors.
pub fn get(port: u16, path: &str) -> Resp {
    request(loopback(port), "GET", path, &[], None)
        .unwrap_or_else(|e| panic!("GET :{port}{path}: {e}"))
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    request_on(stream, method, path, headers, body)
}

/// One HTTP/1.1 request (`Connection: close`) on an already connected stream, which may
/// have been opened, idle, long before.
pub fn request_on(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let t0 = Instant::now();
    let addr = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(bad("connection closed in headers".into()));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| bad(format!("bad chunk size: {e}")))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length".into()))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if method != "HEAD" && status != 204 && status != 304 {
        r.read_to_end(&mut body)?;
    }
    Ok(Resp {
        status,
        headers,
        body,
        elapsed: t0.elapsed(),
    })
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Runs `f(i)` for i in 0..n on n threads released together; returns the results in order.
pub fn concurrently<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (f, barrier) = (&f, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    f(i)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The value of an unlabelled-or-labelled metric line `name{labels} value`, if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be replayed.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}
