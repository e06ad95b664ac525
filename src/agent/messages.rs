//! The messages an agent answers: asking (plain, with a per-turn tool choice or
//! grammar, streamed), reading its history and counters, forking, evicting, resetting
//! and saving.

use std::sync::atomic::Ordering;

use kameo::actor::ActorRef;
use kameo::message::{Context, Message as KameoMessage};

use super::{snapshot, AgentActor, AgentEvent, AgentReply, AgentStats, ToolChoice, NEXT_HOLDER};
use crate::grammar::Grammar;
use crate::kv::KvCache;
use crate::model::Message;
use crate::Result;

/// A user message; replies with the turn's [`AgentReply`].
#[derive(Debug, Clone)]
pub struct Ask(pub String);

impl KameoMessage<Ask> for AgentActor {
    type Reply = Result<AgentReply>;
    async fn handle(&mut self, m: Ask, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.turn(m.0, None, None, None).await
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
        self.turn(m.text, None, None, None).await
    }
}

/// A user message with a per-turn tool choice.
#[derive(Debug, Clone)]
pub struct AskWith {
    /// The message.
    pub text: String,
    /// Tool choice for this turn (the agent's default when `None`).
    pub tool_choice: Option<ToolChoice>,
    /// Answer grammar for this turn (the agent's own when `None`).
    pub grammar: Option<Grammar>,
}

impl AskWith {
    /// A message whose answer must follow `grammar`.
    pub fn grammar(text: impl Into<String>, grammar: Grammar) -> Self {
        Self {
            text: text.into(),
            tool_choice: None,
            grammar: Some(grammar),
        }
    }

    /// A message with a tool choice for this turn.
    pub fn tool_choice(text: impl Into<String>, choice: ToolChoice) -> Self {
        Self {
            text: text.into(),
            tool_choice: Some(choice),
            grammar: None,
        }
    }
}

impl KameoMessage<AskWith> for AgentActor {
    type Reply = Result<AgentReply>;
    async fn handle(&mut self, m: AskWith, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.turn(m.text, m.tool_choice, m.grammar, None).await
    }
}

/// A user message whose tokens and tool events are sent to `events` as they happen.
#[derive(Debug)]
pub struct AskStream {
    /// The message.
    pub text: String,
    /// Where events go.
    pub events: tokio::sync::mpsc::UnboundedSender<AgentEvent>,
    /// Tool choice for this turn (the agent's default when `None`).
    pub tool_choice: Option<ToolChoice>,
}

impl KameoMessage<AskStream> for AgentActor {
    type Reply = Result<AgentReply>;
    async fn handle(&mut self, m: AskStream, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.turn(m.text, m.tool_choice, None, Some(m.events)).await
    }
}

/// Asks `agent` with [`AskStream`] and hands each token and tool event to `on_event`
/// as it happens; returns the turn's reply.
pub async fn ask_streaming(
    agent: &ActorRef<AgentActor>,
    text: impl Into<String>,
    tool_choice: Option<ToolChoice>,
    mut on_event: impl FnMut(AgentEvent),
) -> Result<AgentReply> {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ask = agent.ask(AskStream {
        text: text.into(),
        events,
        tool_choice,
    });
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
    crate::Error::InvalidInput(format!("agent unreachable: {e:?}"))
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
        self.messages.clone()
    }
}

/// The token log and the cache's length (for tests of what a turn leaves behind).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct TokenLog;

impl KameoMessage<TokenLog> for AgentActor {
    type Reply = (Vec<u32>, usize);
    async fn handle(&mut self, _: TokenLog, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        (
            self.log.clone(),
            self.cache.as_ref().map_or(0, KvCache::len),
        )
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
/// no recomputation); the two then diverge independently.
#[derive(Debug, Clone, Copy)]
pub struct Fork;

impl KameoMessage<Fork> for AgentActor {
    type Reply = ActorRef<AgentActor>;
    async fn handle(&mut self, _: Fork, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.fork_child(0)
    }
}

/// A [`Fork`] whose sampling seed is the parent's plus the given offset, so that forks
/// sampling at a temperature explore different continuations of the shared prefix
/// (with the same seed they would all write the same thing).
#[derive(Debug, Clone, Copy)]
pub struct ForkVaried(pub u64);

impl KameoMessage<ForkVaried> for AgentActor {
    type Reply = ActorRef<AgentActor>;
    async fn handle(
        &mut self,
        ForkVaried(offset): ForkVaried,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.fork_child(offset)
    }
}

impl AgentActor {
    fn fork_child(&self, seed_offset: u64) -> ActorRef<AgentActor> {
        let mut config = self.config.clone();
        config.sampling.seed = config.sampling.seed.wrapping_add(seed_offset);
        let child = AgentActor {
            config,
            model: self.model.clone(),
            engine: self.engine.clone(),
            tools: self.tools.clone(),
            messages: self.messages.clone(),
            log: self.log.clone(),
            cache: self.cache.as_ref().map(KvCache::fork),
            holder: NEXT_HOLDER.fetch_add(1, Ordering::Relaxed),
            self_ref: None,
            stats: AgentStats::default(),
            checkpoint: None,
            turn_state: Default::default(),
        };
        child.spawn_agent()
    }
}

/// Drops the agent's cache (the conversation and log stay); its next turn
/// re-prefills.
#[derive(Debug, Clone, Copy)]
pub struct Evict;

impl KameoMessage<Evict> for AgentActor {
    type Reply = ();
    async fn handle(&mut self, _: Evict, _: &mut Context<Self, Self::Reply>) {
        if self.cache.take().is_some() {
            self.stats.evictions += 1;
        }
        self.release_hold().await;
    }
}

/// Forgets the conversation (back to the system prompt and the few-shot examples)
/// and the cache.
#[derive(Debug, Clone, Copy)]
pub struct Reset;

impl KameoMessage<Reset> for AgentActor {
    type Reply = ();
    async fn handle(&mut self, _: Reset, _: &mut Context<Self, Self::Reply>) {
        self.messages = Self::initial_messages(
            &self.config,
            &self.tools,
            super::CallFormat::of(&self.model),
        );
        self.log.clear();
        self.cache = None;
        self.save_checkpoint();
        self.release_hold().await;
    }
}

/// Writes the whole agent to `path` (atomically).
#[derive(Debug, Clone)]
pub struct Save(pub std::path::PathBuf);

impl KameoMessage<Save> for AgentActor {
    type Reply = Result<()>;
    async fn handle(&mut self, m: Save, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        snapshot::save(
            &m.0,
            snapshot::Snapshot {
                config: self.config.clone(),
                messages: self.messages.clone(),
                log: self.log.clone(),
            },
            self.cache.as_ref(),
            &self.model,
        )
    }
}
