//! Shared test support: crafted packets and the privileged-test gate.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

pub mod netns;

use synwake_ebpf::Probe;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

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

pub fn gate<T>(test: &str, error: &dyn std::fmt::Debug) -> Option<T> {
    let reason = format!(
        "{test}: needs root/CAP_BPF, a BPF kernel and network namespaces (euid {}): {error:?}",
        unsafe { libc::geteuid() }
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{reason} (CI=true: privileged tests must run)");
    }
    // Straight to the stderr handle: the test harness captures eprintln! of passing tests.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n!!!!! SKIPPED {reason}\n\n").as_bytes(),
    );
    None
}

/// TCP header with `options` (padded with NOPs... callers pass multiples of 4).
pub fn tcp(src_port: u16, dst_port: u16, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert!(
        options.len() % 4 == 0 && options.len() <= 40,
        "options must be 4-aligned"
    );
    let doff = (20 + options.len()) / 4;
    let mut h = Vec::new();
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // seq
    let ack = if flags & ACK != 0 { 0x2000_0000u32 } else { 0 };
    h.extend_from_slice(&ack.to_be_bytes());
    h.push((doff as u8) << 4);
    h.push(flags);
    h.extend_from_slice(&64240u16.to_be_bytes()); // window
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h.extend_from_slice(options);
    h.extend_from_slice(payload);
    h
}

pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ip_options: &[u8],
    protocol: u8,
    payload: &[u8],
) -> Vec<u8> {
    assert!(ip_options.len() % 4 == 0 && ip_options.len() <= 40);
    let ihl = (20 + ip_options.len()) / 4;
    let total = 20 + ip_options.len() + payload.len();
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]); // id, DF, ttl, proto, csum
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(ip_options);
    let csum = checksum(&h);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next_header);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

pub fn ethernet(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    if let Some(vid) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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

/// The synwake option: kind 253, length 8, ExID 0x5357, big-endian id.
pub fn synwake_option(id: u32) -> [u8; 8] {
    let id = id.to_be_bytes();
    [253, 8, 0x53, 0x57, id[0], id[1], id[2], id[3]]
}

/// What Linux puts in a SYN: MSS, SACK-permitted, timestamps, NOP, window scale (20 bytes).
pub fn linux_syn_options() -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4]; // MSS 1460
    o.extend_from_slice(&[4, 2]); // SACK permitted
    o.extend_from_slice(&[8, 10, 0, 0, 0, 1, 0, 0, 0, 0]); // timestamps
    o.extend_from_slice(&[1, 3, 3, 7]); // NOP, window scale 7
    o
}
