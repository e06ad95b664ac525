//! Agent actors: each [`AgentActor`] owns its conversation, an append-only token log
//! (exactly what its KV cache holds, plus the last sampled token) and its KV cache,
//! and talks to the shared [`ModelActor`].
//!
//! A turn renders the chat template for the whole conversation and keeps only the
//! part past what the log already says, tokenizes that delta and feeds it, so a turn
//! computes only its new tokens. Between turns the agent registers its idle cache with
//! the model actor, which may ask it to evict under KV pressure; an evicted agent keeps
//! its conversation and log and re-prefills on its next turn.

mod config;
mod messages;
mod snapshot;
mod tool_format;
mod tool_run;
mod tools;
mod turn;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::Actor;

pub use config::{
    AgentConfig, ContextPolicy, ToolChoice, MAX_REPLY_TOKENS, MAX_TOOL_STEPS, MAX_TOOL_TIMEOUT_SECS,
};
pub(crate) use messages::{ask_error, unreachable, AskNested};
pub use messages::{
    ask_streaming, Ask, AskStream, AskWith, Evict, Fork, ForkVaried, GetAgentStats, History, Reset,
    Save, TokenLog,
};
pub use tool_format::CallFormat;
pub use tool_run::cap_text;
pub(crate) use tool_run::tool_callers;
pub use tools::{
    example_exchange, format_call, parse_call, tool_fn, tools_prompt, Tool, ToolCall, ToolRun,
    CALL_CLOSE, CALL_OPEN,
};

use crate::engine::{HoldCache, ModelActor, ReleaseCache, Usage};
use crate::grammar::Grammar;
use crate::kv::KvCache;
use crate::model::{Message, Model};
use crate::{Error, Result};

static NEXT_HOLDER: AtomicU64 = AtomicU64::new(1);

/// What one turn produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentReply {
    /// The final answer (or the last reply when the step limit ended the turn).
    pub text: String,
    /// Tools called during the turn, in order.
    pub tool_runs: Vec<ToolRun>,
    /// Token counts summed over the turn's model calls.
    pub usage: Usage,
    /// Tokens the agent had to recompute because its cache was evicted.
    pub recomputed_tokens: usize,
    /// Time to the first generated token of the turn.
    pub ttft: Duration,
    /// Time the turn's requests waited for admission in the model actor.
    pub queue: Duration,
    /// Wall time of the turn.
    pub elapsed: Duration,
}

/// Events of a streamed turn ([`AskStream`]).
#[derive(Clone, Debug)]
pub enum AgentEvent {
    /// Generated text.
    Token(String),
    /// The model called a tool.
    ToolCall(ToolCall),
    /// A tool returned.
    ToolResult(ToolRun),
}

/// Counters of one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, kameo::Reply)]
pub struct AgentStats {
    /// Completed turns.
    pub turns: u64,
    /// Prompt tokens reused from the cache.
    pub reused_tokens: u64,
    /// Tokens computed (prompt and fed-back generated tokens).
    pub computed_tokens: u64,
    /// Times a rendered prompt disagreed with the token log (cache truncated to the
    /// common prefix).
    pub prefix_mismatches: u64,
    /// Times the cache was evicted.
    pub evictions: u64,
    /// Tokens recomputed after evictions.
    pub recomputed_tokens: u64,
}

/// An agent: conversation, token log, KV cache, tools.
pub struct AgentActor {
    config: AgentConfig,
    model: Arc<Model>,
    engine: ActorRef<ModelActor>,
    tools: Vec<Arc<dyn Tool>>,
    messages: Vec<Message>,
    log: Vec<u32>,
    /// `None` when evicted (or never filled).
    cache: Option<KvCache>,
    holder: u64,
    self_ref: Option<WeakActorRef<AgentActor>>,
    stats: AgentStats,
    /// The state after the last completed turn, kept outside the actor so a
    /// supervised agent restarts from it after a crash.
    checkpoint: Option<Arc<std::sync::Mutex<Checkpoint>>>,
    /// What the turn in progress may undo, and who asked it.
    turn_state: turn::TurnState,
}

/// What a restarted agent resumes from.
#[derive(Debug, Clone, Default)]
struct Checkpoint {
    messages: Vec<Message>,
    log: Vec<u32>,
}

/// A supervisor for agents: spawn it once, then hand it to
/// [`AgentActor::spawn_supervised`].
#[derive(Debug, Default)]
pub struct AgentSupervisor;

impl Actor for AgentSupervisor {
    type Args = ();
    type Error = std::convert::Infallible;

    async fn on_start(_: (), _: ActorRef<Self>) -> std::result::Result<Self, Self::Error> {
        Ok(AgentSupervisor)
    }
}

impl std::fmt::Debug for AgentActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentActor")
            .field("name", &self.config.name)
            .field("messages", &self.messages.len())
            .field("log", &self.log.len())
            .finish()
    }
}

impl AgentActor {
    /// An agent over `engine` (which serves `model`). Grammars (the answer grammar and
    /// the tool-call grammar) are compiled now: a bad one fails here.
    pub fn new(
        config: AgentConfig,
        model: Arc<Model>,
        engine: ActorRef<ModelActor>,
        tools: Vec<Arc<dyn Tool>>,
    ) -> Result<Self> {
        config.validate()?;
        for name in &config.tools {
            if !tools.iter().any(|t| t.name() == name) {
                return Err(Error::InvalidInput(format!(
                    "agent `{}` lists unknown tool `{name}`",
                    config.name
                )));
            }
        }
        let tools: Vec<Arc<dyn Tool>> = if config.tools.is_empty() {
            tools
        } else {
            tools
                .into_iter()
                .filter(|t| config.tools.iter().any(|n| n == t.name()))
                .collect()
        };
        let agent = Self {
            messages: Self::initial_messages(&config, &tools, CallFormat::of(&model)),
            config,
            model,
            engine,
            tools,
            log: Vec::new(),
            cache: None,
            holder: NEXT_HOLDER.fetch_add(1, Ordering::Relaxed),
            self_ref: None,
            stats: AgentStats::default(),
            checkpoint: None,
            turn_state: turn::TurnState::default(),
        };
        // Compile every grammar the agent may use, so that errors surface now.
        for choice in [ToolChoice::Auto, ToolChoice::Required, ToolChoice::None] {
            if agent.tools.is_empty() && choice != ToolChoice::None {
                continue;
            }
            if let Some(g) = tools::reply_grammar(
                &agent.tools,
                &choice,
                agent.config.grammar.as_ref(),
                CallFormat::of(&agent.model),
            )? {
                agent.check_grammar(&g)?;
            }
        }
        if let ToolChoice::Tool(_) = &agent.config.tool_choice {
            tools::reply_grammar(
                &agent.tools,
                &agent.config.tool_choice,
                agent.config.grammar.as_ref(),
                CallFormat::of(&agent.model),
            )?;
        }
        Ok(agent)
    }

    fn check_grammar(&self, g: &Grammar) -> Result<()> {
        // Compiled by the model actor's cached compiler, so a thousand agents sharing
        // one grammar compile it once.
        let compiler = self.model.grammar_compiler()?;
        compiler.compile(g)?;
        Ok(())
    }

    fn initial_messages(
        config: &AgentConfig,
        tools: &[Arc<dyn Tool>],
        format: CallFormat,
    ) -> Vec<Message> {
        let mut system = config.system_prompt.clone();
        if !tools.is_empty() && format.needs_tools_prompt() {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(&tools::tools_prompt(tools));
        }
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(Message::system(system));
        }
        let first_example = messages.len();
        messages.extend(config.examples.iter().cloned());
        format.respell(&mut messages[first_example..]);
        messages
    }

    /// Spawns the agent as an actor.
    pub fn spawn_agent(self) -> ActorRef<AgentActor> {
        <AgentActor as Spawn>::spawn(self)
    }

    /// Spawns the agent under `supervisor`: if it crashes (panics or is killed), it
    /// restarts from its last completed turn (conversation and token log; the cache is
    /// re-prefilled on the next turn). The actor reference stays valid across restarts.
    pub async fn spawn_supervised(
        mut self,
        supervisor: &ActorRef<AgentSupervisor>,
    ) -> ActorRef<AgentActor> {
        let checkpoint = Arc::new(std::sync::Mutex::new(Checkpoint {
            messages: self.messages.clone(),
            log: self.log.clone(),
        }));
        self.checkpoint = Some(checkpoint.clone());
        let (config, model, engine, tools) = (
            self.config.clone(),
            self.model.clone(),
            self.engine.clone(),
            self.tools.clone(),
        );
        let holder = self.holder;
        // The first incarnation is this agent (with its cache); later ones are rebuilt
        // from the checkpoint.
        let first = std::sync::Mutex::new(Some(self));
        let factory = move || {
            if let Some(a) = first.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return a;
            }
            let cp = checkpoint.lock().unwrap_or_else(|p| p.into_inner()).clone();
            AgentActor {
                config: config.clone(),
                model: model.clone(),
                engine: engine.clone(),
                tools: tools.clone(),
                messages: cp.messages,
                log: cp.log,
                cache: None,
                holder,
                self_ref: None,
                stats: AgentStats::default(),
                checkpoint: Some(checkpoint.clone()),
                turn_state: turn::TurnState::default(),
            }
        };
        AgentActor::supervise_with(supervisor, factory)
            .restart_policy(kameo::supervision::RestartPolicy::Transient)
            .spawn()
            .await
    }

    fn save_checkpoint(&self) {
        if let Some(cp) = &self.checkpoint {
            *cp.lock().unwrap_or_else(|p| p.into_inner()) = Checkpoint {
                messages: self.messages.clone(),
                log: self.log.clone(),
            };
        }
    }

    async fn release_hold(&self) {
        let _ = self
            .engine
            .tell(ReleaseCache {
                holder: self.holder,
            })
            .await;
    }

    /// The callback the engine calls to ask this agent to evict.
    fn evict_handle(&self) -> Option<crate::engine::EvictFn> {
        let me = self.self_ref.clone()?;
        // Called on the engine thread: delivered from a task on the agent's runtime,
        // which waits for room in a full mailbox rather than dropping the request.
        let runtime = tokio::runtime::Handle::try_current().ok();
        Some(Arc::new(move || {
            if let Some(a) = me.upgrade() {
                match &runtime {
                    Some(rt) => {
                        rt.spawn(async move {
                            let _ = a.tell(Evict).await;
                        });
                    }
                    None => {
                        let _ = a.tell(Evict).try_send();
                    }
                }
            }
        }))
    }

    /// Registers the idle cache (after a failed turn; a finished request registers
    /// it in the engine itself).
    async fn hold(&self) {
        self.hold_idle(false).await;
    }

    /// Registers the idle cache; `in_tool_call` makes it the last to be evicted.
    async fn hold_idle(&self, in_tool_call: bool) {
        let (Some(cache), Some(evict)) = (&self.cache, self.evict_handle()) else {
            return;
        };
        if cache.bytes() == 0 {
            return;
        }
        let _ = self
            .engine
            .tell(HoldCache {
                holder: self.holder,
                bytes: cache.bytes(),
                in_tool_call,
                evict,
            })
            .await;
    }
}

impl Actor for AgentActor {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(
        mut args: Self::Args,
        me: ActorRef<Self>,
    ) -> std::result::Result<Self, Self::Error> {
        args.self_ref = Some(me.downgrade());
        // A forked or loaded agent starts with a cache: account for it (and make it
        // evictable) now rather than after its first request.
        args.hold().await;
        Ok(args)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: kameo::error::ActorStopReason,
    ) -> std::result::Result<(), Self::Error> {
        // A dead agent's cache is gone: stop accounting it.
        self.release_hold().await;
        Ok(())
    }
}

impl AgentActor {
    /// Loads an agent saved with [`Save`]; a corrupt file or one made for another
    /// model or format version gets a clear error.
    pub fn load(
        path: &std::path::Path,
        model: Arc<Model>,
        engine: ActorRef<ModelActor>,
        tools: Vec<Arc<dyn Tool>>,
    ) -> Result<Self> {
        let (snap, cache) = snapshot::load(path, &model)?;
        let mut agent = Self::new(snap.config, model, engine, tools)?;
        agent.messages = snap.messages;
        agent.log = snap.log;
        agent.cache = cache;
        Ok(agent)
    }
}
