//! `synwake bench trace --replay`: the trace, compressed in time to `--replay-duration`,
//! replayed against the real daemon (synwake-bench's namespaces and harness), compared with
//! the simulator on the same compressed trace.
//!
//! Compression divides every time by `speedup` (trace span / replay duration), and every
//! policy duration with it (idle_timeout, the adaptive knobs' durations), so the policies
//! make the same decisions in compressed time. Each policy gets its own copy of every
//! function (`p<i>-<name>`) in one daemon, so one replay measures all policies on the same
//! calls. Idle instance-seconds are reported in trace seconds (daemon seconds x speedup).

use std::time::Duration;

use serde::Serialize;
use synwake_bench::daemon::FunctionSpec as BenchFunction;
use synwake_bench::replay::{self, ReplayOptions, ReplayPlan};
use synwake_bench::trace::{Invocation, Trace};

use super::bench::TraceArgs;
use super::sim::{self, PolicySpec, SimParams};
use super::AdaptiveConfig;

/// Allowed difference between the daemon and the simulator, stated in the report.
pub const COLD_FRACTION_TOLERANCE: f64 = 0.03;
/// Relative, of the simulated idle instance-seconds.
pub const IDLE_SECONDS_TOLERANCE: f64 = 0.15;

/// One policy's replay next to its simulation (a JSON record of `--replay`).
#[derive(Debug, Clone, Serialize)]
pub struct ReplayRecord {
    pub policy: String,
    pub functions: usize,
    pub invocations: u64,
    /// From the daemon's metrics (`synwake_cold_start_wait_seconds_count`).
    pub cold_starts: u64,
    pub cold_start_fraction: f64,
    /// From the daemon's metrics, in trace seconds.
    pub idle_instance_seconds: f64,
    /// Client-side latency a cold call had over the function's median warm call.
    pub p50_added_ms: f64,
    pub p99_added_ms: f64,
    /// Cold calls as the responses' `X-Synwake-Cold-Start` header said.
    pub cold_by_client: u64,
    pub errors: u64,
    pub predicted_prewarms: u64,
    pub prewarm_hits: u64,
    pub prewarms_wasted: u64,
    /// The simulator on the same compressed trace.
    pub simulated: sim::Record,
    pub cold_fraction_difference: f64,
    /// (replay - simulated) / simulated.
    pub idle_seconds_relative_difference: f64,
    pub within_tolerance: bool,
    pub speedup: f64,
    pub replay_seconds: f64,
    pub lateness_p99_ms: f64,
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("--replay-duration {0:?} must be 1 s to 24 h")]
    Duration(Duration),
    #[error("--replay: no policy to replay ({skipped} need distinct client addresses: the bench has one client namespace)")]
    NoPolicy { skipped: String },
    #[error("--replay: the trace has no calls")]
    Empty,
}

/// `d / speedup`, at least 1 ms (the daemon's smallest duration).
fn scaled(d: Duration, speedup: f64) -> Duration {
    Duration::from_secs_f64(d.as_secs_f64() / speedup).max(Duration::from_millis(1))
}

fn scaled_adaptive(c: &AdaptiveConfig, speedup: f64) -> AdaptiveConfig {
    AdaptiveConfig {
        histogram_range: scaled(c.histogram_range, speedup),
        histogram_min: scaled(c.histogram_min, speedup),
        min_unload: scaled(c.min_unload, speedup),
        max_window: scaled(c.max_window, speedup),
        ..c.clone()
    }
}

/// The trace with every time divided by `speedup`.
pub fn compress(trace: &Trace, speedup: f64) -> Trace {
    Trace {
        functions: trace.functions.clone(),
        clients: trace.clients.clone(),
        invocations: trace
            .invocations
            .iter()
            .map(|i| Invocation {
                t: i.t / speedup,
                ..i.clone()
            })
            .collect(),
        duration: trace.duration / speedup,
    }
}

/// The `[[function]]` keys of a policy, in compressed time.
fn policy_settings(p: &PolicySpec, params: &SimParams) -> toml::Table {
    let mut t = toml::Table::new();
    let ms = |d: Duration| toml::Value::String(format!("{}us", d.as_micros().max(1000)));
    match p.fixed {
        Some(d) => {
            t.insert("idle_policy".into(), "fixed".into());
            t.insert("idle_timeout".into(), ms(d));
        }
        None => {
            t.insert("idle_policy".into(), "adaptive".into());
            t.insert("idle_timeout".into(), ms(params.idle_timeout));
            let table = toml::Value::try_from(&params.adaptive).expect("adaptive knobs serialize");
            t.insert("adaptive".into(), table);
        }
    }
    t
}

/// Runs the replay for `args`; prints progress on stderr.
pub fn run(args: &TraceArgs) -> anyhow::Result<Vec<ReplayRecord>> {
    let d = args.replay_duration;
    if !(Duration::from_secs(1)..=Duration::from_secs(86400)).contains(&d) {
        return Err(ReplayError::Duration(d).into());
    }
    let all = args.policy_specs()?;
    let (policies, skipped): (Vec<PolicySpec>, Vec<PolicySpec>) =
        all.into_iter().partition(|p| !p.affinity);
    let skipped: Vec<String> = skipped.iter().map(|p| p.name.clone()).collect();
    if policies.is_empty() {
        return Err(ReplayError::NoPolicy {
            skipped: skipped.join(", "),
        }
        .into());
    }
    if !skipped.is_empty() {
        eprintln!(
            "note: not replayed: {} (the bench's client namespace has one address, so affinity cannot be replayed)",
            skipped.join(", ")
        );
    }
    let trace = args.load_trace()?;
    if trace.invocations.is_empty() {
        return Err(ReplayError::Empty.into());
    }
    let speedup = (trace.duration / d.as_secs_f64()).max(1.0);
    let compressed = compress(&trace, speedup);
    let base = args.params()?;
    let params = SimParams {
        adaptive: scaled_adaptive(&base.adaptive, speedup),
        idle_timeout: scaled(base.idle_timeout, speedup),
        start_ms: Some(args.replay_init_ms as f64),
        ..base
    };
    let specs: Vec<PolicySpec> = policies
        .iter()
        .map(|p| PolicySpec {
            fixed: p.fixed.map(|f| scaled(f, speedup)),
            ..p.clone()
        })
        .collect();
    let nf = trace.functions.len();
    let functions: Vec<BenchFunction> = specs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let settings = policy_settings(p, &params);
            trace
                .functions
                .iter()
                .enumerate()
                .map(move |(j, name)| BenchFunction {
                    name: format!("p{i}-{name}"),
                    port: 20000 + (i * nf + j) as u16,
                    init_ms: args.replay_init_ms,
                    settings: settings.clone(),
                })
        })
        .collect();
    // Every call goes to each policy's copy of its function.
    let calls: Vec<(f64, usize)> = compressed
        .invocations
        .iter()
        .flat_map(|inv| (0..specs.len()).map(move |i| (inv.t, i * nf + inv.function)))
        .collect();
    let plan = ReplayPlan {
        functions,
        calls,
        duration: Duration::from_secs_f64(compressed.duration),
    };
    let opts = ReplayOptions {
        synwake_bin: args.synwake_bin.clone(),
        function_bin: args.function_bin.clone(),
        out: args.out.clone(),
        workers: 32,
    };
    eprintln!(
        "replay: {} calls of {} functions x {} policies, trace of {:.0} s compressed {speedup:.1}x into {:.0} s",
        trace.invocations.len(),
        nf,
        specs.len(),
        trace.duration,
        compressed.duration
    );
    let outcome = replay::replay(&plan, &opts, &|m| eprintln!("{m}"))?;
    let records = specs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mine = &outcome.functions[i * nf..(i + 1) * nf];
            let simulated = sim::simulate(&compressed, p, &params);
            let mut rec = record(&policies[i].name, mine, simulated, speedup);
            rec.replay_seconds = outcome.wall_seconds;
            rec.lateness_p99_ms = outcome.lateness_p99_ms;
            rec.load_before = outcome.load_before;
            rec.load_after = outcome.load_after;
            rec
        })
        .collect();
    Ok(records)
}

fn record(
    policy: &str,
    fns: &[replay::FunctionOutcome],
    mut simulated: sim::Record,
    speedup: f64,
) -> ReplayRecord {
    let invocations: u64 = fns.iter().map(|f| f.calls).sum();
    let cold_starts: u64 = fns.iter().map(|f| f.cold_starts).sum();
    let mut added: Vec<f64> = Vec::new();
    for f in fns {
        let mut warm: Vec<f64> = f
            .latency_ms
            .iter()
            .zip(&f.cold)
            .filter(|(_, c)| !**c)
            .map(|(l, _)| *l)
            .collect();
        warm.sort_by(f64::total_cmp);
        let warm_p50 = warm.get(warm.len() / 2).copied().unwrap_or(0.0);
        for (l, c) in f.latency_ms.iter().zip(&f.cold) {
            added.push(if *c { (l - warm_p50).max(0.0) } else { 0.0 });
        }
    }
    added.sort_by(f64::total_cmp);
    let pct = |p: f64| synwake_bench::stats::percentile(&added, p).unwrap_or(0.0);
    let cold_start_fraction = if invocations > 0 {
        cold_starts as f64 / invocations as f64
    } else {
        0.0
    };
    let idle = fns.iter().map(|f| f.idle_instance_seconds).sum::<f64>() * speedup;
    simulated.policy = policy.to_string();
    simulated.idle_instance_seconds *= speedup;
    let cold_diff = cold_start_fraction - simulated.cold_start_fraction;
    let idle_rel = if simulated.idle_instance_seconds > 0.0 {
        (idle - simulated.idle_instance_seconds) / simulated.idle_instance_seconds
    } else if idle > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    ReplayRecord {
        policy: policy.to_string(),
        functions: fns.len(),
        invocations,
        cold_starts,
        cold_start_fraction,
        idle_instance_seconds: idle,
        p50_added_ms: pct(50.0),
        p99_added_ms: pct(99.0),
        cold_by_client: fns.iter().map(|f| f.cold_by_client).sum(),
        errors: fns.iter().map(|f| f.errors).sum(),
        predicted_prewarms: fns.iter().map(|f| f.predicted_prewarms).sum(),
        prewarm_hits: fns.iter().map(|f| f.prewarm_hits).sum(),
        prewarms_wasted: fns.iter().map(|f| f.prewarms_wasted).sum(),
        within_tolerance: cold_diff.abs() <= COLD_FRACTION_TOLERANCE
            && idle_rel.abs() <= IDLE_SECONDS_TOLERANCE,
        cold_fraction_difference: cold_diff,
        idle_seconds_relative_difference: idle_rel,
        simulated,
        speedup,
        replay_seconds: 0.0,
        lateness_p99_ms: 0.0,
        load_before: None,
        load_after: None,
    }
}

/// The table printed by `--replay`.
pub fn table(records: &[ReplayRecord]) -> String {
    let mut s = format!(
        "| policy | invocations | cold (replay) | cold (sim) | cold fraction replay / sim | idle instance-s replay / sim | p50 / p99 added ms | errors | within tolerance (±{COLD_FRACTION_TOLERANCE} cold fraction, ±{:.0}% idle) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        IDLE_SECONDS_TOLERANCE * 100.0
    );
    for r in records {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} / {:.4} | {:.0} / {:.0} ({:+.1}%) | {:.1} / {:.1} | {} | {} |\n",
            r.policy,
            r.invocations,
            r.cold_starts,
            r.simulated.cold_starts,
            r.cold_start_fraction,
            r.simulated.cold_start_fraction,
            r.idle_instance_seconds,
            r.simulated.idle_instance_seconds,
            r.idle_seconds_relative_difference * 100.0,
            r.p50_added_ms,
            r.p99_added_ms,
            r.errors,
            if r.within_tolerance { "yes" } else { "NO" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_scales_times_and_policy_durations() {
        let trace = Trace {
            functions: vec!["a".into()],
            clients: vec![],
            invocations: vec![
                Invocation {
                    t: 0.0,
                    function: 0,
                    client: None,
                },
                Invocation {
                    t: 240.0,
                    function: 0,
                    client: None,
                },
            ],
            duration: 480.0,
        };
        let c = compress(&trace, 24.0);
        assert_eq!(c.invocations[1].t, 10.0);
        assert_eq!(c.duration, 20.0);
        let a = scaled_adaptive(&AdaptiveConfig::default(), 24.0);
        assert_eq!(a.min_unload, Duration::from_millis(1250));
        assert_eq!(a.histogram_range, Duration::from_secs(600));
        assert!(a.validate().is_ok());
        assert_eq!(
            scaled(Duration::from_millis(10), 100.0),
            Duration::from_millis(1)
        );
        // The same decisions in compressed time: a fixed 60 s keep-alive at 24x is 2.5 s.
        let fixed = PolicySpec::parse("fixed-60s").unwrap();
        let t = policy_settings(
            &PolicySpec {
                fixed: fixed.fixed.map(|f| scaled(f, 24.0)),
                ..fixed
            },
            &SimParams::default(),
        );
        assert_eq!(t["idle_timeout"].as_str(), Some("2500000us"));
        let adaptive = policy_settings(
            &PolicySpec::parse("adaptive").unwrap(),
            &SimParams {
                adaptive: a,
                ..SimParams::default()
            },
        );
        assert_eq!(adaptive["idle_policy"].as_str(), Some("adaptive"));
        // The daemon's config parser takes the rendered knobs back.
        let back: AdaptiveConfig = adaptive["adaptive"].clone().try_into().unwrap();
        assert_eq!(back, scaled_adaptive(&AdaptiveConfig::default(), 24.0));
    }
}
