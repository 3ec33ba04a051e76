//! Packet wake signals: the eBPF probe (crates/synwake-ebpf) sees a SYN for a function and
//! this module turns it into `Lifecycle::wake(function, Trigger::Syn | Trigger::TcpOption)`.
//!
//! A thread reads the ring buffer and wakes functions; a task keeps the probe's maps
//! (watched ports and function ids) in step with deploys, updates and removals.
//!
//! Only cold functions are watched: a SYN for a warm function needs no wake, and each
//! event costs the host a reader wake-up (~5 us of softirq time on these VMs), so warm
//! traffic never pays for the probe beyond the ~25 ns parse. The exception is affinity
//! (`[probe] affinity_window`): then the shared ports are watched always, and their SYNs
//! wake the one function the client called within the window (`Trigger::Affinity`).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use synwake_ebpf::{AttachMode, Probe, ProbeConfig, ProbeEvent, ProbeEvents, ProbeTrigger};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Config, ProbeMode};
use crate::lifecycle::{Lifecycle, Trigger, WakeOutcome};
use crate::metrics::Metrics;

/// A running probe; dropping it stops the tasks and detaches the programs.
pub struct ProbeHandle {
    tasks: Vec<JoinHandle<()>>,
    /// Stops reading events when dropped (before the programs detach).
    _reader: ReaderThread,
    attachments: Vec<(String, &'static str)>,
    /// Keeps the programs attached until the handle drops.
    _probe: Arc<Probe>,
}

impl ProbeHandle {
    /// (interface, mode) pairs the probe attached to.
    pub fn attachments(&self) -> &[(String, &'static str)] {
        &self.attachments
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The event reader: a thread of its own blocked in poll(2) on the ring buffer, which
/// handles each event where it reads it, the woken start's first step (through the spawn)
/// included. A reader task on the runtime measured SYN -> event handled p50 114-122 us
/// against 59 us for this thread (load 10, 2 vCPUs): the task also waited for a worker to
/// come out of epoll and the runtime to poll it.
struct ReaderThread {
    /// Written once to stop the thread.
    stop: Arc<OwnedFd>,
}

impl ReaderThread {
    fn spawn(
        events: Arc<Mutex<ProbeEvents>>,
        dir: Arc<RwLock<Directory>>,
        lc: Lifecycle,
    ) -> std::io::Result<ReaderThread> {
        // SAFETY: eventfd takes no pointers; a valid fd is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let rt = tokio::runtime::Handle::current();
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("synwake-probe".into())
            .spawn(move || {
                // Starts use the runtime (timers, tasks, child reaping) from this thread.
                let _rt = rt.enter();
                read_events(&events, &stop2, &dir, &lc);
                drop((dir, lc));
                // An instance dies with the thread that spawned it (the launcher arms
                // PR_SET_PDEATHSIG, which follows the spawning thread), so this thread
                // never exits: it parks until synwake does, after stopping its instances.
                loop {
                    std::thread::park();
                }
            })?;
        Ok(ReaderThread { stop })
    }
}

impl Drop for ReaderThread {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd we own.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Handles events until `stop` is readable: drains the ring buffer, then blocks in poll(2)
/// until it or `stop` is readable.
fn read_events(
    events: &Mutex<ProbeEvents>,
    stop: &OwnedFd,
    dir: &RwLock<Directory>,
    lc: &Lifecycle,
) {
    let ring = lock(events).raw_fd();
    loop {
        drain(events, dir, lc);
        let mut fds = [
            libc::pollfd {
                fd: ring,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!("probe: waiting for events failed, no more SYN wakes: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
    }
}

fn lock(events: &Mutex<ProbeEvents>) -> std::sync::MutexGuard<'_, ProbeEvents> {
    events
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Handles every buffered event, on the caller's thread: the reader's, or a cold
/// function's connection or request that must not start before its own SYN's wake
/// ([`Lifecycle::set_probe`]). One caller at a time, so each event is handled once.
fn drain(events: &Mutex<ProbeEvents>, dir: &RwLock<Directory>, lc: &Lifecycle) {
    let mut events = lock(events);
    loop {
        match events.try_next() {
            Ok(Some(ev)) => on_event(&ev, dir, lc),
            Ok(None) => return,
            Err(e) => tracing::warn!("probe event dropped: {}", crate::error_chain(&e)),
        }
    }
}

/// Which function a port or an id names; shared by the reader and the map sync.
#[derive(Default)]
struct Directory {
    ports: HashMap<u16, String>,
    ids: HashMap<u32, String>,
}

fn probe_config(config: &Config) -> ProbeConfig {
    ProbeConfig {
        mode: match config.probe.mode {
            ProbeMode::Auto => AttachMode::Auto,
            ProbeMode::Xdp => AttachMode::Xdp,
            ProbeMode::Tc => AttachMode::Tc,
            ProbeMode::Off => AttachMode::Off,
        },
        interfaces: config.probe.interfaces.clone(),
    }
}

/// Starts the probe as configured. `None` when it is off or cannot attach; then synwake
/// wakes on `accept` and `request` only, and says why once.
pub fn start(config: &Config, lifecycle: Lifecycle, metrics: Arc<Metrics>) -> Option<ProbeHandle> {
    if config.probe.mode == ProbeMode::Off {
        tracing::info!(
            "probe off ([probe] mode = \"off\"): waking functions on accept and request"
        );
        return None;
    }
    let mut probe = match Probe::attach(&probe_config(config)) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                "probe unavailable, waking functions on accept and request only: {}",
                crate::error_chain(&e)
            );
            return None;
        }
    };
    let events = match probe.take_events() {
        Ok(ev) => ev,
        Err(e) => {
            tracing::warn!("probe unavailable: {e}");
            return None;
        }
    };
    let attachments = probe.attachments();
    for (iface, mode) in &attachments {
        tracing::info!("probe attached to {iface} ({mode})");
    }
    if let Some(window) = config.probe.affinity_window {
        let shared = [
            Some(config.gateway.listen.port()),
            config.gateway.tls_listen.map(|a| a.port()),
        ];
        for port in shared.into_iter().flatten() {
            if let Err(e) = probe.watch_shared_port(port) {
                tracing::warn!(
                    "probe: watching shared port {port} for affinity: {}",
                    crate::error_chain(&e)
                );
            }
        }
        lifecycle.set_affinity(Some(window));
        tracing::info!("affinity wakes on the shared ports (window {window:?})");
    }
    let probe = Arc::new(probe);
    let dir = Arc::new(RwLock::new(Directory::default()));

    // Watch the cold functions now, so a SYN right after startup is seen.
    sync_maps(&probe, &dir, &lifecycle);
    let sync = {
        let (probe, dir, lc) = (probe.clone(), dir.clone(), lifecycle.clone());
        tokio::spawn(async move {
            let mut changes = lc.subscribe_changes();
            let mut warmth = lc.subscribe_warmth();
            loop {
                sync_maps(&probe, &dir, &lc);
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    r = warmth.changed() => if r.is_err() { return },
                }
            }
        })
    };
    let events = Arc::new(Mutex::new(events));
    let reader = match ReaderThread::spawn(events.clone(), dir.clone(), lifecycle.clone()) {
        Ok(r) => r,
        Err(e) => {
            sync.abort();
            tracing::warn!("probe unavailable: cannot start its reader thread: {e}");
            return None;
        }
    };
    let weak = Arc::downgrade(&probe);
    metrics.set_probe_counters(Box::new(move || {
        let s = weak.upgrade()?.stats().ok()?;
        Some((s.events_total, s.lost_events_total))
    }));
    {
        let dir = dir.clone();
        lifecycle.set_probe(Box::new(move |lc| drain(&events, &dir, lc)));
    }
    Some(ProbeHandle {
        tasks: vec![sync],
        _reader: reader,
        attachments,
        _probe: probe,
    })
}

/// SYN -> wake. The wake's time is the SYN's arrival, so the lifecycle can tell how much
/// head start the packet bought.
fn on_event(ev: &ProbeEvent, dir: &RwLock<Directory>, lc: &Lifecycle) {
    let age = Duration::from_nanos(synwake_ebpf::ktime_now_ns().saturating_sub(ev.ktime_ns));
    let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    let (name, trigger) = {
        let d = dir.read().unwrap();
        match ev.trigger {
            ProbeTrigger::Syn => (d.ports.get(&ev.dst_port).cloned(), Trigger::Syn),
            ProbeTrigger::TcpOption => (
                ev.function_id.and_then(|id| d.ids.get(&id).cloned()),
                Trigger::TcpOption,
            ),
            ProbeTrigger::SharedPort => (None, Trigger::Affinity),
        }
    };
    if trigger == Trigger::Affinity {
        if let Some((name, WakeOutcome::Started)) = lc.wake_by_affinity(ev.src.ip(), at) {
            tracing::debug!("affinity: SYN from {} woke {name}", ev.src);
        }
        return;
    }
    let Some(name) = name else {
        // Raced with a removal; the map update follows.
        return;
    };
    // The start's first step (through the spawn) runs here, on the reader thread: the
    // SYN's wake-up of this thread is the only hand-off before the instance is spawned.
    let outcome = lc.wake_inline(&name, trigger, at);
    if outcome == WakeOutcome::Started {
        tracing::debug!(
            "{} from {} woke {name} ({:.0} us after the SYN arrived)",
            trigger.as_str(),
            ev.src,
            age.as_secs_f64() * 1e6
        );
    }
}

fn sync_maps(probe: &Probe, dir: &RwLock<Directory>, lc: &Lifecycle) {
    let specs: Vec<_> = lc
        .statuses()
        .into_iter()
        .filter(|s| s.replicas == 0)
        .map(|s| s.spec)
        .collect();
    let ports: HashMap<u16, String> = specs
        .iter()
        .flat_map(|s| {
            [s.port, s.tls_port]
                .into_iter()
                .flatten()
                .map(|p| (p, s.name.clone()))
        })
        .collect();
    let ids: HashMap<u32, String> = specs.iter().map(|s| (s.id(), s.name.clone())).collect();
    let mut d = dir.write().unwrap();
    let old_ports: HashSet<u16> = d.ports.keys().copied().collect();
    let old_ids: HashSet<u32> = d.ids.keys().copied().collect();
    for p in old_ports.iter().filter(|p| !ports.contains_key(p)) {
        if let Err(e) = probe.unwatch_port(*p) {
            tracing::warn!("probe: unwatching port {p}: {}", crate::error_chain(&e));
        }
    }
    for p in ports.keys().filter(|p| !old_ports.contains(p)) {
        if let Err(e) = probe.watch_port(*p) {
            tracing::warn!(
                "probe: watching port {p} of {}: {}",
                ports[p],
                crate::error_chain(&e)
            );
        }
    }
    for i in old_ids.iter().filter(|i| !ids.contains_key(i)) {
        if let Err(e) = probe.unwatch_id(*i) {
            tracing::warn!("probe: unwatching id {i:08x}: {}", crate::error_chain(&e));
        }
    }
    for i in ids.keys().filter(|i| !old_ids.contains(i)) {
        if let Err(e) = probe.watch_id(*i) {
            tracing::warn!(
                "probe: watching id {i:08x} of {}: {}",
                ids[i],
                crate::error_chain(&e)
            );
        }
    }
    d.ports = ports;
    d.ids = ids;
}

/// Probe section of `synwake doctor`: attach modes tried on `interfaces` (`None`: every
/// interface that is up).
pub fn doctor(interfaces: Option<&[String]>) -> String {
    let report = synwake_ebpf::doctor_interfaces(interfaces);
    let mut s = String::new();
    for line in report.to_string().lines() {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}
