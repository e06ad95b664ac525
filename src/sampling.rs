//! Sampling: turning one sequence's logits into its next token.
//!
//! Penalties first (repetition over the request's tokens, presence and frequency over
//! what it generated), then greedy at temperature 0; otherwise temperature, top-k,
//! top-p and min-p filtering, drawn with the request's own seeded generator, so that a
//! sampled output depends only on the request, never on what else shares its batch.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// A constraint on the tokens a sequence may produce (a grammar): it masks logits
/// before sampling and follows the chosen tokens.
pub trait TokenConstraint: Send {
    /// Sets the logits of forbidden tokens to `-inf`.
    fn mask(&mut self, logits: &mut [f32]) -> Result<()>;
    /// Advances past the sampled token; returns whether the constraint is complete
    /// (the generation should end with a grammar finish).
    fn commit(&mut self, token: u32) -> Result<bool>;
    /// Tokens the constraint forces next (only one continuation is possible),
    /// already committed; the engine appends them without a decode step each.
    fn forced(&mut self) -> Vec<u32> {
        Vec::new()
    }
    /// Whether the constraint reached its end (after forced tokens too).
    fn is_complete(&self) -> bool {
        false
    }
    /// Time of each mask computation so far, in microseconds.
    fn mask_times(&self) -> &[f64] {
        &[]
    }
    /// Checks the finished output for what the masks could not enforce (a JSON
    /// Schema's dropped keywords); an error names the violation.
    fn check_output(&self, _text: &str) -> Result<()> {
        Ok(())
    }
}

/// One sampling step, shared by every decode loop (the engine's sequences):
/// masks `logits` with the constraint, samples a token and commits it, then appends
/// the tokens the constraint forces (fast-forward, no decode step each). `tokens`
/// receives the new tokens, the sampled one first; the sampler observes each (for its
/// penalties). Returns whether the constraint is complete.
pub(crate) fn sample_step<C: TokenConstraint + ?Sized>(
    logits: &mut [f32],
    sampler: &mut Sampler,
    constraint: Option<&mut C>,
    tokens: &mut Vec<u32>,
) -> Result<bool> {
    let Some(c) = constraint else {
        check_logits(logits)?;
        let token = sampler.sample(logits);
        sampler.observe_generated(token);
        tokens.push(token);
        return Ok(false);
    };
    c.mask(logits)?;
    check_logits(logits)?;
    let token = sampler.sample(logits);
    sampler.observe_generated(token);
    tokens.push(token);
    if c.commit(token)? {
        return Ok(true);
    }
    let forced = c.forced();
    for &t in &forced {
        sampler.observe_generated(t);
    }
    tokens.extend(forced);
    Ok(c.is_complete())
}

/// A row of logits with a NaN cannot be sampled from (every comparison with NaN is
/// false, so the sampler would pick arbitrary tokens): an error for that sequence.
fn check_logits(logits: &[f32]) -> Result<()> {
    match logits.iter().position(|l| l.is_nan()) {
        Some(index) => Err(Error::NanLogits { index }),
        None => Ok(()),
    }
}

/// Temperatures below this are greedy.
pub const GREEDY_BELOW: f32 = 1e-5;

/// How a request's tokens are chosen.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 (or anything below [`GREEDY_BELOW`]) picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already seen in the
    /// request, prompt and generation (1.0: off).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token generated at least once (0: off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (0: off).
    pub frequency_penalty: f32,
    /// Seed of the request's generator.
    pub seed: u64,
    /// Keep generating past end-of-generation tokens, up to the request's most
    /// tokens (as serving benchmarks' `ignore_eos`): every reply then has exactly that
    /// many tokens, unless a stop string or a grammar ends it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Sampling at `temperature` with `seed`.
    pub fn with_temperature(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            seed,
            ..Self::default()
        }
    }

    /// Rejects parameters that make no sense, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |param: &'static str, want: &'static str, got: f32| {
            Err(Error::Sampling { param, want, got })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "a finite number >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "in [0, 1]", self.min_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                "a finite number > 0",
                self.repetition_penalty,
            );
        }
        if !self.presence_penalty.is_finite() {
            return bad("presence_penalty", "finite", self.presence_penalty);
        }
        if !self.frequency_penalty.is_finite() {
            return bad("frequency_penalty", "finite", self.frequency_penalty);
        }
        Ok(())
    }
}

/// The sampler of one sequence: its parameters, its generator and the token counts
/// the penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the request (prompt and generated), for the repetition penalty.
    seen: HashMap<u32, u32>,
    /// Generated tokens and their counts, for presence and frequency penalties.
    generated: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            seen: HashMap::new(),
            generated: HashMap::new(),
        })
    }

    /// Whether the request keeps generating past end-of-generation tokens
    /// ([`SamplingParams::ignore_eos`]).
    pub fn ignores_eos(&self) -> bool {
        self.params.ignore_eos
    }

    /// Records prompt tokens (they count for the repetition penalty only).
    pub fn observe_prompt(&mut self, tokens: &[u32]) {
        for &t in tokens {
            *self.seen.entry(t).or_default() += 1;
        }
    }

    /// Records a generated token.
    pub fn observe_generated(&mut self, token: u32) {
        *self.seen.entry(token).or_default() += 1;
        *self.generated.entry(token).or_default() += 1;
    }

    /// Picks the next token from `logits` (one row, vocabulary wide; overwritten:
    /// by the penalties, and when sampling by the draw's weights). Logits of -inf (masked by a grammar) are never picked
    /// unless every logit is -inf.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        if self.params.temperature < GREEDY_BELOW {
            // Dividing by a tiny temperature overflows logits to infinity (and
            // `inf - inf` is NaN): such a temperature means greedy.
            return argmax(logits);
        }
        let t = self.params.temperature;
        let p = &self.params;
        let max = logits
            .iter()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        // Unnormalised probabilities exp((l - max) / t), written over the logits
        // (no per-token allocation): the most likely has weight 1, a masked (-inf)
        // token exactly 0.
        for l in logits.iter_mut() {
            *l = if l.is_finite() {
                (*l - max) / t
            } else {
                f32::NEG_INFINITY
            };
        }
        crate::math::exp_in_place(logits);
        let w = &*logits;
        if p.top_k == 0 && p.min_p <= 0.0 && p.top_p >= 1.0 {
            // No filter: draw from every token, in vocabulary order.
            let total: f32 = w.iter().sum();
            let mut r = self.rng.random::<f32>() * total;
            let mut last = 0;
            for (i, &x) in w.iter().enumerate() {
                if x > 0.0 {
                    last = i;
                    r -= x;
                    if r <= 0.0 {
                        return i as u32;
                    }
                }
            }
            return last as u32;
        }
        let cand = filtered(w, p);
        if cand.is_empty() {
            return argmax(w);
        }
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in &cand {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }
}

/// The candidates top-k, min-p and top-p keep, most likely first, from the weights
/// `w` (the most likely token has weight 1, impossible ones 0).
///
/// Only the tokens above a weight threshold are sorted, the threshold lowered until
/// the filters are decided, so a vocabulary of 49,152 is scanned, not sorted.
fn filtered(w: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    // min_p keeps p >= min_p * p_max, and p_max has weight 1.
    let floor = p.min_p.max(0.0);
    // Without top-k, top-p's share is of every token min-p keeps.
    let target = (p.top_k == 0 && p.top_p < 1.0)
        .then(|| p.top_p * w.iter().filter(|&&x| x > 0.0 && x >= floor).sum::<f32>());
    let mut theta = 1e-2f32;
    let mut cand: Vec<(u32, f32)>;
    loop {
        let th = theta.max(floor);
        cand = w
            .iter()
            .enumerate()
            .filter(|(_, &x)| x > 0.0 && x >= th)
            .map(|(i, &x)| (i as u32, x))
            .collect();
        let complete = th <= floor || theta == 0.0;
        cand.sort_by(desc);
        if p.top_k > 0 && (cand.len() >= p.top_k || complete) {
            // Every token above the threshold is here, so these are the top k.
            cand.truncate(p.top_k);
            break;
        }
        if let Some(target) = target {
            let mut acc = 0f32;
            if let Some(i) = cand.iter().position(|c| {
                acc += c.1;
                acc >= target
            }) {
                cand.truncate(i + 1);
                return cand;
            }
        }
        if complete {
            return cand;
        }
        theta = if theta > 1e-30 { theta * 1e-3 } else { 0.0 };
    }
    // Top-k decided: top-p over what it kept.
    if p.top_p < 1.0 {
        let target = p.top_p * cand.iter().map(|c| c.1).sum::<f32>();
        let mut acc = 0f32;
        if let Some(i) = cand.iter().position(|c| {
            acc += c.1;
            acc >= target
        }) {
            cand.truncate(i + 1);
        }
    }
    cand
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).unwrap()
    }

    #[test]
    fn greedy_takes_the_largest_and_seeds_reproduce() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        assert_eq!(
            sampler(SamplingParams::greedy()).sample(&mut logits.clone()),
            1
        );
        let draw = |seed| {
            let mut s = sampler(SamplingParams::with_temperature(1.0, seed));
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let logits = vec![3.0, 2.9, 0.0, -5.0];
        let mut s = sampler(SamplingParams {
            top_k: 2,
            ..SamplingParams::with_temperature(5.0, 1)
        });
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&mut logits.clone())).collect();
        assert!(draws.iter().all(|&t| t < 2));
        // Both candidates appear (top-k written as greedy would fail here).
        assert!(draws.contains(&0) && draws.contains(&1), "{draws:?}");
        let mut s = sampler(SamplingParams {
            min_p: 0.5,
            ..SamplingParams::with_temperature(1.0, 1)
        });
        assert!((0..200).all(|_| s.sample(&mut logits.clone()) < 2));
        let mut s = sampler(SamplingParams {
            top_p: 0.1,
            ..SamplingParams::with_temperature(1.0, 1)
        });
        assert!((0..200).all(|_| s.sample(&mut logits.clone()) == 0));
    }

    #[test]
    fn penalties_move_seen_tokens_down() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        s.observe_prompt(&[0]);
        assert_eq!(s.sample(&mut [3.0, 2.0]), 1);
        let mut s = sampler(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        });
        s.observe_generated(0);
        assert_eq!(s.sample(&mut [2.5, 2.0]), 0);
        s.observe_generated(0);
        assert_eq!(s.sample(&mut [2.5, 2.0]), 1);
    }

    #[test]
    fn a_tiny_temperature_is_greedy() {
        for t in [1e-40, f32::MIN_POSITIVE, 1e-6, 9.9e-6] {
            let mut s = sampler(SamplingParams::with_temperature(t, 5));
            assert!(
                (0..50).all(|_| s.sample(&mut [0.1, 2.0, 1.9, -1.0]) == 1),
                "temperature {t}"
            );
        }
    }

    #[test]
    fn nan_logits_fail_the_step() {
        let mut s = sampler(SamplingParams::greedy());
        let mut out = Vec::new();
        let e =
            sample_step::<dyn TokenConstraint>(&mut [0.5, f32::NAN, 1.0], &mut s, None, &mut out)
                .unwrap_err();
        assert!(matches!(e, Error::NanLogits { index: 1 }), "{e}");
        assert!(out.is_empty());
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = Sampler::new(SamplingParams::with_temperature(-1.0, 0)).unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        let e = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("top_p"), "{e}");
    }
}
