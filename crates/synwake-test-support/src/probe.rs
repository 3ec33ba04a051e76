//! The probe tests' topology: a client and a server network namespace joined by a veth
//! pair (removed in `Drop`), the real `synwake` daemon running inside the server namespace,
//! a blocking HTTP/1.1 client that connects from either namespace, and hand-built SYNs
//! sent through a raw socket.
//!
//! Nothing here touches the host's own interfaces: the probe only ever attaches to the veth
//! end inside a namespace the fixture created.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::bins::synwake_bin;
use crate::gate::{is_root, skip_or_fail};
use crate::http::{request_on, Resp};
use crate::metrics::Metrics;
use crate::netns::{in_ns, NetnsPair, PairSpec};
use crate::packets::{syn_packet, RawSender};
use crate::proc::wait_until;

/// Addresses on the veth pair; private to the fixture's namespaces, so every test may use
/// the same ones.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The veth ends: `CLIENT_IF` in the client namespace, `SERVER_IF` (probed) in the server's.
pub const CLIENT_IF: &str = "swp-c";
pub const SERVER_IF: &str = "swp-s";
/// Ports inside the server namespace (free there by construction).
pub const SHARED_PORT: u16 = 8080;
pub const API_PORT: u16 = 8081;

/// Two namespaces, `swp-<pid>-<n>-c` and `swp-<pid>-<n>-s`, joined by a veth pair with
/// a /30 between them. Both namespaces (and with them the veth and anything attached to
/// it) are deleted in `Drop`.
pub struct Net(NetnsPair);

impl std::ops::Deref for Net {
    type Target = NetnsPair;
    fn deref(&self) -> &NetnsPair {
        &self.0
    }
}

impl Net {
    pub fn create() -> io::Result<Net> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        NetnsPair::create(PairSpec {
            base: format!("swp-{}-{n}", std::process::id()),
            client_if: CLIENT_IF.into(),
            server_if: SERVER_IF.into(),
            v4: (CLIENT_IP, SERVER_IP, 30),
            v6: None,
        })
        .map(Net)
    }

    /// Creates the topology, or applies the privileged-test rule and returns `None`.
    pub fn create_or_skip(test: &str) -> Option<Net> {
        if !is_root() {
            skip_or_fail(test, "not root, cannot create network namespaces");
            return None;
        }
        match Net::create() {
            Ok(net) => Some(net),
            Err(e) => {
                skip_or_fail(test, &format!("cannot create netns + veth: {e}"));
                None
            }
        }
    }

    /// An IPPROTO_RAW socket in the client namespace.
    pub fn client_raw_socket(&self) -> RawSender {
        self.in_client(|| RawSender::new().expect("raw socket in the client namespace"))
    }
}

/// How the probe came up in a daemon, from its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeState {
    /// Attached to `SERVER_IF` in this mode (`xdp-native`, `xdp-generic`, `tcx`, ...).
    Attached(String),
    Off,
    /// The daemon's warning, naming the reason.
    Unavailable(String),
}

/// `synwake up` running inside the server namespace through `ip netns exec`.
pub struct NsDaemon {
    pub dir: tempfile::TempDir,
    pub server_ns: String,
    pub probe: ProbeState,
    child: Option<Child>,
}

impl NsDaemon {
    /// Starts the daemon with `[probe] mode = <probe_mode>` on `SERVER_IF`, `gateway_extra`
    /// lines in `[gateway]` and `body` (functions) after; waits until the API answers and
    /// the probe reported how it attached.
    pub fn start(net: &Net, probe_mode: &str, gateway_extra: &str, body: &str) -> NsDaemon {
        Self::start_with_log(net, probe_mode, gateway_extra, body, "info")
    }

    /// [`NsDaemon::start`] with `SYNWAKE_LOG=<log_filter>`.
    pub fn start_with_log(
        net: &Net,
        probe_mode: &str,
        gateway_extra: &str,
        body: &str,
        log_filter: &str,
    ) -> NsDaemon {
        let probe = format!("mode = \"{probe_mode}\"\ninterfaces = [\"{SERVER_IF}\"]");
        Self::start_custom(net, &probe, gateway_extra, body, log_filter)
    }

    /// The daemon with `probe` as the whole `[probe]` table.
    pub fn start_custom(
        net: &Net,
        probe: &str,
        gateway_extra: &str,
        body: &str,
        log_filter: &str,
    ) -> NsDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("synwake.toml");
        let text = format!(
            "[gateway]\nlisten = \"{SERVER_IP}:{SHARED_PORT}\"\napi_listen = \"127.0.0.1:{API_PORT}\"\nstate_dir = {:?}\ndrain_timeout = \"2s\"\n{gateway_extra}\n\n[probe]\n{probe}\n\n{body}",
            dir.path().join("state").display().to_string()
        );
        std::fs::write(&config, text).expect("write config");
        let log = File::create(dir.path().join("daemon.log")).expect("daemon log");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.server_ns])
            .arg(synwake_bin())
            .arg("up")
            .arg("--config")
            .arg(&config)
            .env("SYNWAKE_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn ip netns exec synwake up");
        let mut d = NsDaemon {
            dir,
            server_ns: net.server_ns.clone(),
            probe: ProbeState::Off,
            child: Some(child),
        };
        let mut probe = None;
        let up = wait_until(Duration::from_secs(20), || {
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("synwake exited early ({status}):\n{}", d.log());
            }
            if probe.is_none() {
                probe = d.probe_state();
            }
            probe.is_some()
                && d.api("GET", "/healthz", None)
                    .is_ok_and(|r| r.status == 200)
        });
        assert!(up, "synwake not up after 20 s:\n{}", d.log());
        d.probe = probe.expect("probe state");
        d
    }

    fn probe_state(&self) -> Option<ProbeState> {
        let log = self.log();
        for line in log.lines() {
            if let Some(rest) = line
                .split(&format!("probe attached to {SERVER_IF} ("))
                .nth(1)
            {
                let mode = rest.split(')').next().unwrap_or("?");
                return Some(ProbeState::Attached(mode.to_string()));
            }
            if line.contains("probe off") {
                return Some(ProbeState::Off);
            }
            if line.contains("probe unavailable") {
                return Some(ProbeState::Unavailable(line.trim().to_string()));
            }
        }
        None
    }

    /// True if the probe is attached; otherwise applies the privileged-test rule.
    pub fn probe_or_skip(&self, test: &str) -> bool {
        match &self.probe {
            ProbeState::Attached(mode) => {
                eprintln!("{test}: probe attached to {SERVER_IF} ({mode})");
                true
            }
            other => {
                skip_or_fail(test, &format!("the eBPF probe did not attach: {other:?}"));
                false
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's thread named `name` (e.g. `synwake-probe`, the event reader).
    pub fn thread(&self, name: &str) -> Option<i32> {
        let pid = self.child.as_ref()?.id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|comm| comm.trim_end() == name)
            })
            .and_then(|t| t.file_name().to_str()?.parse().ok())
    }

    /// Live instances according to the process runtime's pid files.
    pub fn pid_files(&self) -> usize {
        std::fs::read_dir(self.state_dir().join("run"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// One request to the management API (from a thread inside the server namespace).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> io::Result<Resp> {
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, API_PORT));
        let stream = in_ns(&self.server_ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })?;
        // The generated password exists once the daemon is up (before that: /healthz only).
        let auth = crate::http::generated_password(&self.state_dir())
            .map(|p| crate::http::basic_auth("admin", &p));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        http(stream, method, path, &headers, body.map(str::as_bytes))
    }

    pub fn metrics(&self) -> Metrics {
        let r = self
            .api("GET", "/metrics", None)
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(r.status, 200, "{}", r.text());
        Metrics(r.text())
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        let r = self
            .api("GET", &format!("/system/function/{name}"), None)
            .unwrap_or_else(|e| panic!("GET /system/function/{name}: {e}"));
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice(&r.body).expect("status JSON")
    }

    pub fn available(&self, name: &str) -> u64 {
        self.status(name)["availableReplicas"]
            .as_u64()
            .expect("availableReplicas")
    }

    pub fn replicas(&self, name: &str) -> u64 {
        self.status(name)["replicas"].as_u64().expect("replicas")
    }

    /// POST /system/scale-function/<name>.
    pub fn scale(&self, name: &str, replicas: u32) {
        let body = format!("{{\"serviceName\":\"{name}\",\"replicas\":{replicas}}}");
        let r = self
            .api(
                "POST",
                &format!("/system/scale-function/{name}"),
                Some(&body),
            )
            .unwrap_or_else(|e| panic!("scale {name}: {e}"));
        assert_eq!(r.status, 202, "scale {name}: {}", r.text());
    }
}

impl NsDaemon {
    /// Stops the daemon as `Drop` does (SIGTERM, SIGKILL after 5 s); its log stays readable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals the daemon this fixture started (ip netns exec execs it).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let stopped = wait_until(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                eprintln!("synwake ignored SIGTERM for 5 s; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- synwake log ----\n{}---- end ----", self.log());
        }
    }
}

/// One HTTP/1.1 request with `Connection: close` on an already connected stream.
pub fn http(
    stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Resp> {
    request_on(stream, method, path, headers, body)
}

/// GET `path` on `to` from the client namespace.
pub fn client_get(net: &Net, to: SocketAddr, path: &str) -> io::Result<Resp> {
    let stream = net.client_connect(to)?;
    http(stream, "GET", path, &[], None)
}

impl RawSender {
    /// One SYN from `CLIENT_IP:src_port` to `SERVER_IP:dst_port`.
    pub fn syn(&self, src_port: u16, dst_port: u16, extra_options: &[u8]) -> io::Result<()> {
        let packet = syn_packet(
            SocketAddrV4::new(CLIENT_IP, src_port),
            SocketAddrV4::new(SERVER_IP, dst_port),
            0x5357_0000 ^ u32::from(src_port),
            extra_options,
        );
        self.send(&packet)
    }
}

/// Busy threads on every CPU and the daemon's probe reader at SCHED_IDLE until dropped:
/// the reader reads the ring milliseconds late, as on a loaded host.
pub struct StarvedReader {
    tid: i32,
    stop: Arc<AtomicBool>,
    hogs: Vec<std::thread::JoinHandle<()>>,
}

impl StarvedReader {
    pub fn new(d: &NsDaemon) -> StarvedReader {
        let tid = d.thread("synwake-probe").expect("the probe reader thread");
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sets the policy of a thread of the daemon this test started.
        let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
        assert_eq!(rc, 0, "SCHED_IDLE: {}", std::io::Error::last_os_error());
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hogs = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        StarvedReader { tid, stop, hogs }
    }
}

impl Drop for StarvedReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.hogs.drain(..) {
            let _ = h.join();
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: gives the reader back its normal policy (it may have exited: ignored).
        unsafe { libc::sched_setscheduler(self.tid, libc::SCHED_OTHER, &param) };
    }
}
