//! Token bucket for packet-triggered wakes: a SYN flood cannot start unbounded instances.

use std::time::Instant;

/// `rate` tokens per second, burst equal to the rate. A rate of 0 suppresses every wake.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> Self {
        TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    pub fn try_take_at(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5);
        let taken = (0..100).filter(|_| b.try_take_at(t0)).count();
        assert_eq!(taken, 5);
        assert!(!b.try_take_at(t0 + Duration::from_millis(100)));
        assert!(b.try_take_at(t0 + Duration::from_millis(250)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.try_take_at(later)).count(), 5);
    }

    #[test]
    fn zero_rate_suppresses_everything() {
        let mut b = TokenBucket::new(0);
        assert!(!b.try_take());
    }
}
