//! The model actor and its engine: continuous batching of many sequences' generation
//! requests over one loaded model.
//!
//! A requester moves its [`KvCache`](crate::KvCache) into a [`Generate`] message with the new tokens
//! to append; the [`ModelActor`] checks the request and hands it to the engine
//! thread, which alone runs the forward (never on a tokio worker). Each step mixes
//! one decode token of every running sequence with chunks of pending prefills
//! ([`Scheduler`]). The requester reads a [`GenerationStream`] of [`Event`]s: each
//! token as it is sampled, then [`Done`] with the cache moved back. Dropping the
//! stream cancels the request at the next step.

mod actor;
pub(crate) mod cache_file;
mod gate;
mod guarded;
mod handle;
mod lease;
pub mod scheduler;
pub mod sequence;
mod spill;
mod stop;
mod worker;

use std::time::Duration;

pub use actor::{GetStats, Hold, ModelActor, Park, Spill};
pub use gate::StepGate;
pub use handle::Engine;
pub use lease::{Evict, Lease, LeaseId, LeasedCache, ParkedCache};
pub use scheduler::{HolderId, Scheduler, SchedulerConfig, SeqId, StepPlan};
pub use sequence::{generate, Generated, Sequence};

use crate::kv::KvDtype;
use crate::sampling::SamplingParams;
pub use crate::sampling::TokenConstraint;
use crate::Error;

/// Settings of one model actor's engine.
#[derive(Clone, Debug, Default)]
pub struct EngineConfig {
    /// Step token budget, running-sequence limit and KV budget.
    pub scheduler: SchedulerConfig,
    /// Element type of the caches of agents that name none: a request with
    /// [`Generate::engine_kv_dtype`] and an empty cache gets a cache of this type.
    pub kv_dtype: KvDtype,
    /// A folder to spill evicted caches to: under KV pressure an idle agent's cache
    /// (asked to [`Evict`]) or a parked one is written there, off the engine thread,
    /// and read back by its next request instead of being recomputed. The budget
    /// counts only caches in memory; each file is removed when its cache is read
    /// back, superseded or released (its agent ended). `None`: evicted caches are
    /// dropped and recomputed.
    pub spill: Option<std::path::PathBuf>,
    /// Faults to inject, for the robustness tests only.
    #[doc(hidden)]
    pub test_hooks: TestHooks,
}

/// Faults the robustness tests inject into the engine thread (all off by default),
/// and the gate through which tests hold and release its steps.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct TestHooks {
    /// Every step waits for a pass through this gate (tests that need to control
    /// when the engine steps, instead of sleeping).
    pub step_gate: Option<StepGate>,
    /// The forward panics on any step that feeds this token id.
    pub panic_in_forward_on_token: Option<u32>,
    /// The engine thread panics (outside any `catch_unwind`) when a request with
    /// this token id arrives.
    pub crash_engine_on_token: Option<u32>,
    /// The engine thread ends (as a thread that died would: no sequence is failed,
    /// their streams just close) when a request with this token id arrives.
    pub exit_engine_on_token: Option<u32>,
    /// Every spill write waits for a pass through this gate (tests that need a
    /// request to arrive while its cache is still being written).
    pub spill_gate: Option<StepGate>,
}

/// A generation request: append `tokens` to `cache`, then generate.
pub struct Generate {
    /// The requester's cache, moved in (a lease on it ends: the request accounts for
    /// it now); it comes back in [`Done`] (or in the failure or the rejection).
    pub cache: LeasedCache,
    /// A cache parked with the engine to continue from instead of `cache` (which
    /// must then be empty): taken back when the engine still holds it, otherwise
    /// recomputed from the prefix.
    pub resume: Option<Resume>,
    /// New tokens to feed after what the cache holds.
    pub tokens: Vec<u32>,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Optional grammar spec; the actor compiles it (cached) and constrains the
    /// output with it. A bad grammar rejects the request at once.
    pub grammar: Option<crate::grammar::Grammar>,
    /// Optional custom constraint (used when `grammar` is `None`).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Strings that end the generation (not part of the returned text).
    pub stop: Vec<String>,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Who holds the cache afterwards: it comes back leased (still accounted against
    /// the KV budget, with no gap in which the budget could be overrun), and under
    /// pressure the engine sends this recipient an [`Evict`] naming the lease.
    pub holder: Option<kameo::actor::WeakRecipient<Evict>>,
    /// An empty `cache` takes the engine's [`EngineConfig::kv_dtype`] (agents whose
    /// config names no dtype set this); otherwise the cache is used as given.
    pub engine_kv_dtype: bool,
    /// Who asks, for traces (an agent's name); shown on the engine's step spans.
    pub label: Option<String>,
    /// The span the request belongs to (the caller's current span when built): the
    /// engine's `admission` span for it, and that span's `step` spans, are its
    /// children, so a trace reads turn -> model call -> admission -> steps.
    pub span: tracing::Span,
}

/// A parked cache a request continues from, with the tokens it held (fed again if
/// the engine dropped it).
#[derive(Debug)]
pub struct Resume {
    /// The park.
    pub parked: ParkedCache,
    /// The tokens the request continues from, `parked.len()` of them: what the
    /// parked cache held, or its first tokens after a
    /// [`truncate`](ParkedCache::truncate) (the rest is cut).
    pub prefix: Vec<u32>,
}

impl Generate {
    /// A greedy request for up to `max_tokens` tokens.
    pub fn new(cache: impl Into<LeasedCache>, tokens: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            cache: cache.into(),
            resume: None,
            tokens,
            sampling: SamplingParams::default(),
            grammar: None,
            constraint: None,
            stop: Vec::new(),
            max_tokens,
            ignore_eos: false,
            holder: None,
            engine_kv_dtype: false,
            label: None,
            span: tracing::Span::current(),
        }
    }

    /// Tokens of context the request starts from (its cache's, or the park's).
    pub fn cached_len(&self) -> usize {
        self.resume
            .as_ref()
            .map_or(self.cache.len(), |r| r.parked.len())
    }
}

impl std::fmt::Debug for Generate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generate")
            .field("cache_len", &self.cached_len())
            .field("tokens", &self.tokens.len())
            .field("sampling", &self.sampling)
            .field("grammar", &self.grammar)
            .field("constrained", &self.constraint.is_some())
            .field("stop", &self.stop)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

/// A request the actor refused at once; the cache (and the park) are handed back
/// untouched.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Rejected {
    /// Why.
    pub error: Error,
    /// The requester's cache.
    pub cache: LeasedCache,
    /// The park the request named, still parked.
    pub resume: Option<Resume>,
}

impl Rejected {
    fn of(error: Error, g: Generate) -> Self {
        Self {
            error,
            cache: g.cache,
            resume: g.resume,
        }
    }
}

/// A generation that failed after it was accepted.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct GenerationError {
    /// What went wrong.
    pub error: Error,
    /// The requester's cache, when the engine could hand it back.
    pub cache: Option<LeasedCache>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The grammar reached an accepting end.
    Grammar,
    /// The requester went away.
    Cancelled,
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Tokens of context before generation: already cached plus new.
    pub prompt_tokens: usize,
    /// Tokens that were already in the cache (not recomputed).
    pub cached_tokens: usize,
    /// Of `cached_tokens`, tokens read back from a spill file (see
    /// [`EngineConfig::spill`]).
    #[serde(default)]
    pub restored_tokens: usize,
    /// Tokens this request ran through the model (new prompt tokens and generated
    /// tokens fed back).
    pub computed_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
}

/// Where the time of one request went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// From submission to admission into the running batch.
    pub queue: Duration,
    /// From submission to the first generated token.
    pub time_to_first_token: Duration,
    /// From the first generated token to the end.
    pub decode: Duration,
    /// The engine's step counter when the request was admitted.
    pub admitted_at_step: u64,
    /// From submission to the request's cache read back from its spill file (zero
    /// when it was not spilled).
    pub restore: Duration,
}

/// The end of a generation.
#[derive(Debug)]
pub struct Done {
    /// The requester's cache (leased to the holder the request named): it holds the
    /// context and every generated token except the last one, which was sampled but
    /// never fed (a requester's next turn feeds it with its new tokens, as it is the
    /// first token past `cache.len()`).
    pub cache: LeasedCache,
    /// Generated token ids (end-of-generation token included when it ended the
    /// generation).
    pub tokens: Vec<u32>,
    /// The generated text (stop string and end-of-generation token excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Time spent.
    pub timings: Timings,
}

/// What a generation stream yields.
#[derive(Debug)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty: text that may
    /// still be part of a stop string, or of a multi-byte character, is held back).
    Token {
        /// Token id.
        id: u32,
        /// Text released with it.
        text: String,
    },
    /// Text released at the end that no token carried: what was held back for a
    /// possible stop string or an incomplete character.
    Text {
        /// The text.
        text: String,
    },
    /// The generation ended.
    Done(Box<Done>),
    /// The generation failed; the cache is handed back (rolled back to where it was
    /// when the request arrived).
    Failed {
        /// What went wrong.
        error: Error,
        /// The requester's cache.
        cache: Box<LeasedCache>,
    },
}

/// The events of one generation. Dropping it cancels the generation (the engine
/// notices at once, even while it waits for evictions).
#[derive(Debug)]
pub struct GenerationStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    /// Wakes the engine when the stream is dropped before the end.
    wake: Option<std::sync::mpsc::Sender<worker::Command>>,
}

impl GenerationStream {
    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await;
        if matches!(ev, None | Some(Event::Done(_) | Event::Failed { .. })) {
            self.wake = None;
        }
        ev
    }

    /// Waits for the end; returns [`Done`], or the error with the cache when the
    /// engine handed it back.
    pub async fn finish(mut self) -> std::result::Result<Done, GenerationError> {
        while let Some(ev) = self.next().await {
            match ev {
                Event::Token { .. } | Event::Text { .. } => {}
                Event::Done(d) => return Ok(*d),
                Event::Failed { error, cache } => {
                    return Err(GenerationError {
                        error,
                        cache: Some(*cache),
                    })
                }
            }
        }
        Err(GenerationError {
            error: Error::EngineStopped,
            cache: None,
        })
    }
}

impl futures::Stream for GenerationStream {
    type Item = Event;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        let ev = self.rx.poll_recv(cx);
        if matches!(
            ev,
            std::task::Poll::Ready(None | Some(Event::Done(_) | Event::Failed { .. }))
        ) {
            self.wake = None;
        }
        ev
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if let Some(wake) = self.wake.take() {
            let _ = wake.send(worker::Command::Wake);
        }
    }
}

/// Counters of the engine, as the [`GetStats`] message returns them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Sequences in the running batch.
    pub running: usize,
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Forward steps run.
    pub steps: u64,
    /// `batch_sizes[n]`: steps that carried `n` sequences.
    pub batch_sizes: Vec<u64>,
    /// Largest token count of one step.
    pub max_step_tokens: usize,
    /// Tokens run through the model.
    pub tokens_computed: u64,
    /// Tokens generated.
    pub tokens_generated: u64,
    /// KV bytes of live caches now (waiting, running, idle holders).
    pub kv_live_bytes: usize,
    /// The KV budget the scheduler admits under.
    pub kv_budget_bytes: usize,
    /// Highest `kv_live_bytes` seen.
    pub kv_peak_bytes: usize,
    /// Evictions requested from idle holders.
    pub evictions_requested: u64,
    /// Requests finished (any reason).
    pub finished: u64,
    /// Requests cancelled by their requester.
    pub cancelled: u64,
    /// Waiting requests whose cache was dropped to admit the front of the queue.
    pub preempted: u64,
    /// Steps whose forward failed (an error or a caught panic); their sequences were
    /// rerun one at a time so that only the faulty one failed.
    pub failed_steps: u64,
    /// Times the engine started afresh after a panic escaped a step (or the model
    /// actor restarted a dead engine thread).
    pub engine_restarts: u64,
    /// Grammar mask computation time per token (µs), over the most recent masks of
    /// finished requests.
    pub mask_us: crate::stats::Quantiles,
    /// Time requests waited for admission (ms), over the most recent admissions.
    pub queue_ms: crate::stats::Quantiles,
    /// The longest admission wait (ms) since the engine started.
    pub queue_ms_max: f64,
    /// Caches written to the spill folder (see [`EngineConfig::spill`]).
    pub spills: u64,
    /// Bytes of the spill files written.
    pub spilled_bytes: u64,
    /// Spill writes that failed (a full or unwritable disk): those caches were
    /// dropped, and their next requests recompute them.
    pub spill_failures: u64,
    /// Requests whose cache was read back from a spill file.
    pub restores: u64,
    /// Requests that took their cache back while its spill was still being written
    /// (no read needed).
    pub restores_in_memory: u64,
    /// Spill files that could not be read back (missing, corrupt): recomputed.
    pub restore_failures: u64,
    /// Time from a request's arrival to its cache read back (ms), over the most
    /// recent restores.
    pub restore_ms: crate::stats::Quantiles,
    /// Spill files on disk now.
    pub spill_files: usize,
    /// Bytes of the spill files on disk now.
    pub spill_bytes: u64,
    /// One sample per step (the first [`TIMELINE_STEPS`]): when it ended, its rows
    /// and the KV bytes live (`troupe loadtest --plot` draws them over time).
    pub timeline: Vec<StepSample>,
}

/// Most steps [`Stats::timeline`] records.
pub const TIMELINE_STEPS: usize = 200_000;

/// One step of the engine, for plots over time.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepSample {
    /// Milliseconds since the engine started, at the end of the step.
    pub at_ms: f64,
    /// Sequences in the step.
    pub rows: usize,
    /// KV bytes of live caches after the step.
    pub kv_live_bytes: usize,
}

impl Stats {
    /// Mean sequences per step.
    pub fn mean_batch(&self) -> f64 {
        let steps: u64 = self.batch_sizes.iter().sum();
        if steps == 0 {
            return 0.0;
        }
        let seqs: u64 = self
            .batch_sizes
            .iter()
            .enumerate()
            .map(|(n, c)| n as u64 * c)
            .sum();
        seqs as f64 / steps as f64
    }

    /// Largest number of sequences in one step.
    pub fn max_batch(&self) -> usize {
        self.batch_sizes.iter().rposition(|&c| c > 0).unwrap_or(0)
    }
}
