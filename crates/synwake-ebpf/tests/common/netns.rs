//! Network-namespace fixtures for privileged tests and the benchmark: a client and a server
//! namespace joined by a veth pair, removed again in `Drop`. Never touches the host's NICs.
#![allow(dead_code)]

use std::{fs::File, io, os::fd::AsRawFd, process::Command};

/// Addresses inside the fixture's own namespaces (nothing else is ever a target).
pub const CLIENT_ADDR_V4: &str = "10.203.0.1";
pub const SERVER_ADDR_V4: &str = "10.203.0.2";
pub const CLIENT_ADDR_V6: &str = "fd00:5357::1";
pub const SERVER_ADDR_V6: &str = "fd00:5357::2";
/// The veth end inside the server namespace, where the probe attaches.
pub const SERVER_IF: &str = "swv-s";
pub const CLIENT_IF: &str = "swv-c";

pub struct VethPair {
    pub client_ns: String,
    pub server_ns: String,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip").args(args).output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

impl VethPair {
    /// Creates `swe-<tag>-<pid>-{c,s}` joined by a veth pair with IPv4 and IPv6 addresses.
    pub fn create(tag: &str) -> io::Result<Self> {
        let pid = std::process::id();
        let pair = Self {
            client_ns: format!("swe-{tag}-{pid}-c"),
            server_ns: format!("swe-{tag}-{pid}-s"),
        };
        let (c, s) = (pair.client_ns.as_str(), pair.server_ns.as_str());
        ip(&["netns", "add", c])?;
        ip(&["netns", "add", s])?;
        ip(&[
            "-n", c, "link", "add", CLIENT_IF, "type", "veth", "peer", "name", SERVER_IF, "netns",
            s,
        ])?;
        for (ns, dev, v4, v6) in [
            (c, CLIENT_IF, CLIENT_ADDR_V4, CLIENT_ADDR_V6),
            (s, SERVER_IF, SERVER_ADDR_V4, SERVER_ADDR_V6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// Moves the calling thread into `ns` (other threads stay where they are).
    pub fn enter(ns: &str) -> io::Result<()> {
        let file = File::open(format!("/var/run/netns/{ns}"))?;
        // SAFETY: valid namespace fd; setns affects only this thread for CLONE_NEWNET.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Programs attached to `SERVER_IF` in `ns`, as `xdp:<name>`, `tcx:<name>` (iproute2
    /// and bpftool on Debian 12 predate TCX, so TCX is queried through aya) or
    /// `clsact:synwake_tc` (a netlink filter).
    pub fn attached_programs(ns: &str) -> Vec<String> {
        let ns = ns.to_string();
        std::thread::spawn(move || {
            Self::enter(&ns).unwrap();
            let mut attached = Vec::new();
            let link = Command::new("ip")
                .args(["-d", "link", "show", "dev", SERVER_IF])
                .output()
                .unwrap();
            let link = String::from_utf8_lossy(&link.stdout).into_owned();
            if let Some(rest) = link.split("prog/xdp ").nth(1) {
                let name = rest
                    .split_whitespace()
                    .skip_while(|w| *w != "name")
                    .nth(1)
                    .unwrap_or("?");
                attached.push(format!("xdp:{name}"));
            }
            let (_, programs) = aya::programs::SchedClassifier::query_tcx(
                SERVER_IF,
                aya::programs::TcAttachType::Ingress,
            )
            .expect("query tcx");
            for program in programs {
                attached.push(format!("tcx:{}", program.name_as_str().unwrap_or("?")));
            }
            let filters = Command::new("tc")
                .args(["filter", "show", "dev", SERVER_IF, "ingress"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&filters.stdout).contains("synwake_tc") {
                attached.push("clsact:synwake_tc".to_string());
            }
            attached
        })
        .join()
        .unwrap()
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end (and so the pair) and its programs.
        let _ = ip(&["netns", "del", &self.server_ns]);
        let _ = ip(&["netns", "del", &self.client_ns]);
    }
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
