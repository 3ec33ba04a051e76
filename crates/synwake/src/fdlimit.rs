//! File descriptors under floods: the soft RLIMIT_NOFILE is raised to the hard limit at
//! start, and the public listeners stop accepting before the last fds are gone, so the
//! management API and instance starts keep a reserve (a flood of idle connections
//! cannot take the daemon's control plane down with it).

use std::time::{Duration, Instant};

/// The soft and hard RLIMIT_NOFILE after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the limits now in force.
pub fn raise_nofile() -> std::io::Result<NofileLimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if rl.rlim_cur < rl.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                rl = raised;
            }
        }
    }
    Ok(NofileLimit {
        soft: rl.rlim_cur,
        hard: rl.rlim_max,
    })
}

/// How many connections the listeners may hold open with a given fd limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// The public listeners together (shared, TLS and functions' own ports).
    pub public: usize,
    /// The management API, out of the reserve the public listeners leave.
    pub api: usize,
}

impl ConnectionBudget {
    /// With `soft` fds the public listeners leave a reserve (a quarter, at least 64 and
    /// at most 1024) for the API, instance starts, upstream connections, logs and state
    /// files; the API may use half of that reserve.
    pub fn for_soft_limit(soft: u64) -> Self {
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        let reserve = (soft / 4).clamp(64, 1024);
        ConnectionBudget {
            public: soft.saturating_sub(reserve).max(1),
            api: (reserve / 2).max(1),
        }
    }

    /// No cap (the limit could not be read).
    pub fn unlimited() -> Self {
        ConnectionBudget {
            public: usize::MAX,
            api: usize::MAX,
        }
    }
}

/// Logs the first of a run of repeated failures, then at most one summary per `every`
/// (how many were suppressed), instead of one line per failure.
#[derive(Debug)]
pub struct LogOnce {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogOnce {
    pub fn new(every: Duration) -> Self {
        LogOnce {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when this occurrence should be logged.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_a_reserve() {
        let b = |soft| ConnectionBudget::for_soft_limit(soft);
        assert_eq!(
            b(1024),
            ConnectionBudget {
                public: 768,
                api: 128
            }
        );
        assert_eq!(b(20000).public, 18976);
        assert_eq!(b(100).public, 36);
        assert_eq!(b(10).public, 1);
        assert!(b(1024).public + b(1024).api < 1024);
    }

    #[test]
    fn a_run_of_failures_logs_once_per_interval() {
        let mut log = LogOnce::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.hit(t0), Some(0));
        let logged = (1..=754)
            .filter(|i| log.hit(t0 + Duration::from_millis(*i)).is_some())
            .count();
        assert_eq!(logged, 0, "754 failures within a second: no more lines");
        assert_eq!(log.hit(t0 + Duration::from_secs(11)), Some(754));
    }

    #[test]
    fn raising_is_idempotent() {
        let a = raise_nofile().unwrap();
        assert_eq!(a.soft, a.hard);
        assert_eq!(raise_nofile().unwrap(), a);
    }
}
