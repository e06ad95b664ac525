//! `troupe bench`: measurements anyone can rerun, printed as a table and written as
//! JSON.

pub mod engine;
pub mod forward;
pub mod grammar;
pub mod perplexity;
pub mod profile;

/// Greedy single-sequence decode timed step by step: prefills `prompt` into a fresh
/// cache, then decodes `n` tokens one forward each (end-of-generation tokens do not
/// stop it); returns each step's seconds. The sequence is the engine's own decode
/// state ([`Sequence`](crate::engine::Sequence)), so a step here costs what one does
/// there.
pub(crate) fn decode_step_times(
    model: &crate::Model,
    prompt: &[u32],
    n: usize,
    kv_dtype: crate::KvDtype,
) -> crate::Result<Vec<f64>> {
    use crate::model::SeqInput;
    let mut cache = model.new_cache(kv_dtype);
    let greedy = crate::sampling::Sampler::new(crate::sampling::SamplingParams::default())?;
    let mut seq = crate::engine::Sequence::new(prompt.to_vec(), greedy, None, &[], n + 1, true);
    let mut times = Vec::with_capacity(n);
    for step in 0..=n {
        let t = std::time::Instant::now();
        let logits = model.forward(&mut [SeqInput {
            tokens: seq.feed(),
            cache: &mut cache,
        }])?;
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let done = seq.sample(&mut row)?;
        seq.advance(model.tokenizer(), done)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

pub use crate::stats::{median, percentiles, Quantiles};
