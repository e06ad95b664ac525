//! After a step's forward: every sequence samples its next tokens (in parallel:
//! grammar masks are the costly part), then streams them and stops on its own stop
//! conditions, or finishes and hands its cache back.

use std::collections::HashMap;
use std::time::Instant;

use super::super::{sample_step, Done, Event, FinishReason, Timings};
use super::guarded::guard;
use super::{SeqId, Worker};

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
            s.feed.drain(..n);
            s.usage.computed_tokens += n;
            if !s.feed.is_empty() {
                // A prefill chunk: the logits of a mid-prompt token are not needed.
                self.sched.set_to_feed(id, s.feed.len());
                continue;
            }
            jobs.push((id, s, row));
        }
        jobs.par_iter_mut()
            .map(|(id, s, logits)| {
                // The sampled token and the ones the grammar forces after it, fed
                // together in the next step (`feed` is empty here).
                let done = guard(|| {
                    sample_step(
                        logits,
                        &mut s.sampler,
                        s.constraint.as_deref_mut(),
                        &mut s.feed,
                    )
                });
                (*id, done)
            })
            .collect()
    }

    /// Streams the tokens a sequence sampled this step and ends it when a stop
    /// condition holds.
    pub(super) fn advance(&mut self, id: SeqId, sampled: crate::Result<bool>) {
        let model = self.model.clone();
        let eos = model.tokenizer().eos_token_ids();
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
        let now = Instant::now();
        if s.first_token.is_none() {
            s.first_token = Some(now);
        }
        let mut finish = None;
        let before = s.generated.len();
        for i in 0..s.feed.len() {
            let t = s.feed[i];
            s.generated.push(t);
            s.usage.generated_tokens += 1;
            self.stats.tokens_generated += 1;
            if eos.contains(&t) && !s.ignore_eos {
                finish = Some(FinishReason::Stop);
                break;
            }
            let piece = match s.decoder.push(model.tokenizer(), t) {
                Ok(p) => p,
                Err(e) => {
                    self.fail(id, e);
                    return;
                }
            };
            let released = s.stop.push(&piece);
            s.text.push_str(&released.text);
            let _ = s.tx.send(Event::Token {
                id: t,
                text: released.text,
            });
            if released.stopped {
                s.stop_hit = true;
                finish = Some(FinishReason::Stop);
                break;
            }
            if s.generated.len() >= s.max_tokens {
                finish = Some(FinishReason::Length);
                break;
            }
        }
        // The grammar's end counts only when its last forced token was emitted too (a
        // `max_tokens` cut inside a forced run is a `Length` end).
        let emitted_all = s.generated.len() - before == s.feed.len();
        if grammar_done && !s.stop_hit && emitted_all {
            finish = Some(FinishReason::Grammar);
        }
        match finish {
            Some(f) => self.finish(id, f),
            None => {
                let n = s.feed.len();
                self.sched.set_to_feed(id, n);
            }
        }
    }

    pub(super) fn finish(&mut self, id: SeqId, finish: FinishReason) {
        self.sched.remove(id);
        let Some(mut s) = self.seqs.remove(&id) else {
            return;
        };
        if !s.stop_hit {
            // Release what was held back for a possible stop string or character.
            let tail = s.decoder.finish();
            let tail = s.stop.push(&tail).text + &s.stop.flush();
            if !tail.is_empty() {
                s.text.push_str(&tail);
                let _ = s.tx.send(Event::Text { text: tail });
            }
        }
        if let Some(c) = &s.constraint {
            self.mask_times.extend(c.mask_times());
            let excess = self.mask_times.len().saturating_sub(20_000);
            self.mask_times.drain(..excess);
        }
        if let Some((holder, evict)) = s.holder.take() {
            // The cache goes back to an idle holder: still accounted, now evictable.
            self.hold_idle(holder, s.cache.bytes(), false, evict);
        }
        let now = Instant::now();
        let first = s.first_token.unwrap_or(now);
        let done = Done {
            cache: s.cache,
            tokens: s.generated,
            text: s.text,
            finish,
            usage: s.usage,
            timings: Timings {
                queue: s.admitted.unwrap_or(now) - s.submitted,
                time_to_first_token: first - s.submitted,
                decode: now - first,
                admitted_at_step: s.admitted_at_step,
            },
        };
        self.stats.finished += 1;
        let _ = s.tx.send(Event::Done(Box::new(done)));
    }
}
