//! Network namespaces for one benchmark run: client, router and server joined by veths,
//! with the router's FORWARD chain sending every packet through the NFQUEUE delay line.
//!
//! Layout (all addresses live only inside namespaces this module creates; 198.18.0.0/15 is
//! the range RFC 2544 reserves for benchmarking):
//!
//! ```text
//!   client ns            router ns                       server ns
//!   swb0 198.18.0.1 <-> swbc [FORWARD -> NFQUEUE] swbs <-> swb0 198.18.0.2
//! ```
//!
//! Client and server see each other as on-link (/32 routes); the router answers ARP for
//! both sides (proxy_arp) and forwards. Delaying in FORWARD rather than at the sender's own
//! egress keeps TCP small queues out of the way, so bulk transfers are not throttled.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace this crate creates; anything named `swb-*` is ours.
pub const NETNS_PREFIX: &str = "swb-";
/// Address of the client end.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Address of the server end (where synwake listens).
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Interface name of the veth end inside the client and inside the server namespace.
pub const ENDPOINT_IFACE: &str = "swb0";
/// Router's interface towards the client.
pub const ROUTER_CLIENT_IFACE: &str = "swbc";
/// Router's interface towards the server.
pub const ROUTER_SERVER_IFACE: &str = "swbs";
/// NFQUEUE number for packets travelling client -> server.
pub const QUEUE_TO_SERVER: u16 = 0;
/// NFQUEUE number for packets travelling server -> client.
pub const QUEUE_TO_CLIENT: u16 = 1;

const NETNS_DIR: &str = "/run/netns";

static TOPOLOGY_SEQ: AtomicU32 = AtomicU32::new(0);

/// Errors from building or entering namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not enter network namespace {name}")]
    Enter {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("thread inside network namespace {name} panicked")]
    ThreadPanicked { name: String },
    #[error("could not write sysctl {path} in {name}")]
    Sysctl {
        name: String,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Runs `ip` (or another command) and turns a non-zero exit into an error carrying stderr.
pub(crate) fn run_cmd(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into the named network namespace. Only this thread changes.
pub fn enter_netns(name: &str) -> Result<(), NetnsError> {
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).map_err(|source| NetnsError::Enter {
        name: name.to_string(),
        source,
    })?;
    // SAFETY: setns on a valid fd we own; it affects the calling thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has entered the network namespace `name`.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = name.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || -> Result<T, NetnsError> {
            enter_netns(&ns)?;
            Ok(f())
        })
        .map_err(|source| NetnsError::Enter {
            name: name.to_string(),
            source,
        })?;
    handle.join().map_err(|_| NetnsError::ThreadPanicked {
        name: name.to_string(),
    })?
}

/// Writes a sysctl under /proc/sys/net as seen from namespace `name`.
fn write_net_sysctl(name: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let ns = name.to_string();
    let (p, v) = (path.clone(), value.to_string());
    // /proc/sys/net resolves against the netns of the thread that opens it.
    in_netns(name, move || std::fs::write(&p, v))?.map_err(|source| NetnsError::Sysctl {
        name: ns,
        path,
        source,
    })
}

/// Lists namespaces whose name starts with [`NETNS_PREFIX`].
pub fn list_bench_netns() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(NETNS_PREFIX))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Kills every process inside namespace `name` (all were started by this harness) and
/// deletes the namespace; `ip netns del` also removes its veths and iptables rules.
pub fn destroy_netns(name: &str) {
    if let Ok(pids) = run_cmd("ip", &["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: plain kill(2) on a pid listed as living in our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = run_cmd("ip", &["netns", "del", name]);
}

/// Removes `swb-<pid>-*` namespaces left behind by harness processes that no longer exist
/// (e.g. after a SIGKILL, where no Drop could run).
pub fn remove_stale_netns() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list_bench_netns() {
        let owner = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            destroy_netns(&name);
            removed.push(name);
        }
    }
    removed
}

/// The three namespaces of one run. Dropping it deletes them (and everything inside).
#[derive(Debug)]
pub struct Topology {
    /// `swb-<pid>-<seq>`: unique per process and per topology.
    pub prefix: String,
    pub client: String,
    pub router: String,
    pub server: String,
    created: Vec<String>,
}

impl Topology {
    /// Creates client, router and server namespaces, wires them and installs the NFQUEUE
    /// rules (IPv4 and IPv6, one queue per direction). Until a delay line binds the queues,
    /// forwarded packets are dropped, never passed undelayed.
    pub fn create() -> Result<Self, NetnsError> {
        let seq = TOPOLOGY_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NETNS_PREFIX}{}-{seq}", std::process::id());
        let mut topo = Topology {
            client: format!("{prefix}-c"),
            router: format!("{prefix}-r"),
            server: format!("{prefix}-s"),
            prefix,
            created: Vec::new(),
        };
        // On error `topo` is dropped here, which removes what was created so far.
        topo.build()?;
        Ok(topo)
    }

    fn build(&mut self) -> Result<(), NetnsError> {
        for ns in [
            self.client.clone(),
            self.router.clone(),
            self.server.clone(),
        ] {
            run_cmd("ip", &["netns", "add", &ns])?;
            self.created.push(ns.clone());
            run_cmd("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (c, r, s) = (&self.client, &self.router, &self.server);
        run_cmd(
            "ip",
            &[
                "-n",
                c,
                "link",
                "add",
                ENDPOINT_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                ROUTER_CLIENT_IFACE,
                "netns",
                r,
            ],
        )?;
        run_cmd(
            "ip",
            &[
                "-n",
                s,
                "link",
                "add",
                ENDPOINT_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                ROUTER_SERVER_IFACE,
                "netns",
                r,
            ],
        )?;
        let client_cidr = format!("{CLIENT_ADDR}/32");
        let server_cidr = format!("{SERVER_ADDR}/32");
        for (ns, own, peer) in [
            (c, &client_cidr, &server_cidr),
            (s, &server_cidr, &client_cidr),
        ] {
            run_cmd("ip", &["-n", ns, "addr", "add", own, "dev", ENDPOINT_IFACE])?;
            run_cmd("ip", &["-n", ns, "link", "set", ENDPOINT_IFACE, "up"])?;
            run_cmd(
                "ip",
                &["-n", ns, "route", "add", peer, "dev", ENDPOINT_IFACE],
            )?;
        }
        write_net_sysctl(r, "net.ipv4.ip_forward", "1")?;
        write_net_sysctl(r, "net.ipv6.conf.all.forwarding", "1")?;
        for (iface, target) in [
            (ROUTER_CLIENT_IFACE, &client_cidr),
            (ROUTER_SERVER_IFACE, &server_cidr),
        ] {
            write_net_sysctl(r, &format!("net.ipv4.conf.{iface}.proxy_arp"), "1")?;
            run_cmd("ip", &["-n", r, "link", "set", iface, "up"])?;
            run_cmd("ip", &["-n", r, "route", "add", target, "dev", iface])?;
        }
        for tool in ["iptables", "ip6tables"] {
            for (from, to, queue) in [
                (ROUTER_CLIENT_IFACE, ROUTER_SERVER_IFACE, QUEUE_TO_SERVER),
                (ROUTER_SERVER_IFACE, ROUTER_CLIENT_IFACE, QUEUE_TO_CLIENT),
            ] {
                let q = queue.to_string();
                run_cmd(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        r,
                        tool,
                        "-A",
                        "FORWARD",
                        "-i",
                        from,
                        "-o",
                        to,
                        "-j",
                        "NFQUEUE",
                        "--queue-num",
                        &q,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Deletes the namespaces now (idempotent; Drop calls it too).
    pub fn destroy(&mut self) {
        while let Some(ns) = self.created.pop() {
            destroy_netns(&ns);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Reads the router's per-queue drop counters (queue_dropped + user_dropped), keyed by queue.
pub fn queue_drops(router: &str) -> Result<Vec<(u16, u64)>, NetnsError> {
    let text = in_netns(router, || {
        // thread-self, not self: /proc/self/net follows the main thread's namespace.
        std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
    })?
    .unwrap_or_default();
    Ok(parse_queue_drops(&text))
}

/// Parses /proc/net/netfilter/nfnetlink_queue: queue, portid, total, mode, range,
/// queue_dropped, user_dropped, id_sequence, 1.
pub fn parse_queue_drops(text: &str) -> Vec<(u16, u64)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() >= 7).then(|| (f[0] as u16, f[5] + f[6]))
        })
        .collect()
}

/// TCP segments retransmitted so far inside namespace `name` (`RetransSegs` of its
/// /proc/net/snmp). Retransmissions mean lost packets, which the emulation must not cause.
pub fn tcp_retransmissions(name: &str) -> Result<u64, NetnsError> {
    let text = in_netns(name, || {
        std::fs::read_to_string("/proc/thread-self/net/snmp")
    })?
    .unwrap_or_default();
    Ok(parse_retrans_segs(&text).unwrap_or(0))
}

/// `RetransSegs` from the two `Tcp:` lines (names, then values) of /proc/net/snmp.
pub fn parse_retrans_segs(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = tcp.next()?;
    let values = tcp.next()?;
    let idx = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_retransmitted_segments_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin RetransSegs InErrs\nTcp: 1 200 17 0\nUdp: InDatagrams\nUdp: 3\n";
        assert_eq!(parse_retrans_segs(snmp), Some(17));
        assert_eq!(parse_retrans_segs("Udp: x\nUdp: 1\n"), None);
    }

    #[test]
    fn parses_nfnetlink_queue_proc_file() {
        let text = "    0  12345     0 1     0  3  4       10  1\n    1  12345     0 1     0  0  0        7  1\n";
        assert_eq!(parse_queue_drops(text), vec![(0, 7), (1, 0)]);
    }
}
