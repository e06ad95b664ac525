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
mod tools;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::Actor;

pub use config::{AgentConfig, ContextPolicy, ToolChoice};
pub(crate) use messages::{ask_error, unreachable};
pub use messages::{
    ask_streaming, Ask, AskStream, AskWith, Evict, Fork, ForkVaried, GetAgentStats, History, Reset,
    Save,
};
pub use tools::{
    example_exchange, format_call, parse_call, tool_fn, tools_prompt, Tool, ToolCall, ToolRun,
    CALL_CLOSE, CALL_OPEN,
};

use crate::engine::{Event, Generate, HoldCache, ModelActor, ReleaseCache, Usage};
use crate::grammar::Grammar;
use crate::kv::KvCache;
use crate::model::{Message, Model, Role};
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
            messages: Self::initial_messages(&config, &tools),
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
        };
        // Compile every grammar the agent may use, so that errors surface now.
        for choice in [ToolChoice::Auto, ToolChoice::Required, ToolChoice::None] {
            if agent.tools.is_empty() && choice != ToolChoice::None {
                continue;
            }
            if let Some(g) =
                tools::reply_grammar(&agent.tools, &choice, agent.config.grammar.as_ref())?
            {
                agent.check_grammar(&g)?;
            }
        }
        if let ToolChoice::Tool(_) = &agent.config.tool_choice {
            tools::reply_grammar(
                &agent.tools,
                &agent.config.tool_choice,
                agent.config.grammar.as_ref(),
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

    fn initial_messages(config: &AgentConfig, tools: &[Arc<dyn Tool>]) -> Vec<Message> {
        let mut system = config.system_prompt.clone();
        if !tools.is_empty() {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(&tools::tools_prompt(tools));
        }
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(Message::system(system));
        }
        messages.extend(config.examples.iter().cloned());
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

    /// Appends to the log what the rendered conversation adds past it; on
    /// disagreement, truncates log and cache to the longest common prefix.
    fn sync_log(&mut self) -> Result<()> {
        let tok = self.model.tokenizer();
        let full = self.model.chat_template().render(&self.messages, true)?;
        let said = tok.decode(&self.log)?;
        if let Some(delta) = full.strip_prefix(said.as_str()) {
            let mut ids = if self.log.is_empty() {
                tok.encode_prompt(delta)?
            } else {
                tok.encode(delta)?
            };
            self.log.append(&mut ids);
            return Ok(());
        }
        let ids = tok.encode_prompt(&full)?;
        let common = self
            .log
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        self.log.truncate(common);
        self.log.extend_from_slice(&ids[common..]);
        if let Some(c) = self.cache.as_mut() {
            c.truncate(common);
        }
        self.stats.prefix_mismatches += 1;
        Ok(())
    }

    /// Makes the turn fit the context, per the policy. Returns an error (with the
    /// conversation restored by the caller) when it cannot.
    fn fit_context(&mut self) -> Result<()> {
        let context = self.model.config().context_length;
        let need = |s: &Self| s.log.len() + s.config.max_tokens;
        if need(self) <= context {
            return Ok(());
        }
        match self.config.context_policy {
            ContextPolicy::Error => Err(Error::RequestTooLong {
                cached: self.cache.as_ref().map_or(0, KvCache::len),
                new: self.log.len() - self.cache.as_ref().map_or(0, KvCache::len),
                max_tokens: self.config.max_tokens,
                context,
            }),
            ContextPolicy::DropOldest => {
                let keep = usize::from(
                    self.messages
                        .first()
                        .is_some_and(|m| m.role == Role::System),
                ) + self.config.examples.len();
                while need(self) > context {
                    // Drop the oldest turn: from the first message after the system
                    // prompt and the examples up to (not including) the next user
                    // message.
                    if self.messages.len() <= keep + 1 {
                        return Err(Error::RequestTooLong {
                            cached: 0,
                            new: self.log.len(),
                            max_tokens: self.config.max_tokens,
                            context,
                        });
                    }
                    let end = self.messages[keep + 1..]
                        .iter()
                        .position(|m| m.role == Role::User)
                        .map_or(self.messages.len() - 1, |p| p + keep + 1);
                    self.messages.drain(keep..end.max(keep + 1));
                    let full = self.model.chat_template().render(&self.messages, true)?;
                    self.log = self.model.tokenizer().encode_prompt(&full)?;
                    self.cache = None;
                }
                Ok(())
            }
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
        Some(Arc::new(move || {
            if let Some(a) = me.upgrade() {
                let _ = a.tell(Evict).try_send();
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

    /// One model call on the current conversation.
    async fn generate(
        &mut self,
        choice: &ToolChoice,
        answer: Option<&Grammar>,
        events: Option<&tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
    ) -> Result<(crate::engine::Done, usize)> {
        self.sync_log()?;
        self.fit_context()?;
        let recomputed =
            if self.cache.as_ref().is_none_or(KvCache::is_empty) && self.stats.turns > 0 {
                self.log.len().saturating_sub(1)
            } else {
                0
            };
        let cache = self.cache.take().unwrap_or_else(|| {
            self.model
                .new_cache(self.config.kv_dtype.unwrap_or_default())
        });
        let fed = cache.len();
        let mut g = Generate::new(cache, self.log[fed..].to_vec(), self.config.max_tokens);
        g.sampling = self.config.sampling.clone();
        g.engine_kv_dtype = self.config.kv_dtype.is_none();
        let answer = answer.or(self.config.grammar.as_ref());
        g.grammar = tools::reply_grammar(&self.tools, choice, answer)?;
        g.holder = self.evict_handle().map(|e| (self.holder, e));
        let mut stream = match self.engine.ask(g).await {
            Ok(s) => s,
            Err(kameo::error::SendError::HandlerError(r)) => {
                self.cache = Some(r.cache);
                return Err(r.error);
            }
            Err(e) => {
                tracing::warn!("model actor unreachable: {e:?}");
                return Err(Error::EngineStopped);
            }
        };
        loop {
            match stream.next().await {
                Some(Event::Token { text, .. }) | Some(Event::Text { text }) => {
                    if let (Some(tx), false) = (events, text.is_empty()) {
                        let _ = tx.send(AgentEvent::Token(text));
                    }
                }
                Some(Event::Done(done)) => {
                    self.stats.recomputed_tokens += recomputed as u64;
                    return Ok((*done, recomputed));
                }
                Some(Event::Failed { error, cache }) => {
                    self.cache = Some(*cache);
                    return Err(error);
                }
                None => return Err(Error::EngineStopped),
            }
        }
    }

    /// A whole turn: the user's message, then model calls and tool runs until a final
    /// answer or the step limit. `choice` and `answer` override the config's tool
    /// choice and answer grammar for this turn.
    async fn turn(
        &mut self,
        user: String,
        choice: Option<ToolChoice>,
        answer: Option<Grammar>,
        events: Option<tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
    ) -> Result<AgentReply> {
        let start = Instant::now();
        let saved = (self.messages.len(), self.log.len());
        self.messages.push(Message::user(user));
        let mut choice = choice.unwrap_or_else(|| self.config.tool_choice.clone());
        let mut usage = Usage::default();
        let mut runs = Vec::new();
        let mut ttft = None;
        let mut recomputed = 0;
        let mut queue = Duration::ZERO;
        let text = loop {
            let submitted = start.elapsed();
            let mut result = self
                .generate(&choice, answer.as_ref(), events.as_ref())
                .await;
            while matches!(result, Err(Error::Preempted)) {
                // Dropped while queued: start again from an empty cache.
                self.cache = None;
                self.stats.evictions += 1;
                result = self
                    .generate(&choice, answer.as_ref(), events.as_ref())
                    .await;
            }
            let (done, rec) = match result {
                Ok(d) => d,
                Err(e) => {
                    // The conversation is left as it was before the turn.
                    self.messages.truncate(saved.0);
                    if self.log.len() > saved.1
                        && self.cache.as_ref().is_none_or(|c| c.len() <= saved.1)
                    {
                        self.log.truncate(saved.1);
                    }
                    self.hold().await;
                    return Err(e);
                }
            };
            recomputed += rec;
            queue += done.timings.queue;
            ttft.get_or_insert(submitted + done.timings.time_to_first_token);
            usage.prompt_tokens += done.usage.prompt_tokens;
            usage.cached_tokens += done.usage.cached_tokens;
            usage.computed_tokens += done.usage.computed_tokens;
            usage.generated_tokens += done.usage.generated_tokens;
            self.log.extend_from_slice(&done.tokens);
            self.cache = Some(done.cache);
            let reply = done.text;
            self.messages.push(Message::assistant(reply.clone()));
            let Some(call) = parse_call(&reply) else {
                break reply;
            };
            if runs.len() >= self.config.max_tool_steps {
                break reply;
            }
            if let Some(tx) = &events {
                let _ = tx.send(AgentEvent::ToolCall(call.clone()));
            }
            // Idle while the tool runs, but about to continue: evicted last.
            self.hold_idle(true).await;
            let run = self.run_tool(call).await;
            if let Some(tx) = &events {
                let _ = tx.send(AgentEvent::ToolResult(run.clone()));
            }
            self.messages.push(Message::tool(run.result.clone()));
            runs.push(run);
            // After the step limit's last call, the model must answer. Otherwise a
            // forced call (`required` or one named tool) has been made, and the model
            // is free again to call more or answer: forcing every step would loop.
            if runs.len() >= self.config.max_tool_steps {
                choice = ToolChoice::None;
            } else if matches!(choice, ToolChoice::Required | ToolChoice::Tool(_)) {
                choice = ToolChoice::Auto;
            }
        };
        self.stats.turns += 1;
        self.stats.reused_tokens += usage.cached_tokens as u64;
        self.stats.computed_tokens += usage.computed_tokens as u64;
        self.save_checkpoint();
        Ok(AgentReply {
            text,
            tool_runs: runs,
            usage,
            recomputed_tokens: recomputed,
            ttft: ttft.unwrap_or_default(),
            queue,
            elapsed: start.elapsed(),
        })
    }

    /// Runs one tool call with the timeout; errors, timeouts and panics become the
    /// text the model sees.
    async fn run_tool(&self, call: ToolCall) -> ToolRun {
        let start = Instant::now();
        let timeout = Duration::from_secs_f64(self.config.tool_timeout_secs.max(0.001));
        let (result, failed) = match self.tools.iter().find(|t| t.name() == call.name) {
            None => (format!("error: unknown tool `{}`", call.name), true),
            Some(tool) => {
                // A tool that panics while building its future is as harmless as one
                // that panics inside it (that one is caught by the task).
                let args = call.arguments.clone();
                let fut =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tool.call(args)))
                        .unwrap_or_else(|_| {
                            Box::pin(async { panic!("tool panicked before running") })
                        });
                let task = tokio::spawn(fut);
                match tokio::time::timeout(timeout, task).await {
                    Ok(Ok(Ok(text))) => (text, false),
                    Ok(Ok(Err(e))) => (format!("error: {e}"), true),
                    Ok(Err(join)) => (
                        format!(
                            "error: tool `{}` crashed{}",
                            call.name,
                            if join.is_panic() { " (panic)" } else { "" }
                        ),
                        true,
                    ),
                    Err(_) => (
                        format!(
                            "error: tool `{}` timed out after {:.1} s",
                            call.name,
                            timeout.as_secs_f64()
                        ),
                        true,
                    ),
                }
            }
        };
        ToolRun {
            call,
            result,
            failed,
            seconds: start.elapsed().as_secs_f64(),
        }
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
