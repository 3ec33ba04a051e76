//! Instance networking: bridge `synwake0`, one netns per container with a veth on the
//! bridge and an address from the subnet. Bridge ports are isolated, so instances cannot
//! reach each other (only the host, which proxies to them).
//!
//! Every name this module creates starts with [`NETNS_PREFIX`] or [`VETH_PREFIX`] followed
//! by the runtime's tag (derived from its state directory), which is how crash cleanup
//! recognises exactly what is ours, and leaves another synwake's namespaces alone.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Name of the bridge every instance veth is attached to.
pub const BRIDGE: &str = "synwake0";
/// Fixed, locally administered MAC of the bridge ("swk" in the middle bytes).
pub const BRIDGE_MAC: &str = "02:73:77:6b:00:01";
/// Prefix of every network namespace this crate creates (also the container id prefix).
pub const NETNS_PREFIX: &str = "swk-";
/// Prefix of every host-side veth this crate creates.
pub const VETH_PREFIX: &str = "swkv";
/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Tag on every iptables rule this crate adds.
const RULE_TAG: &str = "synwake";

/// Why instance networking failed.
// Fields are named for what they hold; the variant docs and messages say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configured subnet is not `a.b.c.d/len` with len in 8..=30.
    #[error("invalid subnet {subnet:?}: {reason}")]
    Subnet { subnet: String, reason: String },
    /// Every address of the subnet is leased.
    #[error("subnet {subnet} has no free address left")]
    Exhausted { subnet: String },
    /// A command (`ip`, `iptables`) failed.
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    /// A command could not be spawned.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// A leased network attachment of one container. Give it back with [`Network::release`].
#[derive(Debug, Clone)]
pub struct Lease {
    /// The instance's address on the bridge.
    pub ip: Ipv4Addr,
    /// Name of the network namespace (under `/run/netns`).
    pub netns: String,
    /// Host side of the veth pair.
    pub host_veth: String,
    offset: u32,
}

impl Lease {
    /// Path of the netns, for the runtime spec's network namespace.
    pub fn netns_path(&self) -> String {
        format!("{NETNS_DIR}/{}", self.netns)
    }
}

/// The bridge plus an address allocator for the subnet.
#[derive(Debug)]
pub struct Network {
    subnet: String,
    base: u32,
    prefix: u8,
    gateway: Ipv4Addr,
    state: Mutex<Alloc>,
    spares: Mutex<Vec<Lease>>,
    spare_target: usize,
    /// Distinguishes this runtime's names (netns `swk-<tag>-n<hex>`, veth `swkv<tag><base36>`).
    tag: String,
    /// Set by [`Network::drop_spares`]: no more spares are made.
    closed: AtomicBool,
}

#[derive(Debug)]
struct Alloc {
    used: HashSet<u32>,
    next: u32,
    spares_pending: usize,
}

/// Interface names are at most IFNAMSIZ - 1 bytes (the kernel refuses longer ones).
const IFNAMSIZ: usize = 16;

/// `swkv<tag><offset in base 36>`: 4 + 6 + at most 5 bytes (36^5 > 2^24, a /8), so
/// the name fits IFNAMSIZ for every subnet `parse_subnet` allows (hex would not past a /12).
fn veth_name(tag: &str, offset: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut digits = Vec::with_capacity(7);
    let mut n = offset;
    loop {
        digits.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    let name = format!(
        "{VETH_PREFIX}{tag}{}",
        String::from_utf8(digits).expect("ASCII digits")
    );
    debug_assert!(name.len() < IFNAMSIZ, "{name}");
    name
}

fn parse_subnet(subnet: &str) -> Result<(u32, u8), NetError> {
    let err = |reason: &str| NetError::Subnet {
        subnet: subnet.to_string(),
        reason: reason.to_string(),
    };
    let (addr, len) = subnet.split_once('/').ok_or_else(|| err("missing /len"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| err("bad address"))?;
    let len: u8 = len.parse().map_err(|_| err("bad prefix length"))?;
    if !(8..=30).contains(&len) {
        return Err(err("prefix length must be 8..=30"));
    }
    let mask = u32::MAX << (32 - len);
    Ok((u32::from(addr) & mask, len))
}

impl Network {
    /// Creates (or adopts) the bridge with the subnet's first address, isolates instance
    /// traffic, and adds or removes the MASQUERADE rule according to `outbound_nat`.
    /// `spares` namespaces are kept ready once [`Network::replenish`] is called.
    pub async fn setup(
        subnet: &str,
        outbound_nat: bool,
        spares: usize,
        tag: &str,
    ) -> Result<Self, NetError> {
        let (base, prefix) = parse_subnet(subnet)?;
        let gateway = Ipv4Addr::from(base + 1);
        let subnet = format!("{}/{prefix}", Ipv4Addr::from(base));
        if !link_exists(BRIDGE) {
            run("ip", &["link", "add", BRIDGE, "type", "bridge"]).await?;
        }
        run(
            "ip",
            &[
                "addr",
                "replace",
                &format!("{gateway}/{prefix}"),
                "dev",
                BRIDGE,
            ],
        )
        .await?;
        // A bridge without a fixed address takes the lowest port MAC, so it changes as
        // instances come and go; instances then answer to a stale gateway MAC and first
        // connections stall for ~13 s until their neighbour entry is re-probed.
        run("ip", &["link", "set", BRIDGE, "address", BRIDGE_MAC]).await?;
        run("ip", &["link", "set", BRIDGE, "up"]).await?;
        // Addresses are handed out again from the start: stale neighbour entries pointing
        // at a previous run's veth MACs would stall first connections for seconds.
        let _ = run("ip", &["neigh", "flush", "dev", BRIDGE]).await;
        // Routed hairpin between instances (bridged traffic is stopped by port isolation).
        ensure_rule(
            "filter",
            "FORWARD",
            &["-i", BRIDGE, "-o", BRIDGE, "-j", "DROP"],
            true,
        )
        .await?;
        let nat = ["-s", &subnet, "!", "-o", BRIDGE, "-j", "MASQUERADE"];
        let fwd_out = ["-i", BRIDGE, "!", "-o", BRIDGE, "-j", "ACCEPT"];
        let fwd_in = [
            "-o",
            BRIDGE,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ];
        if outbound_nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| {
                NetError::Spawn {
                    command: "write /proc/sys/net/ipv4/ip_forward".into(),
                    source,
                }
            })?;
        }
        ensure_rule("nat", "POSTROUTING", &nat, outbound_nat).await?;
        ensure_rule("filter", "FORWARD", &fwd_out, outbound_nat).await?;
        ensure_rule("filter", "FORWARD", &fwd_in, outbound_nat).await?;
        let size = 1u32 << (32 - prefix);
        Ok(Network {
            subnet,
            base,
            prefix,
            gateway,
            state: Mutex::new(Alloc {
                used: HashSet::new(),
                next: 2.min(size - 2),
                spares_pending: 0,
            }),
            spares: Mutex::new(Vec::new()),
            spare_target: spares,
            tag: tag.to_string(),
            closed: AtomicBool::new(false),
        })
    }

    /// The bridge's address: instances' default gateway, and where the host reaches them from.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    fn allocate(&self) -> Result<u32, NetError> {
        let size = 1u32 << (32 - self.prefix);
        let mut a = self.state.lock().expect("alloc lock");
        // Round robin over .2 ..= broadcast-1, so a released address is not reused at once.
        for _ in 0..size {
            let off = a.next;
            a.next = if a.next + 1 >= size - 1 {
                2
            } else {
                a.next + 1
            };
            if off >= 2 && !a.used.contains(&off) {
                a.used.insert(off);
                return Ok(off);
            }
        }
        Err(NetError::Exhausted {
            subnet: self.subnet.clone(),
        })
    }

    /// A ready network for one container: a namespace made ahead of time when one is
    /// spare (namespaces are function-agnostic), else a new one. Call
    /// [`Network::replenish`] afterwards (not right away: making namespaces competes for
    /// the CPU with whatever the caller does next). The netns is named `swk-<tag>-n<hex>`, the host veth `swkv<tag><base36>`.
    pub async fn attach(self: &Arc<Self>) -> Result<Lease, NetError> {
        let spare = self.spares.lock().expect("spares lock").pop();
        let lease = match spare {
            Some(l) => l,
            None => self.make().await?,
        };
        Ok(lease)
    }

    /// Starts background creation of spare namespaces up to the target count.
    pub fn replenish(self: &Arc<Self>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let missing = {
            let mut a = self.state.lock().expect("alloc lock");
            let have = self.spares.lock().expect("spares lock").len() + a.spares_pending;
            let missing = self.spare_target.saturating_sub(have);
            a.spares_pending += missing;
            missing
        };
        for _ in 0..missing {
            let net = self.clone();
            tokio::spawn(async move {
                let made = net.make().await;
                net.state.lock().expect("alloc lock").spares_pending -= 1;
                match made {
                    Ok(l) if net.closed.load(Ordering::Acquire) => net.release(l).await,
                    Ok(l) => net.spares.lock().expect("spares lock").push(l),
                    Err(e) => tracing::warn!("spare netns: {e}"),
                }
            });
        }
    }

    /// Number of namespaces ready to hand out.
    pub fn spare_count(&self) -> usize {
        self.spares.lock().expect("spares lock").len()
    }

    async fn make(&self) -> Result<Lease, NetError> {
        let offset = self.allocate()?;
        let lease = Lease {
            ip: Ipv4Addr::from(self.base + offset),
            netns: format!("{NETNS_PREFIX}{}-n{offset:x}", self.tag),
            host_veth: veth_name(&self.tag, offset),
            offset,
        };
        match self.plumb(&lease).await {
            Ok(()) => Ok(lease),
            Err(e) => {
                self.release(lease).await;
                Err(e)
            }
        }
    }

    /// Deletes every spare namespace (shutdown).
    pub async fn drop_spares(&self) {
        self.closed.store(true, Ordering::Release);
        let spares: Vec<Lease> = self.spares.lock().expect("spares lock").drain(..).collect();
        for l in spares {
            self.release(l).await;
        }
    }

    /// Removes this runtime's gateway address from the bridge (shutdown), so addresses of
    /// finished runs do not pile up on `synwake0`. Another runtime on the same subnet
    /// would lose its gateway: runtimes sharing a host use different subnets.
    pub async fn release_gateway(&self) {
        let prefix = self.prefix;
        let _ = run(
            "ip",
            &[
                "addr",
                "del",
                &format!("{}/{prefix}", self.gateway),
                "dev",
                BRIDGE,
            ],
        )
        .await;
    }

    async fn plumb(&self, l: &Lease) -> Result<(), NetError> {
        // A veth of that name can only be left from a crash we did not clean: replace it.
        if link_exists(&l.host_veth) {
            let _ = run("ip", &["link", "del", &l.host_veth]).await;
        }
        let host = format!(
            "netns add {ns}\n\
             link add {v} type veth peer name eth0 netns {ns}\n\
             link set {v} master {BRIDGE}\n\
             link set dev {v} type bridge_slave isolated on\n\
             link set {v} up\n\
             neigh flush to {ip} dev {BRIDGE}\n",
            ns = l.netns,
            v = l.host_veth,
            ip = l.ip
        );
        batch(&[], &host).await?;
        let inner = format!(
            "addr add {ip}/{p} dev eth0\n\
             link set eth0 up\n\
             link set lo up\n\
             route add default via {gw}\n",
            ip = l.ip,
            p = self.prefix,
            gw = self.gateway
        );
        batch(&["-n", &l.netns], &inner).await
    }

    /// Deletes the veth pair and the netns, and frees the address.
    pub async fn release(&self, lease: Lease) {
        // The host end first: `ip link del` returns once the pair is gone. Removing the
        // netns first left the pair to the kernel's deferred netns cleanup, and under load
        // the host end was still listed after the stop returned (CI saw it).
        if link_exists(&lease.host_veth) {
            let _ = run("ip", &["link", "del", &lease.host_veth]).await;
        }
        delete_netns(&lease.netns);
        self.state
            .lock()
            .expect("alloc lock")
            .used
            .remove(&lease.offset);
    }
}

/// Unmounts and removes a named netns; its interfaces go with it.
pub fn delete_netns(name: &str) {
    let path = format!("{NETNS_DIR}/{name}");
    if let Ok(c) = std::ffi::CString::new(path.clone()) {
        // SAFETY: c is a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(&path);
}

/// Removes every netns and host veth with our prefixes and `tag` (left by a crashed run). Returns
/// how many namespaces and veths were removed.
pub async fn remove_stale(tag: &str) -> (usize, usize) {
    let netns_prefix = format!("{NETNS_PREFIX}{tag}-");
    let veth_prefix = format!("{VETH_PREFIX}{tag}");
    let mut netns = 0;
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&netns_prefix) {
                delete_netns(&name);
                netns += 1;
            }
        }
    }
    let mut veths = 0;
    for name in link_names() {
        if name.starts_with(&veth_prefix) && run("ip", &["link", "del", &name]).await.is_ok() {
            veths += 1;
        }
    }
    (netns, veths)
}

async fn ensure_rule(
    table: &str,
    chain: &str,
    rule: &[&str],
    present: bool,
) -> Result<(), NetError> {
    let mut args: Vec<&str> = vec!["-w", "-t", table, "-C", chain];
    args.extend_from_slice(rule);
    args.extend_from_slice(&["-m", "comment", "--comment", RULE_TAG]);
    let exists = run("iptables", &args).await.is_ok();
    match (exists, present) {
        (false, true) => {
            args[3] = "-I";
            run("iptables", &args).await
        }
        (true, false) => {
            args[3] = "-D";
            run("iptables", &args).await
        }
        _ => Ok(()),
    }
}

async fn run(program: &str, args: &[&str]) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| NetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs several `ip` commands in one process (`ip -batch -`): one fork instead of five.
async fn batch(global: &[&str], script: &str) -> Result<(), NetError> {
    let command = format!("ip {} -batch - <<{:?}", global.join(" "), script);
    let spawn_err = |source| NetError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new("ip")
        .args(global)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(spawn_err)?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether a network interface of this name exists in the calling thread's network
/// namespace. Asks the kernel (ioctl) rather than /sys/class/net, which shows the
/// namespace of whoever mounted /sys: a daemon moved into a netns by setns alone would see
/// the host's interfaces there.
pub fn link_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Names of every network interface in the calling thread's network namespace.
pub fn link_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parses_and_masks() {
        assert_eq!(
            parse_subnet("10.72.3.4/16").unwrap(),
            (u32::from(Ipv4Addr::new(10, 72, 0, 0)), 16)
        );
        assert!(parse_subnet("10.72.0.0").is_err());
        assert!(parse_subnet("10.72.0.0/31").is_err());
    }

    #[test]
    fn veth_names_fit_ifnamsiz_for_every_allowed_subnet() {
        let tag = "abcdef";
        for len in 8..=30u8 {
            let last = (1u32 << (32 - len)) - 1;
            for offset in [1, last / 2, last] {
                let name = veth_name(tag, offset);
                assert!(
                    name.len() < IFNAMSIZ,
                    "/{len}: {name} has {} bytes",
                    name.len()
                );
                assert!(name.starts_with(&format!("{VETH_PREFIX}{tag}")), "{name}");
            }
        }
        let names: std::collections::HashSet<String> =
            (0..100_000).map(|o| veth_name(tag, o)).collect();
        assert_eq!(names.len(), 100_000, "names are unique per offset");
    }
}
