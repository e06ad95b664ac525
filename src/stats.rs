//! Order statistics shared by the engine, the benchmarks and the load test: one
//! [`Quantiles`] type (mean, p50, p90, p95, p99) and the helpers that compute it from samples.
//!
//! Nearest-rank percentiles over the samples themselves (sorted once): the samples
//! here are at most a few hundred thousand, and an exact figure reads better in a
//! report than a histogram bucket.

/// Mean, median, 90th, 95th and 99th percentile of one measure (the figures serving
/// benchmarks report).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Quantiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Quantiles {
    /// The quantiles of `samples` (all 0 when there are none).
    pub fn of(samples: &[f64]) -> Self {
        let q = percentiles(samples, &[50.0, 90.0, 95.0, 99.0]);
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<f64>() / samples.len() as f64
        };
        Self {
            mean,
            p50: q[0],
            p90: q[1],
            p95: q[2],
            p99: q[3],
        }
    }
}

/// Median of a list of samples: the mean of the two middle ones for an even count
/// (0 when empty).
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let v = sorted(samples);
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
    let v = sorted(samples);
    ps.iter()
        .map(|p| {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        })
        .collect()
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(samples: &[f64], p: f64, expected: f64) {
        assert_eq!(
            percentiles(samples, &[p])[0],
            expected,
            "p{p} of {samples:?}"
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        check(&hundred, 50.0, 50.0);
        check(&hundred, 95.0, 95.0);
        check(&hundred, 99.0, 99.0);
        check(&hundred, 100.0, 100.0);
        check(&hundred, 0.0, 1.0);
        check(&[7.0], 99.0, 7.0);
        // Unsorted input, and a rank that rounds up.
        check(&[3.0, 1.0, 2.0], 50.0, 2.0);
        check(&[4.0, 1.0, 3.0, 2.0], 60.0, 3.0);
        check(&[], 50.0, 0.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn quantiles_of_samples() {
        let q = Quantiles::of(&(1..=200).map(f64::from).collect::<Vec<_>>());
        assert_eq!((q.p50, q.p90, q.p95, q.p99), (100.0, 180.0, 190.0, 198.0));
        assert_eq!(q.mean, 100.5);
        assert_eq!(Quantiles::of(&[]), Quantiles::default());
    }
}
