//! `troupe bench`: measurements anyone can rerun, printed as a table and written as
//! JSON.

pub mod engine;
pub mod forward;
pub mod grammar;

/// Median of a list of samples (0 when empty).
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Percentiles (0-100) of one list of samples, nearest rank, sorting once
/// (0 each when empty).
pub fn percentiles(samples: &[f64], ps: &[f64]) -> Vec<f64> {
    if samples.is_empty() {
        return vec![0.0; ps.len()];
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    ps.iter()
        .map(|p| {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        })
        .collect()
}

/// p50 and p99 of the grammar mask time, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct MaskQuantiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl MaskQuantiles {
    /// The quantiles of `samples`.
    pub fn of(samples: &[f64]) -> Self {
        let q = percentiles(samples, &[50.0, 99.0]);
        Self {
            p50: q[0],
            p99: q[1],
        }
    }
}
