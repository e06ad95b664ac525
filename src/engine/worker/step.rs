//! One engine step: admit, preempt and evict as the [`Scheduler`](super::Scheduler)
//! plans, check each sequence, run the ragged forward (each sequence alone when the
//! batch fails, so only the faulty one fails), then sample and advance.

use std::collections::HashMap;
use std::time::Instant;

use super::super::guarded;
use super::super::Event;
use super::{SeqId, Worker};
use crate::model::SeqInput;
use crate::Error;

/// The logits rows of a step, one per sequence, or why the step failed.
type StepRows = crate::Result<Vec<Vec<f32>>>;

/// Most recent admission waits kept for [`Stats::queue_ms`](super::Stats).
const QUEUE_SAMPLES: usize = 20_000;

impl Worker {
    /// The spans of the step about to run: the engine's `engine_step` (entered: its
    /// rows, decode and prefill tokens, KV bytes live and the agents in it), and one
    /// `step` under each sequence's `admission`. They close when the value drops.
    fn step_spans(
        &self,
        wanted: &HashMap<SeqId, usize>,
    ) -> (tracing::span::EnteredSpan, Vec<tracing::Span>) {
        let decode = wanted.values().filter(|&&n| n == 1).count();
        let tokens: usize = wanted.values().sum();
        let engine = tracing::debug_span!(
            "engine_step",
            step = self.stats.steps,
            rows = wanted.len(),
            decode_tokens = decode,
            prefill_tokens = tokens - decode,
            kv_live_bytes = self.sched.live_bytes(),
            agents = tracing::field::Empty,
        );
        if engine.is_disabled() {
            return (engine.entered(), Vec::new());
        }
        let mut agents = Vec::with_capacity(wanted.len());
        let mut seqs = Vec::with_capacity(wanted.len());
        for (id, &n) in wanted {
            if let Some(s) = self.seqs.get(id) {
                agents.push(s.label.as_str());
                seqs.push(tracing::debug_span!(parent: &s.span, "step", step = self.stats.steps, tokens = n, rows = wanted.len()));
            }
        }
        agents.sort_unstable();
        engine.record("agents", agents.join(",").as_str());
        (engine.entered(), seqs)
    }

    /// Plans and runs one step. Returns false when nothing could run (the queue waits
    /// for evictions), true otherwise.
    pub(super) fn step(&mut self) -> bool {
        let seqs = &self.seqs;
        let plan = self
            .sched
            .plan(|id| seqs.get(&id).map_or(0, |s| s.dec.feed.len()));
        let now = Instant::now();
        for id in &plan.admitted {
            if let Some(s) = self.seqs.get_mut(id) {
                if s.restore.is_none() {
                    // (A cache read back from a spill file reserves when it arrives.)
                    s.cache.reserve_exact(s.needed_tokens);
                }
                s.admitted = Some(now);
                s.admitted_at_step = self.stats.steps;
                let wait = (now - s.submitted).as_secs_f64() * 1e3;
                s.span.record("queue_ms", wait);
                self.queue_times.push_back(wait);
                if self.queue_times.len() > QUEUE_SAMPLES {
                    self.queue_times.pop_front();
                }
                self.stats.queue_ms_max = self.stats.queue_ms_max.max(wait);
                tracing::debug!(parent: &s.span, queue_ms = wait, "admitted");
            }
        }
        for &id in &plan.admitted {
            // Its bytes are accounted now: its spilled cache may come back.
            self.start_read(id);
        }
        for id in &plan.preempt {
            if self.spill_waiting(*id) {
                self.stats.preempted += 1;
                continue;
            }
            if let Some(mut s) = self.seqs.remove(id) {
                tracing::debug!(parent: &s.span, "preempted: its cache is dropped");
                s.cache.clear();
                self.stats.preempted += 1;
                let _ = s.tx.send(Event::Failed {
                    error: Error::Preempted,
                    cache: Box::new(s.cache.into()),
                });
            }
        }
        let freed = self.evict(&plan.evict);
        self.note_kv();
        if plan.items.is_empty() {
            // Parked caches dropped just now may admit the queue at once.
            return freed || self.sched.is_idle();
        }

        // Each sequence is checked alone first, so one bad sequence fails alone.
        let mut wanted: HashMap<SeqId, usize> = HashMap::with_capacity(plan.items.len());
        let mut restoring = false;
        for &(id, n) in &plan.items {
            let checked = match self.seqs.get(&id) {
                // Its cache is still on its way back from a spill file.
                Some(s) if s.restore.is_some() => {
                    restoring = true;
                    continue;
                }
                Some(s) => self.validate(s, n),
                None => continue,
            };
            match checked {
                Ok(()) => {
                    wanted.insert(id, n);
                }
                Err(e) => self.fail(id, e),
            }
        }
        if wanted.is_empty() {
            // Only reads to wait for: sleep until one ends (it arrives as a command).
            return !restoring;
        }
        let _step = self.step_spans(&wanted);
        let (order, result) = self.forward_rows(&wanted);
        match result {
            Ok(rows) => {
                for (id, sampled) in self.sample_all(order, rows) {
                    self.advance(id, sampled);
                }
            }
            Err(e) if order.len() == 1 => self.fail(order[0].0, e),
            Err(e) => {
                // The batch failed (an error or a panic): run each sequence alone, so
                // only the one that causes it fails and the others go on with the
                // tokens they would have had anyway (the forward is batch-invariant).
                tracing::warn!(
                    "a batched step of {} sequences failed ({e}); rerunning each alone",
                    order.len()
                );
                for (id, n) in order {
                    let (_, alone) = self.forward_rows(&HashMap::from([(id, n)]));
                    match alone.map(|mut rows| rows.pop()) {
                        Ok(Some(row)) => {
                            for (id, sampled) in self.sample_all(vec![(id, n)], vec![row]) {
                                self.advance(id, sampled);
                            }
                        }
                        Ok(None) => self.fail(
                            id,
                            Error::Forward {
                                what: "the forward returned no logits".into(),
                            },
                        ),
                        Err(e) => self.fail(id, e),
                    }
                }
            }
        }
        true
    }

    /// Checks one sequence before it joins a batch: the forward would reject the
    /// whole batch for it.
    fn validate(&self, s: &super::Seq, n: usize) -> crate::Result<()> {
        let cfg = self.model.config();
        s.cache.check_layout(cfg.kv_layout())?;
        let tokens = s.dec.feed.get(..n).ok_or_else(|| Error::Forward {
            what: format!("a step of {n} tokens for a feed of {}", s.dec.feed.len()),
        })?;
        if tokens.is_empty() {
            return Err(Error::Forward {
                what: "a step with no tokens".into(),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab_size: cfg.vocab_size,
            });
        }
        match s.cache.len().checked_add(n) {
            Some(needed) if needed <= cfg.context_length => Ok(()),
            needed => Err(Error::ContextOverflow {
                needed: needed.unwrap_or(usize::MAX),
                context: cfg.context_length,
            }),
        }
    }

    /// Runs the forward over the sequences of `wanted` (id to tokens fed), under
    /// `catch_unwind`: returns the order the rows come in and the logits rows, or the
    /// error (a panic becomes [`Error::EnginePanic`]), with every cache back at its
    /// length before the step.
    fn forward_rows(&mut self, wanted: &HashMap<SeqId, usize>) -> (Vec<(SeqId, usize)>, StepRows) {
        let mut order = Vec::with_capacity(wanted.len());
        let mut inputs = Vec::with_capacity(wanted.len());
        let mut lens = Vec::with_capacity(wanted.len());
        for (&id, s) in self.seqs.iter_mut() {
            if let Some(&n) = wanted.get(&id) {
                order.push((id, n));
                lens.push(s.cache.len());
                inputs.push(SeqInput {
                    tokens: &s.dec.feed[..n],
                    cache: &mut s.cache,
                });
            }
        }
        let result = guarded::forward(
            &self.model,
            &mut inputs,
            &lens,
            self.hooks.panic_in_forward_on_token,
        );
        drop(inputs);
        self.stats.steps += 1;
        let n_seqs = order.len();
        if self.stats.batch_sizes.len() <= n_seqs {
            self.stats.batch_sizes.resize(n_seqs + 1, 0);
        }
        self.stats.batch_sizes[n_seqs] += 1;
        if self.stats.timeline.len() < super::super::TIMELINE_STEPS {
            self.stats.timeline.push(super::super::StepSample {
                at_ms: self.epoch.elapsed().as_secs_f64() * 1e3,
                rows: n_seqs,
                kv_live_bytes: self.sched.live_bytes(),
            });
        }
        let n_tokens: usize = order.iter().map(|(_, n)| n).sum();
        self.stats.max_step_tokens = self.stats.max_step_tokens.max(n_tokens);
        if result.is_ok() {
            self.stats.tokens_computed += n_tokens as u64;
        } else {
            self.stats.failed_steps += 1;
        }
        (order, result)
    }
}
