//! One sequence's decode state, the same wherever tokens are generated (the engine's
//! batched steps, [`generate`] for one sequence alone, the benchmarks): its sampler
//! and grammar, the tokens waiting to be fed, the incremental detokenizer, the
//! stop-string matcher, and the one set of stop conditions with one
//! [`FinishReason`].
//!
//! A decode step is: the forward gives the logits of the last fed token;
//! [`Sequence::sample`] masks, samples and commits the next token (and the tokens the
//! grammar forces after it) into the feed; [`Sequence::advance`] emits them as text
//! and says whether a stop condition holds. What is left in the feed is what the
//! next forward consumes.

use super::stop::StopMatcher;
use super::FinishReason;
use crate::kv::KvCache;
use crate::model::{IncrementalDecoder, Model, SeqInput, Tokenizer};
use crate::sampling::{sample_step, Sampler, TokenConstraint};
use crate::Result;

/// What a sequence decodes under.
pub struct Sequence {
    /// Tokens not yet fed: the prompt's remainder, or the sampled tokens.
    pub(crate) feed: Vec<u32>,
    sampler: Sampler,
    constraint: Option<Box<dyn TokenConstraint>>,
    stop: StopMatcher,
    decoder: IncrementalDecoder,
    generated: Vec<u32>,
    text: String,
    /// A stop string ended the generation (what it held back is dropped).
    stop_hit: bool,
    max_tokens: usize,
    ignore_eos: bool,
}

/// What one [`Sequence::advance`] released.
#[derive(Debug, Default)]
pub struct Advance {
    /// The new tokens and the text each releases (possibly empty: held back for a
    /// stop string or an incomplete character).
    pub tokens: Vec<(u32, String)>,
    /// Why the generation ends, when it does.
    pub finish: Option<FinishReason>,
}

impl Sequence {
    /// A sequence that will feed `prompt`, then generate up to `max_tokens` tokens
    /// (at least one), stopping at end-of-generation tokens (unless `ignore_eos`, or
    /// the sampler's [`SamplingParams::ignore_eos`](crate::sampling::SamplingParams)),
    /// at any of `stop`, or where `constraint` completes.
    pub fn new(
        prompt: Vec<u32>,
        mut sampler: Sampler,
        constraint: Option<Box<dyn TokenConstraint>>,
        stop: &[String],
        max_tokens: usize,
        ignore_eos: bool,
    ) -> Self {
        sampler.observe_prompt(&prompt);
        let ignore_eos = ignore_eos || sampler.ignores_eos();
        Self {
            feed: prompt,
            sampler,
            constraint,
            stop: StopMatcher::new(stop),
            decoder: IncrementalDecoder::new(),
            generated: Vec::new(),
            text: String::new(),
            stop_hit: false,
            max_tokens: max_tokens.max(1),
            ignore_eos,
        }
    }

    /// Tokens waiting to be fed.
    pub fn feed(&self) -> &[u32] {
        &self.feed
    }

    /// Generated tokens so far (an end-of-generation token that ended it included).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// The grammar, to read its mask times at the end.
    pub fn constraint(&self) -> Option<&dyn TokenConstraint> {
        self.constraint.as_deref()
    }

    /// Samples the next token from the logits of the last fed token (the feed must be
    /// fully fed), with the tokens the grammar forces after it, into the feed.
    /// Returns whether the grammar is complete.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<bool> {
        self.feed.clear();
        sample_step(
            logits,
            &mut self.sampler,
            self.constraint.as_deref_mut(),
            &mut self.feed,
        )
    }

    /// Emits the sampled tokens in the feed as text and checks the stop conditions;
    /// `grammar_done` is what [`Self::sample`] returned. The tokens past a stop stay
    /// unfed and are dropped from the feed.
    pub fn advance(&mut self, tokenizer: &Tokenizer, grammar_done: bool) -> Result<Advance> {
        let mut out = Advance::default();
        let before = self.generated.len();
        let eos = tokenizer.eos_token_ids();
        for i in 0..self.feed.len() {
            let t = self.feed[i];
            self.generated.push(t);
            if eos.contains(&t) && !self.ignore_eos {
                out.finish = Some(FinishReason::Stop);
                break;
            }
            let piece = self.decoder.push(tokenizer, t)?;
            let released = self.stop.push(&piece);
            self.text.push_str(&released.text);
            out.tokens.push((t, released.text));
            if released.stopped {
                self.stop_hit = true;
                out.finish = Some(FinishReason::Stop);
                break;
            }
            if self.generated.len() >= self.max_tokens {
                out.finish = Some(FinishReason::Length);
                break;
            }
        }
        // The grammar's end counts only when its last forced token was emitted too (a
        // `max_tokens` cut inside a forced run is a `Length` end).
        let emitted = self.generated.len() - before;
        if grammar_done && !self.stop_hit && emitted == self.feed.len() {
            out.finish = Some(FinishReason::Grammar);
        }
        if out.finish.is_some() {
            self.feed.clear();
        }
        Ok(out)
    }

    /// The text held back at the end (for a possible stop string or an incomplete
    /// character), released once the generation is over; empty after a stop string.
    pub fn release_tail(&mut self) -> String {
        if self.stop_hit {
            return String::new();
        }
        let tail = self.decoder.finish();
        let tail = self.stop.push(&tail).text + &self.stop.flush();
        self.text.push_str(&tail);
        tail
    }

    /// Checks the finished text against what the grammar could not enforce while
    /// decoding (a lenient JSON Schema's dropped keywords); call it on a grammar
    /// finish, after [`Self::release_tail`].
    pub fn check_output(&self) -> Result<()> {
        match &self.constraint {
            Some(c) => c.check_output(&self.text),
            None => Ok(()),
        }
    }

    /// The generated tokens and text.
    pub fn into_output(self) -> (Vec<u32>, String) {
        (self.generated, self.text)
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Generated token ids (an end-of-generation token that ended it included).
    pub tokens: Vec<u32>,
    /// The text (stop string and end-of-generation token excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Time of each grammar mask computation (µs), when constrained.
    pub mask_times: Vec<f64>,
}

/// Generates for one sequence alone, on the calling thread: feeds `seq`'s prompt
/// into `cache`, then decodes token by token (forced tokens fed together), calling
/// `on_text` with the text as it is released. Batched serving is the
/// model actor's job; this is the plain loop of the CLI's `generate`, the benchmarks
/// and the tests, with the engine's own stop conditions.
pub fn generate(
    model: &Model,
    cache: &mut KvCache,
    mut seq: Sequence,
    mut on_text: impl FnMut(&str),
) -> Result<Generated> {
    loop {
        let logits = model.forward(&mut [SeqInput {
            tokens: &seq.feed,
            cache,
        }])?;
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let done = seq.sample(&mut row)?;
        let step = seq.advance(model.tokenizer(), done)?;
        for (_, text) in &step.tokens {
            if !text.is_empty() {
                on_text(text);
            }
        }
        if let Some(finish) = step.finish {
            let tail = seq.release_tail();
            if !tail.is_empty() {
                on_text(&tail);
            }
            if finish == FinishReason::Grammar {
                seq.check_output()?;
            }
            let mask_times = seq
                .constraint()
                .map(|c| c.mask_times().to_vec())
                .unwrap_or_default();
            let (tokens, text) = seq.into_output();
            return Ok(Generated {
                tokens,
                text,
                finish,
                mask_times,
            });
        }
    }
}
