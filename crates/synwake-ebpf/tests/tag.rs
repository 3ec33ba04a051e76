//! Tier 3 for the tagger: the sockops program on a real cgroup, real connections from a
//! process in it, and the probe on `lo` of a private network namespace telling whether
//! each SYN carried the synwake option (trigger `tcp_option`) or not (trigger `syn`).

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    time::Duration,
};

use common::{netns::unshare_private_netns, *};
use synwake_ebpf::{
    cgroup::{cgroup2_root, TagCgroup},
    function_id, AttachMode, OptionFiller, Probe, ProbeConfig, ProbeEvents, ProbeTrigger,
    TagDestination, Tagger,
};

/// A private netns with the probe on lo, a tagger and a fresh cgroup, or skip/fail.
struct Scene {
    probe: Probe,
    events: ProbeEvents,
    tagger: Tagger,
    cgroup: TagCgroup,
}

fn scene(test: &str) -> Option<Scene> {
    if let Err(error) = unshare_private_netns() {
        return gate(test, &error);
    }
    let config = ProbeConfig {
        mode: AttachMode::Tc,
        interfaces: Some(vec!["lo".into()]),
    };
    let mut probe = match Probe::attach(&config) {
        Ok(probe) => probe,
        Err(error) => return gate(test, &error),
    };
    let events = probe.take_events().unwrap();
    let root = match cgroup2_root() {
        Ok(root) => root,
        Err(error) => return gate(test, &error),
    };
    let name = format!("synwake-tag-{}-{test}", std::process::id());
    let cgroup = TagCgroup::create_named(&root, &name).expect("create the test cgroup");
    let mut tagger = match Tagger::load() {
        Ok(tagger) => tagger,
        Err(error) => return gate(test, &error),
    };
    tagger
        .attach_cgroup(cgroup.path())
        .expect("attach the tagger");
    Some(Scene {
        probe,
        events,
        tagger,
        cgroup,
    })
}

/// Connects to `to` from a bash process in `cgroup` (a socket belongs to the cgroup of
/// the process that made it); returns whether the connect succeeded.
fn connect_from(cgroup: &Path, to: SocketAddr) -> bool {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap();
    let fd = procs.as_raw_fd();
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!("exec 3<>/dev/tcp/{}/{}", to.ip(), to.port()));
    // SAFETY: only write(2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.status().expect("run bash").success()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn next_event(events: &mut ProbeEvents) -> synwake_ebpf::ProbeEvent {
    runtime().block_on(async {
        tokio::time::timeout(Duration::from_secs(2), events.next())
            .await
            .expect("a probe event within 2 s")
            .expect("event")
    })
}

#[test]
fn tagger_tags_syns_to_configured_destinations_only_v4_and_v6() {
    std::thread::spawn(|| {
        let test = "tagger_only_configured";
        let Some(mut s) = scene(test) else { return };
        let tagged = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let tagged_v6 = TcpListener::bind("[::1]:0").unwrap();
        let (hello, v6fn) = (function_id("hello"), function_id("hello-v6"));
        for listener in [&tagged, &other, &tagged_v6] {
            s.probe
                .watch_port(listener.local_addr().unwrap().port())
                .unwrap();
        }
        s.probe.watch_id(hello).unwrap();
        s.probe.watch_id(v6fn).unwrap();
        s.tagger
            .tag(&tagged.local_addr().unwrap().into(), hello)
            .unwrap();
        // A prefix for IPv6: ::/0 on the port, the longest match picks it for ::1.
        let v6_port = tagged_v6.local_addr().unwrap().port();
        s.tagger
            .tag(&format!("[::/0]:{v6_port}").parse().unwrap(), v6fn)
            .unwrap();

        assert!(connect_from(s.cgroup.path(), tagged.local_addr().unwrap()));
        let event = next_event(&mut s.events);
        assert_eq!(event.trigger, ProbeTrigger::TcpOption, "{event:?}");
        assert_eq!(event.function_id, Some(hello));

        // The same port on another address is not the destination: no option.
        assert!(connect_from(s.cgroup.path(), other.local_addr().unwrap()));
        let event = next_event(&mut s.events);
        assert_eq!(event.trigger, ProbeTrigger::Syn, "{event:?}");
        assert_eq!(event.dst_port, other.local_addr().unwrap().port());

        assert!(connect_from(
            s.cgroup.path(),
            tagged_v6.local_addr().unwrap()
        ));
        let event = next_event(&mut s.events);
        assert_eq!(event.trigger, ProbeTrigger::TcpOption, "{event:?}");
        assert_eq!(event.function_id, Some(v6fn));
        assert!(event.src.is_ipv6());

        // A process outside the cgroup (this test's own connect) is never tagged.
        let _outside = std::net::TcpStream::connect(tagged.local_addr().unwrap()).unwrap();
        let event = next_event(&mut s.events);
        assert_eq!(event.trigger, ProbeTrigger::Syn, "{event:?}");

        // Untagging is live.
        s.tagger
            .untag(&TagDestination::from(tagged.local_addr().unwrap()))
            .unwrap();
        assert!(connect_from(s.cgroup.path(), tagged.local_addr().unwrap()));
        assert_eq!(next_event(&mut s.events).trigger, ProbeTrigger::Syn);

        let stats = s.tagger.stats().unwrap();
        assert_eq!((stats.tagged_syns, stats.untagged_full), (2, 0));
    })
    .join()
    .expect("scenario thread");
}

#[test]
fn full_option_space_sends_the_syn_untagged_and_counts_it() {
    std::thread::spawn(|| {
        let test = "tagger_option_space_full";
        let Some(mut s) = scene(test) else { return };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        let id = function_id("hello");
        s.probe.watch_port(to.port()).unwrap();
        s.probe.watch_id(id).unwrap();
        s.tagger.tag(&to.into(), id).unwrap();
        // Linux's SYN options take 20 of the 40 bytes; a program in a child cgroup (which
        // runs before the parent's) takes the other 20.
        let full = TagCgroup::create_named(s.cgroup.path(), "full").unwrap();
        let _filler = OptionFiller::attach(full.path(), 20).expect("attach the filler");

        assert!(
            connect_from(full.path(), to),
            "the connection must go ahead"
        );
        let event = next_event(&mut s.events);
        assert_eq!(event.trigger, ProbeTrigger::Syn, "{event:?}");
        let stats = s.tagger.stats().unwrap();
        assert_eq!((stats.tagged_syns, stats.untagged_full), (0, 1));

        // With room left (12 bytes taken), the option still fits.
        let roomy = TagCgroup::create_named(s.cgroup.path(), "roomy").unwrap();
        let _small = OptionFiller::attach(roomy.path(), 12).unwrap();
        assert!(connect_from(roomy.path(), to));
        let event = next_event(&mut s.events);
        assert_eq!(event.trigger, ProbeTrigger::TcpOption, "{event:?}");
        let stats = s.tagger.stats().unwrap();
        assert_eq!((stats.tagged_syns, stats.untagged_full), (1, 1));
        drop((full, roomy));
    })
    .join()
    .expect("scenario thread");
}
