//! After a step's forward: every sequence samples its next tokens (in parallel:
//! grammar masks are the costly part), then streams them and stops on its own stop
//! conditions, or finishes and hands its cache back.

use std::collections::HashMap;
use std::time::Instant;

use super::super::guarded::guard;
use super::super::{Done, Event, FinishReason, Timings};
use super::{SeqId, Worker};

/// Most recent grammar mask times kept for [`Stats::mask_us`](super::Stats).
const MASK_SAMPLES: usize = 20_000;

impl Worker {
    /// Takes every sequence of a step past it: drops the fed tokens, and for those
    /// whose prompt is done, masks, samples and commits their next tokens. The
    /// sequences sample in parallel (grammar masks are the costly part), each on its
    /// own state, so the result does not depend on the order.
    pub(super) fn sample_all(
        &mut self,
        order: Vec<(SeqId, usize)>,
        rows: Vec<Vec<f32>>,
    ) -> Vec<(SeqId, crate::Result<bool>)> {
        use rayon::prelude::*;
        let mut fed: HashMap<SeqId, (usize, Vec<f32>)> = order
            .into_iter()
            .zip(rows)
            .map(|((id, n), row)| (id, (n, row)))
            .collect();
        let mut jobs = Vec::with_capacity(fed.len());
        for (&id, s) in self.seqs.iter_mut() {
            let Some((n, row)) = fed.remove(&id) else {
                continue;
            };
            s.dec.feed.drain(..n);
            s.usage.computed_tokens += n;
            if !s.dec.feed.is_empty() {
                // A prefill chunk: the logits of a mid-prompt token are not needed.
                self.sched.set_to_feed(id, s.dec.feed.len());
                continue;
            }
            jobs.push((id, s, row));
        }
        jobs.par_iter_mut()
            .map(|(id, s, logits)| (*id, guard(|| s.dec.sample(logits))))
            .collect()
    }

    /// Streams the tokens a sequence sampled this step and ends it when a stop
    /// condition holds.
    pub(super) fn advance(&mut self, id: SeqId, sampled: crate::Result<bool>) {
        let model = self.model.clone();
        let grammar_done = match sampled {
            Ok(done) => done,
            Err(e) => {
                self.fail(id, e);
                return;
            }
        };
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        s.first_token.get_or_insert_with(Instant::now);
        let step = match s.dec.advance(model.tokenizer(), grammar_done) {
            Ok(step) => step,
            Err(e) => {
                self.fail(id, e);
                return;
            }
        };
        let new = s.dec.generated().len() - s.usage.generated_tokens;
        s.usage.generated_tokens += new;
        self.stats.tokens_generated += new as u64;
        for (id, text) in step.tokens {
            let _ = s.tx.send(Event::Token { id, text });
        }
        match step.finish {
            Some(f) => self.finish(id, f),
            None => {
                let n = s.dec.feed.len();
                self.sched.set_to_feed(id, n);
            }
        }
    }

    pub(super) fn finish(&mut self, id: SeqId, finish: FinishReason) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let tail = s.dec.release_tail();
        if !tail.is_empty() {
            let _ = s.tx.send(Event::Text { text: tail });
        }
        if finish == FinishReason::Grammar {
            if let Err(error) = s.dec.check_output() {
                // The output broke what the grammar could not enforce: a failure, the
                // cache rolled back as for any other.
                self.fail(id, error);
                return;
            }
        }
        self.sched.remove(id);
        let Some(s) = self.seqs.remove(&id) else {
            return;
        };
        if let Some(c) = s.dec.constraint() {
            self.mask_times.extend(c.mask_times());
            let excess = self.mask_times.len().saturating_sub(MASK_SAMPLES);
            self.mask_times.drain(..excess);
        }
        let now = Instant::now();
        let first = s.first_token.unwrap_or(now);
        let (tokens, text) = s.dec.into_output();
        let cache = self.hand_back(s.cache, s.holder);
        let done = Done {
            cache,
            tokens,
            text,
            finish,
            usage: s.usage,
            timings: Timings {
                queue: s.admitted.unwrap_or(now) - s.submitted,
                time_to_first_token: first - s.submitted,
                decode: now - first,
                admitted_at_step: s.admitted_at_step,
                restore: s.restored_in,
            },
        };
        self.stats.finished += 1;
        let _ = s.tx.send(Event::Done(Box::new(done)));
    }
}
