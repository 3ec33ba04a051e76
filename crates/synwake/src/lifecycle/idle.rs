//! A function's idle policy inside the lifecycle: the learned history (crate::policy),
//! the window it gives after the last request, and the pre-warm it schedules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::policy::{Basis, IdleHistory, IdlePolicyKind, Window};
use crate::spec::Policy;

/// Seconds since the Unix epoch: the history's clock, so it means something after a restart.
pub(crate) fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The policy's current decision, for the API and `synwake describe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdleView {
    pub policy: String,
    /// fixed, fallback, representative or out_of_range.
    pub basis: String,
    /// Seconds after the last request at which a stopped instance is started again (0:
    /// the instance stays up from the last request on).
    pub prewarm_after_seconds: f64,
    /// Seconds after the last request at which the instance stops.
    pub keep_alive_seconds: f64,
    /// Idle times recorded so far.
    pub samples: u64,
    pub reason: String,
}

pub(crate) struct IdleState {
    pub history: IdleHistory,
    pub window: Window,
    /// End of the last request on the monotonic clock (decisions in this run use it, so a
    /// wall-clock jump cannot stop or keep an instance at the wrong time).
    pub last_done: Option<Instant>,
    /// The `last_done` a predicted pre-warm was already started for (one per idle period).
    pub prewarmed_for: Option<Instant>,
    /// Changed since the history was last saved.
    pub dirty: bool,
}

impl IdleState {
    pub fn new(policy: &Policy, restored: Option<IdleHistory>) -> Self {
        let mut history = IdleHistory::new(&policy.adaptive);
        let mut last_done = None;
        if let Some(h) = restored.filter(|h| h.fits(&policy.adaptive)) {
            // Where the last request ended, carried over to this run's monotonic clock.
            if let Some(last) = h.last_activity() {
                let ago = wall_now() - last;
                if (0.0..policy.adaptive.histogram_range.as_secs_f64() * 2.0).contains(&ago) {
                    last_done = Instant::now().checked_sub(Duration::from_secs_f64(ago));
                }
            }
            history = h;
        }
        let mut s = IdleState {
            history,
            window: Window::fixed(policy.idle_timeout, Basis::Fixed),
            last_done,
            prewarmed_for: None,
            dirty: false,
        };
        s.refresh(policy);
        s
    }

    fn refresh(&mut self, policy: &Policy) {
        self.window = match policy.idle_policy {
            IdlePolicyKind::Fixed => Window::fixed(policy.idle_timeout, Basis::Fixed),
            IdlePolicyKind::Adaptive => self.history.window(&policy.adaptive, policy.idle_timeout),
        };
    }

    /// A request arrived.
    pub fn on_request(&mut self, policy: &Policy) {
        if policy.idle_policy == IdlePolicyKind::Adaptive {
            self.history.on_request(&policy.adaptive, wall_now());
            self.dirty = true;
        }
    }

    /// The last in-flight request finished: the idle time starts now.
    pub fn on_done(&mut self, policy: &Policy) {
        self.last_done = Some(Instant::now());
        self.prewarmed_for = None;
        if policy.idle_policy == IdlePolicyKind::Adaptive {
            self.history.on_done(wall_now());
            self.dirty = true;
            self.refresh(policy);
        }
    }

    /// Idle since the last request, if there was one.
    pub fn idle(&self, now: Instant) -> Option<Duration> {
        self.last_done.map(|l| now.saturating_duration_since(l))
    }

    /// Whether a cold function should be pre-warmed now (then marks it done for this idle
    /// period).
    pub fn take_prewarm(&mut self, now: Instant) -> bool {
        let due = self.prewarm_pending(now)
            && self
                .idle(now)
                .is_some_and(|idle| idle >= self.window.prewarm_after);
        if due {
            self.prewarmed_for = self.last_done;
        }
        due
    }

    /// Whether [`Self::take_prewarm`] may still answer true in this idle period (so
    /// somebody has to keep asking).
    pub fn prewarm_pending(&self, now: Instant) -> bool {
        let (Some(last), Some(idle)) = (self.last_done, self.idle(now)) else {
            return false;
        };
        !self.window.prewarm_after.is_zero()
            && self.prewarmed_for != Some(last)
            && idle < self.window.keep_alive
    }

    pub fn view(&self, policy: &Policy) -> IdleView {
        IdleView {
            policy: policy.idle_policy.as_str().into(),
            basis: self.window.basis.as_str().into(),
            prewarm_after_seconds: self.window.prewarm_after.as_secs_f64(),
            keep_alive_seconds: self.window.keep_alive.as_secs_f64(),
            samples: self.history.recorded(),
            reason: self.window.reason(self.history.recorded()),
        }
    }
}
