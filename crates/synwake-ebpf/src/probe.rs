//! Loading the probe, attaching it to interfaces, its live maps and its counters.

use std::{
    collections::BTreeSet,
    error::Error as StdError,
    io,
    os::fd::AsFd,
    sync::{Arc, Mutex, MutexGuard},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::LinkOrder,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        xdp::XdpLinkId,
        ProgramError, SchedClassifier, TcAttachType, TcError, Xdp, XdpMode,
    },
    Ebpf, EbpfError,
};
use tracing::{info, warn};

use crate::{
    config::{AttachMode, ProbeConfig},
    event::{EventError, ProbeEvents},
    header::{SYNWAKE_PORT_FUNCTION, SYNWAKE_PORT_SHARED, SYNWAKE_STAT_EVENTS, SYNWAKE_STAT_LOST},
    sys,
};

/// The compiled `bpf/probe.bpf.c`.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.bpf.o"));

/// Names of the programs and maps in `bpf/probe.bpf.c`.
pub(crate) const XDP_PROGRAM: &str = "synwake_xdp";
pub(crate) const TC_PROGRAM: &str = "synwake_tc";
const EVENTS_MAP: &str = "events";
const PORTS_MAP: &str = "watched_ports";
const IDS_MAP: &str = "watched_ids";
const STATS_MAP: &str = "stats";

/// Errors of loading, attaching and driving the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the probe is configured off (mode = \"off\")")]
    Off,
    #[error("loading the eBPF probe failed (needs root or CAP_BPF+CAP_NET_ADMIN and a kernel with BPF): {reason}")]
    Load {
        reason: String,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("the kernel rejected program {program}: {reason}")]
    Program {
        program: &'static str,
        reason: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("program {program} is missing from the eBPF object or has the wrong type")]
    MissingProgram { program: &'static str },
    #[error("map {map} is missing from the eBPF object or has the wrong type")]
    MissingMap { map: &'static str },
    #[error("opening map {map} failed")]
    OpenMap {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("updating map {map} failed")]
    MapUpdate {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("interface {interface} does not exist")]
    UnknownInterface { interface: String },
    #[error("cannot attach the probe to {interface}: {reason}")]
    Attach { interface: String, reason: String },
    #[error("the probe could not attach to any interface: {reasons}")]
    NothingAttached { reasons: String },
    #[error("listing the network interfaces failed")]
    Interfaces {
        #[source]
        source: io::Error,
    },
    #[error("the event source was already taken")]
    EventsTaken,
    #[error("reading probe events failed")]
    Events {
        #[from]
        source: EventError,
    },
    #[error("BPF_PROG_TEST_RUN of {program} failed")]
    TestRun {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("removing stale synwake TC programs from {interface} failed")]
    DetachStale {
        interface: String,
        #[source]
        source: TcError,
    },
}

/// The two hooks the probe program exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `synwake_xdp`, section `xdp`.
    Xdp,
    /// `synwake_tc`, section `classifier` (TC ingress).
    Tc,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Self::Xdp => XDP_PROGRAM,
            Self::Tc => TC_PROGRAM,
        }
    }
}

/// One BPF_PROG_TEST_RUN of a probe program on a crafted packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    /// XDP action or TC verdict returned by the program.
    pub verdict: u32,
    /// The packet after the program ran.
    pub data_out: Vec<u8>,
    /// Average run time per repetition as measured by the kernel, ns.
    pub duration_ns: u32,
}

/// Counters summed over all CPUs since the probe was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Events written to the ring buffer.
    pub events_total: u64,
    /// Events lost because the ring buffer was full.
    pub lost_events_total: u64,
}

/// Cumulative kernel run-time statistics of one program (needs
/// `kernel.bpf_stats_enabled=1` or [`aya::sys::enable_stats`] while it runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// An attachment mode tried per interface, with the name the logs and `attachments` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookMode {
    XdpNative,
    XdpGeneric,
    Tcx,
    TcNetlink,
}

impl HookMode {
    pub(crate) const ALL: [HookMode; 4] = [
        Self::XdpNative,
        Self::XdpGeneric,
        Self::Tcx,
        Self::TcNetlink,
    ];

    /// `auto`: native XDP where the driver has it; otherwise TC before generic XDP, because
    /// generic XDP cost 17-23% of bulk TCP throughput on `lo` here while TCX stayed within
    /// noise (BENCH.md).
    pub(crate) const AUTO: [HookMode; 4] = [
        Self::XdpNative,
        Self::Tcx,
        Self::TcNetlink,
        Self::XdpGeneric,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
            Self::Tcx => "tcx",
            Self::TcNetlink => "tc-clsact",
        }
    }

    fn candidates(mode: AttachMode) -> &'static [HookMode] {
        match mode {
            AttachMode::Auto => &Self::AUTO,
            AttachMode::Xdp => &[Self::XdpNative, Self::XdpGeneric],
            AttachMode::Tc => &[Self::Tcx, Self::TcNetlink],
            AttachMode::Off => &[],
        }
    }
}

#[derive(Debug)]
pub(crate) enum LinkId {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

#[derive(Debug)]
struct Attachment {
    interface: String,
    mode: HookMode,
    _link: LinkId,
}

struct WatchMaps {
    /// Indexed by port: SYNWAKE_PORT_FUNCTION or SYNWAKE_PORT_SHARED, 0 = not watched.
    ports: Array<MapData, u8>,
    ids: HashMap<MapData, u32, u8>,
    /// What `ports` holds, so listing needs no 65536 lookups.
    port_set: BTreeSet<u16>,
    shared_set: BTreeSet<u16>,
}

impl WatchMaps {
    fn set_port(&mut self, port: u16, kind: u8) -> Result<(), ProbeError> {
        self.ports
            .set(u32::from(port), kind, 0)
            .map_err(|source| ProbeError::MapUpdate {
                map: PORTS_MAP,
                source,
            })
    }
}

/// A cloneable handle on the probe's watch lists; updates apply to the running program at
/// once (no reload). Handles stay usable after the [`Probe`] is dropped (then nothing reads
/// them). Watching twice or unwatching something not watched is not an error.
///
/// Every SYN to a watched port (or naming a watched id) emits an event, and when the reader
/// is idle the ring buffer wakes it with an IPI (~5 us of softirq time on a VM, see
/// BENCH.md). Watching a function only while it is cold keeps warm traffic event-free.
#[derive(Clone)]
pub struct ProbeMaps {
    inner: Arc<Mutex<WatchMaps>>,
}

impl std::fmt::Debug for ProbeMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeMaps").finish_non_exhaustive()
    }
}

impl ProbeMaps {
    fn lock(&self) -> MutexGuard<'_, WatchMaps> {
        // The maps hold no invariant a panicking holder could break.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// SYNs to `port` (host order, any address) emit trigger `syn` events.
    pub fn watch_port(&self, port: u16) -> Result<(), ProbeError> {
        let mut maps = self.lock();
        maps.set_port(port, SYNWAKE_PORT_FUNCTION as u8)?;
        maps.shared_set.remove(&port);
        maps.port_set.insert(port);
        Ok(())
    }

    /// SYNs to the shared gateway port `port` emit trigger `shared_port` events (the
    /// daemon picks the function from the client address: affinity).
    pub fn watch_shared_port(&self, port: u16) -> Result<(), ProbeError> {
        let mut maps = self.lock();
        maps.set_port(port, SYNWAKE_PORT_SHARED as u8)?;
        maps.port_set.remove(&port);
        maps.shared_set.insert(port);
        Ok(())
    }

    /// Stops `syn` or `shared_port` events for `port`.
    pub fn unwatch_port(&self, port: u16) -> Result<(), ProbeError> {
        let mut maps = self.lock();
        maps.set_port(port, 0)?;
        maps.port_set.remove(&port);
        maps.shared_set.remove(&port);
        Ok(())
    }

    /// The watched shared ports, sorted.
    pub fn watched_shared_ports(&self) -> Vec<u16> {
        self.lock().shared_set.iter().copied().collect()
    }

    /// SYNs carrying the synwake option with `id` (see [`crate::function_id`]) emit
    /// trigger `tcp_option` events, on any port.
    pub fn watch_id(&self, id: u32) -> Result<(), ProbeError> {
        self.lock()
            .ids
            .insert(id, 1, 0)
            .map_err(|source| ProbeError::MapUpdate {
                map: IDS_MAP,
                source,
            })
    }

    /// Stops `tcp_option` events for `id`.
    pub fn unwatch_id(&self, id: u32) -> Result<(), ProbeError> {
        ignore_missing(self.lock().ids.remove(&id)).map_err(|source| ProbeError::MapUpdate {
            map: IDS_MAP,
            source,
        })
    }

    /// The watched ports, sorted.
    pub fn watched_ports(&self) -> Vec<u16> {
        self.lock().port_set.iter().copied().collect()
    }

    /// The watched function ids, sorted.
    pub fn watched_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.lock().ids.keys().filter_map(Result::ok).collect();
        ids.sort_unstable();
        ids
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The loaded probe: both programs, their attachments and maps. Dropping it detaches
/// everything it attached.
///
/// `Probe` is `Send + Sync`; the map updates take `&self`, so the daemon may share it in an
/// `Arc` (or share only a [`ProbeMaps`] clone).
pub struct Probe {
    ebpf: Ebpf,
    maps: ProbeMaps,
    stats: PerCpuArray<MapData, u64>,
    events: Option<ProbeEvents>,
    attachments: Vec<Attachment>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("attachments", &self.attachments())
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// Loads the probe and attaches it as `config` says.
    ///
    /// With `interfaces: Some(..)` every named interface must attach, else the error names
    /// the interface and each mode's reason. With `None` (every interface that is up),
    /// interfaces that cannot attach are skipped with a warning, and only attaching
    /// nowhere is an error. `mode = off` returns [`ProbeError::Off`]. Which mode attached
    /// where is logged at info level and returned by [`Probe::attachments`].
    pub fn attach(config: &ProbeConfig) -> Result<Self, ProbeError> {
        if config.mode == AttachMode::Off {
            return Err(ProbeError::Off);
        }
        let mut probe = Self::load()?;
        match &config.interfaces {
            Some(interfaces) => {
                for interface in interfaces {
                    probe.attach_interface(interface, config.mode)?;
                }
            }
            None => {
                let interfaces =
                    sys::interfaces_up().map_err(|source| ProbeError::Interfaces { source })?;
                let mut reasons = Vec::new();
                for interface in &interfaces {
                    if let Err(error) = probe.attach_interface(interface, config.mode) {
                        warn!(interface = %interface, "probe not attached: {error}");
                        reasons.push(error.to_string());
                    }
                }
                if probe.attachments.is_empty() {
                    return Err(ProbeError::NothingAttached {
                        reasons: if reasons.is_empty() {
                            "no interface is up".to_string()
                        } else {
                            reasons.join("; ")
                        },
                    });
                }
            }
        }
        Ok(probe)
    }

    /// Loads both programs into the kernel without attaching them anywhere: for
    /// [`Probe::test_run`] fixtures, benchmarks and diagnostics.
    pub fn load() -> Result<Self, ProbeError> {
        let mut ebpf = Ebpf::load(PROBE_OBJECT).map_err(|source| ProbeError::Load {
            reason: error_chain(&source),
            source: Box::new(source),
        })?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, XDP_PROGRAM)?;
        xdp.load()
            .map_err(|source| program_error(XDP_PROGRAM, source))?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, TC_PROGRAM)?;
        tc.load()
            .map_err(|source| program_error(TC_PROGRAM, source))?;

        let ports = Array::try_from(take_map(&mut ebpf, PORTS_MAP)?).map_err(|source| {
            ProbeError::OpenMap {
                map: PORTS_MAP,
                source,
            }
        })?;
        let ids = HashMap::try_from(take_map(&mut ebpf, IDS_MAP)?).map_err(|source| {
            ProbeError::OpenMap {
                map: IDS_MAP,
                source,
            }
        })?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, STATS_MAP)?).map_err(|source| {
            ProbeError::OpenMap {
                map: STATS_MAP,
                source,
            }
        })?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, EVENTS_MAP)?).map_err(|source| {
            ProbeError::OpenMap {
                map: EVENTS_MAP,
                source,
            }
        })?;
        Ok(Self {
            ebpf,
            maps: ProbeMaps {
                inner: Arc::new(Mutex::new(WatchMaps {
                    ports,
                    ids,
                    port_set: BTreeSet::new(),
                    shared_set: BTreeSet::new(),
                })),
            },
            stats,
            events: Some(ProbeEvents::new(ring)),
            attachments: Vec::new(),
        })
    }

    /// Attaches to `interface` in exactly the mode named (`xdp-native`, `xdp-generic`,
    /// `tcx`, `tc-clsact`); for tests that need a particular mode.
    #[doc(hidden)]
    pub fn attach_interface_in(&mut self, interface: &str, mode: &str) -> Result<(), ProbeError> {
        let hook_mode = HookMode::ALL
            .into_iter()
            .find(|m| m.name() == mode)
            .ok_or_else(|| ProbeError::Attach {
                interface: interface.to_string(),
                reason: format!("unknown mode {mode}"),
            })?;
        let link = self
            .attach_hook(interface, hook_mode)
            .map_err(|reason| ProbeError::Attach {
                interface: interface.to_string(),
                reason,
            })?;
        self.attachments.push(Attachment {
            interface: interface.to_string(),
            mode: hook_mode,
            _link: link,
        });
        Ok(())
    }

    /// Attaches to one more interface, trying the modes `mode` allows in order; returns
    /// the mode name that attached (see [`Probe::attachments`]).
    pub fn attach_interface(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<&'static str, ProbeError> {
        if mode == AttachMode::Off {
            return Err(ProbeError::Off);
        }
        if sys::ifindex(interface).is_none() {
            return Err(ProbeError::UnknownInterface {
                interface: interface.to_string(),
            });
        }
        let mut reasons = Vec::new();
        for &hook_mode in HookMode::candidates(mode) {
            match self.attach_hook(interface, hook_mode) {
                Ok(link) => {
                    info!(interface, mode = hook_mode.name(), "probe attached");
                    self.attachments.push(Attachment {
                        interface: interface.to_string(),
                        mode: hook_mode,
                        _link: link,
                    });
                    return Ok(hook_mode.name());
                }
                Err(reason) => reasons.push(format!("{}: {reason}", hook_mode.name())),
            }
        }
        Err(ProbeError::Attach {
            interface: interface.to_string(),
            reason: reasons.join("; "),
        })
    }

    /// Attaches in exactly one mode; the error is a human-readable reason.
    pub(crate) fn attach_hook(
        &mut self,
        interface: &str,
        mode: HookMode,
    ) -> Result<LinkId, String> {
        match mode {
            HookMode::XdpNative | HookMode::XdpGeneric => {
                let xdp_mode = if mode == HookMode::XdpNative {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let xdp: &mut Xdp =
                    program_mut(&mut self.ebpf, XDP_PROGRAM).map_err(|e| e.to_string())?;
                xdp.attach(interface, xdp_mode)
                    .map(LinkId::Xdp)
                    .map_err(|e| error_chain(&e))
            }
            HookMode::Tcx => {
                let tc: &mut SchedClassifier =
                    program_mut(&mut self.ebpf, TC_PROGRAM).map_err(|e| e.to_string())?;
                tc.attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map(LinkId::Tc)
                .map_err(|e| error_chain(&e))
            }
            HookMode::TcNetlink => {
                // EEXIST (already there) is fine; any real problem shows in the attach below.
                let _ = tc::qdisc_add_clsact(interface);
                let tc: &mut SchedClassifier =
                    program_mut(&mut self.ebpf, TC_PROGRAM).map_err(|e| e.to_string())?;
                tc.attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map(LinkId::Tc)
                .map_err(|e| error_chain(&e))
            }
        }
    }

    /// Detaches one link made by [`Probe::attach_hook`] (used by `doctor`).
    pub(crate) fn detach_hook(&mut self, link: LinkId) -> Result<(), String> {
        match link {
            LinkId::Xdp(id) => {
                let xdp: &mut Xdp =
                    program_mut(&mut self.ebpf, XDP_PROGRAM).map_err(|e| e.to_string())?;
                xdp.detach(id).map_err(|e| error_chain(&e))
            }
            LinkId::Tc(id) => {
                let tc: &mut SchedClassifier =
                    program_mut(&mut self.ebpf, TC_PROGRAM).map_err(|e| e.to_string())?;
                tc.detach(id).map_err(|e| error_chain(&e))
            }
        }
    }

    /// `(interface, mode)` for every attachment, in attach order. Modes: `xdp-native`,
    /// `xdp-generic`, `tcx`, `tc-clsact`.
    pub fn attachments(&self) -> Vec<(String, &'static str)> {
        self.attachments
            .iter()
            .map(|attachment| (attachment.interface.clone(), attachment.mode.name()))
            .collect()
    }

    /// A cloneable handle on the watch lists (see [`ProbeMaps`]).
    pub fn maps(&self) -> ProbeMaps {
        self.maps.clone()
    }

    /// Same as [`ProbeMaps::watch_port`].
    pub fn watch_port(&self, port: u16) -> Result<(), ProbeError> {
        self.maps.watch_port(port)
    }

    /// Same as [`ProbeMaps::unwatch_port`].
    pub fn unwatch_port(&self, port: u16) -> Result<(), ProbeError> {
        self.maps.unwatch_port(port)
    }

    /// Same as [`ProbeMaps::watch_shared_port`].
    pub fn watch_shared_port(&self, port: u16) -> Result<(), ProbeError> {
        self.maps.watch_shared_port(port)
    }

    /// Same as [`ProbeMaps::watch_id`].
    pub fn watch_id(&self, id: u32) -> Result<(), ProbeError> {
        self.maps.watch_id(id)
    }

    /// Same as [`ProbeMaps::unwatch_id`].
    pub fn unwatch_id(&self, id: u32) -> Result<(), ProbeError> {
        self.maps.unwatch_id(id)
    }

    /// The event source; there is one per probe, so the second call fails with
    /// [`ProbeError::EventsTaken`]. It may outlive the probe, but once the probe is dropped
    /// nothing new arrives (only what was already buffered).
    pub fn take_events(&mut self) -> Result<ProbeEvents, ProbeError> {
        self.events.take().ok_or(ProbeError::EventsTaken)
    }

    /// Event and lost-event counters, summed over CPUs.
    pub fn stats(&self) -> Result<ProbeStats, ProbeError> {
        let sum = |index: u64| -> Result<u64, ProbeError> {
            let values =
                self.stats
                    .get(&(index as u32), 0)
                    .map_err(|source| ProbeError::OpenMap {
                        map: STATS_MAP,
                        source,
                    })?;
            Ok(values.iter().sum())
        };
        Ok(ProbeStats {
            events_total: sum(SYNWAKE_STAT_EVENTS)?,
            lost_events_total: sum(SYNWAKE_STAT_LOST)?,
        })
    }

    /// Kernel run-time statistics of one program (all its attachments together).
    pub fn run_stats(&self, hook: Hook) -> Result<RunStats, ProbeError> {
        let info = match hook {
            Hook::Xdp => program_ref::<Xdp>(&self.ebpf, XDP_PROGRAM)?.info(),
            Hook::Tc => program_ref::<SchedClassifier>(&self.ebpf, TC_PROGRAM)?.info(),
        }
        .map_err(|source| program_error(hook.program(), source))?;
        Ok(RunStats {
            run_time_ns: info.run_time().as_nanos() as u64,
            run_count: info.run_count(),
        })
    }

    /// Runs one program on `packet` through BPF_PROG_TEST_RUN (no NIC involved); events it
    /// emits go to the same ring buffer as live ones. `repeat` > 1 averages `duration_ns`.
    pub fn test_run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<TestRun, ProbeError> {
        let program = hook.program();
        let fd = match hook {
            Hook::Xdp => program_ref::<Xdp>(&self.ebpf, program)?.fd(),
            Hook::Tc => program_ref::<SchedClassifier>(&self.ebpf, program)?.fd(),
        }
        .map_err(|source| program_error(program, source))?;
        let run = sys::prog_test_run(fd.as_fd(), packet, repeat)
            .map_err(|source| ProbeError::TestRun { program, source })?;
        Ok(TestRun {
            verdict: run.retval,
            data_out: run.data_out,
            duration_ns: run.duration_ns,
        })
    }

    /// Removes synwake TC programs that a crashed run left attached through netlink clsact
    /// (the fallback for kernels without TCX; XDP and TCX attachments are bpf_links that
    /// die with their process). Returns how many interfaces had one. Call it before
    /// [`Probe::attach`]; interfaces without a leftover are not an error.
    pub fn detach_stale(interfaces: &[String]) -> Result<usize, ProbeError> {
        let mut removed = 0;
        for interface in interfaces {
            match tc::qdisc_detach_program(interface, TcAttachType::Ingress, TC_PROGRAM) {
                Ok(()) => {
                    info!(interface = %interface, "removed a stale synwake TC program");
                    removed += 1;
                }
                Err(TcError::IoError(error)) if error.kind() == io::ErrorKind::NotFound => {}
                Err(TcError::NetlinkError(error)) if is_no_qdisc(&error) => {}
                Err(source) => {
                    return Err(ProbeError::DetachStale {
                        interface: interface.clone(),
                        source,
                    })
                }
            }
        }
        Ok(removed)
    }
}

/// A netlink filter dump on an interface without clsact fails with EINVAL or ENOENT.
fn is_no_qdisc(error: &aya::sys::NetlinkError) -> bool {
    let text = error_chain(error);
    text.contains("os error 2") || text.contains("os error 22")
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(ProbeError::MissingProgram { program: name })
}

fn program_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T, ProbeError>
where
    &'a T: TryFrom<&'a aya::programs::Program>,
{
    ebpf.program(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(ProbeError::MissingProgram { program: name })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or(ProbeError::MissingMap { map: name })
}

fn program_error(program: &'static str, source: ProgramError) -> ProbeError {
    ProbeError::Program {
        program,
        reason: error_chain(&source),
        source: Box::new(source),
    }
}

/// "outer: inner: root cause" for logs that show one line.
pub(crate) fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn assert_send_sync<T: Send + Sync>() {}
    const _: () = assert_send_sync::<Probe>();
    const _: () = assert_send_sync::<ProbeMaps>();

    #[test]
    fn mode_candidates_follow_the_config() {
        assert_eq!(HookMode::candidates(AttachMode::Auto).len(), 4);
        assert_eq!(
            HookMode::candidates(AttachMode::Xdp)
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>(),
            ["xdp-native", "xdp-generic"]
        );
        assert_eq!(
            HookMode::candidates(AttachMode::Tc)
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>(),
            ["tcx", "tc-clsact"]
        );
        assert!(HookMode::candidates(AttachMode::Off).is_empty());
    }

    #[test]
    fn off_mode_is_refused_before_loading() {
        let config = ProbeConfig {
            mode: AttachMode::Off,
            interfaces: None,
        };
        assert!(matches!(Probe::attach(&config), Err(ProbeError::Off)));
    }
}
