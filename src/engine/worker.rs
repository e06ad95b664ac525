//! The engine thread: the only place the forward runs. It drains commands, lets the
//! [`Scheduler`] plan a step, runs the ragged batch, samples, and streams events.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::guarded::{self, guard, panic_text};
use super::scheduler::{HolderId, Scheduler, SeqId};
use super::stop::StopMatcher;
use super::{
    sample_step, Done, EngineConfig, Event, EvictFn, FinishReason, Generate, Stats, TestHooks,
    Timings, TokenConstraint, Usage,
};
use crate::kv::KvCache;
use crate::model::{IncrementalDecoder, Model, SeqInput};
use crate::sampling::Sampler;
use crate::Error;

/// The logits rows of a step, one per sequence, or why the step failed.
type StepRows = crate::Result<Vec<Vec<f32>>>;

/// What the actor sends the engine thread.
pub(crate) enum Command {
    /// A checked request.
    Submit(Box<Submission>),
    /// Reply with the counters.
    Stats(tokio::sync::oneshot::Sender<Stats>),
    /// An idle cache held outside the engine.
    Hold {
        holder: HolderId,
        bytes: usize,
        last: bool,
        evict: EvictFn,
    },
    /// The holder took its cache back or dropped it.
    Release { holder: HolderId },
}

/// A request the actor accepted.
pub(crate) struct Submission {
    pub id: SeqId,
    pub request: Generate,
    pub sampler: Sampler,
    pub tx: UnboundedSender<Event>,
    pub submitted: Instant,
    /// Tokens the cache must hold room for: context, new tokens and `max_tokens`.
    pub needed_tokens: usize,
    pub needed_bytes: usize,
}

/// A request inside the engine.
struct Seq {
    cache: KvCache,
    /// Tokens not yet fed: the prompt's remainder, or the last sampled token.
    feed: Vec<u32>,
    sampler: Sampler,
    constraint: Option<Box<dyn TokenConstraint>>,
    stop: StopMatcher,
    decoder: IncrementalDecoder,
    generated: Vec<u32>,
    text: String,
    /// A stop string ended the generation (what it held back is dropped).
    stop_hit: bool,
    /// The requester registers its cache as idle when the request ends.
    holder: Option<(HolderId, EvictFn)>,
    max_tokens: usize,
    ignore_eos: bool,
    tx: UnboundedSender<Event>,
    needed_tokens: usize,
    start_len: usize,
    usage: Usage,
    submitted: Instant,
    admitted: Option<Instant>,
    admitted_at_step: u64,
    first_token: Option<Instant>,
}

struct Worker {
    /// Recent grammar mask times (µs), bounded.
    mask_times: std::collections::VecDeque<f64>,
    model: Arc<Model>,
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    holders: HashMap<HolderId, EvictFn>,
    stats: Stats,
    /// Faults the tests inject.
    hooks: TestHooks,
}

/// Starts the engine thread; it stops when every command sender is gone and its work
/// is done. A panic that escapes a step (the forward's own are caught per step) fails
/// every sequence the engine holds and starts a fresh worker on the same command
/// channel, so no command is lost and the next request is served.
pub(crate) fn spawn(
    model: Arc<Model>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("troupe-engine".into())
        .spawn(move || {
            let mut stats = Stats::default();
            loop {
                let mut w = Worker {
                    mask_times: std::collections::VecDeque::new(),
                    model: model.clone(),
                    sched: Scheduler::new(cfg.scheduler.clone()),
                    seqs: HashMap::new(),
                    holders: HashMap::new(),
                    stats,
                    hooks: cfg.test_hooks,
                };
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(&rx))) {
                    Ok(()) => return,
                    Err(p) => {
                        let what = panic_text(p.as_ref());
                        tracing::error!("the engine panicked ({what}); failing its sequences and starting afresh");
                        stats = w.fail_all(&what);
                    }
                }
            }
        })
}

impl Worker {
    /// An idle cache of `holder`: accounted by the scheduler, evictable through `evict`.
    fn hold_idle(&mut self, holder: HolderId, bytes: usize, last: bool, evict: EvictFn) {
        self.sched.hold(holder, bytes, last);
        self.holders.insert(holder, evict);
    }

    /// `holder`'s idle cache is gone (taken into a request, or dropped).
    fn release_idle(&mut self, holder: HolderId) {
        self.sched.release(holder);
        self.holders.remove(&holder);
    }

    fn run(&mut self, rx: &Receiver<Command>) {
        let mut waiting_on_evictions = false;
        loop {
            if self.sched.is_idle() || waiting_on_evictions {
                // Nothing to run (or only requests blocked on the KV budget): wait.
                let timeout = if waiting_on_evictions {
                    Duration::from_millis(5)
                } else {
                    Duration::from_secs(3600)
                };
                match rx.recv_timeout(timeout) {
                    Ok(c) => self.command(c),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        if self.sched.is_idle() {
                            return;
                        }
                    }
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.command(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.sched.is_idle() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            waiting_on_evictions = !self.step();
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(s) => self.submit(*s),
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Hold {
                holder,
                bytes,
                last,
                evict,
            } => {
                self.hold_idle(holder, bytes, last, evict);
                self.note_kv();
            }
            Command::Release { holder } => self.release_idle(holder),
        }
    }

    fn submit(&mut self, s: Submission) {
        let Submission {
            id,
            request,
            mut sampler,
            tx,
            submitted,
            needed_tokens,
            needed_bytes,
        } = s;
        if let Some(t) = self.hooks.crash_engine_on_token {
            if request.tokens.contains(&t) {
                // Outside every `catch_unwind`: the engine thread dies.
                panic!("test hook: the engine thread crashes on token {t}");
            }
        }
        let start_len = request.cache.len();
        sampler.observe_prompt(&request.tokens);
        if let Some((holder, _)) = &request.holder {
            // The holder's idle cache is this request's cache now.
            self.release_idle(*holder);
        }
        self.sched.submit(id, request.cache.bytes(), needed_bytes);
        self.seqs.insert(
            id,
            Seq {
                usage: Usage {
                    prompt_tokens: start_len + request.tokens.len(),
                    cached_tokens: start_len,
                    ..Usage::default()
                },
                cache: request.cache,
                feed: request.tokens,
                sampler,
                constraint: request.constraint,
                stop: StopMatcher::new(&request.stop),
                decoder: IncrementalDecoder::new(),
                generated: Vec::new(),
                text: String::new(),
                stop_hit: false,
                holder: request.holder,
                max_tokens: request.max_tokens,
                ignore_eos: request.ignore_eos,
                tx,
                needed_tokens,
                start_len,
                submitted,
                admitted: None,
                admitted_at_step: 0,
                first_token: None,
            },
        );
        self.note_kv();
    }

    /// Removes the sequences whose requester dropped its stream; their caches are
    /// dropped with them.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.sched.remove(id);
            self.seqs.remove(&id);
            self.stats.cancelled += 1;
        }
    }

    /// Plans and runs one step. Returns false when nothing could run (the queue waits
    /// for evictions), true otherwise.
    fn step(&mut self) -> bool {
        let seqs = &self.seqs;
        let plan = self
            .sched
            .plan(|id| seqs.get(&id).map_or(0, |s| s.feed.len()));
        let now = Instant::now();
        for id in &plan.admitted {
            if let Some(s) = self.seqs.get_mut(id) {
                s.cache.reserve_exact(s.needed_tokens);
                s.admitted = Some(now);
                s.admitted_at_step = self.stats.steps;
            }
        }
        for id in &plan.preempt {
            if let Some(mut s) = self.seqs.remove(id) {
                s.cache.clear();
                self.stats.preempted += 1;
                let _ = s.tx.send(Event::Failed {
                    error: Error::Preempted,
                    cache: Box::new(s.cache),
                });
            }
        }
        for h in &plan.evict {
            if let Some(evict) = self.holders.get(h) {
                evict();
                self.stats.evictions_requested += 1;
            }
        }
        self.note_kv();
        if plan.items.is_empty() {
            return self.sched.is_idle();
        }

        // Each sequence is checked alone first, so one bad sequence fails alone.
        let mut wanted: HashMap<SeqId, usize> = HashMap::with_capacity(plan.items.len());
        for &(id, n) in &plan.items {
            let checked = match self.seqs.get(&id) {
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
            return true;
        }
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
                        Ok(None) => {
                            self.fail(id, Error::InvalidInput("forward returned no logits".into()))
                        }
                        Err(e) => self.fail(id, e),
                    }
                }
            }
        }
        true
    }

    /// Checks one sequence before it joins a batch: the forward would reject the
    /// whole batch for it.
    fn validate(&self, s: &Seq, n: usize) -> crate::Result<()> {
        let cfg = self.model.config();
        s.cache.check_layout(cfg.kv_layout())?;
        let tokens = s.feed.get(..n).ok_or_else(|| {
            Error::InvalidInput(format!(
                "a step of {n} tokens for a feed of {}",
                s.feed.len()
            ))
        })?;
        if tokens.is_empty() {
            return Err(Error::InvalidInput("a step with no tokens".into()));
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
                    tokens: &s.feed[..n],
                    cache: &mut s.cache,
                });
            }
        }
        let _span = tracing::trace_span!("step", seqs = inputs.len()).entered();
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
        let n_tokens: usize = order.iter().map(|(_, n)| n).sum();
        self.stats.max_step_tokens = self.stats.max_step_tokens.max(n_tokens);
        if result.is_ok() {
            self.stats.tokens_computed += n_tokens as u64;
        } else {
            self.stats.failed_steps += 1;
        }
        (order, result)
    }

    /// Takes every sequence of a step past it: drops the fed tokens, and for those
    /// whose prompt is done, masks, samples and commits their next tokens. The
    /// sequences sample in parallel (grammar masks are the costly part), each on its
    /// own state, so the result does not depend on the order.
    fn sample_all(
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
    fn advance(&mut self, id: SeqId, sampled: crate::Result<bool>) {
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

    fn finish(&mut self, id: SeqId, finish: FinishReason) {
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

    fn fail(&mut self, id: SeqId, error: Error) {
        self.sched.remove(id);
        if let Some(mut s) = self.seqs.remove(&id) {
            s.cache.truncate(s.start_len);
            let _ = s.tx.send(Event::Failed {
                error,
                cache: Box::new(s.cache),
            });
        }
    }

    /// After a panic escaped a step: fails every sequence (their caches handed back,
    /// rolled back) and returns the counters for the next worker. The idle holders
    /// are forgotten: they register again with their next request.
    fn fail_all(&mut self, what: &str) -> Stats {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            if let Some(mut s) = self.seqs.remove(&id) {
                s.cache.truncate(s.start_len);
                let _ = s.tx.send(Event::Failed {
                    error: Error::EnginePanic { what: what.into() },
                    cache: Box::new(s.cache),
                });
            }
        }
        let mut stats = std::mem::take(&mut self.stats);
        stats.engine_restarts += 1;
        stats
    }

    fn note_kv(&mut self) {
        let live = self.sched.live_bytes();
        self.stats.kv_live_bytes = live;
        self.stats.kv_peak_bytes = self.stats.kv_peak_bytes.max(live);
    }

    fn stats(&self) -> Stats {
        let (running, waiting) = self.sched.counts();
        let (front, back) = self.mask_times.as_slices();
        let masks = crate::bench::MaskQuantiles::of(&[front, back].concat());
        Stats {
            running,
            waiting,
            kv_live_bytes: self.sched.live_bytes(),
            mask_us_p50: masks.p50,
            mask_us_p99: masks.p99,
            ..self.stats.clone()
        }
    }
}
