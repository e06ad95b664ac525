//! The engine thread: the only place the forward runs. It drains commands, lets the
//! [`Scheduler`] plan a step, runs the ragged batch, samples, and streams events.
//!
//! It sleeps on its command channel whenever it cannot run anything, including
//! while it waits for holders to evict: every change that could unblock it (a new
//! request, a lease released, a stream dropped, a shutdown) arrives as a command.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use kameo::actor::WeakRecipient;
use tokio::sync::mpsc::UnboundedSender;

mod advance;
mod holders;
mod spilling;
mod step;

use super::guarded::panic_text;
use super::lease::{Evict, LeaseId};
use super::scheduler::{Scheduler, SeqId};
use super::sequence::Sequence;
use super::{EngineConfig, Event, Generate, Stats, TestHooks, Usage};
use crate::kv::KvCache;
use crate::model::Model;
use crate::Error;

/// What the actor (and the leases) send the engine thread.
pub(crate) enum Command {
    /// A checked request.
    Submit(Box<Submission>),
    /// Reply with the counters.
    Stats(tokio::sync::oneshot::Sender<Stats>),
    /// Account an idle cache of `bytes` held by `holder` under `lease`.
    Hold {
        lease: LeaseId,
        bytes: usize,
        holder: WeakRecipient<Evict>,
    },
    /// Hold `cache` here under `lease` (a parked cache), ending `replaces` (the
    /// lease it had, whose accounting moves over); with `spill`, write it to the
    /// spill folder at once (its holder was asked to evict it).
    Park {
        lease: LeaseId,
        cache: KvCache,
        replaces: Option<LeaseId>,
        spill: bool,
    },
    /// The spill thread wrote (or failed to write) the cache of `lease` to `path`.
    Spilled {
        lease: LeaseId,
        path: std::path::PathBuf,
        outcome: super::spill::Written,
    },
    /// The spill thread read back the cache of request `id` (its file is removed).
    Restored {
        id: SeqId,
        cache: std::result::Result<KvCache, String>,
    },
    /// A lease ended (its guard was dropped): stop accounting it; a parked cache
    /// under it is dropped.
    Release(LeaseId),
    /// Something may have changed (a stream was dropped): look again.
    Wake,
    /// The runtime to deliver evictions from (the actor's, sent when it starts).
    Runtime(tokio::runtime::Handle),
    /// Fail every request (their caches handed back) and end the thread.
    Shutdown,
}

/// A request the actor accepted.
pub(crate) struct Submission {
    pub id: SeqId,
    pub request: Generate,
    pub sampler: crate::sampling::Sampler,
    pub tx: UnboundedSender<Event>,
    pub submitted: Instant,
    /// Tokens the cache must hold room for: context, new tokens and `max_tokens`.
    pub needed_tokens: usize,
    pub needed_bytes: usize,
}

/// A request inside the engine.
struct Seq {
    cache: KvCache,
    /// The decode state (feed, sampler, grammar, stop conditions, text).
    dec: Sequence,
    /// Who holds the cache when the request ends (it comes back leased to them).
    holder: Option<WeakRecipient<Evict>>,
    tx: UnboundedSender<Event>,
    needed_tokens: usize,
    start_len: usize,
    usage: Usage,
    submitted: Instant,
    admitted: Option<Instant>,
    admitted_at_step: u64,
    first_token: Option<Instant>,
    /// How long its cache took to come back from a spill file (zero if it did not).
    restored_in: std::time::Duration,
    /// Its cache is on its way back from a spill file: it is queued (and admitted)
    /// with an empty cache, and runs once the cache is read back.
    restore: Option<spilling::Restore>,
    /// The request's life in the engine (`admission`, a child of the caller's span);
    /// each step it is in opens a `step` span under it.
    span: tracing::Span,
    /// Who asked (for the engine's step spans).
    label: String,
}

/// Who holds an idle cache the engine accounts for.
enum Holder {
    /// A requester, asked through its recipient to drop it.
    Remote(WeakRecipient<Evict>),
    /// The engine itself (a parked cache), dropped (or spilled) at once under
    /// pressure.
    Parked(KvCache),
    /// A parked cache being written to the spill folder, still in memory (and
    /// accounted) until the write ends; `then` says what its end does.
    Spilling {
        slot: super::spill::Slot,
        then: AfterSpill,
    },
    /// A cache in a spill file, not in memory (not accounted).
    Spilled {
        path: std::path::PathBuf,
        bytes: u64,
    },
}

/// What the end of a spill write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterSpill {
    /// Keep the file until a request resumes the cache.
    Keep,
    /// Read it back at once for this request (which resumed it while it was written).
    Restore(SeqId),
    /// Remove it (the lease ended while it was written).
    Remove,
}

struct Worker {
    /// Recent grammar mask times (µs), bounded.
    mask_times: std::collections::VecDeque<f64>,
    /// Recent admission waits (ms), bounded.
    queue_times: std::collections::VecDeque<f64>,
    /// Recent waits for a spilled cache to be read back (ms), bounded.
    restore_times: std::collections::VecDeque<f64>,
    /// The spill thread, when the engine spills (see [`EngineConfig::spill`]).
    spill: Option<Arc<super::spill::Spiller>>,

    model: Arc<Model>,
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    holders: HashMap<LeaseId, Holder>,
    stats: Stats,
    /// A sender on the thread's own channel, for the leases it hands out.
    me: Sender<Command>,
    /// Where evictions are delivered from.
    runtime: Option<tokio::runtime::Handle>,
    /// Faults the tests inject, and their step gate.
    hooks: TestHooks,
    /// When the engine started (the timeline's zero).
    epoch: Instant,
    /// A test hook or a shutdown asked the thread to end.
    exit: bool,
}

/// The engine thread's command channel and handle.
pub(crate) struct Thread {
    pub tx: Sender<Command>,
    pub handle: std::thread::JoinHandle<()>,
}

/// Starts the engine thread; it ends on [`Command::Shutdown`] (or when every command
/// sender is gone and its work is done). A panic that escapes a step (the forward's
/// own are caught per step) fails every sequence the engine holds and starts a fresh
/// worker on the same command channel, so no command is lost and the next request is
/// served.
pub(crate) fn spawn(model: Arc<Model>, cfg: EngineConfig) -> std::io::Result<Thread> {
    let (tx, rx) = std::sync::mpsc::channel();
    let me = tx.clone();
    let handle = std::thread::Builder::new()
        .name("troupe-engine".into())
        .spawn(move || {
            let spill = cfg.spill.as_deref().and_then(|dir| {
                let id = super::cache_file::ModelId::of(&model);
                let gate = cfg.test_hooks.spill_gate.clone();
                super::spill::Spiller::start(dir, id, me.clone(), gate)
            });
            let spill = spill.map(Arc::new);
            let mut stats = Stats::default();
            let mut runtime = None;
            let epoch = Instant::now();
            loop {
                let mut w = Worker {
                    mask_times: Default::default(),
                    queue_times: Default::default(),
                    restore_times: Default::default(),
                    spill: spill.clone(),
                    model: model.clone(),
                    sched: Scheduler::new(cfg.scheduler.clone()),
                    seqs: HashMap::new(),
                    holders: HashMap::new(),
                    stats,
                    me: me.clone(),
                    runtime: runtime.clone(),
                    hooks: cfg.test_hooks.clone(),
                    epoch,
                    exit: false,
                };
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(&rx))) {
                    Ok(()) => {
                        w.forget_spills();
                        return;
                    }
                    Err(p) => {
                        let what = panic_text(p.as_ref());
                        tracing::error!("the engine panicked ({what}); failing its sequences and starting afresh");
                        runtime = w.runtime.clone();
                        stats = w.fail_all(|| Error::EnginePanic { what: what.clone() });
                    }
                }
            }
        })?;
    Ok(Thread { tx, handle })
}

impl Worker {
    fn run(&mut self, rx: &Receiver<Command>) {
        let mut blocked = false;
        loop {
            if self.exit {
                return;
            }
            if self.sched.is_idle() || blocked {
                // Nothing to run, or only requests waiting on the KV budget: sleep
                // until a command changes that.
                match rx.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => return,
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
            if !self.gate_passed(rx) {
                return;
            }
            blocked = !self.step();
        }
    }

    /// With the tests' step gate: waits until the next step may run, taking commands
    /// meanwhile. Returns false when the thread should end.
    fn gate_passed(&mut self, rx: &Receiver<Command>) -> bool {
        let Some(gate) = self.hooks.step_gate.clone() else {
            return true;
        };
        while !self.sched.is_idle() && !gate.try_pass() {
            gate.wait_open(std::time::Duration::from_millis(1));
            loop {
                match rx.try_recv() {
                    Ok(c) => self.command(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return false,
                }
                if self.exit {
                    return false;
                }
            }
            self.drop_cancelled();
        }
        true
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(s) => self.submit(*s),
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Hold {
                lease,
                bytes,
                holder,
            } => self.hold(lease, bytes, Holder::Remote(holder)),
            Command::Park {
                lease,
                cache,
                replaces,
                spill,
            } => {
                if let Some(old) = replaces {
                    self.release(old);
                }
                let bytes = cache.bytes();
                self.hold(lease, bytes, Holder::Parked(cache));
                if spill {
                    self.spill_now(lease);
                }
            }
            Command::Spilled {
                lease,
                path,
                outcome,
            } => self.spilled(lease, path, outcome),
            Command::Restored { id, cache } => self.restored(id, cache),
            Command::Release(lease) => self.release(lease),
            // A stream was dropped: counted at once (a step gate may hold the steps).
            Command::Wake => self.drop_cancelled(),
            Command::Runtime(rt) => self.runtime = Some(rt),
            Command::Shutdown => {
                let stats = self.fail_all(|| Error::EngineStopped);
                self.stats = stats;
                self.exit = true;
            }
        }
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
            if let Some(s) = self.seqs.remove(&id) {
                tracing::debug!(parent: &s.span, "cancelled: the requester went away");
            }
            self.stats.cancelled += 1;
        }
        self.note_kv();
    }

    /// Fails one sequence; its cache is rolled back to where it was when the request
    /// arrived and handed back (leased to its holder, if any).
    fn fail(&mut self, id: SeqId, error: Error) {
        self.sched.remove(id);
        if let Some(mut s) = self.seqs.remove(&id) {
            s.cache.truncate(s.start_len);
            let cache = self.hand_back(s.cache, s.holder);
            let _ = s.tx.send(Event::Failed {
                error,
                cache: Box::new(cache),
            });
        }
        self.note_kv();
    }

    /// Fails every sequence (their caches handed back, rolled back, unleased: this
    /// engine is ending) and drops what it holds; returns the counters for the next
    /// worker.
    fn fail_all(&mut self, error: impl Fn() -> Error) -> Stats {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            if let Some(mut s) = self.seqs.remove(&id) {
                s.cache.truncate(s.start_len);
                let _ = s.tx.send(Event::Failed {
                    error: error(),
                    cache: Box::new(s.cache.into()),
                });
            }
        }
        self.forget_spills();
        self.holders.clear();
        let mut stats = std::mem::take(&mut self.stats);
        if matches!(error(), Error::EnginePanic { .. }) {
            stats.engine_restarts += 1;
        }
        stats
    }

    fn note_kv(&mut self) {
        let live = self.sched.live_bytes();
        self.stats.kv_live_bytes = live;
        self.stats.kv_peak_bytes = self.stats.kv_peak_bytes.max(live);
    }

    fn stats(&self) -> Stats {
        let (running, waiting) = self.sched.counts();
        let masks: Vec<f64> = self.mask_times.iter().copied().collect();
        let queues: Vec<f64> = self.queue_times.iter().copied().collect();
        let restores: Vec<f64> = self.restore_times.iter().copied().collect();
        let (spill_files, spill_bytes) = self.spill_files();
        Stats {
            running,
            waiting,
            kv_live_bytes: self.sched.live_bytes(),
            kv_budget_bytes: self.sched.config().kv_budget_bytes,
            mask_us: crate::stats::Quantiles::of(&masks),
            queue_ms: crate::stats::Quantiles::of(&queues),
            restore_ms: crate::stats::Quantiles::of(&restores),
            spill_files,
            spill_bytes,
            ..self.stats.clone()
        }
    }
}
