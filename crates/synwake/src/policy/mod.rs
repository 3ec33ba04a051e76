//! The idle policy: when to stop an idle function and when to start it again before its
//! next call. Pure code (times in, decisions out), so the daemon and the trace simulator
//! (`synwake bench trace`) run exactly the same decisions.
//!
//! `fixed` keeps an instance for `idle_timeout` after its last request. `adaptive` learns,
//! per function, how long the gaps between calls are (a histogram of idle times with
//! log-spaced bins, so 200 ms bursts and 3 h cron jobs both land in useful bins) and then
//! keeps an instance only around the time the next call is expected:
//!
//! - pre-warm point: a low percentile of the idle times, minus a margin. Until then no
//!   instance is kept (unless the point is so close that stopping would not pay off).
//! - keep-alive point: a high percentile, plus a margin. Past it the instance stops.
//!
//! While the histogram has too few samples, or its idle times are spread so evenly that
//! no gap is more likely than another, it is not representative and the policy falls back
//! to the fixed keep-alive. Idle times beyond the histogram's range are not binned: when
//! they dominate, the window is placed around the recent out-of-range idle times instead.
//! Every window is capped, so one function cannot hold an idle instance without bound.
//!
//! The approach follows Shahrad et al., "Serverless in the Wild" (USENIX ATC 2020).

pub mod affinity;
pub mod bench;
pub mod replay;
pub mod sim;

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which idle policy a function uses (`idle_policy` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdlePolicyKind {
    /// Stop after `idle_timeout` without requests.
    #[default]
    Fixed,
    /// Learned pre-warm and keep-alive points (this module).
    Adaptive,
}

impl IdlePolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdlePolicyKind::Fixed => "fixed",
            IdlePolicyKind::Adaptive => "adaptive",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "fixed" => Ok(IdlePolicyKind::Fixed),
            "adaptive" => Ok(IdlePolicyKind::Adaptive),
            _ => Err("the idle policy must be \"fixed\" or \"adaptive\"".into()),
        }
    }
}

/// The adaptive policy's knobs. Defaults are documented in the README (`[defaults.adaptive]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Upper end of the histogram; longer idle times are out of range.
    #[serde(with = "crate::spec::duration_str")]
    pub histogram_range: Duration,
    /// Lower edge of the first bin; shorter idle times count in the first bin.
    #[serde(with = "crate::spec::duration_str")]
    pub histogram_min: Duration,
    /// Number of log-spaced bins between `histogram_min` and `histogram_range`.
    pub bins: u32,
    /// Percentile (0-100) of idle times that places the pre-warm point.
    pub prewarm_percentile: f64,
    /// Percentile (0-100) of idle times that places the keep-alive point.
    pub keepalive_percentile: f64,
    /// The pre-warm point is moved earlier by this fraction (0.1 = 10%).
    pub prewarm_margin: f64,
    /// The keep-alive point is moved later by this fraction.
    pub keepalive_margin: f64,
    /// Idle times needed before the histogram is trusted.
    pub min_samples: u32,
    /// Coefficient of variation of the bin counts needed to trust the histogram (an even
    /// spread means idle times are not predictable).
    pub min_cv: f64,
    /// Weight of history: each new idle time scales older ones by (1 - 1/history), so a
    /// function that changes its pattern is followed.
    pub history: u32,
    /// A pre-warm point closer than this keeps the instance warm instead of stopping it.
    #[serde(with = "crate::spec::duration_str")]
    pub min_unload: Duration,
    /// Cap on the idle instance-seconds one idle period may cost (the window's length).
    #[serde(with = "crate::spec::duration_str")]
    pub max_window: Duration,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            histogram_range: Duration::from_secs(4 * 3600),
            histogram_min: Duration::from_millis(100),
            bins: 120,
            prewarm_percentile: 5.0,
            keepalive_percentile: 99.0,
            prewarm_margin: 0.1,
            keepalive_margin: 0.1,
            min_samples: 5,
            min_cv: 1.0,
            history: 100,
            min_unload: Duration::from_secs(30),
            max_window: Duration::from_secs(3600),
        }
    }
}

impl AdaptiveConfig {
    /// Checks ranges: on error, the key (`adaptive.<knob>`) and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.check()
            .map_err(|m| (m.split(' ').next().unwrap_or("adaptive").to_string(), m))
    }

    fn check(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.bins) {
            return Err(format!("adaptive.bins {} must be 1 to 1000", self.bins));
        }
        if self.histogram_min.is_zero() || self.histogram_min >= self.histogram_range {
            return Err(
                "adaptive.histogram_min must be above zero and below adaptive.histogram_range"
                    .into(),
            );
        }
        if self.histogram_range > Duration::from_secs(7 * 86400) {
            return Err("adaptive.histogram_range must be at most 7 days".into());
        }
        let pct = |v: f64, key: &str| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("adaptive.{key} {v} must be between 0 and 100"))
            }
        };
        pct(self.prewarm_percentile, "prewarm_percentile")?;
        pct(self.keepalive_percentile, "keepalive_percentile")?;
        if self.prewarm_percentile > self.keepalive_percentile {
            return Err(
                "adaptive.prewarm_percentile must not exceed adaptive.keepalive_percentile".into(),
            );
        }
        let frac = |v: f64, key: &str| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("adaptive.{key} {v} must be between 0 and 1"))
            }
        };
        frac(self.prewarm_margin, "prewarm_margin")?;
        frac(self.keepalive_margin, "keepalive_margin")?;
        if !(0.0..=100.0).contains(&self.min_cv) {
            return Err(format!(
                "adaptive.min_cv {} must be between 0 and 100",
                self.min_cv
            ));
        }
        if self.history < 2 || self.history > 100_000 {
            return Err(format!(
                "adaptive.history {} must be 2 to 100000",
                self.history
            ));
        }
        if self.max_window.is_zero() {
            return Err("adaptive.max_window must be above zero".into());
        }
        Ok(())
    }

    fn ratio(&self) -> f64 {
        (self.histogram_range.as_secs_f64() / self.histogram_min.as_secs_f64()).ln()
            / self.bins as f64
    }

    /// Lower edge of bin `i` (bin `bins` is the upper edge of the last one), in seconds.
    fn edge(&self, i: usize) -> f64 {
        self.histogram_min.as_secs_f64() * (self.ratio() * i as f64).exp()
    }

    fn bin_of(&self, idle: f64) -> usize {
        let min = self.histogram_min.as_secs_f64();
        if idle <= min {
            return 0;
        }
        (((idle / min).ln() / self.ratio()) as usize).min(self.bins as usize - 1)
    }
}

/// Why a function's windows are what they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// `idle_policy = "fixed"`.
    Fixed,
    /// Adaptive, but too few or too evenly spread idle times: fixed keep-alive.
    Fallback,
    /// Adaptive, from the histogram's percentiles.
    Representative,
    /// Adaptive, most recent idle times were beyond the histogram's range.
    OutOfRange,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Fixed => "fixed",
            Basis::Fallback => "fallback",
            Basis::Representative => "representative",
            Basis::OutOfRange => "out_of_range",
        }
    }
}

/// What to do after a function's last request, relative to that request's end.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    /// Stop right away and start again this long after the last request; zero: stay warm.
    pub prewarm_after: Duration,
    /// Stop this long after the last request (measured from the same point).
    pub keep_alive: Duration,
    pub basis: Basis,
}

impl Window {
    pub fn fixed(idle_timeout: Duration, basis: Basis) -> Self {
        Window {
            prewarm_after: Duration::ZERO,
            keep_alive: idle_timeout,
            basis,
        }
    }

    /// Whether an instance is there `idle` after the last request.
    pub fn warm_at(&self, idle: f64) -> bool {
        idle >= self.prewarm_after.as_secs_f64() && idle <= self.keep_alive.as_secs_f64()
    }

    /// Instance-seconds an idle gap of `idle` costs under this window.
    pub fn idle_cost(&self, idle: f64) -> f64 {
        (idle.min(self.keep_alive.as_secs_f64()) - self.prewarm_after.as_secs_f64()).max(0.0)
    }

    /// One line for logs, the API and `synwake describe`.
    pub fn reason(&self, samples: u64) -> String {
        let d =
            |d: Duration| humantime::format_duration(Duration::from_millis(d.as_millis() as u64));
        match self.basis {
            Basis::Fixed => format!("fixed: keep for {} after the last request", d(self.keep_alive)),
            Basis::Fallback => format!(
                "fallback: {samples} idle time(s) are not yet representative; keep for {} (idle_timeout)",
                d(self.keep_alive)
            ),
            Basis::Representative if self.prewarm_after.is_zero() => format!(
                "representative ({samples} idle times): keep warm until {} after the last request",
                d(self.keep_alive)
            ),
            Basis::Representative => format!(
                "representative ({samples} idle times): stop, pre-warm {} after the last request, keep until {}",
                d(self.prewarm_after),
                d(self.keep_alive)
            ),
            Basis::OutOfRange => format!(
                "out of range: recent idle times exceed the histogram; pre-warm {} after the last request, keep until {}",
                d(self.prewarm_after),
                d(self.keep_alive)
            ),
        }
    }
}

/// Out-of-range idle times remembered to place the window when they dominate.
const OUT_OF_RANGE_KEPT: usize = 8;

/// One function's learned idle times. Times are seconds on the caller's clock (the daemon
/// uses wall-clock seconds so the history survives a restart; the simulator trace time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdleHistory {
    /// Decayed count per bin.
    bins: Vec<f64>,
    /// Decayed count of out-of-range idle times.
    out_of_range: f64,
    /// The most recent out-of-range idle times, in seconds.
    recent_out_of_range: VecDeque<f64>,
    /// Idle times recorded (not decayed; shown as "samples").
    recorded: u64,
    /// End of the last request (seconds on the caller's clock).
    last_activity: Option<f64>,
}

impl IdleHistory {
    pub fn new(cfg: &AdaptiveConfig) -> Self {
        IdleHistory {
            bins: vec![0.0; cfg.bins as usize],
            out_of_range: 0.0,
            recent_out_of_range: VecDeque::new(),
            recorded: 0,
            last_activity: None,
        }
    }

    /// Whether this history was built with `cfg`'s bin layout (else it must be rebuilt).
    pub fn fits(&self, cfg: &AdaptiveConfig) -> bool {
        self.bins.len() == cfg.bins as usize
    }

    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    pub fn last_activity(&self) -> Option<f64> {
        self.last_activity
    }

    fn weight(&self) -> f64 {
        self.bins.iter().sum::<f64>() + self.out_of_range
    }

    /// A request arrived at `now`: records the idle time since the last activity.
    ///
    /// A clock that went backwards yields no sample (the gap is unknown); the next idle
    /// time is measured from `now`.
    pub fn on_request(&mut self, cfg: &AdaptiveConfig, now: f64) {
        if !now.is_finite() {
            return;
        }
        if let Some(last) = self.last_activity {
            let idle = now - last;
            if idle >= 0.0 {
                self.record(cfg, idle);
            }
        }
        self.last_activity = Some(now);
    }

    /// A request finished at `now` (the idle time starts here).
    pub fn on_done(&mut self, now: f64) {
        // Also after a backwards clock jump: the next idle time is measured from here.
        if now.is_finite() {
            self.last_activity = Some(now);
        }
    }

    /// Adds one idle time of `idle` seconds.
    pub fn record(&mut self, cfg: &AdaptiveConfig, idle: f64) {
        let keep = 1.0 - 1.0 / cfg.history as f64;
        for b in &mut self.bins {
            *b *= keep;
        }
        self.out_of_range *= keep;
        self.recorded += 1;
        if idle > cfg.histogram_range.as_secs_f64() {
            self.out_of_range += 1.0;
            if self.recent_out_of_range.len() == OUT_OF_RANGE_KEPT {
                self.recent_out_of_range.pop_front();
            }
            self.recent_out_of_range.push_back(idle);
        } else {
            let i = cfg.bin_of(idle);
            self.bins[i] += 1.0;
        }
    }

    fn representative(&self, cfg: &AdaptiveConfig) -> bool {
        if self.recorded < cfg.min_samples as u64 {
            return false;
        }
        let n = self.bins.len() as f64;
        let mean = self.bins.iter().sum::<f64>() / n;
        if mean <= 0.0 {
            return false;
        }
        let var = self.bins.iter().map(|b| (b - mean).powi(2)).sum::<f64>() / n;
        var.sqrt() / mean >= cfg.min_cv
    }

    /// Idle time (seconds) below which `pct` percent of the binned weight lies: the lower
    /// edge of the bin that reaches it (`upper = false`) or its upper edge.
    fn percentile(&self, cfg: &AdaptiveConfig, pct: f64, upper: bool) -> f64 {
        let total: f64 = self.bins.iter().sum();
        let target = total * pct / 100.0;
        let mut acc = 0.0;
        for (i, b) in self.bins.iter().enumerate() {
            acc += b;
            if *b > 0.0 && acc >= target - 1e-9 {
                return if upper { cfg.edge(i + 1) } else { cfg.edge(i) };
            }
        }
        cfg.histogram_range.as_secs_f64()
    }

    /// The window after the last request, for a function whose fixed keep-alive is
    /// `idle_timeout`.
    pub fn window(&self, cfg: &AdaptiveConfig, idle_timeout: Duration) -> Window {
        let binned: f64 = self.bins.iter().sum();
        let (head, tail, basis) = if self.recorded >= cfg.min_samples as u64
            && self.out_of_range > binned
            && !self.recent_out_of_range.is_empty()
        {
            let lo = self
                .recent_out_of_range
                .iter()
                .copied()
                .fold(f64::MAX, f64::min);
            let hi = self.recent_out_of_range.iter().copied().fold(0.0, f64::max);
            (lo, hi, Basis::OutOfRange)
        } else if self.representative(cfg) {
            (
                self.percentile(cfg, cfg.prewarm_percentile, false),
                self.percentile(cfg, cfg.keepalive_percentile, true),
                Basis::Representative,
            )
        } else {
            return Window::fixed(idle_timeout, Basis::Fallback);
        };
        let mut prewarm = head * (1.0 - cfg.prewarm_margin);
        let mut keep = tail * (1.0 + cfg.keepalive_margin);
        let cap = cfg.max_window.as_secs_f64();
        if keep - prewarm > cap {
            if basis == Basis::OutOfRange {
                // Margins of hours around a daily job: centre the capped window instead.
                let mid = (head + tail) / 2.0;
                prewarm = mid - cap / 2.0;
                keep = mid + cap / 2.0;
            } else {
                // Where a window of the capped length catches the most idle times.
                prewarm = self.densest_start(cfg, prewarm, keep, cap);
                keep = prewarm + cap;
            }
        }
        if prewarm < cfg.min_unload.as_secs_f64() {
            // Staying warm: a stop sooner than min_unload after the last request would not
            // pay off either, and a short p99 (a hot function's) would make its rare long
            // gaps cold (fixed 10 min keeps those warm).
            prewarm = 0.0;
            keep = keep.max(cfg.min_unload.as_secs_f64()).min(cap);
        }
        Window {
            prewarm_after: Duration::from_secs_f64(prewarm.max(0.0)),
            keep_alive: Duration::from_secs_f64(keep.max(prewarm)),
            basis,
        }
    }

    /// Start (seconds) in [lo, hi - len] of the window of length `len` holding the most
    /// binned weight (a bin partly inside counts by the share of its width inside).
    fn densest_start(&self, cfg: &AdaptiveConfig, lo: f64, hi: f64, len: f64) -> f64 {
        let mut prefix = Vec::with_capacity(self.bins.len() + 1);
        prefix.push(0.0);
        for b in &self.bins {
            prefix.push(prefix.last().unwrap() + b);
        }
        let width = |i: usize| cfg.edge(i + 1) - cfg.edge(i);
        let weight = |start: f64| {
            let end = (start + len).min(cfg.edge(self.bins.len()));
            let (i0, i1) = (cfg.bin_of(start), cfg.bin_of(end));
            if i0 == i1 {
                return self.bins[i0] * (end - start) / width(i0);
            }
            self.bins[i0] * (cfg.edge(i0 + 1) - start).max(0.0) / width(i0)
                + (prefix[i1] - prefix[i0 + 1])
                + self.bins[i1] * (end - cfg.edge(i1)).max(0.0) / width(i1)
        };
        let last = hi - len;
        let mut best = (weight(lo), lo);
        for i in cfg.bin_of(lo)..=self.bins.len() {
            // Windows starting at an edge, and windows ending at one.
            for start in [cfg.edge(i), cfg.edge(i) - len] {
                if start > lo && start <= last {
                    let w = weight(start);
                    if w > best.0 + 1e-12 {
                        best = (w, start);
                    }
                }
            }
        }
        best.1
    }

    /// Decayed weight of everything recorded (for display).
    pub fn samples(&self) -> f64 {
        self.weight()
    }
}

#[cfg(test)]
mod tests;
