//! The sweep: topology + delay line, then per daemon configuration (phase), per RTT
//! (emulation checked first), per init time, the runs of each mode. The phases run as a
//! palindrome (see [`plan_legs`]), so no mode always gets the machine's earlier state.
//! Writes the outputs at the end.

use std::fmt::Write as _;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client;
use crate::daemon::{Api, Daemon, DaemonSetup, FunctionSpec, WakeSetup, FUNCTION_PORT_BASE};
use crate::delay::DelayLine;
use crate::interrupt;
use crate::netns::{self, NetnsError, Topology};
use crate::report::{self, Record};
use crate::stats::{percentile, Summary};
use crate::tls::TestPki;
use crate::{BenchArgs, Mode, Protocol, RuntimeKind};

/// Port the emulation check connects to (a bare listener, never a function).
const CHECK_PORT: u16 = 7999;
/// How long one request may take before the run is declared failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Times the daemon may be restarted after exiting on its own during one phase.
const MAX_DAEMON_RESTARTS: usize = 2;

/// The daemon under test exited while the harness was measuring.
#[derive(Debug, thiserror::Error)]
#[error("synwake exited during the sweep")]
struct DaemonExited;

/// Failed requests tolerated per cell (each is retried and reported).
const MAX_ERRORS_PER_CELL: usize = 3;
/// How long scaling to zero may take.
const COLD_TIMEOUT: Duration = Duration::from_secs(20);

/// Result of timing TCP connects through the delay line.
#[derive(Debug, Clone)]
pub struct EmulationCheck {
    pub rtt_ms: u64,
    /// Connect times in ms, in the order measured.
    pub connect_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    pub tolerance_ms: f64,
}

impl EmulationCheck {
    /// Whether the median connect time is within tolerance of the target RTT.
    pub fn passed(&self) -> bool {
        (self.p50_ms - self.rtt_ms as f64).abs() <= self.tolerance_ms
    }
}

/// Why the emulation could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("could not listen on the server side for the check")]
    Listen(#[source] std::io::Error),
    #[error("check connect failed")]
    Connect(#[source] std::io::Error),
}

/// Allowed error of the emulated RTT: 10 %, or 0.5 ms at RTT 0.
pub fn tolerance_ms(rtt_ms: u64) -> f64 {
    if rtt_ms == 0 {
        0.5
    } else {
        rtt_ms as f64 * 0.1
    }
}

/// What a sweep does with an emulation check.
#[derive(Debug, Clone, PartialEq)]
pub enum EmulationVerdict {
    Ok,
    /// Outside tolerance: a published sweep stops here.
    Refuse(String),
    /// Outside tolerance but drift was allowed (harness tests on a loaded machine): the
    /// sweep goes on and its report says it is not publishable.
    Unverified(String),
}

/// Judges `check`; `allow_drift` turns a refusal into an unverified, marked report.
pub fn judge_emulation(check: &EmulationCheck, allow_drift: bool) -> EmulationVerdict {
    if check.passed() {
        return EmulationVerdict::Ok;
    }
    let why = format!(
        "emulation check failed at RTT {} ms: connect p50 {:.3} ms (tolerance ±{:.2} ms, samples {:?})",
        check.rtt_ms, check.p50_ms, check.tolerance_ms, check.connect_ms
    );
    if allow_drift {
        EmulationVerdict::Unverified(why)
    } else {
        EmulationVerdict::Refuse(why)
    }
}

/// Times `connects` TCP handshakes client -> server (after one untimed warm-up that also
/// fills the neighbour caches). A handshake is one round trip, so it should match the RTT.
pub fn check_emulation(
    topo: &Topology,
    rtt_ms: u64,
    connects: usize,
) -> Result<EmulationCheck, EmulationError> {
    let bind = SocketAddrV4::new(netns::SERVER_ADDR, CHECK_PORT);
    // The socket stays in the server namespace after the thread returns; the kernel
    // completes handshakes from the backlog, so nobody needs to accept().
    let listener: TcpListener = netns::in_netns(&topo.server, move || TcpListener::bind(bind))?
        .map_err(EmulationError::Listen)?;
    let target = SocketAddr::V4(bind);
    let times = netns::in_netns(&topo.client, move || -> std::io::Result<Vec<f64>> {
        let mut out = Vec::with_capacity(connects);
        for i in 0..=connects {
            let start = Instant::now();
            let s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            drop(s);
            if i > 0 {
                out.push(ms);
            }
        }
        Ok(out)
    })?
    .map_err(EmulationError::Connect)?;
    drop(listener);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(EmulationCheck {
        rtt_ms,
        p50_ms: percentile(&sorted, 50.0).unwrap_or(f64::NAN),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        connect_ms: times,
        tolerance_ms: tolerance_ms(rtt_ms),
    })
}

fn resolve_bins(args: &BenchArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let synwake = resolve_synwake(args.synwake_bin.as_deref())?;
    let function = match args.runtime {
        RuntimeKind::Process => Some(resolve_function(&synwake, args.function_bin.as_deref())?),
        RuntimeKind::Oci | RuntimeKind::OciPool => None,
    };
    Ok((synwake, function))
}

/// The synwake binary: `given`, else this executable if it is `synwake`, else `synwake`
/// next to it.
pub fn resolve_synwake(given: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    let synwake = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let me = std::env::current_exe().context("current_exe")?;
            if me.file_name().is_some_and(|n| n == "synwake") {
                me
            } else {
                me.with_file_name("synwake")
            }
        }
    };
    std::fs::canonicalize(&synwake).with_context(|| {
        format!(
            "synwake binary {} not found (use --synwake-bin)",
            synwake.display()
        )
    })
}

/// The test function: `given`, else `synwake-fn` next to the synwake binary.
pub fn resolve_function(
    synwake: &std::path::Path,
    given: Option<&std::path::Path>,
) -> anyhow::Result<PathBuf> {
    let f = given
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| synwake.with_file_name("synwake-fn"));
    std::fs::canonicalize(&f).with_context(|| {
        format!(
            "test function {} not found (use --function-bin)",
            f.display()
        )
    })
}

/// The bench process (the client) moved into a fresh cgroup with the tagger attached,
/// tagging SYNs to the shared port with each function's id; moved back on drop.
struct TaggedClient {
    home: std::path::PathBuf,
    dest: synwake_ebpf::TagDestination,
    tagger: synwake_ebpf::Tagger,
    _cgroup: synwake_ebpf::cgroup::TagCgroup,
}

impl TaggedClient {
    fn enter(functions: &[FunctionSpec]) -> anyhow::Result<Self> {
        use synwake_ebpf::{cgroup, function_id, TagDestination, Tagger};
        let root = cgroup::cgroup2_root()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let home = root.join(rel.trim_start_matches('/'));
        let group = cgroup::TagCgroup::create_named(
            &root,
            &format!("{}bench-{}", cgroup::TAG_CGROUP_PREFIX, std::process::id()),
        )?;
        let mut tagger = Tagger::load()?;
        let dest = TagDestination::from(SocketAddr::V4(SocketAddrV4::new(
            netns::SERVER_ADDR,
            crate::daemon::GATEWAY_PORT,
        )));
        anyhow::ensure!(!functions.is_empty(), "tagged mode needs a function");
        tagger.tag(&dest, function_id(&functions[0].name))?;
        tagger.attach_cgroup(group.path())?;
        std::fs::write(
            group.path().join("cgroup.procs"),
            std::process::id().to_string(),
        )?;
        Ok(Self {
            home,
            dest,
            tagger,
            _cgroup: group,
        })
    }

    /// SYNs to the shared port name `function` from now on (one function per cell).
    fn target(&mut self, function: &str) -> anyhow::Result<()> {
        self.tagger
            .tag(&self.dest, synwake_ebpf::function_id(function))?;
        Ok(())
    }
}

impl Drop for TaggedClient {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

/// One daemon configuration and the modes measured under it.
struct Phase {
    name: &'static str,
    wake: WakeSetup,
    modes: Vec<Mode>,
}

fn plan_phases(modes: &[Mode]) -> Vec<Phase> {
    let has = |m| modes.contains(&m);
    let mut phases = Vec::new();
    if has(Mode::Request) {
        phases.push(Phase {
            name: "request",
            wake: WakeSetup {
                probe: false,
                wake_on_accept: false,
                affinity: false,
            },
            modes: vec![Mode::Request],
        });
    }
    if has(Mode::Accept) {
        phases.push(Phase {
            name: "accept",
            wake: WakeSetup {
                probe: false,
                wake_on_accept: true,
                affinity: false,
            },
            modes: vec![Mode::Accept],
        });
    }
    // syn isolates the probe: accept-wake is off, so a probe that did not fire shows up as
    // request-mode numbers rather than being masked by the accept fallback.
    if has(Mode::Syn) {
        phases.push(Phase {
            name: "syn",
            wake: WakeSetup {
                probe: true,
                wake_on_accept: false,
                affinity: false,
            },
            modes: vec![Mode::Syn],
        });
    }
    // sni: no probe and no accept wake, so only the ClientHello can wake early.
    if has(Mode::Sni) {
        phases.push(Phase {
            name: "sni",
            wake: WakeSetup {
                probe: false,
                wake_on_accept: false,
                affinity: false,
            },
            modes: vec![Mode::Sni],
        });
    }
    // tagged: the probe as in syn, but the client calls the shared port and only the
    // synwake option in its SYN names the function.
    if has(Mode::Tagged) {
        phases.push(Phase {
            name: "tagged",
            wake: WakeSetup {
                probe: true,
                wake_on_accept: false,
                affinity: false,
            },
            modes: vec![Mode::Tagged],
        });
    }
    // affinity: the probe watches the shared port; the client's SYN names no function,
    // its address does (it called only this function within the window).
    if has(Mode::Affinity) {
        phases.push(Phase {
            name: "affinity",
            wake: WakeSetup {
                probe: true,
                wake_on_accept: false,
                affinity: true,
            },
            modes: vec![Mode::Affinity],
        });
    }
    // warm is the reference for syn, so it runs with the same daemon (probe attached).
    if has(Mode::Warm) {
        match phases.iter_mut().find(|p| p.name == "syn") {
            Some(p) => p.modes.push(Mode::Warm),
            None => phases.push(Phase {
                name: "warm",
                wake: WakeSetup {
                    probe: false,
                    wake_on_accept: true,
                    affinity: false,
                },
                modes: vec![Mode::Warm],
            }),
        }
    }
    phases
}

/// A stretch of one phase's runs, with a daemon of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leg {
    /// Index into the planned phases.
    phase: usize,
    /// Runs of every cell measured in this leg.
    runs: usize,
    /// Which half of the phase this is (1 or 2), of `halves`.
    half: usize,
    halves: usize,
}

/// The phases as a palindrome: P1 P2 .. Pk .. P2 P1, the middle one whole and every other
/// split into two halves of the runs. Each phase's runs are then centred on the same
/// moment of the sweep, so a load that rises or falls steadily while it runs weighs on
/// every mode alike (run one after the other, the first phase always had the quieter or
/// the busier machine).
fn plan_legs(phases: usize, runs: usize) -> Vec<Leg> {
    let Some(last) = phases.checked_sub(1) else {
        return Vec::new();
    };
    let first_half = runs / 2;
    let split = |phase, half, runs| Leg {
        phase,
        runs,
        half,
        halves: 2,
    };
    let mut legs: Vec<Leg> = (0..last)
        .filter(|_| first_half > 0)
        .map(|p| split(p, 1, first_half))
        .collect();
    legs.push(Leg {
        phase: last,
        runs,
        half: 1,
        halves: 1,
    });
    legs.extend((0..last).rev().map(|p| {
        if first_half > 0 {
            split(p, 2, runs - first_half)
        } else {
            // One run per cell cannot be split: these phases run once, after the last.
            Leg {
                phase: p,
                runs,
                half: 1,
                halves: 1,
            }
        }
    }));
    legs
}

/// A cell's samples and observations over all its legs.
#[derive(Default)]
struct CellAcc {
    samples: Vec<Duration>,
    cold_header_true: usize,
    runs: usize,
    errors: Vec<String>,
}

/// Starts each function once through the API (unmeasured) and waits until it is ready, so
/// every daemon has learned each function's start time (where the readiness probe steps
/// finely) before its first measured cold start, whichever leg it serves.
fn start_once(api: &Api, functions: &[FunctionSpec]) -> anyhow::Result<()> {
    for f in functions {
        api.scale(&f.name, 1)?;
        let t = Instant::now();
        while api.available_replicas(&f.name)? < 1 {
            interrupt::check()?;
            if t.elapsed() > COLD_TIMEOUT {
                bail!(
                    "{}: not ready {} s after the unmeasured first start",
                    f.name,
                    COLD_TIMEOUT.as_secs()
                );
            }
            interrupt::sleep(Duration::from_millis(3));
        }
    }
    Ok(())
}

/// Per-cell observation beside the latencies.
struct CellNotes {
    cold_header_true: usize,
    runs: usize,
    /// Requests that failed (and were retried).
    errors: Vec<String>,
}

/// 1-minute load average, to report how busy the machine was around the sweep.
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Nice value of the harness, the daemon and its instances (inherited by every thread and
/// child created afterwards): unrelated load on a shared 2-core machine should not be
/// what is measured.
pub(crate) const BENCH_NICE: libc::c_int = -10;

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    interrupt::install();
    let load_before = load_average();
    // SAFETY: setpriority on the calling thread; failure only means no boost.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BENCH_NICE) } != 0 {
        eprintln!("note: could not raise priority (nice {BENCH_NICE}); running at normal priority");
    }
    if args.runs == 0 || args.rtt.is_empty() || args.init.is_empty() || args.modes.is_empty() {
        bail!("--runs, --rtt, --init and --modes must not be empty");
    }
    if args.runtime != RuntimeKind::Process && args.image.is_none() {
        bail!("--runtime {} needs --image PATH", args.runtime);
    }
    let protocol = args.protocol();
    if args.modes.contains(&Mode::Sni) && protocol == Protocol::Http {
        bail!("the sni mode needs --tls or --tls12");
    }
    if args.modes.contains(&Mode::Tagged) && protocol != Protocol::Http {
        bail!("the tagged mode measures plain HTTP on the shared port; run it without --tls");
    }
    let (synwake_bin, function_bin) = resolve_bins(&args)?;
    let removed = netns::remove_stale_netns();
    if !removed.is_empty() {
        eprintln!("removed stale namespaces: {}", removed.join(", "));
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)?;
    let pki = match protocol {
        Protocol::Http => None,
        _ => Some(TestPki::create(&out).context("make the test CA and certificate")?),
    };
    let tls_client = pki.as_ref().map(|p| p.client(protocol)).transpose()?;

    let mut modes = args.modes.clone();
    modes.sort();
    modes.dedup();
    let phases = plan_phases(&modes);
    let functions: Vec<FunctionSpec> = args
        .init
        .iter()
        .enumerate()
        .map(|(i, &init_ms)| FunctionSpec {
            name: format!("init-{init_ms}"),
            port: FUNCTION_PORT_BASE + i as u16,
            init_ms,
            settings: toml::Table::new(),
        })
        .collect();

    let topo = Topology::create().context("create namespaces")?;
    let line = DelayLine::start(
        &topo.router,
        &[netns::QUEUE_TO_SERVER, netns::QUEUE_TO_CLIENT],
        Duration::ZERO,
    )
    .context("start delay line")?;
    eprintln!(
        "topology {} (client {}, router {}, server {})",
        topo.prefix, topo.client, topo.router, topo.server
    );

    let total = (modes.len() * args.rtt.len() * args.init.len() * args.runs) as u64;
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} runs  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let mut checks: Vec<(String, EmulationCheck)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // Samples per (mode, RTT, init), gathered over the legs; in first-measured order.
    let mut cells: Vec<((Mode, u64, u64), CellAcc)> = Vec::new();
    let legs = plan_legs(phases.len(), args.runs);
    for (leg_no, leg) in legs.iter().enumerate() {
        interrupt::check()?;
        let phase = &phases[leg.phase];
        let leg_tag = if leg.halves > 1 {
            format!("{} phase, half {}/2", phase.name, leg.half)
        } else {
            format!("{} phase", phase.name)
        };
        let setup = DaemonSetup {
            wake: phase.wake,
            runtime: args.runtime,
            function_bin: function_bin.clone().unwrap_or_default(),
            image: args.image.clone(),
            state_dir: out.join(format!("state-{}", phase.name)),
            probe_iface: netns::ENDPOINT_IFACE.to_string(),
            functions: functions.clone(),
            marker_prefix: topo.prefix.clone(),
            tls: pki.as_ref().map(|p| (p.cert.clone(), p.key.clone())),
        };
        pb.set_message(format!("starting synwake ({leg_tag})"));
        // The second half of a phase gets its own log; restarts within a leg too.
        let log_name = |attempt: usize| match (leg.half, attempt) {
            (1, 0) => format!("daemon-{}.log", phase.name),
            (1, n) => format!("daemon-{}.{n}.log", phase.name),
            (h, 0) => format!("daemon-{}-half{h}.log", phase.name),
            (h, n) => format!("daemon-{}-half{h}.{n}.log", phase.name),
        };
        let start_daemon = |attempt: usize| -> anyhow::Result<Daemon> {
            let daemon = Daemon::start(
                &synwake_bin,
                &setup,
                &out.join(format!("daemon-{}.toml", phase.name)),
                &out.join(log_name(attempt)),
                &topo.server,
            )
            .with_context(|| format!("start synwake for the {leg_tag}"))?;
            let api = Api::new(&topo.server, &setup.state_dir);
            if phase.wake.probe {
                pb.set_message("waiting for the probe to see SYNs");
                wait_probe_delivers(&topo, &api, &functions[0]).context(
                    "syn mode needs the probe (run without `syn` in --modes to skip it)",
                )?;
            }
            pb.set_message("one unmeasured start per function");
            start_once(&api, &functions)?;
            Ok(daemon)
        };
        let mut restarts = 0;
        let mut daemon = start_daemon(0)?;
        // This process is the client: in the tagged phase it runs in a tagged cgroup.
        let mut tagged = if phase.modes.contains(&Mode::Tagged) {
            Some(TaggedClient::enter(&functions).context("tagged mode: the sockops tagger")?)
        } else {
            None
        };
        let api = Api::new(&topo.server, &setup.state_dir);
        for &rtt in &args.rtt {
            interrupt::check()?;
            line.set_one_way(Duration::from_micros(rtt * 500));
            let check = check_emulation(&topo, rtt, args.check_connects)
                .with_context(|| format!("emulation check at RTT {rtt} ms"))?;
            match judge_emulation(&check, args.allow_emulation_drift) {
                EmulationVerdict::Ok => {}
                EmulationVerdict::Refuse(why) => bail!("{why}; refusing to report"),
                EmulationVerdict::Unverified(why) => {
                    say(&pb, format!("WARNING: {why}; results are not publishable"));
                    notes.push(format!("NOT PUBLISHABLE: {why}"));
                }
            }
            say(
                &pb,
                format!(
                    "[{leg_tag}, leg {}/{}] RTT {rtt} ms: emulation ok, connect p50 {:.2} ms max {:.2} ms",
                    leg_no + 1,
                    legs.len(),
                    check.p50_ms,
                    check.max_ms
                ),
            );
            checks.push((phase.name.to_string(), check));
            for f in &functions {
                if let Some(tagged) = tagged.as_mut() {
                    tagged.target(&f.name)?;
                }
                for &mode in &phase.modes {
                    pb.set_message(format!("{mode} rtt={rtt}ms init={}ms", f.init_ms));
                    let (samples, cell) = loop {
                        let measured = measure_cell(
                            mode,
                            tls_client.clone(),
                            f,
                            &topo,
                            &api,
                            &mut daemon,
                            &format!("{}/{}", topo.prefix, f.name),
                            &line,
                            leg.runs,
                            &pb,
                        );
                        match measured {
                            Ok(v) => break v,
                            // Something outside the harness stopped the daemon (seen on a
                            // shared machine): restart it, re-measure the leg's share of
                            // the cell, report it.
                            Err(e) if e.is::<DaemonExited>() && restarts < MAX_DAEMON_RESTARTS => {
                                restarts += 1;
                                let last = daemon.log_tail(1);
                                notes.push(format!(
                                    "{mode} RTT {rtt} init {}: synwake exited mid-cell (last log line: {last}); restarted it and re-measured the cell",
                                    f.init_ms
                                ));
                                say(&pb, format!("  synwake exited ({last}); restarting"));
                                daemon.stop();
                                daemon = start_daemon(restarts)?;
                            }
                            Err(e) => {
                                return Err(e.context(format!(
                                    "{mode} at RTT {rtt} ms, init {} ms",
                                    f.init_ms
                                )))
                            }
                        }
                    };
                    let s = Summary::from_durations(&samples).context("no samples")?;
                    say(&pb, format!(
                        "  {mode:>7} rtt={rtt:>3} init={:>3}: p50 {:8.2} ms  p90 {:8.2} ms  (cold header {}/{}{})",
                        f.init_ms, s.p50, s.p90, cell.cold_header_true, cell.runs,
                        if leg.halves > 1 { format!(", half {}", leg.half) } else { String::new() }
                    ));
                    let key = (mode, rtt, f.init_ms);
                    let acc = match cells.iter().position(|(k, _)| *k == key) {
                        Some(i) => &mut cells[i].1,
                        None => {
                            cells.push((key, CellAcc::default()));
                            &mut cells.last_mut().expect("just pushed").1
                        }
                    };
                    acc.samples.extend(samples);
                    acc.cold_header_true += cell.cold_header_true;
                    acc.runs += cell.runs;
                    acc.errors.extend(cell.errors);
                }
            }
        }
        daemon.stop();
    }
    let mut records: Vec<Record> = Vec::new();
    let mut hidden_counts: Vec<String> = Vec::new();
    for ((mode, rtt, init_ms), cell) in &cells {
        let (mode, rtt, init_ms) = (*mode, *rtt, *init_ms);
        let s = Summary::from_durations(&cell.samples).context("no samples")?;
        // request/accept must always wait for a start and warm never; with
        // syn a `false` means the start was fully hidden behind the network.
        let expected = match mode {
            Mode::Request | Mode::Accept => Some(cell.runs),
            Mode::Warm => Some(0),
            Mode::Syn | Mode::Sni | Mode::Tagged | Mode::Affinity => None,
        };
        if let Some(want) = expected.filter(|&w| w != cell.cold_header_true) {
            notes.push(format!(
                "{mode} RTT {rtt} init {init_ms}: X-Synwake-Cold-Start true on {}/{} responses (expected {want})",
                cell.cold_header_true, cell.runs
            ));
        }
        for e in &cell.errors {
            notes.push(format!(
                "{mode} RTT {rtt} init {init_ms}: a request failed and was retried: {e}"
            ));
        }
        if matches!(mode, Mode::Syn | Mode::Sni | Mode::Affinity) {
            hidden_counts.push(format!(
                "{mode} init {init_ms} RTT {rtt}: {}/{}",
                cell.runs - cell.cold_header_true,
                cell.runs
            ));
        }
        let mut record = Record::new(mode, args.runtime, rtt, init_ms, s);
        record.protocol = protocol;
        records.push(record);
    }
    pb.finish_and_clear();
    let elapsed = started.elapsed();

    let retrans_client = netns::tcp_retransmissions(&topo.client).unwrap_or(0);
    let retrans_server = netns::tcp_retransmissions(&topo.server).unwrap_or(0);
    let drops = netns::queue_drops(&topo.router).unwrap_or_default();
    let dropped: u64 = drops.iter().map(|(_, d)| d).sum();
    let stats = line.stats();
    let packets = stats.packets.load(std::sync::atomic::Ordering::Relaxed);
    let late_mean_us = stats.late_ns_sum.load(std::sync::atomic::Ordering::Relaxed) as f64
        / packets.max(1) as f64
        / 1e3;
    let late_max_us = stats.late_ns_max.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e3;
    let late_over_1ms = stats
        .late_over_1ms
        .load(std::sync::atomic::Ordering::Relaxed);
    line.stop().context("delay line")?;
    drop(topo);

    // Outputs.
    let json = serde_json::to_string_pretty(&records)?;
    std::fs::write(out.join("results.json"), &json)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("write {}", path.display()))?;
    }
    let mut inits: Vec<u64> = args.init.clone();
    inits.sort();
    inits.dedup();
    let mut svgs = Vec::new();
    for &init in &inits {
        let name = format!("cold-{}-init-{init}ms.svg", args.runtime);
        std::fs::write(
            out.join(&name),
            report::svg_plot(&records, init, args.runtime),
        )?;
        svgs.push(name);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "runtime `{}`, protocol `{protocol}`{}, {} runs per cell, latency = client connect() to last response byte, ms\n",
        args.runtime,
        if protocol == Protocol::Http { "" } else { " (full handshake per request, client verifies the harness's test CA)" },
        args.runs
    );
    md.push_str(&report::markdown_table(&records));
    md.push('\n');
    md.push_str(&targets_section(&records, &modes));
    let _ = writeln!(md, "\nSweep wall time: {:.1} s.", elapsed.as_secs_f64());
    let fmt_load = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
    let _ = writeln!(
        md,
        "Machine load (1-min average): {} before, {} after ({} CPUs); harness, daemon and instances at nice {BENCH_NICE}.",
        fmt_load(load_before),
        fmt_load(load_average()),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        md,
        "Delay line: {packets} packets, release lateness mean {late_mean_us:.0} us, max {late_max_us:.0} us, {late_over_1ms} packets over 1 ms late; kernel queue drops: {dropped}."
    );
    let _ = writeln!(
        md,
        "TCP retransmissions: client namespace {retrans_client}, server namespace {retrans_server} (each adds >= 200 ms to the run it hits)."
    );
    md.push_str("\nEmulation checks (TCP connect time client -> server):\n\n");
    for (phase, c) in &checks {
        let _ = writeln!(
            md,
            "- {phase} phase, RTT {} ms: p50 {:.2} ms, max {:.2} ms{}",
            c.rtt_ms,
            c.p50_ms,
            c.max_ms,
            if c.passed() {
                String::new()
            } else {
                format!(" (outside the ±{:.2} ms tolerance)", c.tolerance_ms)
            }
        );
    }
    if !hidden_counts.is_empty() {
        let _ = writeln!(
            md,
            "\nsyn/sni: requests that found the instance ready (X-Synwake-Cold-Start: false): {}",
            hidden_counts.join(", ")
        );
    }
    if !notes.is_empty() {
        md.push_str("\nAnomalies:\n\n");
        for n in &notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    std::fs::write(out.join("results.md"), &md)?;
    println!("{md}");
    println!(
        "wrote {} (results.md, results.json and {})",
        out.display(),
        svgs.join(", ")
    );
    if dropped > 0 {
        eprintln!("warning: the kernel dropped {dropped} queued packets; numbers may be off");
    }
    Ok(())
}

/// The daemon answers /healthz before the probe is attached. Sends bare SYNs (connect,
/// then close) to a function's port until the probe's event counter moves, so `syn` runs
/// never measure a daemon whose probe is not yet listening.
fn wait_probe_delivers(topo: &Topology, api: &Api, f: &FunctionSpec) -> anyhow::Result<()> {
    const METRIC: &str = "synwake_probe_events_total";
    let target = SocketAddr::V4(SocketAddrV4::new(netns::SERVER_ADDR, f.port));
    let start = Instant::now();
    let before = api.metric(METRIC)?.unwrap_or(0.0);
    while start.elapsed() < Duration::from_secs(15) {
        interrupt::check()?;
        // Short timeout: attaching native XDP to the veth can drop a SYN, and waiting for
        // its 1 s retransmission would only delay the sweep.
        let _ = netns::in_netns(&topo.client, move || {
            std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300))
        })?;
        interrupt::sleep(Duration::from_millis(100));
        if api.metric(METRIC)?.unwrap_or(0.0) > before {
            return Ok(());
        }
    }
    bail!("the probe delivered no SYN event within 15 s (metric {METRIC}); see the daemon log")
}

/// Prints above the progress bar, or to stderr when the bar is hidden (not a terminal).
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

#[allow(clippy::too_many_arguments)]
fn measure_cell(
    mode: Mode,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    f: &FunctionSpec,
    topo: &Topology,
    api: &Api,
    daemon: &mut Daemon,
    marker: &str,
    line: &DelayLine,
    runs: usize,
    pb: &ProgressBar,
) -> anyhow::Result<(Vec<Duration>, CellNotes)> {
    // sni goes to the shared HTTPS port, tagged to the shared plain port (only the SYN's
    // option names f there), every other mode to the function's own port.
    let (port, path) = match mode {
        Mode::Sni => (crate::daemon::TLS_GATEWAY_PORT, "/".to_string()),
        Mode::Tagged | Mode::Affinity => (
            crate::daemon::GATEWAY_PORT,
            format!("/function/{}/", f.name),
        ),
        _ => (f.port, "/".to_string()),
    };
    let target = SocketAddr::V4(SocketAddrV4::new(netns::SERVER_ADDR, port));
    let host = crate::tls::host_of(&f.name);
    let timed = |topo: &Topology| -> anyhow::Result<client::Response> {
        let (tls, host, path) = (tls.clone(), host.clone(), path.clone());
        let resp = netns::in_netns(&topo.client, move || match tls {
            Some(tls) => client::get_tls(target, &host, &path, tls, REQUEST_TIMEOUT),
            None => client::request(target, "GET", &path, None, REQUEST_TIMEOUT),
        })??;
        if resp.status != 200 {
            bail!(
                "function answered {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        }
        Ok(resp)
    };
    if mode == Mode::Warm {
        // Make sure an instance is up; this request is not measured.
        timed(topo).context("warm-up request")?;
    }
    if mode == Mode::Affinity {
        // The previous cell's function leaves the window; then this client calls only f.
        interrupt::sleep(crate::daemon::AFFINITY_WINDOW + Duration::from_millis(200));
        timed(topo).context("affinity warm-up request")?;
    }
    let mut samples = Vec::with_capacity(runs);
    let mut cold_true = 0;
    let mut errors = Vec::new();
    while samples.len() < runs {
        interrupt::check()?;
        if !daemon.is_running() {
            return Err(DaemonExited.into());
        }
        if !line.is_running() {
            bail!("the delay line stopped during the sweep");
        }
        if mode != Mode::Warm {
            api.scale_to_zero_and_wait(&f.name, marker, COLD_TIMEOUT)?;
        }
        let resp = match timed(topo) {
            Ok(resp) => resp,
            // A failed request is reported, not hidden: it is retried (so the cell still
            // has `runs` samples) and listed in the results; too many abort the sweep.
            Err(e) if errors.len() + 1 < MAX_ERRORS_PER_CELL => {
                say(
                    pb,
                    format!(
                        "  {mode} init={}: request failed, retrying: {e:#}",
                        f.init_ms
                    ),
                );
                errors.push(format!("{e:#}"));
                continue;
            }
            Err(e) => {
                return Err(e.context(format!("{MAX_ERRORS_PER_CELL} failed requests in one cell")))
            }
        };
        if resp.cold_start() == Some(true) {
            cold_true += 1;
        }
        samples.push(resp.elapsed);
        pb.inc(1);
    }
    Ok((
        samples,
        CellNotes {
            cold_header_true: cold_true,
            runs,
            errors,
        },
    ))
}

/// The targets, evaluated on the records.
fn targets_section(records: &[Record], modes: &[Mode]) -> String {
    let p50 = |m: Mode, rtt: u64, init: u64| {
        records
            .iter()
            .find(|r| r.mode == m && r.rtt_ms == rtt && r.init_ms == init)
            .map(|r| r.p50_ms)
    };
    let mut cells: Vec<(u64, u64)> = records.iter().map(|r| (r.init_ms, r.rtt_ms)).collect();
    cells.sort();
    cells.dedup();
    let mut s = String::from("Targets:\n\n");
    if modes.contains(&Mode::Syn) && modes.contains(&Mode::Warm) {
        let (mut met, mut total) = (0, 0);
        let mut misses = Vec::new();
        for &(init, rtt) in &cells {
            if rtt < init + 5 {
                continue;
            }
            let (Some(syn), Some(warm)) = (p50(Mode::Syn, rtt, init), p50(Mode::Warm, rtt, init))
            else {
                continue;
            };
            total += 1;
            let hidden = report::cell_hidden_fraction(records, rtt, init);
            let ok = syn <= 1.10 * warm && hidden.is_none_or(|h| h >= 0.9);
            if ok {
                met += 1;
            } else {
                misses.push(format!(
                    "init {init}/RTT {rtt}: syn {syn:.1} vs warm {warm:.1}, hidden {}",
                    hidden.map_or("n/a".into(), |h| format!("{h:.2}"))
                ));
            }
        }
        let _ = writeln!(
            s,
            "- RTT >= init + 5 ms: syn p50 <= 1.10 x warm p50 and hidden fraction >= 0.9 in {met}/{total} cells{}",
            if misses.is_empty() { String::new() } else { format!(" (missed: {})", misses.join("; ")) }
        );
    }
    if modes.contains(&Mode::Request) && modes.contains(&Mode::Warm) {
        let (mut met, mut total) = (0, 0);
        for &(init, rtt) in &cells {
            let (Some(req), Some(warm)) =
                (p50(Mode::Request, rtt, init), p50(Mode::Warm, rtt, init))
            else {
                continue;
            };
            total += 1;
            if req >= warm + init as f64 {
                met += 1;
            }
        }
        let _ = writeln!(s, "- request p50 >= warm p50 + init in {met}/{total} cells");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drifting_emulation_is_refused_unless_drift_is_allowed() {
        let check = |p50_ms| EmulationCheck {
            rtt_ms: 0,
            connect_ms: vec![p50_ms],
            p50_ms,
            max_ms: p50_ms,
            tolerance_ms: tolerance_ms(0),
        };
        // The loaded-machine case from issue 12: RTT 0, connect p50 0.898 ms.
        let loaded = check(0.898);
        assert!(matches!(
            judge_emulation(&loaded, false),
            EmulationVerdict::Refuse(why) if why.contains("0.898")
        ));
        assert!(matches!(
            judge_emulation(&loaded, true),
            EmulationVerdict::Unverified(why) if why.contains("RTT 0 ms")
        ));
        assert_eq!(judge_emulation(&check(0.2), false), EmulationVerdict::Ok);
        assert_eq!(judge_emulation(&check(0.2), true), EmulationVerdict::Ok);
    }

    #[test]
    fn tolerance_is_ten_percent_or_half_a_millisecond() {
        assert_eq!(tolerance_ms(0), 0.5);
        assert_eq!(tolerance_ms(20), 2.0);
    }

    #[test]
    fn phases_run_as_a_palindrome_of_halves() {
        let order = |phases, runs| -> Vec<(usize, usize, usize)> {
            plan_legs(phases, runs)
                .iter()
                .map(|l| (l.phase, l.runs, l.half))
                .collect()
        };
        // request, accept, syn: the middle phase whole, the others split around it.
        assert_eq!(
            order(3, 20),
            [(0, 10, 1), (1, 10, 1), (2, 20, 1), (1, 10, 2), (0, 10, 2)]
        );
        // Each phase gets all its runs; with even runs its legs are centred on the middle.
        for (phases, runs) in [(2, 20), (3, 8), (4, 6), (1, 3), (3, 7)] {
            let legs = plan_legs(phases, runs);
            let mut pos = 0.0;
            let mut centre = vec![0.0; phases];
            let mut total = vec![0; phases];
            for l in &legs {
                centre[l.phase] += (pos + l.runs as f64 / 2.0) * l.runs as f64;
                total[l.phase] += l.runs;
                pos += l.runs as f64;
            }
            assert!(
                total.iter().all(|&t| t == runs),
                "{phases} x {runs}: {legs:?}"
            );
            let mid = pos / 2.0;
            if runs % 2 == 0 {
                for (p, c) in centre.iter().enumerate() {
                    let c = c / runs as f64;
                    assert!(
                        (c - mid).abs() < 1e-9,
                        "{phases} x {runs}: phase {p} at {c}, mid {mid}"
                    );
                }
            }
        }
        // A single run cannot be split: every phase once, the last first.
        assert_eq!(order(2, 1), [(1, 1, 1), (0, 1, 1)]);
        assert!(plan_legs(0, 20).is_empty());
    }

    #[test]
    fn phases_pair_warm_with_the_probe_daemon() {
        let p = plan_phases(&[Mode::Request, Mode::Accept, Mode::Syn, Mode::Warm]);
        let names: Vec<&str> = p.iter().map(|p| p.name).collect();
        assert_eq!(names, ["request", "accept", "syn"]);
        assert_eq!(p[2].modes, [Mode::Syn, Mode::Warm]);
        assert!(p[2].wake.probe && !p[2].wake.wake_on_accept);
        assert!(!p[0].wake.probe && !p[0].wake.wake_on_accept);
        assert!(p[1].wake.wake_on_accept);
        let w = plan_phases(&[Mode::Warm]);
        assert_eq!(w.len(), 1);
        assert!(!w[0].wake.probe);
        // tagged: its own daemon, probe on, no accept fallback (like syn).
        let t = plan_phases(&[Mode::Syn, Mode::Tagged]);
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[1].name, t[1].modes.as_slice()),
            ("tagged", &[Mode::Tagged][..])
        );
        assert!(t[1].wake.probe && !t[1].wake.wake_on_accept);
        // affinity: its own daemon, probe on with the affinity window, no accept fallback.
        let a = plan_phases(&[Mode::Affinity, Mode::Warm]);
        assert_eq!(a[0].name, "affinity");
        assert!(a[0].wake.probe && a[0].wake.affinity && !a[0].wake.wake_on_accept);
        assert!(!t[1].wake.affinity && !p[2].wake.affinity);
    }
}
