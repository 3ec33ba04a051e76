//! Two network namespaces joined by a veth pair, deleted again in `Drop` (which removes
//! the veth and anything attached to it). Never touches the host's own interfaces.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

/// Runs `ip <args>`; the error carries ip's own message.
pub fn ip(args: &[&str]) -> io::Result<()> {
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

/// What a [`NetnsPair`] is made of.
#[derive(Debug, Clone)]
pub struct PairSpec {
    /// Namespaces are `<base>-c` and `<base>-s`; put the test's short name and the pid in.
    pub base: String,
    pub client_if: String,
    pub server_if: String,
    /// Client address, server address, prefix length.
    pub v4: (Ipv4Addr, Ipv4Addr, u8),
    pub v6: Option<(Ipv6Addr, Ipv6Addr, u8)>,
}

/// A client and a server namespace joined by a veth pair (`client_if` in the client's,
/// `server_if` in the server's), both up with their addresses, `lo` up in each.
#[derive(Debug)]
pub struct NetnsPair {
    pub client_ns: String,
    pub server_ns: String,
    pub spec: PairSpec,
}

impl NetnsPair {
    pub fn create(spec: PairSpec) -> io::Result<NetnsPair> {
        // Built first so that a failure half-way is cleaned up by Drop.
        let pair = NetnsPair {
            client_ns: format!("{}-c", spec.base),
            server_ns: format!("{}-s", spec.base),
            spec,
        };
        let (c, s) = (pair.client_ns.as_str(), pair.server_ns.as_str());
        let spec = &pair.spec;
        ip(&["netns", "add", c])?;
        ip(&["netns", "add", s])?;
        ip(&[
            "-n",
            c,
            "link",
            "add",
            &spec.client_if,
            "type",
            "veth",
            "peer",
            "name",
            &spec.server_if,
            "netns",
            s,
        ])?;
        let (cv4, sv4, len4) = spec.v4;
        for (ns, dev, v4, v6) in [
            (c, &spec.client_if, cv4, spec.v6.map(|(a, _, l)| (a, l))),
            (s, &spec.server_if, sv4, spec.v6.map(|(_, a, l)| (a, l))),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/{len4}"), "dev", dev])?;
            if let Some((v6, len6)) = v6 {
                let addr = format!("{v6}/{len6}");
                ip(&["-n", ns, "addr", "add", &addr, "dev", dev, "nodad"])?;
            }
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
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
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.server_ns, &self.client_ns] {
            if netns_exists(ns) {
                if let Err(e) = ip(&["netns", "del", ns]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}

/// Whether `/var/run/netns/<ns>` exists.
pub fn netns_exists(ns: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(ns).exists()
}

/// Named network namespaces whose names start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
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

/// Puts the calling thread in a fresh, private network namespace with `lo` up: the
/// namespace disappears with the thread, and nothing outside it is touched.
pub fn unshare_private_netns() -> io::Result<()> {
    // SAFETY: CLONE_NEWNET only affects the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    ip(&["link", "set", "lo", "up"]).or_else(|_| set_lo_up_ioctl())
}

fn set_lo_up_ioctl() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a struct we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        libc::close(fd);
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
