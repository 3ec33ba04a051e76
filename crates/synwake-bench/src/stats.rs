//! Percentiles and per-cell summaries.

use std::time::Duration;

/// Percentile `p` (0..=100) of `sorted` (ascending) by linear interpolation between the
/// closest ranks (the "type 7" definition used by numpy and R's default). `None` if empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// Latency summary of one cell, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub runs: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises latencies; `None` for no samples.
    pub fn from_durations(samples: &[Duration]) -> Option<Self> {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Self::from_ms(&ms)
    }

    /// Summarises latencies given in milliseconds; `None` for no samples.
    pub fn from_ms(samples: &[f64]) -> Option<Self> {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Summary {
            runs: v.len(),
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }
}

/// Share of the cold-start penalty the probe hides: (request - syn) / (request - warm),
/// from p50s. `None` when the baseline pays nothing (request <= warm), where the ratio
/// means nothing.
pub fn hidden_fraction(request: f64, syn: f64, warm: f64) -> Option<f64> {
    let penalty = request - warm;
    (penalty > 0.0).then(|| (request - syn) / penalty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        // rank 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
    }

    #[test]
    fn percentile_of_one_sample_is_that_sample() {
        assert_eq!(percentile(&[7.5], 99.0), Some(7.5));
    }

    #[test]
    fn percentile_rejects_empty_and_out_of_range() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], 101.0), None);
        assert_eq!(percentile(&[1.0], -1.0), None);
    }

    #[test]
    fn percentile_matches_numpy_on_1_to_100() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        // numpy.percentile(range(1, 101), [50, 90, 99]) == [50.5, 90.1, 99.01]
        assert!((percentile(&v, 50.0).unwrap() - 50.5).abs() < 1e-9);
        assert!((percentile(&v, 90.0).unwrap() - 90.1).abs() < 1e-9);
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
    }

    #[test]
    fn summary_sorts_unsorted_input() {
        let s = Summary::from_ms(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.p50, 3.0);
        assert!(Summary::from_ms(&[]).is_none());
    }

    #[test]
    fn summary_from_durations_is_in_milliseconds() {
        let s = Summary::from_durations(&[Duration::from_micros(1500)]).unwrap();
        assert!((s.p50 - 1.5).abs() < 1e-12);
    }

    #[test]
    fn hidden_fraction_is_one_when_syn_matches_warm() {
        assert_eq!(hidden_fraction(60.0, 10.0, 10.0), Some(1.0));
        assert_eq!(hidden_fraction(60.0, 60.0, 10.0), Some(0.0));
        assert_eq!(hidden_fraction(60.0, 35.0, 10.0), Some(0.5));
        assert_eq!(hidden_fraction(10.0, 10.0, 10.0), None);
    }
}
