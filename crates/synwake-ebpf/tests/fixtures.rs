//! Tier 2: crafted packets through BPF_PROG_TEST_RUN, on both the XDP and the TC program.
//! Every run checks the verdict (pass) and that the packet comes out byte for byte unchanged.

mod common;

use std::net::SocketAddr;

use common::*;
use synwake_ebpf::{function_id, ktime_now_ns, Hook, Probe, ProbeEvent, ProbeEvents, ProbeTrigger};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

const WATCHED_PORT: u16 = 8081;
const OTHER_PORT: u16 = 9999;

struct Fixture {
    probe: Probe,
    events: ProbeEvents,
    emitted: u64,
}

impl Fixture {
    fn new(test: &str) -> Option<Self> {
        let mut probe = load_probe_or_skip(test)?;
        probe.watch_port(WATCHED_PORT).unwrap();
        probe.watch_id(function_id("hello")).unwrap();
        let events = probe.take_events().unwrap();
        Some(Self {
            probe,
            events,
            emitted: 0,
        })
    }

    /// Runs `packet` through `hook`, asserts pass + unchanged bytes, returns the events.
    fn run(&mut self, hook: Hook, packet: &[u8]) -> Vec<ProbeEvent> {
        let run = self
            .probe
            .test_run(hook, packet, 1)
            .unwrap_or_else(|e| panic!("{hook:?} test run of {} bytes: {e:?}", packet.len()));
        let pass = if hook == Hook::Xdp {
            XDP_PASS
        } else {
            TC_ACT_OK
        };
        assert_eq!(run.verdict, pass, "{hook:?} verdict for {packet:02x?}");
        assert_eq!(run.data_out, packet, "{hook:?} changed the packet");
        let events = self.drain();
        self.emitted += events.len() as u64;
        let stats = self.probe.stats().unwrap();
        assert_eq!(stats.events_total, self.emitted, "events counter");
        assert_eq!(stats.lost_events_total, 0);
        events
    }

    fn drain(&mut self) -> Vec<ProbeEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.events.try_next().unwrap() {
            events.push(event);
        }
        events
    }

    /// Runs on both hooks and returns the single event each produced (asserting it is the
    /// same apart from the timestamp).
    fn one_event(&mut self, packet: &[u8]) -> ProbeEvent {
        let mut seen = Vec::new();
        for hook in HOOKS {
            let before = ktime_now_ns();
            let events = self.run(hook, packet);
            assert_eq!(
                events.len(),
                1,
                "{hook:?}: expected one event, got {events:?}"
            );
            let event = events[0];
            assert!(
                event.ktime_ns >= before && event.ktime_ns <= ktime_now_ns(),
                "{hook:?} ktime"
            );
            assert_eq!(event.ifindex, 1, "{hook:?}: test runs arrive on lo");
            seen.push(ProbeEvent {
                ktime_ns: 0,
                ..event
            });
        }
        assert_eq!(seen[0], seen[1], "XDP and TC disagree");
        seen[0]
    }

    fn no_event(&mut self, packet: &[u8], what: &str) {
        for hook in HOOKS {
            let events = self.run(hook, packet);
            assert!(events.is_empty(), "{hook:?} {what}: unexpected {events:?}");
        }
    }
}

macro_rules! fixture {
    ($name:expr) => {
        match Fixture::new($name) {
            Some(fixture) => fixture,
            None => return,
        }
    };
}

#[test]
fn ipv4_syn_to_watched_port_emits_one_syn_event() {
    let mut f = fixture!("ipv4_syn_to_watched_port_emits_one_syn_event");
    let event = f.one_event(&v4_packet(WATCHED_PORT, SYN, &linux_syn_options(), &[]));
    assert_eq!(event.trigger, ProbeTrigger::Syn);
    assert_eq!(event.dst_port, WATCHED_PORT);
    assert_eq!(event.function_id, None);
    assert_eq!(event.src, SocketAddr::from((CLIENT_V4, 40000)));
}

#[test]
fn syn_to_a_shared_port_emits_a_shared_port_event_with_the_client_address() {
    let mut f = fixture!("syn_to_a_shared_port_emits_a_shared_port_event_with_the_client_address");
    f.probe.watch_shared_port(OTHER_PORT).unwrap();
    let event = f.one_event(&v4_packet(OTHER_PORT, SYN, &linux_syn_options(), &[]));
    assert_eq!(event.trigger, ProbeTrigger::SharedPort);
    assert_eq!(event.dst_port, OTHER_PORT);
    assert_eq!(event.function_id, None);
    assert_eq!(event.src, SocketAddr::from((CLIENT_V4, 40000)));
    let event = f.one_event(&v6_packet(OTHER_PORT, SYN, &linux_syn_options(), &[]));
    assert_eq!(event.trigger, ProbeTrigger::SharedPort);
    assert_eq!(event.src, SocketAddr::from((CLIENT_V6, 40001)));
    assert_eq!(f.probe.maps().watched_shared_ports(), vec![OTHER_PORT]);
    // The function's own port keeps its trigger; the option still names the function.
    assert_eq!(
        f.one_event(&v4_packet(WATCHED_PORT, SYN, &[], &[])).trigger,
        ProbeTrigger::Syn
    );
    let tagged = f.one_event(&v4_packet(
        OTHER_PORT,
        SYN,
        &synwake_option(function_id("hello")),
        &[],
    ));
    assert_eq!(tagged.trigger, ProbeTrigger::TcpOption);
    f.probe.unwatch_port(OTHER_PORT).unwrap();
    f.no_event(
        &v4_packet(OTHER_PORT, SYN, &linux_syn_options(), &[]),
        "shared port unwatched",
    );
    assert!(f.probe.maps().watched_shared_ports().is_empty());
}

#[test]
fn ipv6_syn_to_watched_port_emits_one_syn_event() {
    let mut f = fixture!("ipv6_syn_to_watched_port_emits_one_syn_event");
    let event = f.one_event(&v6_packet(WATCHED_PORT, SYN, &linux_syn_options(), &[]));
    assert_eq!(event.trigger, ProbeTrigger::Syn);
    assert_eq!(event.dst_port, WATCHED_PORT);
    assert_eq!(event.src, SocketAddr::from((CLIENT_V6, 40001)));
}

#[test]
fn syn_without_options_is_seen() {
    let mut f = fixture!("syn_without_options_is_seen");
    assert_eq!(
        f.one_event(&v4_packet(WATCHED_PORT, SYN, &[], &[]))
            .dst_port,
        WATCHED_PORT
    );
    assert_eq!(
        f.one_event(&v6_packet(WATCHED_PORT, SYN, &[], &[]))
            .dst_port,
        WATCHED_PORT
    );
}

#[test]
fn non_opening_segments_emit_nothing() {
    let mut f = fixture!("non_opening_segments_emit_nothing");
    let opts = linux_syn_options();
    for (flags, payload, what) in [
        (SYN | ACK, &[][..], "SYN-ACK"),
        (ACK, &[][..], "ACK"),
        (RST, &[][..], "RST"),
        (RST | ACK, &[][..], "RST-ACK"),
        (FIN | ACK, &[][..], "FIN"),
        (SYN | RST, &[][..], "SYN+RST"),
        (SYN | FIN, &[][..], "SYN+FIN"),
        (PSH | ACK, &b"GET / HTTP/1.1\r\n\r\n"[..], "data"),
    ] {
        f.no_event(&v4_packet(WATCHED_PORT, flags, &[], payload), what);
        f.no_event(&v6_packet(WATCHED_PORT, flags, &opts, payload), what);
        // Even with the synwake option and a watched id.
        f.no_event(
            &v4_packet(
                OTHER_PORT,
                flags,
                &synwake_option(function_id("hello")),
                payload,
            ),
            what,
        );
    }
}

#[test]
fn syn_to_unwatched_port_emits_nothing_and_unwatch_takes_effect() {
    let mut f = fixture!("syn_to_unwatched_port_emits_nothing_and_unwatch_takes_effect");
    f.no_event(
        &v4_packet(OTHER_PORT, SYN, &linux_syn_options(), &[]),
        "unwatched v4",
    );
    f.no_event(&v6_packet(OTHER_PORT, SYN, &[], &[]), "unwatched v6");
    // Live map updates: watch, see it; unwatch, see nothing.
    f.probe.watch_port(OTHER_PORT).unwrap();
    assert_eq!(
        f.probe.maps().watched_ports(),
        vec![WATCHED_PORT, OTHER_PORT]
    );
    assert_eq!(
        f.one_event(&v4_packet(OTHER_PORT, SYN, &[], &[])).dst_port,
        OTHER_PORT
    );
    f.probe.unwatch_port(OTHER_PORT).unwrap();
    f.probe.unwatch_port(OTHER_PORT).unwrap(); // idempotent
    f.no_event(&v4_packet(OTHER_PORT, SYN, &[], &[]), "unwatched again");
    f.probe.unwatch_port(WATCHED_PORT).unwrap();
    f.no_event(
        &v4_packet(WATCHED_PORT, SYN, &[], &[]),
        "all ports unwatched",
    );
}

#[test]
fn synwake_option_wakes_on_any_port() {
    let mut f = fixture!("synwake_option_wakes_on_any_port");
    let id = function_id("hello");
    for packet in [
        v4_packet(OTHER_PORT, SYN, &synwake_option(id), &[]),
        v6_packet(OTHER_PORT, SYN, &synwake_option(id), &[]),
    ] {
        let event = f.one_event(&packet);
        assert_eq!(event.trigger, ProbeTrigger::TcpOption);
        assert_eq!(event.function_id, Some(id));
        assert_eq!(event.dst_port, OTHER_PORT);
    }
    // On a watched port the option still names the function: one event, trigger tcp_option.
    let event = f.one_event(&v4_packet(WATCHED_PORT, SYN, &synwake_option(id), &[]));
    assert_eq!(
        (event.trigger, event.function_id),
        (ProbeTrigger::TcpOption, Some(id))
    );
}

#[test]
fn synwake_option_after_other_options_is_found() {
    let mut f = fixture!("synwake_option_after_other_options_is_found");
    let id = function_id("hello");
    let mut after_linux = linux_syn_options();
    after_linux.extend_from_slice(&synwake_option(id)); // 28 bytes
                                                        // MSS, SACK-perm, timestamps, NOP, wscale, 12 NOPs, then the option: exactly 40 bytes.
    let mut at_the_end = linux_syn_options();
    at_the_end.extend_from_slice(&[1; 12]);
    at_the_end.extend_from_slice(&synwake_option(id));
    assert_eq!(at_the_end.len(), 40);
    // Option first, then the usual ones.
    let mut first = synwake_option(id).to_vec();
    first.extend_from_slice(&linux_syn_options());
    // Another experimental option (different ExID) before ours.
    let mut other_exp = vec![253, 8, 0x12, 0x34, 0, 0, 0, 1];
    other_exp.extend_from_slice(&synwake_option(id));
    // Timestamps full of 0xfd (the option's kind byte) before the option.
    let mut kind_bytes_elsewhere =
        vec![8, 10, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 1, 1];
    kind_bytes_elsewhere.extend_from_slice(&synwake_option(id));
    for options in [
        after_linux,
        at_the_end,
        first,
        other_exp,
        kind_bytes_elsewhere,
    ] {
        for packet in [
            v4_packet(OTHER_PORT, SYN, &options, &[]),
            v6_packet(OTHER_PORT, SYN, &options, &[]),
        ] {
            let event = f.one_event(&packet);
            assert_eq!(
                (event.trigger, event.function_id),
                (ProbeTrigger::TcpOption, Some(id)),
                "{options:?}"
            );
        }
    }
}

#[test]
fn malformed_or_foreign_options_are_ignored() {
    let mut f = fixture!("malformed_or_foreign_options_are_ignored");
    let id = function_id("hello").to_be_bytes();
    let unknown = function_id("nobody-deployed-this").to_be_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "kind byte only inside other options",
            vec![8, 10, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 8, 0x53, 0x57, 1, 1],
        ),
        ("length 6", vec![253, 6, 0x53, 0x57, id[0], id[1], 1, 1]),
        (
            "length 10",
            vec![253, 10, 0x53, 0x57, id[0], id[1], id[2], id[3], 0, 0, 1, 1],
        ),
        (
            "wrong ExID",
            vec![253, 8, 0x57, 0x53, id[0], id[1], id[2], id[3]],
        ),
        (
            "kind 254",
            vec![254, 8, 0x53, 0x57, id[0], id[1], id[2], id[3]],
        ),
        (
            "unknown id",
            vec![
                253, 8, 0x53, 0x57, unknown[0], unknown[1], unknown[2], unknown[3],
            ],
        ),
        (
            "after end-of-list",
            [&[0u8, 0, 0, 0][..], &synwake_option(function_id("hello"))].concat(),
        ),
        (
            "option length 0",
            [&[2u8, 0, 0, 0][..], &synwake_option(function_id("hello"))].concat(),
        ),
        (
            "option length 1",
            [&[2u8, 1, 0, 0][..], &synwake_option(function_id("hello"))].concat(),
        ),
        (
            "length runs past the options",
            [
                &[2u8, 4, 5, 0xb4, 8, 12, 0, 0][..],
                &synwake_option(function_id("hello"))[..4],
            ]
            .concat(),
        ),
        (
            "cut by the header end",
            [
                &[1u8, 1, 1, 1][..],
                &synwake_option(function_id("hello"))[..4],
            ]
            .concat(),
        ),
    ];
    for (what, options) in cases {
        f.no_event(&v4_packet(OTHER_PORT, SYN, &options, &[]), what);
        f.no_event(&v6_packet(OTHER_PORT, SYN, &options, &[]), what);
        // A watched port still wakes by port when the option is unusable.
        let event = f.one_event(&v4_packet(WATCHED_PORT, SYN, &options, &[]));
        assert_eq!(
            (event.trigger, event.function_id),
            (ProbeTrigger::Syn, None),
            "{what}"
        );
    }
    // The id stops waking once unwatched.
    f.probe.unwatch_id(function_id("hello")).unwrap();
    f.no_event(
        &v4_packet(OTHER_PORT, SYN, &synwake_option(function_id("hello")), &[]),
        "unwatched id",
    );
}

#[test]
fn ipv4_with_ip_options_is_parsed() {
    let mut f = fixture!("ipv4_with_ip_options_is_parsed");
    let segment = tcp(40000, WATCHED_PORT, SYN, &linux_syn_options(), &[]);
    // IHL 6 (NOP x3 + EOL) and IHL 15 (40 bytes of NOPs).
    for ip_options in [vec![1, 1, 1, 0], vec![1; 40]] {
        let packet = ethernet(
            ETH_P_IP,
            None,
            &ipv4(CLIENT_V4, SERVER_V4, &ip_options, 6, &segment),
        );
        let event = f.one_event(&packet);
        assert_eq!(event.src, SocketAddr::from((CLIENT_V4, 40000)));
        assert_eq!(event.dst_port, WATCHED_PORT);
    }
    let seg_opt = tcp(
        40000,
        OTHER_PORT,
        SYN,
        &synwake_option(function_id("hello")),
        &[],
    );
    let packet = ethernet(
        ETH_P_IP,
        None,
        &ipv4(CLIENT_V4, SERVER_V4, &[1; 40], 6, &seg_opt),
    );
    assert_eq!(f.one_event(&packet).trigger, ProbeTrigger::TcpOption);
}

#[test]
fn vlan_tagged_syns_are_parsed() {
    let mut f = fixture!("vlan_tagged_syns_are_parsed");
    let v4 = ipv4(
        CLIENT_V4,
        SERVER_V4,
        &[],
        6,
        &tcp(40000, WATCHED_PORT, SYN, &[], &[]),
    );
    let event = f.one_event(&ethernet(ETH_P_IP, Some(42), &v4));
    assert_eq!(event.src, SocketAddr::from((CLIENT_V4, 40000)));
    let v6 = ipv6(
        CLIENT_V6,
        SERVER_V6,
        6,
        &tcp(
            40001,
            OTHER_PORT,
            SYN,
            &synwake_option(function_id("hello")),
            &[],
        ),
    );
    let event = f.one_event(&ethernet(ETH_P_IPV6, Some(7), &v6));
    assert_eq!(event.trigger, ProbeTrigger::TcpOption);
    assert_eq!(event.src, SocketAddr::from((CLIENT_V6, 40001)));
}

#[test]
fn other_protocols_and_malformed_headers_emit_nothing() {
    let mut f = fixture!("other_protocols_and_malformed_headers_emit_nothing");
    let syn = tcp(40000, WATCHED_PORT, SYN, &[], &[]);
    let udp = ethernet(ETH_P_IP, None, &ipv4(CLIENT_V4, SERVER_V4, &[], 17, &syn));
    f.no_event(&udp, "UDP");
    let arp = ethernet(0x0806, None, &[0u8; 28]);
    f.no_event(&arp, "ARP");
    // IPv6 with a hop-by-hop header before TCP: extension headers are not walked.
    let mut hbh = vec![6u8, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&syn);
    f.no_event(
        &ethernet(ETH_P_IPV6, None, &ipv6(CLIENT_V6, SERVER_V6, 0, &hbh)),
        "IPv6 ext header",
    );
    // A later IPv4 fragment carries no TCP header.
    let mut frag = ipv4(CLIENT_V4, SERVER_V4, &[], 6, &syn);
    frag[6] = 0x00;
    frag[7] = 0x10;
    f.no_event(&ethernet(ETH_P_IP, None, &frag), "later fragment");
    // IHL below 5.
    let mut bad_ihl = ipv4(CLIENT_V4, SERVER_V4, &[], 6, &syn);
    bad_ihl[0] = 0x44;
    f.no_event(&ethernet(ETH_P_IP, None, &bad_ihl), "IHL 4");
    // Wrong IP version under the IPv4 EtherType.
    let mut bad_version = ipv4(CLIENT_V4, SERVER_V4, &[], 6, &syn);
    bad_version[0] = 0x65;
    f.no_event(&ethernet(ETH_P_IP, None, &bad_version), "version 6 in IPv4");
    // TCP data offset below 5, and one pointing past the packet.
    for doff in [4u8, 15] {
        let mut bad_doff = syn.clone();
        bad_doff[12] = doff << 4;
        f.no_event(
            &ethernet(
                ETH_P_IP,
                None,
                &ipv4(CLIENT_V4, SERVER_V4, &[], 6, &bad_doff),
            ),
            "bad doff",
        );
    }
    // IHL pointing past the packet.
    let mut long_ihl = ipv4(CLIENT_V4, SERVER_V4, &[], 6, &[0u8; 4]);
    long_ihl[0] = 0x4f;
    f.no_event(&ethernet(ETH_P_IP, None, &long_ihl), "IHL past end");
}

#[test]
fn every_truncation_of_a_syn_passes_without_event() {
    let mut f = fixture!("every_truncation_of_a_syn_passes_without_event");
    let mut options = linux_syn_options();
    options.extend_from_slice(&synwake_option(function_id("hello")));
    // (packet, length below which the kernel's skb test harness refuses to run it: it pulls
    // the fixed IPv4/IPv6 header for those EtherTypes; XDP runs every length >= 14).
    let packets = [
        (v4_packet(WATCHED_PORT, SYN, &options, &[]), 14 + 20),
        (v6_packet(WATCHED_PORT, SYN, &options, &[]), 14 + 40),
        (
            ethernet(
                ETH_P_IP,
                Some(5),
                &ipv4(
                    CLIENT_V4,
                    SERVER_V4,
                    &[1; 8],
                    6,
                    &tcp(1, WATCHED_PORT, SYN, &options, &[]),
                ),
            ),
            14,
        ),
    ];
    for (full, tc_min) in packets {
        // The whole packet does produce an event, so each truncation below is a real check.
        assert_eq!(f.one_event(&full).trigger, ProbeTrigger::TcpOption);
        for len in 0..full.len() {
            let cut = &full[..len];
            for hook in HOOKS {
                match f.probe.test_run(hook, cut, 1) {
                    Ok(run) => {
                        let pass = if hook == Hook::Xdp {
                            XDP_PASS
                        } else {
                            TC_ACT_OK
                        };
                        assert_eq!(run.verdict, pass, "{hook:?} verdict at {len} bytes");
                        assert_eq!(run.data_out, cut, "{hook:?} changed {len} bytes");
                    }
                    // The kernel itself refuses frames shorter than an Ethernet header (and,
                    // for TC, than the fixed L3 header).
                    Err(e) if len < 14 || (hook == Hook::Tc && len < tc_min) => {
                        assert!(format!("{e:?}").contains("Invalid argument"), "{e:?}")
                    }
                    Err(e) => panic!("{hook:?} at {len} bytes: {e:?}"),
                }
                let events = f.drain();
                assert!(
                    events.is_empty(),
                    "{hook:?}: {len}-byte truncation emitted {events:?}"
                );
            }
        }
    }
}
