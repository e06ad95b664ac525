//! The engine thread: the only place the forward runs. It drains commands, lets the
//! [`Scheduler`] plan a step, runs the ragged batch, samples, and streams events.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::scheduler::{HolderId, Scheduler, SeqId};
use super::stop::StopMatcher;
use super::{
    sample_step, Done, EngineConfig, Event, EvictFn, FinishReason, Generate, Stats, Timings,
    TokenConstraint, Usage,
};
use crate::kv::KvCache;
use crate::model::{IncrementalDecoder, Model, SeqInput};
use crate::sampling::Sampler;
use crate::Error;

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
}

/// Starts the engine thread; it stops when every command sender is gone and its work
/// is done.
pub(crate) fn spawn(
    model: Arc<Model>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("troupe-engine".into())
        .spawn(move || {
            let mut w = Worker {
                mask_times: std::collections::VecDeque::new(),
                model,
                sched: Scheduler::new(cfg.scheduler),
                seqs: HashMap::new(),
                holders: HashMap::new(),
                stats: Stats::default(),
            };
            w.run(rx);
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

    fn run(&mut self, rx: Receiver<Command>) {
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

        let wanted: HashMap<SeqId, usize> = plan.items.iter().copied().collect();
        let mut order = Vec::with_capacity(wanted.len());
        let mut inputs = Vec::with_capacity(wanted.len());
        for (&id, s) in self.seqs.iter_mut() {
            if let Some(&n) = wanted.get(&id) {
                order.push((id, n));
                inputs.push(SeqInput {
                    tokens: &s.feed[..n],
                    cache: &mut s.cache,
                });
            }
        }
        let _span = tracing::trace_span!("step", seqs = inputs.len()).entered();
        let result = self
            .model
            .forward(&mut inputs)
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        drop(inputs);
        self.stats.steps += 1;
        let n_seqs = order.len();
        if self.stats.batch_sizes.len() <= n_seqs {
            self.stats.batch_sizes.resize(n_seqs + 1, 0);
        }
        self.stats.batch_sizes[n_seqs] += 1;
        let n_tokens: usize = order.iter().map(|(_, n)| n).sum();
        self.stats.max_step_tokens = self.stats.max_step_tokens.max(n_tokens);
        match result {
            Ok(rows) => {
                self.stats.tokens_computed += n_tokens as u64;
                let sampled = self.sample_all(order, rows);
                for (id, outcome) in sampled {
                    self.advance(id, outcome);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (id, _) in order {
                    self.fail(id, Error::InvalidInput(format!("forward failed: {msg}")));
                }
            }
        }
        true
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
        if grammar_done && !s.stop_hit {
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

/// Runs a requester-supplied constraint callback so that a panic in it fails only
/// that sequence, never the engine thread that serves everyone else.
fn guard<T>(f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Grammar {
                kind: "constraint",
                message: format!("panicked: {what}"),
            })
        }
    }
}
