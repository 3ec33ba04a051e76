//! The tagger: a sockops program on a cgroup v2 that puts the synwake option (the
//! function's id) into the SYNs its sockets send to configured destinations, so the
//! probe on the server wakes that function on the SYN even on a shared port.

use std::{
    fmt,
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        MapData, MapError, PerCpuArray,
    },
    programs::{links::CgroupAttachMode, SockOps},
    Ebpf, EbpfError, EbpfLoader,
};
use ipnet::IpNet;

use crate::{
    header::{
        SYNWAKE_FAMILY_IPV4, SYNWAKE_FAMILY_IPV6, SYNWAKE_TAG_KEY_FIXED_BITS, SYNWAKE_TAG_KEY_SIZE,
        SYNWAKE_TAG_STAT_FULL, SYNWAKE_TAG_STAT_TAGGED,
    },
    probe::error_chain,
};

/// The compiled `bpf/tag.bpf.c`.
static TAG_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tag.bpf.o"));
static FILL_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fill_options.bpf.o"));
const TAG_PROGRAM: &str = "synwake_tag";
const FILL_PROGRAM: &str = "synwake_fill_options";
const DESTINATIONS_MAP: &str = "tag_destinations";
const STATS_MAP: &str = "tag_stats";

/// `struct synwake_tag_key` of `bpf/synwake.h` after its `prefixlen` (which aya's
/// [`Key`] carries): family, pad, port (network order), address.
type KeyData = [u8; SYNWAKE_TAG_KEY_SIZE as usize - 4];

/// Errors of loading, configuring and attaching the tagger.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error("loading the sockops tagger failed (needs root or CAP_BPF+CAP_NET_ADMIN): {reason}")]
    Load {
        reason: String,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("the kernel rejected the sockops program {program}: {reason}")]
    Program {
        program: &'static str,
        reason: String,
    },
    #[error("map {map} is missing from the tagger object or has the wrong type")]
    MissingMap { map: &'static str },
    #[error("updating map {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("opening cgroup {path} failed")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching the tagger to cgroup {path} failed: {reason}")]
    Attach { path: PathBuf, reason: String },
}

/// A destination whose SYNs get tagged: an address prefix and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TagDestination {
    /// The address prefix (host bits cleared).
    pub net: IpNet,
    pub port: u16,
}

/// Why a destination string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination {text:?}: {reason} (expected ADDR:PORT, ADDR/PREFIX:PORT, [V6]:PORT or [V6/PREFIX]:PORT)")]
pub struct DestinationError {
    text: String,
    reason: &'static str,
}

impl FromStr for TagDestination {
    type Err = DestinationError;

    fn from_str(text: &str) -> Result<Self, DestinationError> {
        let error = |reason| DestinationError {
            text: text.chars().take(80).collect(),
            reason,
        };
        let (addr, port) = if let Some(rest) = text.strip_prefix('[') {
            let (addr, port) = rest.split_once("]:").ok_or_else(|| error("no ]:PORT"))?;
            (addr, port)
        } else {
            text.rsplit_once(':').ok_or_else(|| error("no :PORT"))?
        };
        let port: u16 = port
            .parse()
            .map_err(|_| error("the port is not a number"))?;
        if port == 0 {
            return Err(error("port 0 is never a destination"));
        }
        let net = if addr.contains('/') {
            addr.parse::<IpNet>()
                .map_err(|_| error("the address prefix is not valid"))?
        } else {
            IpNet::from(
                addr.parse::<IpAddr>()
                    .map_err(|_| error("the address is not an IP address"))?,
            )
        };
        if addr.contains(':') && !text.starts_with('[') {
            return Err(error("an IPv6 address goes in brackets"));
        }
        Ok(Self {
            net: net.trunc(),
            port,
        })
    }
}

impl fmt::Display for TagDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = self.net.prefix_len() == self.net.max_prefix_len();
        match (self.net, full) {
            (IpNet::V4(net), true) => write!(f, "{}:{}", net.addr(), self.port),
            (IpNet::V4(net), false) => write!(f, "{net}:{}", self.port),
            (IpNet::V6(net), true) => write!(f, "[{}]:{}", net.addr(), self.port),
            (IpNet::V6(net), false) => write!(f, "[{net}]:{}", self.port),
        }
    }
}

impl From<SocketAddr> for TagDestination {
    fn from(addr: SocketAddr) -> Self {
        Self {
            net: IpNet::from(addr.ip()),
            port: addr.port(),
        }
    }
}

impl TagDestination {
    fn key(&self) -> Key<KeyData> {
        let mut data: KeyData = [0; SYNWAKE_TAG_KEY_SIZE as usize - 4];
        let port = self.port.to_be_bytes();
        data[2] = port[0];
        data[3] = port[1];
        match self.net.trunc() {
            IpNet::V4(net) => {
                data[0] = SYNWAKE_FAMILY_IPV4 as u8;
                data[4..8].copy_from_slice(&net.addr().octets());
            }
            IpNet::V6(net) => {
                data[0] = SYNWAKE_FAMILY_IPV6 as u8;
                data[4..20].copy_from_slice(&net.addr().octets());
            }
        }
        let prefix = SYNWAKE_TAG_KEY_FIXED_BITS as u32 + u32::from(self.net.prefix_len());
        Key::new(prefix, data)
    }
}

/// The tagger's counters, summed over CPUs, since it was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagStats {
    /// SYNs sent with the synwake option (a retransmitted SYN counts again).
    pub tagged_syns: u64,
    /// SYNs sent untagged because the 40 option bytes were already full.
    pub untagged_full: u64,
}

/// The loaded tagger. Its cgroup attachments are bpf_links held by this process: dropping
/// the tagger, or the process dying (kill -9 included), detaches them.
pub struct Tagger {
    ebpf: Ebpf,
    destinations: LpmTrie<MapData, KeyData, u32>,
    stats: PerCpuArray<MapData, u64>,
    cgroups: Vec<PathBuf>,
}

impl fmt::Debug for Tagger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tagger")
            .field("cgroups", &self.cgroups)
            .finish_non_exhaustive()
    }
}

impl Tagger {
    /// Loads and verifies the sockops program; nothing is attached yet.
    pub fn load() -> Result<Self, TagError> {
        let mut ebpf = Ebpf::load(TAG_OBJECT).map_err(load_error)?;
        load_sock_ops(&mut ebpf, TAG_PROGRAM)?;
        let destinations = ebpf
            .take_map(DESTINATIONS_MAP)
            .ok_or(TagError::MissingMap {
                map: DESTINATIONS_MAP,
            })?;
        let destinations = LpmTrie::try_from(destinations).map_err(|source| TagError::Map {
            map: DESTINATIONS_MAP,
            source,
        })?;
        let stats = ebpf
            .take_map(STATS_MAP)
            .ok_or(TagError::MissingMap { map: STATS_MAP })?;
        let stats = PerCpuArray::try_from(stats).map_err(|source| TagError::Map {
            map: STATS_MAP,
            source,
        })?;
        Ok(Self {
            ebpf,
            destinations,
            stats,
            cgroups: Vec::new(),
        })
    }

    /// SYNs to `destination` carry `function_id` from now on (the longest matching prefix
    /// wins when prefixes overlap). Applies to the attached program at once.
    pub fn tag(&mut self, destination: &TagDestination, function_id: u32) -> Result<(), TagError> {
        self.destinations
            .insert(&destination.key(), function_id, 0)
            .map_err(|source| TagError::Map {
                map: DESTINATIONS_MAP,
                source,
            })
    }

    /// SYNs to `destination` go out untagged again; removing an unknown one is not an error.
    pub fn untag(&mut self, destination: &TagDestination) -> Result<(), TagError> {
        match self.destinations.remove(&destination.key()) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(TagError::Map {
                map: DESTINATIONS_MAP,
                source,
            }),
        }
    }

    /// Attaches to the cgroup v2 directory `cgroup`: its processes' sockets (and those of
    /// its descendants) are tagged, next to any other sockops program already there.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), TagError> {
        attach_sock_ops(&mut self.ebpf, TAG_PROGRAM, cgroup)?;
        self.cgroups.push(cgroup.to_path_buf());
        Ok(())
    }

    /// The cgroups attached to, in order.
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> Result<TagStats, TagError> {
        let sum = |index: u64| -> Result<u64, TagError> {
            let values = self
                .stats
                .get(&(index as u32), 0)
                .map_err(|source| TagError::Map {
                    map: STATS_MAP,
                    source,
                })?;
            Ok(values.iter().sum())
        };
        Ok(TagStats {
            tagged_syns: sum(SYNWAKE_TAG_STAT_TAGGED)?,
            untagged_full: sum(SYNWAKE_TAG_STAT_FULL)?,
        })
    }
}

/// For tests only: a sockops program that reserves `fill_len` option bytes in every SYN
/// its cgroup sends (left as NOPs), as other option users can. In a child cgroup of the
/// tagger's it runs first (cgroup programs run from the socket's cgroup upwards).
#[doc(hidden)]
pub struct OptionFiller {
    ebpf: Ebpf,
}

impl OptionFiller {
    pub fn attach(cgroup: &Path, fill_len: u32) -> Result<Self, TagError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("fill_len", &fill_len, true)
            .load(FILL_OBJECT)
            .map_err(load_error)?;
        load_sock_ops(&mut ebpf, FILL_PROGRAM)?;
        attach_sock_ops(&mut ebpf, FILL_PROGRAM, cgroup)?;
        Ok(Self { ebpf })
    }
}

impl fmt::Debug for OptionFiller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = &self.ebpf;
        f.debug_struct("OptionFiller").finish_non_exhaustive()
    }
}

fn load_error(source: EbpfError) -> TagError {
    TagError::Load {
        reason: error_chain(&source),
        source: Box::new(source),
    }
}

fn sock_ops<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut SockOps, TagError> {
    ebpf.program_mut(program)
        .and_then(|p| <&mut SockOps>::try_from(p).ok())
        .ok_or(TagError::Program {
            program,
            reason: "missing from the object or not a sockops program".into(),
        })
}

fn load_sock_ops(ebpf: &mut Ebpf, program: &'static str) -> Result<(), TagError> {
    sock_ops(ebpf, program)?
        .load()
        .map_err(|e| TagError::Program {
            program,
            reason: error_chain(&e),
        })
}

fn attach_sock_ops(ebpf: &mut Ebpf, program: &'static str, cgroup: &Path) -> Result<(), TagError> {
    crate::cgroup::check_cgroup2_dir(cgroup)?;
    let dir = File::open(cgroup).map_err(|source| TagError::OpenCgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    // A bpf_link (kernel >= 5.7): it lives exactly as long as this process holds it.
    sock_ops(ebpf, program)?
        .attach(dir, CgroupAttachMode::Single)
        .map_err(|e| TagError::Attach {
            path: cgroup.to_path_buf(),
            reason: error_chain(&e),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_v4_v6_and_prefixes() {
        let d: TagDestination = "10.1.2.3:8080".parse().unwrap();
        assert_eq!((d.net.to_string(), d.port), ("10.1.2.3/32".into(), 8080));
        assert_eq!(d.to_string(), "10.1.2.3:8080");
        let d: TagDestination = "10.1.2.3/16:80".parse().unwrap();
        assert_eq!(d.net.to_string(), "10.1.0.0/16", "host bits cleared");
        assert_eq!(d.to_string(), "10.1.0.0/16:80");
        let d: TagDestination = "[fd00::1]:443".parse().unwrap();
        assert_eq!(d.to_string(), "[fd00::1]:443");
        let d: TagDestination = "[fd00:1::/32]:443".parse().unwrap();
        assert_eq!(d.to_string(), "[fd00:1::/32]:443");
        for bad in [
            "10.1.2.3",
            "10.1.2.3:0",
            "10.1.2.3:99999",
            "host:80",
            "fd00::1:80",
            "[fd00::1]80",
            "10.1.2.3/33:80",
            "",
        ] {
            assert!(bad.parse::<TagDestination>().is_err(), "{bad:?} accepted");
        }
        let error = "x:y".parse::<TagDestination>().unwrap_err().to_string();
        assert!(
            error.contains("\"x:y\"") && error.contains("port"),
            "{error}"
        );
    }

    #[test]
    fn keys_match_family_and_port_in_full_then_the_prefix() {
        let d: TagDestination = "10.1.0.0/16:8080".parse().unwrap();
        let key = d.key();
        assert_eq!(key.prefix_len(), 32 + 16);
        let data = key.data();
        assert_eq!(&data[..8], &[4, 0, 0x1f, 0x90, 10, 1, 0, 0]);
        let d: TagDestination = "[fd00::2]:80".parse().unwrap();
        let key = d.key();
        assert_eq!(key.prefix_len(), 32 + 128);
        assert_eq!(key.data()[0], 6);
        assert_eq!(key.data()[19], 2);
    }
}
