//! Network-namespace fixtures for privileged tests: a client and a server namespace
//! joined by a veth pair (`synwake_test_support::netns`), removed again in `Drop`. Never
//! touches the host's NICs.
#![allow(dead_code)]

use std::{io, process::Command};

pub use synwake_test_support::netns::unshare_private_netns;
use synwake_test_support::netns::{NetnsPair, PairSpec};

/// Addresses inside the fixture's own namespaces (nothing else is ever a target).
pub const CLIENT_ADDR_V4: &str = "10.203.0.1";
pub const SERVER_ADDR_V4: &str = "10.203.0.2";
pub const CLIENT_ADDR_V6: &str = "fd00:5357::1";
pub const SERVER_ADDR_V6: &str = "fd00:5357::2";
/// The veth end inside the server namespace, where the probe attaches.
pub const SERVER_IF: &str = "swv-s";
pub const CLIENT_IF: &str = "swv-c";

pub struct VethPair(NetnsPair);

impl std::ops::Deref for VethPair {
    type Target = NetnsPair;
    fn deref(&self) -> &NetnsPair {
        &self.0
    }
}

impl VethPair {
    /// Creates `swe-<tag>-<pid>-{c,s}` joined by a veth pair with IPv4 and IPv6 addresses.
    pub fn create(tag: &str) -> io::Result<Self> {
        NetnsPair::create(PairSpec {
            base: format!("swe-{tag}-{}", std::process::id()),
            client_if: CLIENT_IF.into(),
            server_if: SERVER_IF.into(),
            v4: (
                CLIENT_ADDR_V4.parse().unwrap(),
                SERVER_ADDR_V4.parse().unwrap(),
                24,
            ),
            v6: Some((
                CLIENT_ADDR_V6.parse().unwrap(),
                SERVER_ADDR_V6.parse().unwrap(),
                64,
            )),
        })
        .map(VethPair)
    }

    /// Moves the calling thread into `ns` (other threads stay where they are).
    pub fn enter(ns: &str) -> io::Result<()> {
        synwake_test_support::netns::enter_ns(ns)
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
