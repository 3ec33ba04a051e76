//! Shared test support: crafted packets (from `synwake_test_support::packets`) and the
//! privileged-test gate.
#![allow(dead_code, unused_imports)]

use std::net::{Ipv4Addr, Ipv6Addr};

pub mod netns;

use synwake_ebpf::Probe;
pub use synwake_test_support::packets::{
    ethernet, ipv4, ipv6, linux_syn_options, set_tcp_checksum_v4, synwake_option, tcp, RawSender,
    ACK, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, FIN, PSH, RST, SYN,
};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 7);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x1234);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x1);

/// Loads the probe, or explains loudly why a privileged test cannot run. Under CI=true a
/// missing capability is a failure, not a skip.
pub fn load_probe_or_skip(test: &str) -> Option<Probe> {
    match Probe::load() {
        Ok(probe) => Some(probe),
        Err(error) => gate(test, &error),
    }
}

/// The privileged-test rule for `error`; always `None` (it panics under CI=true).
pub fn gate<T>(test: &str, error: &dyn std::fmt::Debug) -> Option<T> {
    let why = format!(
        "needs root/CAP_BPF, a BPF kernel and network namespaces (euid {}): {error:?}",
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    );
    synwake_test_support::gate::skip_or_fail(test, &why);
    None
}

/// A TCP segment over IPv4 in Ethernet.
pub fn v4_packet(dst_port: u16, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    ethernet(
        ETH_P_IP,
        None,
        &ipv4(
            CLIENT_V4,
            SERVER_V4,
            &[],
            6,
            &tcp(40000, dst_port, flags, options, payload),
        ),
    )
}

/// A TCP segment over IPv6 in Ethernet.
pub fn v6_packet(dst_port: u16, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    ethernet(
        ETH_P_IPV6,
        None,
        &ipv6(
            CLIENT_V6,
            SERVER_V6,
            6,
            &tcp(40001, dst_port, flags, options, payload),
        ),
    )
}
