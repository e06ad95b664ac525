//! The engine thread: the only place the forward runs. It drains commands, lets the
//! [`Scheduler`] plan a step, runs the ragged batch, samples, and streams events.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

mod advance;

use super::guarded::{self, panic_text};
use super::scheduler::{HolderId, Scheduler, SeqId};
use super::stop::StopMatcher;
use super::{EngineConfig, Event, EvictFn, Generate, Stats, TestHooks, TokenConstraint, Usage};
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
    /// The request's life in the engine (`admission`, a child of the caller's span);
    /// each step it is in opens a `step` span under it.
    span: tracing::Span,
    /// Who asked (for the engine's step spans).
    label: String,
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
    /// When the engine started (the timeline's zero).
    epoch: Instant,
    /// A test hook asked the thread to end.
    exit: bool,
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
            let epoch = Instant::now();
            loop {
                let mut w = Worker {
                    mask_times: std::collections::VecDeque::new(),
                    model: model.clone(),
                    sched: Scheduler::new(cfg.scheduler.clone()),
                    seqs: HashMap::new(),
                    holders: HashMap::new(),
                    stats,
                    hooks: cfg.test_hooks,
                    epoch,
                    exit: false,
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
            if self.exit {
                return;
            }
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
                if self.exit {
                    return;
                }
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
        if self
            .hooks
            .exit_engine_on_token
            .is_some_and(|t| request.tokens.contains(&t))
        {
            // The submission is dropped with its stream's sender, as in a dead thread.
            self.exit = true;
            return;
        }
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
        let label = request.label.unwrap_or_else(|| format!("request-{id}"));
        let span = tracing::debug_span!(
            parent: &request.span,
            "admission",
            request = id,
            agent = %label,
            cached = start_len,
            new = request.tokens.len(),
            queue_ms = tracing::field::Empty,
            kv_bytes = needed_bytes,
        );
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
                span,
                label,
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
                let wait = (now - s.submitted).as_secs_f64() * 1e3;
                s.span.record("queue_ms", wait);
                tracing::debug!(parent: &s.span, queue_ms = wait, "admitted");
            }
        }
        for id in &plan.preempt {
            if let Some(mut s) = self.seqs.remove(id) {
                tracing::debug!(parent: &s.span, "preempted: its cache is dropped");
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
                tracing::debug!(holder = h, "asked to evict its idle cache");
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
        if self.stats.timeline.len() < super::TIMELINE_STEPS {
            self.stats.timeline.push(super::StepSample {
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
