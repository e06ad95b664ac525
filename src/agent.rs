//! Agent actors: each [`AgentActor`] owns a [`Conversation`] (messages, an
//! append-only token log that is exactly what its KV cache holds plus the last
//! sampled token, and the cache itself) and talks to the shared model actor through
//! an [`Engine`].
//!
//! A turn appends only what the new messages add to the log and feeds the tokens past
//! what the cache holds, so a turn computes only its new tokens. Between turns the
//! agent holds its cache under a lease; the engine may ask it to [`Evict`] under KV
//! pressure. During a tool call the cache is parked with the engine, which may drop
//! it at once. An evicted agent keeps its conversation and re-prefills on its next
//! turn, or, with an engine that spills ([`EngineConfig::spill`]), hands its cache to
//! the engine's spill folder and reads it back on its next turn. See
//! `ARCHITECTURE.md` for the sequence of one turn.
//!
//! [`EngineConfig::spill`]: crate::engine::EngineConfig::spill

mod complete;
mod config;
mod conversation;
mod mcp;
mod messages;
mod snapshot;
mod supervision;
mod tool_format;
mod tool_run;
mod tools;
mod turn;

use std::sync::Arc;
use std::time::Duration;

use kameo::actor::{ActorRef, Spawn, WeakActorRef, WeakRecipient};
use kameo::Actor;

pub use complete::{Complete, Completion};
pub use config::{
    AgentConfig, ContextPolicy, ToolChoice, MAX_REPLY_TOKENS, MAX_TOOL_STEPS, MAX_TOOL_TIMEOUT_SECS,
};
pub use conversation::{CacheSlot, Conversation, SyncWork, Undo};
pub use mcp::{
    server_tools, McpServerConfig, McpTool, McpToolbox, RemoteTool, SchemaMode, ServerLink,
    DEFAULT_STARTUP_TIMEOUT_SECS,
};
pub(crate) use messages::{ask_error, unreachable, AskNested};
pub use messages::{
    ask_streaming, Ask, CacheBytes, Fork, GetAgentStats, History, Reset, Save, TokenLog,
    TurnOptions,
};
pub use supervision::AgentSupervisor;
pub use tool_format::CallFormat;
pub use tool_run::cap_text;
pub(crate) use tool_run::tool_callers;
pub use tools::{
    example_exchange, format_call, parse_call, reply_grammar, tool_fn, tools_prompt, Tool,
    ToolCall, ToolRun, CALL_CLOSE, CALL_OPEN,
};

pub use crate::engine::Evict;
use crate::engine::{Engine, Hold, Spill, Usage};
use crate::grammar::Grammar;
use crate::model::Message;
use crate::{Error, Result};

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
    /// Tokens read back from a spill file instead of recomputed (see
    /// [`EngineConfig::spill`](crate::engine::EngineConfig::spill)).
    pub restored_tokens: usize,
    /// Time the turn's model calls waited for their caches to be read back.
    pub restore: Duration,
    /// Time to the first generated token of the turn.
    pub ttft: Duration,
    /// Time the turn's requests waited for admission in the model actor.
    pub queue: Duration,
    /// Wall time of the turn.
    pub elapsed: Duration,
}

/// Events of a streamed turn ([`TurnOptions::events`]).
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
    /// Times the cache was evicted (by the engine, a park it dropped, or a caller).
    pub evictions: u64,
    /// Tokens recomputed after evictions.
    pub recomputed_tokens: u64,
    /// Times the agent's idle cache, asked to evict, went to the engine's spill
    /// folder instead of being dropped.
    pub spills: u64,
    /// Model calls whose cache was read back from a spill file.
    pub restores: u64,
    /// Tokens read back from spill files instead of recomputed.
    pub restored_tokens: u64,
    /// Model calls whose prompt came from a rendered window (not the whole
    /// conversation).
    pub windowed_syncs: u64,
    /// Model calls that rendered the whole conversation.
    pub full_syncs: u64,
}

/// An agent: its conversation (with its cache), tools and settings.
pub struct AgentActor {
    config: AgentConfig,
    engine: Engine,
    tools: Vec<Arc<dyn Tool>>,
    conv: Conversation,
    /// Where the engine sends evictions (this actor), set when it starts.
    holder: Option<WeakRecipient<Evict>>,
    stats: AgentStats,
    /// The state after the last completed turn, kept outside the actor so a
    /// supervised agent restarts from it after a crash.
    checkpoint: Option<supervision::CheckpointCell>,
    /// What the turn in progress may undo, and who asked it.
    turn_state: turn::TurnState,
    /// Its MCP servers (shared with its forks), when its config names some.
    mcp: Option<mcp::McpAttachment>,
}

impl std::fmt::Debug for AgentActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentActor")
            .field("name", &self.config.name)
            .field("messages", &self.conv.messages().len())
            .field("log", &self.conv.log().len())
            .finish()
    }
}

impl Engine {
    /// Spawns an agent on this engine (see [`AgentActor::new`]).
    pub fn agent(
        &self,
        config: AgentConfig,
        tools: Vec<Arc<dyn Tool>>,
    ) -> Result<ActorRef<AgentActor>> {
        Ok(AgentActor::new(config, self.clone(), tools)?.spawn_agent())
    }
}

impl AgentActor {
    /// An agent on `engine`. Grammars (the answer grammar and the tool-call grammar)
    /// are compiled now: a bad one fails here, as does a config naming a tool that is
    /// not in `tools`. A config with MCP servers needs [`AgentActor::connect`] (or
    /// [`Engine::spawn_agent`]): connecting is async.
    pub fn new(config: AgentConfig, engine: Engine, tools: Vec<Arc<dyn Tool>>) -> Result<Self> {
        if !config.mcp_servers.is_empty() {
            return Err(Error::Config {
                what: format!(
                    "agent `{}` has MCP servers: spawn it with `Engine::spawn_agent` (or `AgentActor::connect`), which connects them",
                    config.name
                ),
            });
        }
        Self::build(config, engine, tools)
    }

    /// [`AgentActor::new`] once the MCP servers' tools (if any) are in `tools`.
    fn build(config: AgentConfig, engine: Engine, tools: Vec<Arc<dyn Tool>>) -> Result<Self> {
        config.validate()?;
        for name in &config.tools {
            if !tools.iter().any(|t| t.name() == name) {
                return Err(Error::UnknownTool {
                    owner: format!("agent `{}`", config.name),
                    tool: name.clone(),
                    known: tools::names(&tools),
                });
            }
        }
        let tools = config.filter_tools(tools);
        let format = CallFormat::of(engine.model());
        let mut conv = Conversation::new(Self::initial_messages(&config, &tools, format));
        conv.set_tools(format.template_tools(&tools));
        let agent = Self {
            conv,
            config,
            engine,
            tools,
            holder: None,
            stats: AgentStats::default(),
            checkpoint: None,
            turn_state: turn::TurnState::default(),
            mcp: None,
        };
        agent.check_grammars(&agent.tools)?;
        Ok(agent)
    }

    /// Compiles every grammar an agent with `tools` may use, so that errors surface
    /// now.
    fn check_grammars(&self, tools: &[Arc<dyn Tool>]) -> Result<()> {
        let format = CallFormat::of(self.engine.model());
        for choice in [ToolChoice::Auto, ToolChoice::Required, ToolChoice::None] {
            if tools.is_empty() && choice != ToolChoice::None {
                continue;
            }
            if let Some(g) = reply_grammar(tools, &choice, self.config.grammar.as_ref(), format)? {
                self.check_grammar(&g)?;
            }
        }
        if let ToolChoice::Tool(_) = &self.config.tool_choice {
            reply_grammar(
                tools,
                &self.config.tool_choice,
                self.config.grammar.as_ref(),
                format,
            )?;
        }
        Ok(())
    }

    fn check_grammar(&self, g: &Grammar) -> Result<()> {
        // The engine's cached compiler: a thousand agents sharing one grammar compile
        // it once.
        self.engine.grammars().compile(g)?;
        Ok(())
    }

    /// The system prompt (with troupe's tools paragraph when the calls are spelled in
    /// troupe's format) and the few-shot examples, their calls spelled in `format`.
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
            system.push_str(&tools_prompt(tools));
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

    /// Loads an agent saved with [`Save`]; a corrupt file or one made for another
    /// model or format version gets a clear error.
    pub fn load(path: &std::path::Path, engine: Engine, tools: Vec<Arc<dyn Tool>>) -> Result<Self> {
        let (snap, cache) = snapshot::load(path, engine.model())?;
        let mut agent = Self::new(snap.config, engine, tools)?;
        agent.conv = Conversation::restore(agent.engine.model(), snap.messages, snap.log)?;
        if let Some(c) = cache {
            agent.conv.cache = CacheSlot::Here(c.into());
        }
        Ok(agent)
    }

    /// Evicts the cache: with an engine that spills, an idle cache goes to its spill
    /// folder (parked, read back by the next turn); otherwise, or when that fails, it
    /// is dropped. The conversation stays.
    async fn evict_cache(&mut self) {
        // (A cache cut back to no tokens has nothing worth keeping.)
        if self.engine.spills() && matches!(&self.conv.cache, CacheSlot::Here(c) if !c.is_empty()) {
            let CacheSlot::Here(cache) = std::mem::take(&mut self.conv.cache) else {
                return;
            };
            match self.engine.actor().ask(Spill(cache)).await {
                Ok(parked) => {
                    self.stats.spills += 1;
                    self.conv.cache = CacheSlot::Parked(parked);
                }
                // Handed back, or the engine is gone: dropped.
                Err(_) => self.stats.evictions += 1,
            }
            return;
        }
        self.drop_cache();
    }

    /// Drops the cache (wherever it is); the conversation stays.
    fn drop_cache(&mut self) {
        if !matches!(self.conv.cache, CacheSlot::Empty) {
            self.stats.evictions += 1;
        }
        self.conv.cache = CacheSlot::Empty;
    }

    /// Puts an unleased cache under a lease (a forked or loaded agent, or one whose
    /// request failed with an unleased cache), so the engine accounts for it.
    async fn lease_cache(&mut self) {
        let CacheSlot::Here(c) = &self.conv.cache else {
            return;
        };
        let Some(holder) = self.holder.clone() else {
            return;
        };
        if c.lease().is_some() || c.is_empty() {
            return;
        }
        let CacheSlot::Here(cache) = std::mem::take(&mut self.conv.cache) else {
            return;
        };
        self.conv.cache = match self.engine.actor().ask(Hold { cache, holder }).await {
            Ok(leased) => CacheSlot::Here(leased),
            // The model actor is gone: nothing to account with.
            Err(_) => CacheSlot::Empty,
        };
    }
}

impl Actor for AgentActor {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(
        mut args: Self::Args,
        me: ActorRef<Self>,
    ) -> std::result::Result<Self, Self::Error> {
        args.holder = Some(me.recipient::<Evict>().downgrade());
        // A forked or loaded agent starts with a cache: account for it now.
        args.lease_cache().await;
        Ok(args)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: kameo::error::ActorStopReason,
    ) -> std::result::Result<(), Self::Error> {
        // Dropping the cache drops its lease, which ends the engine's accounting.
        self.conv.cache = CacheSlot::Empty;
        Ok(())
    }
}
