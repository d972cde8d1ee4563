//! Medians and percentiles, one definition of each for every bench:
//! - the median of n values is the middle one for an odd n, the mean of the middle two for an
//!   even n ([`median`]);
//! - the p-th percentile (0 <= p <= 1) of n sorted values is the one at nearest rank
//!   ceil(p * n) (1-based; rank 1 for p = 0), i.e. the smallest value with at least p of the
//!   values at or below it ([`percentile`]). p = 0.5 gives the lower of the middle two, not the
//!   median.

use std::time::Duration;

/// A value two of which can be averaged (for the median of an even count).
pub trait Mid: Copy + PartialOrd {
    fn mid(a: Self, b: Self) -> Self;
}

impl Mid for f64 {
    fn mid(a: f64, b: f64) -> f64 {
        (a + b) / 2.0
    }
}

impl Mid for u64 {
    fn mid(a: u64, b: u64) -> u64 {
        a / 2 + b / 2 + (a % 2 + b % 2) / 2
    }
}

impl Mid for Duration {
    fn mid(a: Duration, b: Duration) -> Duration {
        (a + b) / 2
    }
}

/// The median: the middle value, the mean of the middle two for an even count; `None` when
/// empty.
pub fn median<T: Mid>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some(T::mid(v[n / 2 - 1], v[n / 2])),
    }
}

/// [`median`] of durations (zero when empty).
pub fn median_duration(v: &[Duration]) -> Duration {
    median(v.to_vec()).unwrap_or_default()
}

/// The index of the p-th percentile in a sorted slice of `n` (> 0) values: nearest rank
/// ceil(p * n), 1-based, at least 1.
fn nearest_rank(n: usize, p: f64) -> usize {
    let rank = (p * n as f64).ceil() as usize;
    rank.clamp(1, n) - 1
}

/// The p-th percentile of `sorted` by nearest rank; `None` when empty.
pub fn percentile(sorted: &[i64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[nearest_rank(sorted.len(), p)] as f64)
}

/// p90, p99.9 and the maximum of `sorted`, by [`percentile`].
pub fn tail(sorted: &[i64]) -> Option<[f64; 3]> {
    Some([
        percentile(sorted, 0.90)?,
        percentile(sorted, 0.999)?,
        *sorted.last()? as f64,
    ])
}

/// [`percentile`] of sorted durations (zero when empty).
pub fn percentile_duration(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[nearest_rank(sorted.len(), p)]
}
