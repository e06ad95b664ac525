//! One turn of an agent, as a transaction: the user's message, model calls and tool
//! runs until a final answer; a turn that fails for any reason leaves the
//! conversation, the token log and the cache as they were before it started.
//!
//! The chat template is rendered off the tokio workers (`spawn_blocking`): a
//! template from a file may be slow (it is bounded by fuel, see
//! [`ChatTemplate`](crate::model::ChatTemplate)).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tools::{parse_call, CALL_OPEN};
use super::{AgentActor, AgentEvent, AgentReply, ContextPolicy, ToolChoice};
use crate::engine::{Event, FinishReason, Generate, Usage};
use crate::grammar::Grammar;
use crate::kv::KvCache;
use crate::model::{Message, Model, Role};
use crate::{Error, Result};

/// What a turn in progress may need to undo or answer to.
#[derive(Debug, Default)]
pub(super) struct TurnState {
    /// The cache from before the turn, when `drop_oldest` rebuilt the context: put
    /// back if the turn fails.
    pub stash: Option<KvCache>,
    /// The agents whose tool calls asked this turn, outermost first (agent-as-tool
    /// calls carry it, so that a cycle is refused instead of deadlocking).
    pub asked_by: Vec<kameo::actor::ActorId>,
    /// Closed when the asker gave up (its tool call timed out): the turn stops at
    /// its next step.
    pub asker_alive: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// The state a failed turn returns to.
struct Undo {
    messages: Vec<Message>,
    log: Vec<u32>,
    cache_len: usize,
}

/// Renders the conversation on a blocking thread.
/// The token counts of a reply on its span (`reused`, `computed`, `generated`).
fn record_usage(span: &tracing::Span, u: &Usage) {
    span.record("reused", u.cached_tokens);
    span.record("computed", u.computed_tokens);
    span.record("generated", u.generated_tokens);
}

async fn render(
    model: &Arc<Model>,
    tools: &[Arc<dyn super::Tool>],
    messages: Vec<Message>,
) -> Result<String> {
    let model = model.clone();
    // The agent's tools, for a template that renders them.
    let tools = super::CallFormat::of(&model).template_tools(tools);
    tokio::task::spawn_blocking(move || {
        model
            .chat_template()
            .render_with_tools(&messages, tools.as_ref(), true)
    })
    .await
    .map_err(|e| Error::ChatTemplate(format!("rendering stopped: {e}")))?
}

impl AgentActor {
    /// Appends to the log what the rendered conversation adds past it; on
    /// disagreement, truncates log and cache to the longest common prefix.
    async fn sync_log(&mut self) -> Result<()> {
        let full = render(&self.model, &self.tools, self.messages.clone()).await?;
        let tok = self.model.tokenizer();
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

    /// Makes the turn fit the context, per the policy; `drop_oldest` works on a copy
    /// of the conversation and commits only when it fits.
    async fn fit_context(&mut self, max_tokens: usize) -> Result<()> {
        let context = self.model.config().context_length;
        let fits = |log: &[u32]| log.len().saturating_add(max_tokens) <= context;
        if fits(&self.log) {
            return Ok(());
        }
        let cached = self.cache.as_ref().map_or(0, KvCache::len);
        let too_long = |new: usize| Error::RequestTooLong {
            cached,
            new,
            max_tokens,
            context,
        };
        if self.config.context_policy == ContextPolicy::Error {
            return Err(too_long(self.log.len().saturating_sub(cached)));
        }
        let keep = usize::from(
            self.messages
                .first()
                .is_some_and(|m| m.role == Role::System),
        ) + self.config.examples.len();
        let mut messages = self.messages.clone();
        loop {
            // Drop the oldest turn: from the first message after the system prompt
            // and the examples up to (not including) the next user message.
            if messages.len() <= keep + 1 {
                return Err(too_long(self.log.len().saturating_sub(cached)));
            }
            let end = messages[keep + 1..]
                .iter()
                .position(|m| m.role == Role::User)
                .map_or(messages.len() - 1, |p| p + keep + 1);
            messages.drain(keep..end.max(keep + 1));
            let full = render(&self.model, &self.tools, messages.clone()).await?;
            let log = self.model.tokenizer().encode_prompt(&full)?;
            if fits(&log) {
                self.messages = messages;
                self.log = log;
                // Kept aside, not dropped: a failed turn puts it back.
                let old = self.cache.take();
                if self.turn_state.stash.is_none() {
                    self.turn_state.stash = old;
                }
                return Ok(());
            }
        }
    }

    /// One model call on the current conversation, of at most `max_tokens` tokens,
    /// in a `model_call` span (the engine's spans for the request are its children).
    async fn generate(
        &mut self,
        choice: &ToolChoice,
        answer: Option<&Grammar>,
        events: Option<&tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
        max_tokens: usize,
    ) -> Result<(crate::engine::Done, usize)> {
        let span = tracing::debug_span!(
            "model_call",
            agent = %self.config.name,
            holder = self.holder,
            reused = tracing::field::Empty,
            computed = tracing::field::Empty,
            generated = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(
            self.generate_inner(choice, answer, events, max_tokens),
            span.clone(),
        )
        .await;
        if let Ok((done, _)) = &result {
            record_usage(&span, &done.usage);
        }
        result
    }

    async fn generate_inner(
        &mut self,
        choice: &ToolChoice,
        answer: Option<&Grammar>,
        events: Option<&tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
        max_tokens: usize,
    ) -> Result<(crate::engine::Done, usize)> {
        self.sync_log().await?;
        self.fit_context(max_tokens).await?;
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
        let fed = cache.len().min(self.log.len());
        let mut g = Generate::new(cache, self.log[fed..].to_vec(), max_tokens);
        g.sampling = self.config.sampling.clone();
        g.engine_kv_dtype = self.config.kv_dtype.is_none();
        g.label = Some(self.config.name.clone());
        let answer = answer.or(self.config.grammar.as_ref());
        let format = super::CallFormat::of(&self.model);
        g.grammar = match super::tools::reply_grammar(&self.tools, choice, answer, format) {
            Ok(g) => g,
            Err(e) => {
                self.cache = Some(g.cache);
                return Err(e);
            }
        };
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

    /// Whether the agent that asked this turn as a tool gave up on it.
    fn asker_gone(&mut self) -> bool {
        self.turn_state.asker_alive.as_mut().is_some_and(|rx| {
            rx.try_recv() == Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        })
    }

    /// A whole turn, as a transaction: on any error the conversation, the log and
    /// the cache are put back as they were (see [`Self::turn_steps`]).
    pub(super) async fn turn(
        &mut self,
        user: String,
        choice: Option<ToolChoice>,
        answer: Option<Grammar>,
        events: Option<tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
    ) -> Result<AgentReply> {
        let undo = Undo {
            messages: self.messages.clone(),
            log: self.log.clone(),
            cache_len: self.cache.as_ref().map_or(0, KvCache::len),
        };
        self.turn_state.stash = None;
        let span = tracing::info_span!(
            "turn",
            agent = %self.config.name,
            turn = self.stats.turns,
            reused = tracing::field::Empty,
            computed = tracing::field::Empty,
            generated = tracing::field::Empty,
            tool_calls = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(
            self.turn_steps(user, choice, answer, events),
            span.clone(),
        )
        .await;
        match &result {
            Ok(reply) => {
                record_usage(&span, &reply.usage);
                span.record("tool_calls", reply.tool_runs.len());
            }
            Err(e) => {
                span.record("error", tracing::field::display(e));
            }
        }
        let stash = self.turn_state.stash.take();
        self.turn_state.asker_alive = None;
        self.turn_state.asked_by.clear();
        match result {
            Ok(reply) => {
                self.stats.turns += 1;
                self.stats.reused_tokens += reply.usage.cached_tokens as u64;
                self.stats.computed_tokens += reply.usage.computed_tokens as u64;
                self.save_checkpoint();
                Ok(reply)
            }
            Err(e) => {
                self.messages = undo.messages;
                self.log = undo.log;
                if let Some(old) = stash {
                    self.cache = Some(old);
                }
                if let Some(c) = self.cache.as_mut() {
                    // Caches only grow within a turn (or are cut to a common prefix),
                    // so the first `cache_len` tokens are those of before.
                    c.truncate(c.len().min(undo.cache_len).min(self.log.len()));
                }
                self.hold().await;
                Err(e)
            }
        }
    }

    /// The steps of a turn: the user's message, then model calls and tool runs until
    /// a final answer or the step limit. `choice` and `answer` override the config's
    /// tool choice and answer grammar for this turn.
    async fn turn_steps(
        &mut self,
        user: String,
        choice: Option<ToolChoice>,
        answer: Option<Grammar>,
        events: Option<tokio::sync::mpsc::UnboundedSender<AgentEvent>>,
    ) -> Result<AgentReply> {
        let start = Instant::now();
        if self.asker_gone() {
            return Err(Error::Cancelled);
        }
        self.messages.push(Message::user(user));
        let mut choice = choice.unwrap_or_else(|| self.config.tool_choice.clone());
        let mut usage = Usage::default();
        let mut runs = Vec::new();
        let mut ttft = None;
        let mut recomputed = 0;
        let mut queue = Duration::ZERO;
        let mut max_tokens = self.config.max_tokens;
        let mut retried = false;
        let text = loop {
            if self.asker_gone() {
                return Err(Error::Cancelled);
            }
            let submitted = start.elapsed();
            let mut result = self
                .generate(&choice, answer.as_ref(), events.as_ref(), max_tokens)
                .await;
            while matches!(result, Err(Error::Preempted)) {
                // Dropped while queued: start again from an empty cache.
                self.cache = None;
                self.stats.evictions += 1;
                result = self
                    .generate(&choice, answer.as_ref(), events.as_ref(), max_tokens)
                    .await;
            }
            let (done, rec) = result?;
            recomputed += rec;
            queue += done.timings.queue;
            ttft.get_or_insert(submitted + done.timings.time_to_first_token);
            usage.prompt_tokens += done.usage.prompt_tokens;
            usage.cached_tokens += done.usage.cached_tokens;
            usage.computed_tokens += done.usage.computed_tokens;
            usage.generated_tokens += done.usage.generated_tokens;
            let reply = done.text;
            let opening = reply.trim_start();
            let cut_call = done.finish == FinishReason::Length
                && !opening.is_empty()
                && (opening.starts_with(CALL_OPEN) || CALL_OPEN.starts_with(opening))
                && parse_call(&reply).is_none();
            if cut_call {
                // `max_tokens` ended the reply inside a tool call: never an answer.
                // Forget the reply and retry once with more room (the last prompt
                // token is fed again, so the cache keeps one token less).
                let mut cache = done.cache;
                cache.truncate(self.log.len().saturating_sub(1));
                self.cache = Some(cache);
                let room = self
                    .model
                    .config()
                    .context_length
                    .saturating_sub(self.log.len());
                let more = room.min(self.config.max_tokens.saturating_mul(4));
                if retried || more <= max_tokens {
                    return Err(Error::ToolCallCut { max_tokens });
                }
                retried = true;
                max_tokens = more;
                continue;
            }
            self.log.extend_from_slice(&done.tokens);
            self.cache = Some(done.cache);
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
            max_tokens = self.config.max_tokens;
            retried = false;
            // After the step limit's last call, the model must answer. Otherwise a
            // forced call (`required` or one named tool) has been made, and the model
            // is free again to call more or answer: forcing every step would loop.
            if runs.len() >= self.config.max_tool_steps {
                choice = ToolChoice::None;
            } else if matches!(choice, ToolChoice::Required | ToolChoice::Tool(_)) {
                choice = ToolChoice::Auto;
            }
        };
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
}
