//! Tier 3: the probe attached for real — to `lo` in a private network namespace, and to a
//! veth pair in namespaces the test creates — delivering events through the async API.
//! Also checks that a kill -9 leaves no program attached.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{netns::*, *};
use synwake_ebpf::{
    function_id, ktime_now_ns, AttachMode, Probe, ProbeConfig, ProbeEvents, ProbeTrigger,
};

/// The index of `name` in the calling thread's namespace (sysfs would show the process's).
fn if_index(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?}");
    index
}

/// Attaches as `config` says, or skips/fails per the privileged-test rule.
fn attach_or_skip(test: &str, config: &ProbeConfig) -> Option<Probe> {
    match Probe::attach(config) {
        Ok(probe) => Some(probe),
        Err(error) => gate(test, &error),
    }
}

/// Moves this thread into a private namespace, or skips/fails per the privileged-test rule.
fn private_netns_or_skip(test: &str) -> bool {
    match unshare_private_netns() {
        Ok(()) => true,
        Err(source) => gate::<()>(test, &source).is_some(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects (the SYN is what matters) and returns the client's address.
async fn connect(to: SocketAddr) -> SocketAddr {
    let stream = tokio::net::TcpStream::connect(to).await.expect("connect");
    stream.local_addr().unwrap()
}

async fn expect_event(events: &mut ProbeEvents) -> synwake_ebpf::ProbeEvent {
    tokio::time::timeout(Duration::from_secs(1), events.next())
        .await
        .expect("event within a second")
        .expect("event")
}

async fn expect_silence(events: &mut ProbeEvents) {
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), events.next()).await {
        panic!("unexpected event {event:?}");
    }
}

/// The lo scenario for one mode, in a private namespace so nothing else sees the probe.
fn lo_scenario(test: &str, mode: AttachMode, expected_mode: &str) {
    let test = test.to_string();
    let expected_mode = expected_mode.to_string();
    std::thread::spawn(move || {
        if !private_netns_or_skip(&test) {
            return;
        }
        let config = ProbeConfig {
            mode,
            interfaces: Some(vec!["lo".to_string()]),
        };
        let Some(mut probe) = attach_or_skip(&test, &config) else {
            return;
        };
        assert_eq!(
            probe.attachments(),
            vec![("lo".to_string(), expected_mode.as_str())]
        );
        let watched = TcpListener::bind("127.0.0.1:0").unwrap();
        let watched_v6 = TcpListener::bind("[::1]:0").unwrap();
        let unwatched = TcpListener::bind("127.0.0.1:0").unwrap();
        let maps = probe.maps();
        maps.watch_port(watched.local_addr().unwrap().port())
            .unwrap();
        maps.watch_port(watched_v6.local_addr().unwrap().port())
            .unwrap();
        let mut events = probe.take_events().unwrap();
        runtime().block_on(async {
            for listener in [&watched, &watched_v6] {
                let to = listener.local_addr().unwrap();
                let started = Instant::now();
                let client = connect(to).await;
                let event = expect_event(&mut events).await;
                assert!(started.elapsed() < Duration::from_secs(1));
                assert_eq!(event.trigger, ProbeTrigger::Syn);
                assert_eq!(event.dst_port, to.port());
                assert_eq!(event.src, client);
                assert_eq!(event.ifindex, 1, "lo");
                assert!(ktime_now_ns() - event.ktime_ns < 1_000_000_000);
            }
            // A burst: every SYN gives exactly one event, all drained in order of arrival.
            let burst_to = watched.local_addr().unwrap();
            let mut clients = Vec::new();
            for _ in 0..50 {
                clients.push(connect(burst_to).await);
            }
            for client in clients {
                let event = expect_event(&mut events).await;
                assert_eq!((event.src, event.dst_port), (client, burst_to.port()));
            }
            connect(unwatched.local_addr().unwrap()).await;
            expect_silence(&mut events).await;
            // Unwatching is live too.
            maps.unwatch_port(watched.local_addr().unwrap().port())
                .unwrap();
            connect(watched.local_addr().unwrap()).await;
            expect_silence(&mut events).await;
        });
        let stats = probe.stats().unwrap();
        assert_eq!((stats.events_total, stats.lost_events_total), (52, 0));
    })
    .join()
    .expect("scenario thread");
}

#[test]
fn lo_auto_attaches_tc_and_delivers_syn_events() {
    // No native XDP on lo; auto prefers TC over generic XDP (BENCH.md: throughput).
    lo_scenario(
        "lo_auto_attaches_tc_and_delivers_syn_events",
        AttachMode::Auto,
        "tcx",
    );
}

#[test]
fn lo_tc_attaches_tcx_and_delivers_syn_events() {
    lo_scenario(
        "lo_tc_attaches_tcx_and_delivers_syn_events",
        AttachMode::Tc,
        "tcx",
    );
}

#[test]
fn unknown_interface_is_named_in_the_error() {
    std::thread::spawn(|| {
        if !private_netns_or_skip("unknown_interface_is_named_in_the_error") {
            return;
        }
        let config = ProbeConfig {
            mode: AttachMode::Auto,
            interfaces: Some(vec!["lo".into(), "swe-nope0".into()]),
        };
        match Probe::attach(&config) {
            Err(synwake_ebpf::ProbeError::UnknownInterface { interface }) => {
                assert_eq!(interface, "swe-nope0")
            }
            Err(synwake_ebpf::ProbeError::Load { .. })
                if std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("!!!!! SKIPPED unknown_interface_is_named_in_the_error: cannot load BPF")
            }
            other => panic!("expected UnknownInterface, got {other:?}"),
        }
        // Every interface that is up: only lo here.
        if let Ok(probe) = Probe::attach(&ProbeConfig::default()) {
            assert_eq!(probe.attachments(), vec![("lo".to_string(), "tcx")]);
        }
        // Nothing stale in a namespace that never had clsact.
        assert_eq!(Probe::detach_stale(&["lo".to_string()]).unwrap(), 0);
    })
    .join()
    .unwrap();
}

#[test]
fn doctor_reports_modes_for_lo_in_a_private_namespace() {
    std::thread::spawn(|| {
        let test = "doctor_reports_modes_for_lo_in_a_private_namespace";
        if !private_netns_or_skip(test) {
            return;
        }
        let report = synwake_ebpf::doctor();
        let text = report.to_string();
        if !report.checks.iter().all(|check| check.ok) {
            let _ = gate::<()>(test, &text);
            return;
        }
        assert_eq!(report.interfaces.len(), 1, "{text}");
        let lo = &report.interfaces[0];
        assert_eq!(lo.interface, "lo");
        let modes: Vec<(&str, bool)> = lo.modes.iter().map(|(m, r)| (*m, r.is_ok())).collect();
        assert_eq!(
            modes,
            [
                ("xdp-native", false),
                ("xdp-generic", true),
                ("tcx", true),
                ("tc-clsact", false)
            ],
            "{text}"
        );
        assert_eq!(lo.best_mode(), Some("tcx"));
        assert!(
            text.contains("tc-clsact    fails: not tried: tcx works"),
            "{text}"
        );
        assert!(report.probe_usable());
        // Doctor detached everything again: the probe can attach natively afterwards.
        let probe = Probe::attach(&ProbeConfig::default()).unwrap();
        assert_eq!(probe.attachments(), vec![("lo".to_string(), "tcx")]);
    })
    .join()
    .unwrap();
}

/// Sends one SYN carrying the synwake option from a raw socket; the server answers RST,
/// which does not matter to the probe.
fn send_syn_with_option(to: Ipv4Addr, port: u16, id: u32) {
    let mut options = linux_syn_options();
    options.extend_from_slice(&synwake_option(id));
    let src: Ipv4Addr = CLIENT_ADDR_V4.parse().unwrap();
    let mut segment = tcp(45678, port, SYN, &options, &[]);
    set_tcp_checksum_v4(src, to, &mut segment);
    let packet = ipv4(src, to, &[], libc::IPPROTO_TCP as u8, &segment);
    RawSender::new()
        .and_then(|raw| raw.send(&packet))
        .unwrap_or_else(|e| panic!("raw SYN to {to}:{port}: {e}"));
}

#[test]
fn veth_native_xdp_sees_remote_syns_and_the_synwake_option() {
    let test = "veth_native_xdp_sees_remote_syns_and_the_synwake_option";
    let pair = match VethPair::create("att") {
        Ok(pair) => pair,
        Err(error) => {
            let _ = gate::<()>(test, &error);
            return;
        }
    };
    let server_ns = pair.server_ns.clone();
    let client_ns = pair.client_ns.clone();
    std::thread::spawn(move || {
        VethPair::enter(&server_ns).unwrap();
        let config = ProbeConfig {
            mode: AttachMode::Xdp,
            interfaces: Some(vec![SERVER_IF.to_string()]),
        };
        let Some(mut probe) = attach_or_skip(test, &config) else {
            return;
        };
        assert_eq!(
            probe.attachments(),
            vec![(SERVER_IF.to_string(), "xdp-native")]
        );
        assert_eq!(VethPair::attached_programs(&server_ns), ["xdp:synwake_xdp"]);
        let listener = TcpListener::bind("[::]:0").unwrap(); // dual stack
        let port = listener.local_addr().unwrap().port();
        probe.watch_port(port).unwrap();
        probe.watch_id(function_id("hello")).unwrap();
        let server_ifindex = if_index(SERVER_IF);
        let mut events = probe.take_events().unwrap();
        let server: IpAddr = SERVER_ADDR_V4.parse().unwrap();
        let server_v6: IpAddr = SERVER_ADDR_V6.parse().unwrap();
        let client_ns2 = client_ns.clone();
        runtime().block_on(async move {
            for to in [
                SocketAddr::new(server, port),
                SocketAddr::new(server_v6, port),
            ] {
                let ns = client_ns2.clone();
                let client = std::thread::spawn(move || {
                    VethPair::enter(&ns).unwrap();
                    std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                        .unwrap()
                        .local_addr()
                        .unwrap()
                })
                .join()
                .unwrap();
                let event = expect_event(&mut events).await;
                assert_eq!(event.trigger, ProbeTrigger::Syn);
                assert_eq!(event.src, client);
                assert_eq!(event.dst_port, port);
                assert_eq!(event.ifindex, server_ifindex);
            }
            let ns = client_ns2.clone();
            std::thread::spawn(move || {
                VethPair::enter(&ns).unwrap();
                send_syn_with_option(SERVER_ADDR_V4.parse().unwrap(), 1, function_id("hello"));
            })
            .join()
            .unwrap();
            let event = expect_event(&mut events).await;
            assert_eq!(event.trigger, ProbeTrigger::TcpOption);
            assert_eq!(event.function_id, Some(function_id("hello")));
            assert_eq!(event.dst_port, 1);
            assert_eq!(
                event.src,
                SocketAddr::from((CLIENT_ADDR_V4.parse::<Ipv4Addr>().unwrap(), 45678))
            );
        });
        drop(probe);
        assert!(
            VethPair::attached_programs(&server_ns).is_empty(),
            "dropping the probe detaches"
        );
    })
    .join()
    .expect("scenario thread");
    drop(pair);
}

const CHILD_NS: &str = "SYNWAKE_EBPF_TEST_CHILD_NS";
const CHILD_MODE: &str = "SYNWAKE_EBPF_TEST_CHILD_MODE";

/// Not a test of its own: the process `kill_9_leaves_nothing_attached` starts and kills.
#[test]
#[ignore = "helper process for kill_9_leaves_nothing_attached"]
fn kill9_child() {
    let (Ok(ns), Ok(mode)) = (std::env::var(CHILD_NS), std::env::var(CHILD_MODE)) else {
        return;
    };
    VethPair::enter(&ns).unwrap();
    let mut probe = Probe::load().expect("child load");
    probe
        .attach_interface_in(SERVER_IF, &mode)
        .expect("child attach");
    println!("ATTACHED {}", probe.attachments()[0].1);
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn kill_9_leaves_nothing_attached() {
    let test = "kill_9_leaves_nothing_attached";
    if load_probe_or_skip(test).is_none() {
        return;
    }
    let pair = VethPair::create("k9").expect("veth pair");
    for (mode, program) in [
        ("xdp-native", "xdp:synwake_xdp"),
        ("xdp-generic", "xdp:synwake_xdp"),
        ("tcx", "tcx:synwake_tc"),
        ("tc-clsact", "clsact:synwake_tc"),
    ] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "kill9_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_NS, &pair.server_ns)
            .env(CHILD_MODE, mode)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let attached = lines
            .find_map(|line| {
                line.ok()
                    .and_then(|l| l.split("ATTACHED ").nth(1).map(|m| m.trim().to_string()))
            })
            .expect("child attached");
        assert_eq!(attached, mode);
        assert_eq!(VethPair::attached_programs(&pair.server_ns), [program]);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if mode == "tc-clsact" {
            // A netlink filter belongs to the interface, not to a process: it survives the
            // kill, and detach_stale is what removes it.
            assert_eq!(VethPair::attached_programs(&pair.server_ns), [program]);
            let ns = pair.server_ns.clone();
            let removed = std::thread::spawn(move || {
                VethPair::enter(&ns).unwrap();
                Probe::detach_stale(&[SERVER_IF.to_string(), "lo".to_string()]).unwrap()
            })
            .join()
            .unwrap();
            assert_eq!(removed, 1);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !VethPair::attached_programs(&pair.server_ns).is_empty() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = VethPair::attached_programs(&pair.server_ns);
        assert!(
            left.is_empty(),
            "{mode}: left attached after kill -9: {left:?}"
        );
    }
}
