//! Medians and percentiles. The benches do not all define them alike (noted at each function);
//! each keeps the definition it always used, so that its figures stay comparable run to run.

use std::time::Duration;

/// The median, the mean of the middle two for an even count; `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// [`median`] of durations (zero when empty).
pub fn median_duration(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

/// The upper median: the higher of the middle two for an even count; `None` when empty.
pub fn upper_median<T: Ord + Copy>(v: &[T]) -> Option<T> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// The value at rank floor(n * p) of `sorted` (the last for p = 1); `None` when empty.
pub fn percentile(sorted: &[i64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    Some(sorted[i] as f64)
}

/// p90, p99.9 and the maximum of `sorted`, by [`percentile`].
pub fn tail(sorted: &[i64]) -> Option<[f64; 3]> {
    Some([
        percentile(sorted, 0.90)?,
        percentile(sorted, 0.999)?,
        *sorted.last()? as f64,
    ])
}

/// The value at rank round((n - 1) * p) of `sorted` (zero when empty): unlike [`percentile`],
/// rounded to the nearest rank.
pub fn percentile_rounded(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
