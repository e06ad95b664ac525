//! `troupe bench`: measurements anyone can rerun, printed as a table and written as
//! JSON.

pub mod engine;
pub mod forward;
pub mod grammar;
pub mod perplexity;
pub mod profile;

/// Greedy single-sequence decode timed step by step: prefills `prompt` into a fresh
/// cache, then decodes `n` tokens one forward each; returns each step's seconds.
pub(crate) fn decode_step_times(
    model: &crate::Model,
    prompt: &[u32],
    n: usize,
    kv_dtype: crate::KvDtype,
) -> crate::Result<Vec<f64>> {
    use crate::model::SeqInput;
    let mut cache = model.new_cache(kv_dtype);
    let logits = model.forward(&mut [SeqInput {
        tokens: prompt,
        cache: &mut cache,
    }])?;
    let mut next = crate::sampling::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let logits = model.forward(&mut [SeqInput {
            tokens: &[next],
            cache: &mut cache,
        }])?;
        next = crate::sampling::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

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
