//! `troupe bench forward --profile`: where a batched decode step's time goes, per
//! number of rows: the linear layers, attention, rotary/norms/copies, the output
//! head (from the forward's own phase counters), then sampling and grammar masks of
//! every row, so anyone can see which part grows with the rows.

use std::time::Instant;

use crate::grammar::Grammar;
use crate::kv::{KvCache, KvDtype};
use crate::model::profile::{self, PhaseTimes};
use crate::model::{Model, SeqInput};
use crate::sampling::TokenConstraint;
use crate::sampling::{argmax, Sampler, SamplingParams};
use crate::Result;

/// Milliseconds per decode step, by part, at one number of rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileRow {
    /// Sequences in the step.
    pub rows: usize,
    /// The whole step: forward, sampling and masks.
    pub step_ms: f64,
    /// Linear layers of the blocks.
    pub linear_ms: f64,
    /// Attention against the caches.
    pub attention_ms: f64,
    /// Embedding, norms, rotary, activation, residuals, cache writes, copies.
    pub other_ms: f64,
    /// Final norm and output head.
    pub head_ms: f64,
    /// Sampling every row (temperature 0.8, top-p 0.95).
    pub sampling_ms: f64,
    /// A JSON-Schema grammar mask for every row, one after another.
    pub masks_ms: f64,
    /// Generated tokens per second of the forward alone.
    pub forward_tok_s: f64,
}

/// Profiles `steps` decode steps at each of `rows`, every sequence starting from a
/// copy of `base` (a prefilled cache).
pub fn profile_steps(
    model: &Model,
    base: &KvCache,
    rows: &[usize],
    steps: usize,
) -> Result<Vec<ProfileRow>> {
    let compiler = crate::grammar::GrammarCompiler::new(model.tokenizer())?;
    let grammar = compiler.compile(&Grammar::JsonSchema(super::grammar::nested_schema()))?;
    let mut out = Vec::new();
    for &b in rows {
        let mut caches: Vec<KvCache> = (0..b).map(|_| base.fork()).collect();
        let mut next: Vec<u32> = (0..b).map(|i| (1000 + i * 31) as u32).collect();
        let mut samplers = (0..b)
            .map(|i| {
                Sampler::new(SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    seed: i as u64,
                    ..SamplingParams::default()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut grammars: Vec<_> = (0..b).map(|_| grammar.constraint()).collect();
        let (mut fwd, mut sampling, mut masks) = (0f64, 0f64, 0f64);
        let mut phases = PhaseTimes::default();
        // One untimed step first: it grows the caches and warms the buffers.
        for step in 0..=steps {
            profile::enable(step > 0);
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut seqs: Vec<SeqInput<'_>> = caches
                .iter_mut()
                .zip(&toks)
                .map(|(cache, t)| SeqInput { tokens: t, cache })
                .collect();
            let t = Instant::now();
            let logits: Vec<Vec<f32>> = model.forward(&mut seqs)?.to_vec2()?;
            let t_fwd = t.elapsed().as_secs_f64();
            let p = profile::take();
            let t = Instant::now();
            for (row, s) in logits.iter().zip(samplers.iter_mut()) {
                let mut r = row.clone();
                std::hint::black_box(s.sample(&mut r));
            }
            let t_sample = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (row, g) in logits.iter().zip(grammars.iter_mut()) {
                let mut r = row.clone();
                g.mask(&mut r)?;
                let tok = argmax(&r);
                if g.commit(tok)? {
                    *g = grammar.constraint();
                }
            }
            let t_masks = t.elapsed().as_secs_f64();
            next = logits.iter().map(|r| argmax(r)).collect();
            if step > 0 {
                fwd += t_fwd;
                sampling += t_sample;
                masks += t_masks;
                phases.linear += p.linear;
                phases.attention += p.attention;
                phases.other += p.other;
                phases.head += p.head;
            }
        }
        profile::enable(false);
        let ms = |s: f64| s * 1e3 / steps as f64;
        out.push(ProfileRow {
            rows: b,
            step_ms: ms(fwd + sampling + masks),
            linear_ms: ms(phases.linear),
            attention_ms: ms(phases.attention),
            other_ms: ms(phases.other),
            head_ms: ms(phases.head),
            sampling_ms: ms(sampling),
            masks_ms: ms(masks),
            forward_tok_s: b as f64 * steps as f64 / fwd,
        });
    }
    Ok(out)
}

/// Profiles one prefill of `tokens` into a fresh cache (reported with `rows` = the
/// prompt length; sampling and masks are not part of a prefill).
pub fn profile_prefill(model: &Model, tokens: &[u32], dtype: KvDtype) -> Result<ProfileRow> {
    // Once untimed: the first run allocates and touches the buffers.
    prefilled(model, tokens, dtype)?;
    profile::enable(true);
    let t = Instant::now();
    prefilled(model, tokens, dtype)?;
    let secs = t.elapsed().as_secs_f64();
    let p = profile::take();
    profile::enable(false);
    Ok(ProfileRow {
        rows: tokens.len(),
        step_ms: secs * 1e3,
        linear_ms: p.linear * 1e3,
        attention_ms: p.attention * 1e3,
        other_ms: p.other * 1e3,
        head_ms: p.head * 1e3,
        sampling_ms: 0.0,
        masks_ms: 0.0,
        forward_tok_s: tokens.len() as f64 / secs,
    })
}

/// A new cache of `dtype` holding `tokens`.
pub fn prefilled(model: &Model, tokens: &[u32], dtype: KvDtype) -> Result<KvCache> {
    let mut cache = model.new_cache(dtype);
    model.forward(&mut [SeqInput {
        tokens,
        cache: &mut cache,
    }])?;
    Ok(cache)
}
