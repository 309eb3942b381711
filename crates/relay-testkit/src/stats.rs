//! Latency percentiles, one way of computing them for the tests, the demo and the benchmark:
//! nearest rank over the sorted samples.

use std::time::Duration;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// From samples in microseconds (sorted here).
    pub fn of_micros(samples: &mut [u32]) -> Self {
        samples.sort_unstable();
        let at = |p: f64| nearest_rank(samples, p).map_or(0.0, |&us| f64::from(us) / 1000.0);
        Self { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1.0) }
    }
}

/// The `p`-th percentile (0.0-1.0) of `sorted` samples, if there are any.
pub fn nearest_rank<T>(sorted: &[T], p: f64) -> Option<&T> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get(((last as f64) * p.clamp(0.0, 1.0)).round() as usize)
}

/// The `p`-th percentile of `samples` (sorted here), if there are any.
pub fn percentile(samples: &mut [Duration], p: f64) -> Option<Duration> {
    samples.sort_unstable();
    nearest_rank(samples, p).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_samples() {
        let mut samples: Vec<u32> = (1..=100).rev().map(|ms| ms * 1000).collect();
        let p = Percentiles::of_micros(&mut samples);
        assert_eq!((p.p50, p.p99, p.max), (51.0, 99.0, 100.0));
        assert_eq!(percentile(&mut [], 0.5), None);
    }
}
