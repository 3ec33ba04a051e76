//! Real-time replay of an invocation trace against the real daemon, in the bench's
//! namespaces (`synwake bench trace --replay`): each call is sent from the client namespace
//! at its time, and what the daemon did (cold starts, idle instance-seconds, pre-warms) is
//! read back from its metrics. The caller decides what the functions are (their idle
//! policies) and compares the outcome with the simulator.
//!
//! Cleans up like `synwake bench`: namespaces, the delay line, the daemon and every
//! instance are gone when [`replay`] returns, also on an error or SIGINT/SIGTERM.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::client;
use crate::daemon::{self, Api, Daemon, DaemonSetup, FunctionSpec, WakeSetup, GATEWAY_PORT};
use crate::delay::DelayLine;
use crate::interrupt;
use crate::netns::{self, Topology};
use crate::stats::percentile;
use crate::RuntimeKind;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayPlan {
    /// The daemon's functions (name, init time, idle policy keys in `settings`).
    pub functions: Vec<FunctionSpec>,
    /// (seconds from the replay's start, index into `functions`), sorted by time.
    pub calls: Vec<(f64, usize)>,
    /// Wall time the replay covers; instances still up then are stopped and counted.
    pub duration: Duration,
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub synwake_bin: Option<PathBuf>,
    pub function_bin: Option<PathBuf>,
    /// Daemon config, log and state dir go here.
    pub out: PathBuf,
    /// Client threads sending calls (a call to a cold function holds one for its start).
    pub workers: usize,
}

/// One function's outcome, from the client and from the daemon's metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FunctionOutcome {
    pub name: String,
    pub calls: u64,
    /// Calls that got a 200.
    pub ok: u64,
    pub errors: u64,
    /// Calls whose response said `X-Synwake-Cold-Start: true`.
    pub cold_by_client: u64,
    /// `synwake_cold_start_wait_seconds_count`: requests that waited for a start.
    pub cold_starts: u64,
    /// `synwake_idle_instance_seconds_total`.
    pub idle_instance_seconds: f64,
    pub predicted_prewarms: u64,
    pub prewarm_hits: u64,
    pub prewarms_wasted: u64,
    /// Client-side latency of each call, ms, in call order.
    #[serde(skip)]
    pub latency_ms: Vec<f64>,
    /// Whether each call was cold (by the response header), in call order.
    #[serde(skip)]
    pub cold: Vec<bool>,
}

/// The whole replay's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    pub functions: Vec<FunctionOutcome>,
    /// How late calls went out against their schedule, ms.
    pub lateness_p50_ms: f64,
    pub lateness_p99_ms: f64,
    pub lateness_max_ms: f64,
    pub wall_seconds: f64,
    /// 1-minute load average before and after (the machine is shared).
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

struct CallResult {
    function: usize,
    seq: usize,
    late_ms: f64,
    latency_ms: f64,
    status: Option<u16>,
    cold: bool,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Replays `plan`; blocking. See the module docs for what it cleans up.
pub fn replay(
    plan: &ReplayPlan,
    opts: &ReplayOptions,
    progress: &dyn Fn(&str),
) -> anyhow::Result<ReplayOutcome> {
    interrupt::install();
    if plan.functions.is_empty() {
        bail!("the replay has no functions");
    }
    if plan.calls.windows(2).any(|w| w[1].0 < w[0].0)
        || plan.calls.iter().any(|c| c.1 >= plan.functions.len())
    {
        bail!("replay calls must be sorted by time and name known functions");
    }
    let load_before = crate::sweep::load_average();
    // SAFETY: setpriority on the calling thread; failure only means no boost.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, crate::sweep::BENCH_NICE) } != 0 {
        progress("note: could not raise priority; running at normal priority");
    }
    let synwake_bin = crate::resolve_synwake(opts.synwake_bin.as_deref())?;
    let function_bin = crate::resolve_function(&synwake_bin, opts.function_bin.as_deref())?;
    let removed = netns::remove_stale_netns();
    if !removed.is_empty() {
        progress(&format!("removed stale namespaces: {}", removed.join(", ")));
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let out = std::fs::canonicalize(&opts.out)?;
    // Drop order on every exit path: daemon (and its instances), delay line, namespaces.
    let topo = Topology::create().context("create namespaces")?;
    let _line = DelayLine::start(
        &topo.router,
        &[netns::QUEUE_TO_SERVER, netns::QUEUE_TO_CLIENT],
        Duration::ZERO,
    )
    .context("start delay line")?;
    let state_dir = out.join("state-replay");
    // A state dir of an earlier replay would bring its idle histories along.
    let _ = std::fs::remove_dir_all(&state_dir);
    let setup = DaemonSetup {
        wake: WakeSetup {
            probe: false,
            wake_on_accept: false,
            affinity: false,
        },
        runtime: RuntimeKind::Process,
        function_bin,
        image: None,
        state_dir: state_dir.clone(),
        probe_iface: netns::ENDPOINT_IFACE.to_string(),
        functions: plan.functions.clone(),
        marker_prefix: topo.prefix.clone(),
        tls: None,
    };
    let mut daemon = Daemon::start(
        &synwake_bin,
        &setup,
        &out.join("daemon-replay.toml"),
        &out.join("daemon-replay.log"),
        &topo.server,
    )
    .context("start synwake for the replay")?;
    let api = Api::new(&topo.server, &state_dir);
    progress(&format!(
        "replaying {} calls to {} functions over {:?} (topology {})",
        plan.calls.len(),
        plan.functions.len(),
        plan.duration,
        topo.prefix
    ));

    let results = Arc::new(Mutex::new(Vec::with_capacity(plan.calls.len())));
    let (tx, rx) = mpsc::channel::<(Instant, usize, usize)>();
    let rx = Arc::new(Mutex::new(rx));
    let names: Arc<Vec<String>> = Arc::new(plan.functions.iter().map(|f| f.name.clone()).collect());
    let target = SocketAddr::V4(SocketAddrV4::new(netns::SERVER_ADDR, GATEWAY_PORT));
    let mut workers = Vec::new();
    for w in 0..opts.workers.max(1) {
        let (rx, results, names, ns) = (
            rx.clone(),
            results.clone(),
            names.clone(),
            topo.client.clone(),
        );
        workers.push(
            std::thread::Builder::new()
                .name(format!("replay-{w}"))
                .spawn(move || -> anyhow::Result<()> {
                    netns::enter_netns(&ns)?;
                    loop {
                        let job = rx.lock().unwrap().recv();
                        let Ok((due, function, seq)) = job else {
                            return Ok(());
                        };
                        let sent = Instant::now();
                        let path = format!("/function/{}/", names[function]);
                        let r = client::request(target, "GET", &path, None, REQUEST_TIMEOUT);
                        let latency_ms = sent.elapsed().as_secs_f64() * 1e3;
                        let (status, cold) = match &r {
                            Ok(resp) => (Some(resp.status), resp.cold_start() == Some(true)),
                            Err(_) => (None, false),
                        };
                        results.lock().unwrap().push(CallResult {
                            function,
                            seq,
                            late_ms: sent.saturating_duration_since(due).as_secs_f64() * 1e3,
                            latency_ms,
                            status,
                            cold,
                        });
                    }
                })
                .context("spawn a replay client thread")?,
        );
    }
    let start = Instant::now();
    let mut interrupted = false;
    for (seq, &(t, function)) in plan.calls.iter().enumerate() {
        let due = start + Duration::from_secs_f64(t.max(0.0));
        interrupt::sleep(due.saturating_duration_since(Instant::now()));
        if interrupt::interrupted() || !daemon.is_running() {
            interrupted = true;
            break;
        }
        if seq % 100 == 0 {
            progress(&format!(
                "{seq}/{} calls sent, {:.0} s of {:.0} s",
                plan.calls.len(),
                start.elapsed().as_secs_f64(),
                plan.duration.as_secs_f64()
            ));
        }
        let _ = tx.send((due, function, seq));
    }
    drop(tx);
    for w in workers {
        match w.join() {
            Ok(r) => r?,
            Err(_) => bail!("a replay client thread panicked"),
        }
    }
    interrupt::check()?;
    if !daemon.is_running() {
        bail!(
            "synwake exited during the replay; last log lines:\n{}",
            daemon.log_tail(20)
        );
    }
    if interrupted {
        bail!("the replay was interrupted");
    }
    interrupt::sleep((start + plan.duration).saturating_duration_since(Instant::now()));
    interrupt::check()?;
    // Stop what is still up, all at once, so its idle time is counted up to the end.
    let stops: Vec<_> = plan
        .functions
        .iter()
        .map(|f| {
            let (api, name) = (api.clone(), f.name.clone());
            std::thread::spawn(move || api.scale(&name, 0))
        })
        .collect();
    for s in stops {
        s.join()
            .map_err(|_| anyhow::anyhow!("scale thread panicked"))?
            .context("scale to zero at the end of the replay")?;
    }
    let wall_seconds = start.elapsed().as_secs_f64();
    for f in &plan.functions {
        let marker = format!("{}/{}", topo.prefix, f.name);
        api.scale_to_zero_and_wait(&f.name, &marker, Duration::from_secs(20))?;
    }
    let text = api.metrics_text()?;
    let mut outcome: Vec<FunctionOutcome> = plan
        .functions
        .iter()
        .map(|f| {
            let m = |name: &str| daemon::function_metric(&text, name, &f.name);
            FunctionOutcome {
                name: f.name.clone(),
                cold_starts: m("synwake_cold_start_wait_seconds_count") as u64,
                idle_instance_seconds: m("synwake_idle_instance_seconds_total"),
                predicted_prewarms: m("synwake_predicted_prewarms_total") as u64,
                prewarm_hits: m("synwake_predicted_prewarm_hits_total") as u64,
                prewarms_wasted: m("synwake_predicted_prewarms_wasted_total") as u64,
                ..FunctionOutcome::default()
            }
        })
        .collect();
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by_key(|r| r.seq);
    let mut late: Vec<f64> = Vec::with_capacity(results.len());
    for r in &results {
        let f = &mut outcome[r.function];
        f.calls += 1;
        if r.status == Some(200) {
            f.ok += 1;
        } else {
            f.errors += 1;
        }
        f.cold_by_client += r.cold as u64;
        f.latency_ms.push(r.latency_ms);
        f.cold.push(r.cold);
        late.push(r.late_ms);
    }
    late.sort_by(f64::total_cmp);
    daemon.stop();
    Ok(ReplayOutcome {
        functions: outcome,
        lateness_p50_ms: percentile(&late, 50.0).unwrap_or(0.0),
        lateness_p99_ms: percentile(&late, 99.0).unwrap_or(0.0),
        lateness_max_ms: late.last().copied().unwrap_or(0.0),
        wall_seconds,
        load_before,
        load_after: crate::sweep::load_average(),
    })
}
