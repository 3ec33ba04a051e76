//! The trace simulator behind `synwake bench trace`: replays an invocation trace through
//! the same policy code the daemon runs ([`IdleHistory::window`], [`Affinity`]) and counts
//! cold starts, the latency they add and the idle instance-seconds each policy costs.
//!
//! Model: requests take no time; a cold request waits for its function's start time; a
//! pre-warmed instance is ready at its pre-warm point. With affinity, a client's SYN
//! arrives one round trip (`rtt_ms`) before its request is in, and a wake on it hides that
//! much of the start.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use synwake_bench::trace::Trace;

use super::affinity::Affinity;
use super::{AdaptiveConfig, Basis, IdleHistory, Window};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("policy {given:?}: expected fixed-<duration> (like fixed-60s, fixed-10m) or adaptive, optionally followed by +affinity")]
    BadPolicy { given: String },
}

/// A policy as named on the command line: `fixed-60s`, `fixed-10m`, `adaptive`,
/// `adaptive+affinity`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    pub name: String,
    /// `None`: adaptive.
    pub fixed: Option<Duration>,
    pub affinity: bool,
}

impl PolicySpec {
    pub fn parse(s: &str) -> Result<Self, SimError> {
        let bad = || SimError::BadPolicy {
            given: s.chars().take(64).collect(),
        };
        let (base, affinity) = match s.strip_suffix("+affinity") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let fixed = if base == "adaptive" {
            None
        } else {
            let d = base.strip_prefix("fixed-").ok_or_else(bad)?;
            let d = humantime::parse_duration(d).map_err(|_| bad())?;
            if d.is_zero() {
                return Err(bad());
            }
            Some(d)
        };
        Ok(PolicySpec {
            name: s.to_string(),
            fixed,
            affinity,
        })
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Everything besides the trace and the policy that the outcome depends on.
#[derive(Debug, Clone)]
pub struct SimParams {
    pub adaptive: AdaptiveConfig,
    /// The adaptive policy's fallback keep-alive (a function's `idle_timeout`).
    pub idle_timeout: Duration,
    /// Round trip between the client's SYN and its request (what an affinity wake hides).
    pub rtt_ms: f64,
    /// Every function's start time; `None`: per function from its name (see [`start_ms_of`]).
    pub start_ms: Option<f64>,
    pub affinity_window: Duration,
    pub prewarm_ttl: Duration,
    pub max_wakes_per_second: u32,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            adaptive: AdaptiveConfig::default(),
            idle_timeout: Duration::from_secs(60),
            rtt_ms: 20.0,
            start_ms: None,
            affinity_window: Duration::from_secs(60),
            prewarm_ttl: Duration::from_secs(10),
            max_wakes_per_second: 5,
        }
    }
}

/// A function's start time when the trace does not say: 50 ms to 1 s, log-uniform over
/// the FNV-1a hash of its name, so it is the same in every run and every policy.
pub fn start_ms_of(name: &str) -> f64 {
    let h = crate::spec::function_id(name) as f64 / u32::MAX as f64;
    (50f64.ln() + (1000f64.ln() - 50f64.ln()) * h).exp()
}

/// One policy's outcome on one trace (the JSON record of `synwake bench trace`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub policy: String,
    pub functions: usize,
    pub invocations: u64,
    /// Requests that waited for a start.
    pub cold_starts: u64,
    pub cold_start_fraction: f64,
    /// Seconds an instance was up without serving a request, summed over functions.
    pub idle_instance_seconds: f64,
    /// Latency added by starts, over all requests (warm ones add 0).
    pub p50_added_ms: f64,
    pub p99_added_ms: f64,
    /// Starts at a predicted pre-warm point, those a request used, and those it did not.
    pub predicted_prewarms: u64,
    pub prewarm_hits: u64,
    pub prewarms_wasted: u64,
    /// Affinity wakes, and those no request of the woken function used within prewarm_ttl.
    pub affinity_wakes: u64,
    pub affinity_wasted: u64,
}

struct FnSim {
    start_ms: f64,
    history: IdleHistory,
    last: Option<f64>,
    window: Window,
    /// An affinity wake at this time, not yet used.
    affinity_at: Option<f64>,
    tokens: f64,
    tokens_at: f64,
}

/// Runs `policy` over `trace`.
pub fn simulate(trace: &Trace, policy: &PolicySpec, p: &SimParams) -> Record {
    let ttl = p.prewarm_ttl.as_secs_f64();
    let rate = p.max_wakes_per_second as f64;
    let window_for = |h: &IdleHistory| match policy.fixed {
        Some(k) => Window::fixed(k, Basis::Fixed),
        None => h.window(&p.adaptive, p.idle_timeout),
    };
    let mut fns: Vec<FnSim> = trace
        .functions
        .iter()
        .map(|name| {
            let history = IdleHistory::new(&p.adaptive);
            FnSim {
                start_ms: p.start_ms.unwrap_or_else(|| start_ms_of(name)),
                window: window_for(&history),
                history,
                last: None,
                affinity_at: None,
                tokens: rate,
                tokens_at: 0.0,
            }
        })
        .collect();
    let mut affinity: Affinity<usize, usize> =
        Affinity::new(p.affinity_window.as_secs_f64(), 1 << 20);
    let mut rec = Record {
        policy: policy.name.clone(),
        functions: trace.functions.len(),
        invocations: trace.invocations.len() as u64,
        cold_starts: 0,
        cold_start_fraction: 0.0,
        idle_instance_seconds: 0.0,
        p50_added_ms: 0.0,
        p99_added_ms: 0.0,
        predicted_prewarms: 0,
        prewarm_hits: 0,
        prewarms_wasted: 0,
        affinity_wakes: 0,
        affinity_wasted: 0,
    };
    let mut added: Vec<f64> = Vec::with_capacity(trace.invocations.len());
    let warm_by_policy = |f: &FnSim, t: f64| f.last.is_some_and(|l| f.window.warm_at(t - l));
    // An unused affinity wake expired: count it.
    let expire = |f: &mut FnSim, t: f64, rec: &mut Record| {
        if let Some(at) = f.affinity_at {
            if t - at > ttl {
                rec.affinity_wasted += 1;
                rec.idle_instance_seconds += ttl;
                f.affinity_at = None;
            }
        }
    };
    for inv in &trace.invocations {
        let t = inv.t;
        if policy.affinity {
            if let Some(g) = inv.client.and_then(|c| affinity.sole_function(&c, t)) {
                let fg = &mut fns[g];
                expire(fg, t, &mut rec);
                if !warm_by_policy(fg, t) && fg.affinity_at.is_none() {
                    fg.tokens = (fg.tokens + (t - fg.tokens_at) * rate).min(rate);
                    fg.tokens_at = t;
                    if fg.tokens >= 1.0 {
                        fg.tokens -= 1.0;
                        fg.affinity_at = Some(t);
                        rec.affinity_wakes += 1;
                    }
                }
            }
        }
        let f = &mut fns[inv.function];
        expire(f, t, &mut rec);
        let wait_ms = if let Some(last) = f.last {
            let gap = t - last;
            let w = f.window;
            rec.idle_instance_seconds += w.idle_cost(gap);
            let prewarmed = !w.prewarm_after.is_zero() && gap >= w.prewarm_after.as_secs_f64();
            if prewarmed {
                rec.predicted_prewarms += 1;
                if w.warm_at(gap) {
                    rec.prewarm_hits += 1;
                } else {
                    rec.prewarms_wasted += 1;
                }
            }
            if w.warm_at(gap) {
                0.0
            } else if let Some(at) = f.affinity_at {
                rec.idle_instance_seconds += t - at;
                // Woken at the SYN, `rtt` before the request is in.
                (f.start_ms - p.rtt_ms - (t - at) * 1e3).max(0.0)
            } else {
                f.start_ms
            }
        } else if let Some(at) = f.affinity_at {
            rec.idle_instance_seconds += t - at;
            (f.start_ms - p.rtt_ms - (t - at) * 1e3).max(0.0)
        } else {
            f.start_ms
        };
        f.affinity_at = None;
        if wait_ms > 0.0 {
            rec.cold_starts += 1;
        }
        added.push(wait_ms);
        if policy.fixed.is_none() {
            f.history.on_request(&p.adaptive, t);
            f.history.on_done(t);
        }
        f.last = Some(t);
        f.window = window_for(&f.history);
        if let Some(c) = inv.client {
            affinity.record(c, inv.function, t);
        }
    }
    let end = trace
        .duration
        .max(trace.invocations.last().map(|i| i.t).unwrap_or(0.0));
    for f in &mut fns {
        if let Some(last) = f.last {
            rec.idle_instance_seconds += f.window.idle_cost(end - last);
        }
        if let Some(at) = f.affinity_at.take() {
            rec.affinity_wasted += 1;
            rec.idle_instance_seconds += ttl.min(end - at);
        }
    }
    if rec.invocations > 0 {
        rec.cold_start_fraction = rec.cold_starts as f64 / rec.invocations as f64;
    }
    added.sort_by(f64::total_cmp);
    rec.p50_added_ms = percentile(&added, 50.0);
    rec.p99_added_ms = percentile(&added, 99.0);
    rec
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[f64], pct: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A markdown table of records, for the terminal and docs/benchmarks.md.
pub fn table(records: &[Record]) -> String {
    let mut s = String::from(
        "| policy | functions | invocations | cold starts | cold fraction | idle instance-s | p50 added ms | p99 added ms |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in records {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {:.0} | {:.1} | {:.1} |\n",
            r.policy,
            r.functions,
            r.invocations,
            r.cold_starts,
            r.cold_start_fraction,
            r.idle_instance_seconds,
            r.p50_added_ms,
            r.p99_added_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests;
