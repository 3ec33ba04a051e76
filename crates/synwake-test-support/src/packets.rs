//! Hand-built frames: Ethernet (optionally VLAN-tagged), IPv4 with options, IPv6, TCP
//! with options, the synwake TCP option, and a raw socket that sends whole IPv4 packets.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The synwake option (design.md): kind 253, length 8, ExID 0x5357, function id BE.
pub fn synwake_option(function_id: u32) -> [u8; 8] {
    let id = function_id.to_be_bytes();
    [253, 8, 0x53, 0x57, id[0], id[1], id[2], id[3]]
}

/// FNV-1a 32-bit of the name: the id the synwake option carries. Written out here so the
/// tests check the daemon against the design, not against its own helper.
pub fn function_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What Linux puts in a SYN: MSS, SACK-permitted, timestamps, NOP, window scale (20 bytes).
pub fn linux_syn_options() -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4]; // MSS 1460
    o.extend_from_slice(&[4, 2]); // SACK permitted
    o.extend_from_slice(&[8, 10, 0, 0, 0, 1, 0, 0, 0, 0]); // timestamps
    o.extend_from_slice(&[1, 3, 3, 7]); // NOP, window scale 7
    o
}

/// The Internet checksum over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
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

/// A TCP header with sequence/ack numbers, `options` (4-aligned) and `payload`; the
/// checksum is left 0 (see [`set_tcp_checksum_v4`]).
pub fn tcp_segment(
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "options must be 4-aligned"
    );
    let doff = (20 + options.len()) / 4;
    let mut h = Vec::with_capacity(20 + options.len() + payload.len());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h.push((doff as u8) << 4);
    h.push(flags);
    h.extend_from_slice(&64240u16.to_be_bytes()); // window
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h.extend_from_slice(options);
    h.extend_from_slice(payload);
    h
}

/// [`tcp_segment`] with fixed sequence numbers (ack set only with the ACK flag).
pub fn tcp(src_port: u16, dst_port: u16, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let ack = if flags & ACK != 0 { 0x2000_0000u32 } else { 0 };
    tcp_segment(
        src_port,
        dst_port,
        0x1000_0000,
        ack,
        flags,
        options,
        payload,
    )
}

/// Fills in the TCP checksum of `segment` carried from `src` to `dst` over IPv4.
pub fn set_tcp_checksum_v4(src: Ipv4Addr, dst: Ipv4Addr, segment: &mut [u8]) {
    let pseudo = [
        src.octets().as_slice(),
        dst.octets().as_slice(),
        &[0, libc::IPPROTO_TCP as u8],
        &(segment.len() as u16).to_be_bytes(),
    ]
    .concat();
    segment[16..18].copy_from_slice(&[0, 0]);
    let c = checksum(&[&pseudo, segment]);
    segment[16..18].copy_from_slice(&c.to_be_bytes());
}

/// An IPv4 header (DF, TTL 64, correct checksum) with `ip_options` (4-aligned) and
/// `payload`.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ip_options: &[u8],
    protocol: u8,
    payload: &[u8],
) -> Vec<u8> {
    assert!(ip_options.len().is_multiple_of(4) && ip_options.len() <= 40);
    let ihl = (20 + ip_options.len()) / 4;
    let total = 20 + ip_options.len() + payload.len();
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]); // id, DF, ttl, proto, csum
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(ip_options);
    let csum = checksum(&[&h]);
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

/// A complete IPv4 + TCP SYN with correct checksums. The TCP options are the usual Linux
/// ones (MSS 1460, SACK permitted), NOPs to a 4-byte boundary, then `extra_options`.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, extra_options: &[u8]) -> Vec<u8> {
    let mut options = vec![2, 4, 0x05, 0xb4, 1, 1, 4, 2];
    options.extend_from_slice(extra_options);
    while !options.len().is_multiple_of(4) {
        options.insert(options.len() - extra_options.len(), 1);
    }
    let mut segment = tcp_segment(src.port(), dst.port(), seq, 0, SYN, &options, &[]);
    set_tcp_checksum_v4(*src.ip(), *dst.ip(), &mut segment);
    ipv4(*src.ip(), *dst.ip(), &[], libc::IPPROTO_TCP as u8, &segment)
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

    /// Sends one IPv4 packet to the destination in its header.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let (c, s) = (Ipv4Addr::new(10, 5, 0, 1), Ipv4Addr::new(10, 5, 0, 2));
        let p = syn_packet(
            SocketAddrV4::new(c, 40000),
            SocketAddrV4::new(s, 8080),
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
        assert_eq!(p[33], SYN, "flags");
        // FNV-1a 32 reference vectors.
        assert_eq!(function_id(""), 0x811c_9dc5);
        assert_eq!(function_id("a"), 0xe40c_292c);
        assert_eq!(function_id("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn split_parts_checksum_like_one_buffer() {
        let data = [1u8, 2, 3, 4, 5, 6, 7];
        assert_eq!(checksum(&[&data]), checksum(&[&data[..3], &data[3..]]));
    }
}
