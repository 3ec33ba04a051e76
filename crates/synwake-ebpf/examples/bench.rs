//! Probe benchmark on a veth pair in two namespaces this program creates (and removes):
//! per-packet cost of the XDP program in native mode from the kernel's BPF run-time stats
//! (next to an empty XDP program on the same traffic, the floor of that measurement),
//! and the latency from a SYN (BPF timestamp) to the event arriving in a tokio task.
//!
//! Run (root): `cargo run --release -p synwake-ebpf --example bench [-- <latency SYNs>]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

use aya::{
    programs::{Xdp, XdpMode},
    sys::{enable_stats, Stats},
    Ebpf,
};
use common::netns::{VethPair, CLIENT_IF, SERVER_ADDR_V4, SERVER_IF};
use common::{linux_syn_options, synwake_option, v4_packet, ACK, PSH, SYN};
use synwake_ebpf::{
    ktime_now_ns, AttachMode, Hook, Probe, ProbeConfig, RunStats, BASELINE_XDP_OBJECT,
    BASELINE_XDP_PROGRAM,
};

const WATCHED_PORT: u16 = 18081; // nothing listens: the client's SYN is answered by RST
const UNWATCHED_CLOSED_PORT: u16 = 18082;
const BULK_BYTES: usize = 256 << 20;
const SYN_COUNT: usize = 20_000;
const LO_BULK_BYTES: usize = 2 << 30;

/// Something attached to the server veth whose run-time statistics we read.
trait Measured {
    fn run_stats(&self) -> RunStats;
    fn events(&self) -> u64;
}

impl Measured for Probe {
    fn run_stats(&self) -> RunStats {
        Probe::run_stats(self, Hook::Xdp).unwrap()
    }
    fn events(&self) -> u64 {
        self.stats().unwrap().events_total
    }
}

impl Measured for Ebpf {
    fn run_stats(&self) -> RunStats {
        let program: &Xdp = self
            .program(BASELINE_XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let info = program.info().unwrap();
        RunStats {
            run_time_ns: info.run_time().as_nanos() as u64,
            run_count: info.run_count(),
        }
    }
    fn events(&self) -> u64 {
        0
    }
}

struct Cost {
    packets: u64,
    events: u64,
    ns_per_packet: f64,
}

/// Runs `traffic` in the client namespace and returns the XDP cost it caused.
fn cost(subject: &dyn Measured, client_ns: &str, traffic: impl FnOnce() + Send + 'static) -> Cost {
    let before = subject.run_stats();
    let events_before = subject.events();
    in_ns(client_ns, traffic);
    let after = subject.run_stats();
    let packets = after.run_count - before.run_count;
    Cost {
        packets,
        events: subject.events() - events_before,
        ns_per_packet: (after.run_time_ns - before.run_time_ns) as f64 / packets as f64,
    }
}

/// Streams BULK_BYTES over one TCP connection client -> server (unwatched port).
fn bulk(subject: &dyn Measured, server_ns: &str, client_ns: &str) -> Cost {
    let (port_tx, port_rx) = mpsc::channel();
    let ns = server_ns.to_string();
    let sink = std::thread::spawn(move || {
        VethPair::enter(&ns).unwrap();
        let listener = TcpListener::bind((SERVER_ADDR_V4, 0)).unwrap();
        port_tx.send(listener.local_addr().unwrap().port()).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let port = port_rx.recv().unwrap();
    let result = cost(subject, client_ns, move || {
        let mut conn = TcpStream::connect((SERVER_ADDR_V4, port)).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..BULK_BYTES / chunk.len() {
            conn.write_all(&chunk).unwrap();
        }
    });
    sink.join().unwrap();
    result
}

/// `count` connects to a closed `port`: the server veth sees only the SYNs (RST goes out).
fn syns(subject: &dyn Measured, client_ns: &str, port: u16, count: usize) -> Cost {
    cost(subject, client_ns, move || {
        for _ in 0..count {
            let _ = TcpStream::connect((SERVER_ADDR_V4, port));
        }
    })
}

fn report(what: &str, cost: &Cost, floor: f64) {
    println!(
        "{what:<44} {:>7} packets {:>6} events  {:>7.1} ns/packet  ({:>7.1} ns over the empty program)",
        cost.packets,
        cost.events,
        cost.ns_per_packet,
        cost.ns_per_packet - floor
    );
}

fn main() {
    let latency_syns: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    test_run_costs();
    let pair = VethPair::create("bench").expect("create namespaces (needs root)");
    let (server_ns, client_ns) = (pair.server_ns.clone(), pair.client_ns.clone());
    let stats_fd = enable_stats(Stats::RunTime).expect("enable BPF run-time stats");

    // 1. The floor: an XDP program that only returns XDP_PASS, same traffic.
    let baseline = {
        let ns = server_ns.clone();
        std::thread::spawn(move || {
            VethPair::enter(&ns).unwrap();
            let mut ebpf = Ebpf::load(BASELINE_XDP_OBJECT).unwrap();
            let program: &mut Xdp = ebpf
                .program_mut(BASELINE_XDP_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap();
            program.load().unwrap();
            program.attach(SERVER_IF, XdpMode::Driver).unwrap();
            ebpf
        })
        .join()
        .unwrap()
    };
    let floor_bulk = bulk(&baseline, &server_ns, &client_ns);
    let floor_syn = syns(&baseline, &client_ns, WATCHED_PORT, SYN_COUNT);
    report(
        "empty XDP program: bulk TCP (non-SYN)",
        &floor_bulk,
        floor_bulk.ns_per_packet,
    );
    report(
        "empty XDP program: SYN",
        &floor_syn,
        floor_syn.ns_per_packet,
    );
    drop(baseline);

    // 2. The probe, native XDP.
    let mut probe = {
        let ns = server_ns.clone();
        std::thread::spawn(move || {
            VethPair::enter(&ns).unwrap();
            let config = ProbeConfig {
                mode: AttachMode::Xdp,
                interfaces: Some(vec![SERVER_IF.to_string()]),
            };
            Probe::attach(&config).expect("attach")
        })
        .join()
        .unwrap()
    };
    println!(
        "probe attachments: {:?} (client side: {CLIENT_IF})",
        probe.attachments()
    );
    probe.watch_port(WATCHED_PORT).unwrap();
    probe.watch_id(synwake_ebpf::function_id("bench")).unwrap();
    let mut events = probe.take_events().unwrap();

    // Consumer: a tokio task woken through AsyncFd; reports each event's age on receipt.
    // While `paused` it stops reading, so the ring buffer raises no wakeups.
    let paused = Arc::new(AtomicBool::new(false));
    let (age_tx, age_rx) = mpsc::channel::<u64>();
    let consumer_paused = paused.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            loop {
                while consumer_paused.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_micros(200));
                }
                let Ok(event) = events.next().await else {
                    break;
                };
                if age_tx.send(ktime_now_ns() - event.ktime_ns).is_err() {
                    break;
                }
            }
        });
    });

    let probe_bulk = bulk(&probe, &server_ns, &client_ns);
    report(
        "probe: bulk TCP (non-SYN)",
        &probe_bulk,
        floor_bulk.ns_per_packet,
    );
    let no_event = syns(&probe, &client_ns, UNWATCHED_CLOSED_PORT, SYN_COUNT);
    report(
        "probe: SYN, unwatched port (no event)",
        &no_event,
        floor_syn.ns_per_packet,
    );
    let woken = syns(&probe, &client_ns, WATCHED_PORT, SYN_COUNT);
    report(
        "probe: SYN, event, idle reader woken each",
        &woken,
        floor_syn.ns_per_packet,
    );
    paused.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(50));
    // Fewer than the ring buffer holds (256 KiB / 48-byte records), so nothing is lost.
    let busy = syns(&probe, &client_ns, WATCHED_PORT, 4000);
    report(
        "probe: SYN, event, reader busy (no wakeup)",
        &busy,
        floor_syn.ns_per_packet,
    );
    paused.store(false, Ordering::Release);
    println!("probe stats: {:?}", probe.stats().unwrap());
    drop(stats_fd);
    std::thread::sleep(Duration::from_millis(300));
    while age_rx.try_recv().is_ok() {}

    // 3. Latency: one SYN at a time, SYN (BPF timestamp) -> event in the tokio task.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let ns = client_ns.clone();
    let client = std::thread::spawn(move || {
        VethPair::enter(&ns).unwrap();
        while go_rx.recv().is_ok() {
            let _ = TcpStream::connect((SERVER_ADDR_V4, WATCHED_PORT));
        }
    });
    let mut ages = Vec::with_capacity(latency_syns);
    for _ in 0..latency_syns {
        go_tx.send(()).unwrap();
        let age = age_rx
            .recv_timeout(Duration::from_secs(1))
            .expect("event within a second");
        ages.push(age);
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(go_tx);
    client.join().unwrap();
    ages.sort_unstable();
    let pct =
        |p: f64| ages[((ages.len() as f64 * p).ceil() as usize).saturating_sub(1)] as f64 / 1000.0;
    println!(
        "SYN -> event in a tokio task ({} SYNs, 1 ms apart): p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us",
        ages.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        *ages.last().unwrap() as f64 / 1000.0
    );
    assert_eq!(probe.stats().unwrap().lost_events_total, 0);
    drop(probe);
    drop(pair);

    lo_throughput();
}

/// Bulk TCP over `lo` in a private namespace: nothing attached, generic XDP (what `auto`
/// picks on lo), TCX. Generic XDP needs linear skbs, so it may copy large GRO packets.
fn lo_throughput() {
    std::thread::spawn(|| {
        common::netns::unshare_private_netns().unwrap();
        let ns = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let run = |label: &str| {
            let mut best = 0f64;
            for _ in 0..3 {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let ns_fd = ns.try_clone().unwrap();
                let sender = std::thread::spawn(move || {
                    // SAFETY: valid namespace fd; affects only this thread.
                    assert_eq!(
                        unsafe {
                            libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns_fd), libc::CLONE_NEWNET)
                        },
                        0
                    );
                    let mut conn = TcpStream::connect(addr).unwrap();
                    let chunk = vec![0x5au8; 1 << 20];
                    for _ in 0..LO_BULK_BYTES / chunk.len() {
                        conn.write_all(&chunk).unwrap();
                    }
                });
                let (mut conn, _) = listener.accept().unwrap();
                let started = std::time::Instant::now();
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0usize;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                sender.join().unwrap();
                best = best.max(total as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9);
            }
            println!("lo bulk TCP, {label:<28} best of 3: {best:>6.1} Gbit/s");
        };
        run("nothing attached");
        for (mode, label) in [
            (AttachMode::Xdp, "probe as generic XDP"),
            (AttachMode::Tc, "probe as TCX"),
        ] {
            let config = ProbeConfig {
                mode,
                interfaces: Some(vec!["lo".to_string()]),
            };
            let probe = Probe::attach(&config).unwrap();
            run(label);
            drop(probe);
        }
    })
    .join()
    .unwrap();
}

/// Warm-cache cost per packet through BPF_PROG_TEST_RUN (1e6 repetitions, best of 5),
/// both hooks; the test harness's own overhead is included.
fn test_run_costs() {
    let probe = Probe::load().expect("load the probe (needs root)");
    probe.watch_port(8081).unwrap();
    probe.watch_id(synwake_ebpf::function_id("bench")).unwrap();
    let mut data_options = vec![1, 1];
    data_options.extend_from_slice(&[8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    let mut option_unknown_id = linux_syn_options();
    option_unknown_id.extend_from_slice(&synwake_option(7));
    let cases = [
        (
            "data segment (ACK+PSH, 1400 bytes)",
            v4_packet(8081, ACK | PSH, &data_options, &[0u8; 1400]),
        ),
        (
            "SYN, Linux options, unwatched port",
            v4_packet(9999, SYN, &linux_syn_options(), &[]),
        ),
        (
            "SYN, Linux options + synwake option, unknown id",
            v4_packet(9999, SYN, &option_unknown_id, &[]),
        ),
    ];
    println!("BPF_PROG_TEST_RUN, warm cache, ns/run (best of 5 x 1e6):");
    for (what, packet) in cases {
        let best = |hook| {
            (0..5)
                .map(|_| {
                    probe
                        .test_run(hook, &packet, 1_000_000)
                        .unwrap()
                        .duration_ns
                })
                .min()
                .unwrap()
        };
        println!(
            "  {what:<50} xdp {:>4}  tc {:>4}",
            best(Hook::Xdp),
            best(Hook::Tc)
        );
    }
    // Emitting events: 4000 repetitions fit in the ring buffer, which is drained between
    // runs, so only the first record of each run can raise a reader wakeup.
    let mut probe = probe;
    let mut events = probe.take_events().unwrap();
    let mut with_option = linux_syn_options();
    with_option.extend_from_slice(&synwake_option(synwake_ebpf::function_id("bench")));
    for (what, packet) in [
        (
            "SYN, Linux options, watched port -> event",
            v4_packet(8081, SYN, &linux_syn_options(), &[]),
        ),
        (
            "SYN, Linux + synwake option, watched id -> event",
            v4_packet(9999, SYN, &with_option, &[]),
        ),
    ] {
        let mut best = |hook| {
            (0..5)
                .map(|_| {
                    let run = probe.test_run(hook, &packet, 4000).unwrap();
                    while events.try_next().unwrap().is_some() {}
                    run.duration_ns
                })
                .min()
                .unwrap()
        };
        let (xdp, tc) = (best(Hook::Xdp), best(Hook::Tc));
        println!("  {what:<50} xdp {xdp:>4}  tc {tc:>4}");
    }
    assert_eq!(probe.stats().unwrap().lost_events_total, 0);
}

fn in_ns(ns: &str, work: impl FnOnce() + Send + 'static) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        VethPair::enter(&ns).unwrap();
        work();
    })
    .join()
    .unwrap();
}
