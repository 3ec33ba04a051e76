//! Fixtures for the probe's integration tests: a client and a server network namespace
//! joined by a veth pair (removed in `Drop`), the real `synwake` daemon running inside the
//! server namespace, a blocking HTTP/1.1 client that connects from either namespace, and
//! hand-built SYNs sent through a raw socket.
//!
//! Nothing here touches the host's own interfaces: the probe only ever attaches to the veth
//! end inside a namespace the fixture created.

#![allow(dead_code)] // the tests and the #[ignore] benchmarks use different parts

use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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

/// Privileged-test rule: with CI=true a missing capability fails the test; otherwise the
/// test is skipped with a loud message saying exactly what was missing.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run under CI=true: {why}");
    }
    // Straight to fd 2, not eprintln!: the test harness captures the latter.
    let _ = writeln!(
        io::stderr(),
        "\n!!!!! SKIPPED {test}: {why} (needs root with CAP_NET_ADMIN and CAP_BPF/CAP_SYS_ADMIN; set CI=true to make this a failure)\n"
    );
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Two namespaces, `swp-<pid>-<n>-c` and `swp-<pid>-<n>-s`, joined by a veth pair with
/// a /30 between them. Both namespaces (and with them the veth and anything attached to
/// it) are deleted in `Drop`.
pub struct Net {
    pub client_ns: String,
    pub server_ns: String,
}

impl Net {
    pub fn create() -> io::Result<Net> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("swp-{}-{n}", std::process::id());
        let net = Net {
            client_ns: format!("{base}-c"),
            server_ns: format!("{base}-s"),
        };
        let (c, s) = (net.client_ns.as_str(), net.server_ns.as_str());
        ip(&["netns", "add", c])?;
        ip(&["netns", "add", s])?;
        ip(&[
            "-n", c, "link", "add", CLIENT_IF, "type", "veth", "peer", "name", SERVER_IF, "netns",
            s,
        ])?;
        for (ns, dev, addr) in [(c, CLIENT_IF, CLIENT_IP), (s, SERVER_IF, SERVER_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(net)
    }

    /// Creates the topology, or applies the privileged-test rule and returns `None`.
    pub fn create_or_skip(test: &str) -> Option<Net> {
        // SAFETY: no arguments, cannot fail.
        if unsafe { libc::geteuid() } != 0 {
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

    /// Runs `f` on a thread that joined the client namespace.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_ns(&self.client_ns, f)
    }

    /// Runs `f` on a thread that joined the server namespace.
    pub fn in_server<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_ns(&self.server_ns, f)
    }

    /// A TCP connection from the client namespace (the socket keeps its namespace after
    /// the helper thread is gone, so the caller may use it anywhere).
    pub fn client_connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        self.in_client(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
    }

    /// An IPPROTO_RAW socket in the client namespace.
    pub fn client_raw_socket(&self) -> RawSender {
        self.in_client(|| RawSender::new().expect("raw socket in the client namespace"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end (so the pair) and programs attached to it.
        for ns in [&self.server_ns, &self.client_ns] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Moves the calling thread into namespace `ns` (network namespaces are per thread).
pub fn enter_ns(ns: &str) -> io::Result<()> {
    let file = File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_ns(&ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
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
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("content-type", "application/json")]
        } else {
            &[]
        };
        http(stream, method, path, headers, body.map(str::as_bytes))
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

impl Drop for NsDaemon {
    fn drop(&mut self) {
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
        if std::thread::panicking() {
            eprintln!("---- synwake log ----\n{}---- end ----", self.log());
        }
    }
}

/// The text of GET /metrics.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of one series, `name{labels}` exactly as rendered; 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        self.0
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }
}

/// The binaries, config snippets, waiting and the HTTP client are the core tests' own.
pub use crate::common::{function, synwake_bin, wait_until, Resp};

/// One HTTP/1.1 request with `Connection: close` on an already connected stream.
pub fn http(
    stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Resp> {
    crate::common::request_on(stream, method, path, headers, body)
}

/// GET `path` on `to` from the client namespace.
pub fn client_get(net: &Net, to: SocketAddr, path: &str) -> io::Result<Resp> {
    let stream = net.client_connect(to)?;
    http(stream, "GET", path, &[], None)
}

/// TCP option kinds and flags used in hand-built SYNs.
const TCP_SYN: u8 = 0x02;

/// The synwake TCP option (design.md): kind 253, length 8, ExID 0x5357, function id BE.
pub fn synwake_option(function_id: u32) -> [u8; 8] {
    let id = function_id.to_be_bytes();
    [253, 8, 0x53, 0x57, id[0], id[1], id[2], id[3]]
}

/// FNV-1a 32-bit of the name: the id the synwake option carries. Written out here so the
/// test checks the daemon against the design, not against its own helper.
pub fn function_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                None => odd = Some(b),
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A complete IPv4 + TCP SYN with correct checksums. `options` are the TCP options after
/// the usual Linux ones (MSS 1460, SACK permitted); padded with NOPs to a 4-byte boundary.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, extra_options: &[u8]) -> Vec<u8> {
    let mut options = vec![2, 4, 0x05, 0xb4, 1, 1, 4, 2];
    options.extend_from_slice(extra_options);
    while options.len() % 4 != 0 {
        options.insert(options.len() - extra_options.len(), 1);
    }
    let tcp_len = 20 + options.len();
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.push(((tcp_len / 4) as u8) << 4);
    tcp.push(TCP_SYN);
    tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0]); // checksum
    tcp.extend_from_slice(&[0, 0]); // urgent pointer
    tcp.extend_from_slice(&options);
    let pseudo = [
        src.ip().octets().as_slice(),
        dst.ip().octets().as_slice(),
        &[0, libc::IPPROTO_TCP as u8],
        &(tcp_len as u16).to_be_bytes(),
    ]
    .concat();
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let total = 20 + tcp_len;
    let mut ip = Vec::with_capacity(total);
    ip.push(0x45); // IPv4, IHL 5
    ip.push(0);
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&(seq as u16).to_be_bytes()); // identification
    ip.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip.push(64); // TTL
    ip.push(libc::IPPROTO_TCP as u8);
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// An IPPROTO_RAW socket (IP_HDRINCL implied): sends whole IPv4 packets as built.
pub struct RawSender {
    fd: OwnedFd,
}

impl RawSender {
    /// Opens the socket in the calling thread's network namespace.
    pub fn new() -> io::Result<RawSender> {
        // SAFETY: plain socket call; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Ok(RawSender {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: buffer and sockaddr are valid for the call's duration.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

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

/// Percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let p = syn_packet(
            SocketAddrV4::new(CLIENT_IP, 40000),
            SocketAddrV4::new(SERVER_IP, 8080),
            7,
            &synwake_option(function_id("g")),
        );
        assert_eq!(p.len(), 20 + 20 + 16);
        assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header checksum");
        let pseudo = [
            &p[12..20],
            &[0, 6],
            &((p.len() - 20) as u16).to_be_bytes()[..],
        ]
        .concat();
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "TCP checksum");
        assert_eq!(&p[48..56], &synwake_option(function_id("g")));
        // FNV-1a 32 reference vectors.
        assert_eq!(function_id(""), 0x811c_9dc5);
        assert_eq!(function_id("a"), 0xe40c_292c);
        assert_eq!(function_id("foobar"), 0xbf9c_f968);
    }
}
