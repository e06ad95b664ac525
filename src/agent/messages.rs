//! The messages an agent answers: asking (one [`Ask`] with its [`TurnOptions`]),
//! reading its history and counters, forking, evicting, resetting and saving.

use kameo::actor::ActorRef;
use kameo::message::{Context, Message as KameoMessage};

use super::conversation::CacheSlot;
use super::{snapshot, AgentActor, AgentEvent, AgentReply, AgentStats, Evict, ToolChoice};
use crate::grammar::Grammar;
use crate::model::Message;
use crate::Result;

/// How one turn runs, where it differs from the agent's config.
#[derive(Debug, Clone, Default)]
pub struct TurnOptions {
    /// Tool choice for this turn (the agent's default when `None`).
    pub tool_choice: Option<ToolChoice>,
    /// Answer grammar for this turn (the agent's own when `None`).
    pub grammar: Option<Grammar>,
    /// Where tokens and tool events go as they happen (a streamed turn). Dropping the
    /// receiver cancels the turn (its model call is cancelled in the engine, and the
    /// conversation is left as before the turn).
    pub events: Option<tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
    /// Most tokens per model reply (the agent's `max_tokens` when `None`).
    pub max_tokens: Option<usize>,
    /// Sampling for this turn (the agent's own when `None`).
    pub sampling: Option<crate::sampling::SamplingParams>,
    /// Strings that end a reply (not part of it).
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens, to exactly `max_tokens`
    /// (benchmarks).
    pub ignore_eos: bool,
}

/// A user message; replies with the turn's [`AgentReply`].
#[derive(Debug, Clone)]
pub struct Ask {
    /// The message.
    pub text: String,
    /// How the turn runs.
    pub options: TurnOptions,
}

impl Ask {
    /// A plain turn.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            options: TurnOptions::default(),
        }
    }

    /// With a tool choice for this turn.
    pub fn tool_choice(mut self, choice: ToolChoice) -> Self {
        self.options.tool_choice = Some(choice);
        self
    }

    /// With an answer grammar for this turn.
    pub fn grammar(mut self, grammar: Grammar) -> Self {
        self.options.grammar = Some(grammar);
        self
    }

    /// Streaming the turn's events to `events`.
    pub fn events(mut self, events: tokio::sync::mpsc::UnboundedSender<AgentEvent>) -> Self {
        self.options.events = Some(events);
        self
    }
}

impl KameoMessage<Ask> for AgentActor {
    type Reply = Result<AgentReply>;
    async fn handle(&mut self, m: Ask, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.turn(m.text, m.options).await
    }
}

/// A user message from another agent's tool call ([`agent_tool`]): it carries the
/// chain of agents that asked (a cycle is refused) and a guard whose drop (the asking
/// tool timed out) stops the turn at its next step.
///
/// [`agent_tool`]: crate::workflow::agent_tool
#[derive(Debug)]
pub(crate) struct AskNested {
    /// The message.
    pub text: String,
    /// The agents whose tool calls led here, outermost first.
    pub asked_by: Vec<kameo::actor::ActorId>,
    /// Closed when the asker gives up.
    pub asker_alive: tokio::sync::oneshot::Receiver<()>,
}

impl KameoMessage<AskNested> for AgentActor {
    type Reply = Result<AgentReply>;
    async fn handle(&mut self, m: AskNested, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.turn_state.asked_by = m.asked_by;
        self.turn_state.asker_alive = Some(m.asker_alive);
        self.turn(m.text, TurnOptions::default()).await
    }
}

/// Asks `agent` and hands each token and tool event to `on_event` as it happens;
/// returns the turn's reply.
pub async fn ask_streaming(
    agent: &ActorRef<AgentActor>,
    ask: Ask,
    mut on_event: impl FnMut(AgentEvent),
) -> Result<AgentReply> {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ask = agent.ask(ask.events(events));
    // The channel closes when the turn ends (the agent drops its sender).
    let drain = async {
        while let Some(ev) = rx.recv().await {
            on_event(ev);
        }
    };
    let (reply, ()) = tokio::join!(async { ask.await }, drain);
    reply.map_err(ask_error)
}

/// An agent that cannot be reached (stopped, or its mailbox gone), as an error.
pub(crate) fn unreachable(e: impl std::fmt::Debug) -> crate::Error {
    crate::Error::AgentUnreachable {
        what: format!("{e:?}"),
    }
}

/// The error of an ask: the agent's own, or [`unreachable`].
pub(crate) fn ask_error<M: std::fmt::Debug>(
    e: kameo::error::SendError<M, crate::Error>,
) -> crate::Error {
    match e {
        kameo::error::SendError::HandlerError(e) => e,
        e => unreachable(e),
    }
}

/// The conversation so far (system prompt and few-shot examples included).
#[derive(Debug, Clone, Copy)]
pub struct History;

impl KameoMessage<History> for AgentActor {
    type Reply = Vec<Message>;
    async fn handle(&mut self, _: History, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.conv.messages().to_vec()
    }
}

/// The token log and the cache's length (for tests of what a turn leaves behind).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct TokenLog;

impl KameoMessage<TokenLog> for AgentActor {
    type Reply = (Vec<u32>, usize);
    async fn handle(&mut self, _: TokenLog, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        (self.conv.log().to_vec(), self.conv.cache.len())
    }
}

/// Bytes of the cache the agent holds now (0 when it has none, or it is parked with
/// the engine), for tests that hold the engine's accounting against real bytes.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct CacheBytes;

impl KameoMessage<CacheBytes> for AgentActor {
    type Reply = usize;
    async fn handle(&mut self, _: CacheBytes, _: &mut Context<Self, Self::Reply>) -> usize {
        match &self.conv.cache {
            CacheSlot::Here(c) => c.bytes(),
            _ => 0,
        }
    }
}

/// The agent's counters.
#[derive(Debug, Clone, Copy)]
pub struct GetAgentStats;

impl KameoMessage<GetAgentStats> for AgentActor {
    type Reply = AgentStats;
    async fn handle(
        &mut self,
        _: GetAgentStats,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.stats.clone()
    }
}

/// Spawns a new agent with a copy of the conversation, log and cache (a memory copy,
/// no recomputation); the two then diverge independently. Its sampling seed is the
/// parent's plus `seed_offset`, so that forks sampling at a temperature explore
/// different continuations of the shared prefix (with the same seed they would all
/// write the same thing).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fork {
    /// Added to the parent's sampling seed.
    pub seed_offset: u64,
}

impl KameoMessage<Fork> for AgentActor {
    type Reply = ActorRef<AgentActor>;
    async fn handle(&mut self, m: Fork, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let mut config = self.config.clone();
        config.sampling.seed = config.sampling.seed.wrapping_add(m.seed_offset);
        let child = AgentActor {
            config,
            engine: self.engine.clone(),
            tools: self.tools.clone(),
            conv: self.conv.fork(),
            holder: None,
            stats: AgentStats::default(),
            checkpoint: None,
            turn_state: Default::default(),
            // The servers are shared: they stop when the last agent using them does.
            mcp: self.mcp.clone(),
        };
        child.spawn_agent()
    }
}

/// Evicts the agent's cache when the lease named is the one it holds: the engine's
/// eviction spills it when the engine spills (the next turn reads it back), drops it
/// otherwise; [`Evict::ANY`] (a caller's own) always drops it. The conversation and
/// log stay; a dropped cache is re-prefilled by the next turn.
impl KameoMessage<Evict> for AgentActor {
    type Reply = ();
    async fn handle(&mut self, m: Evict, _: &mut Context<Self, Self::Reply>) {
        let held = match &self.conv.cache {
            CacheSlot::Here(c) => c.lease(),
            CacheSlot::Parked(p) => Some(p.lease.id()),
            CacheSlot::Empty => return,
        };
        if !m.applies_to(held) {
            return;
        }
        if m.lease.is_some() {
            self.evict_cache().await;
        } else {
            self.drop_cache();
        }
    }
}

/// Forgets the conversation (back to the system prompt and the few-shot examples)
/// and the cache.
#[derive(Debug, Clone, Copy)]
pub struct Reset;

impl KameoMessage<Reset> for AgentActor {
    type Reply = ();
    async fn handle(&mut self, _: Reset, _: &mut Context<Self, Self::Reply>) {
        let format = super::CallFormat::of(self.engine.model());
        self.conv
            .reset(Self::initial_messages(&self.config, &self.tools, format));
        self.save_checkpoint();
    }
}

/// Writes the whole agent to `path` (atomically).
#[derive(Debug, Clone)]
pub struct Save(pub std::path::PathBuf);

impl KameoMessage<Save> for AgentActor {
    type Reply = Result<()>;
    async fn handle(&mut self, m: Save, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let cache = match &self.conv.cache {
            CacheSlot::Here(c) => Some(&**c),
            _ => None,
        };
        snapshot::save(
            &m.0,
            snapshot::Snapshot {
                config: self.config.clone(),
                messages: self.conv.messages().to_vec(),
                log: self.conv.log().to_vec(),
            },
            cache,
            self.engine.model(),
        )
    }
}
