//! One turn of an agent, as a transaction: the user's message, model calls and tool
//! runs until a final answer; a turn that fails for any reason leaves the
//! conversation, the token log and the cache as they were before it started.
//!
//! The chat template is rendered off the tokio workers (`spawn_blocking`): a
//! template from a file may be slow (it is bounded by fuel, see
//! [`ChatTemplate`](crate::model::ChatTemplate)).

use std::time::{Duration, Instant};

use super::conversation::{CacheSlot, Conversation, Undo};
use super::messages::TurnOptions;
use super::tools::{parse_call, reply_grammar, CALL_OPEN};
use super::{AgentActor, AgentEvent, AgentReply, ContextPolicy, ToolChoice};
use crate::engine::{Done, Event, FinishReason, Generate, Park, Resume, Usage};
use crate::model::{Message, Role};
use crate::{Error, Result};

/// What a turn in progress may need to undo or answer to.
#[derive(Debug, Default)]
pub(super) struct TurnState {
    /// The cache from before the turn, when `drop_oldest` rebuilt the context: put
    /// back if the turn fails.
    pub stash: Option<CacheSlot>,
    /// The agents whose tool calls asked this turn, outermost first (agent-as-tool
    /// calls carry it, so that a cycle is refused instead of deadlocking).
    pub asked_by: Vec<kameo::actor::ActorId>,
    /// Closed when the asker gave up (its tool call timed out): the turn stops at
    /// its next step.
    pub asker_alive: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// The token counts of a reply on its span (`reused`, `computed`, `generated`).
fn record_usage(span: &tracing::Span, u: &Usage) {
    span.record("reused", u.cached_tokens);
    span.record("computed", u.computed_tokens);
    span.record("generated", u.generated_tokens);
}

pub(super) fn add_usage(total: &mut Usage, u: &Usage) {
    total.prompt_tokens += u.prompt_tokens;
    total.cached_tokens += u.cached_tokens;
    total.restored_tokens += u.restored_tokens;
    total.computed_tokens += u.computed_tokens;
    total.generated_tokens += u.generated_tokens;
}

impl AgentActor {
    /// Runs `f` on the conversation on a blocking thread (it renders the template).
    async fn with_conv<T: Send + 'static>(
        &mut self,
        undo: &mut Undo,
        f: impl FnOnce(&mut Conversation, &crate::Model, &mut Undo) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let model = self.engine.model().clone();
        let mut conv = std::mem::take(&mut self.conv);
        let mut u = std::mem::replace(undo, self.conv.undo_point());
        let (conv, u, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut conv, &model, &mut u);
            (conv, u, out)
        })
        .await
        .map_err(|e| Error::ChatTemplate(format!("rendering stopped: {e}")))?;
        self.conv = conv;
        *undo = u;
        out
    }

    /// Appends the prompt of the new messages to the log (see
    /// [`Conversation::sync`]).
    async fn sync_log(&mut self, undo: &mut Undo) -> Result<()> {
        let work = self.with_conv(undo, |c, m, u| c.sync(m, u)).await?;
        if work.mismatch {
            self.stats.prefix_mismatches += 1;
        }
        if work.windowed {
            self.stats.windowed_syncs += 1;
        } else if work.rendered_bytes > 0 {
            self.stats.full_syncs += 1;
        }
        Ok(())
    }

    /// Makes the turn fit the context, per the policy; `drop_oldest` tries cuts of
    /// the conversation and commits only one that fits.
    async fn fit_context(&mut self, max_tokens: usize, undo: &mut Undo) -> Result<()> {
        let context = self.engine.model().config().context_length;
        let fits = |n: usize| n.saturating_add(max_tokens) <= context;
        let log_len = self.conv.log().len();
        if fits(log_len) {
            return Ok(());
        }
        let cached = self.conv.cache.len();
        let too_long = Error::RequestTooLong {
            cached,
            new: log_len.saturating_sub(cached),
            max_tokens,
            context,
        };
        if self.config.context_policy == ContextPolicy::Error {
            return Err(too_long);
        }
        let keep = usize::from(
            self.conv
                .messages()
                .first()
                .is_some_and(|m| m.role == Role::System),
        ) + self.config.examples.len();
        let mut messages = self.conv.messages().to_vec();
        let model = self.engine.model().clone();
        loop {
            // Drop the oldest turn: from the first message after the system prompt
            // and the examples up to (not including) the next user message.
            if messages.len() <= keep + 1 {
                return Err(too_long);
            }
            let end = messages[keep + 1..]
                .iter()
                .position(|m| m.role == Role::User)
                .map_or(messages.len() - 1, |p| p + keep + 1);
            messages.drain(keep..end.max(keep + 1));
            let (m2, probe) = (model.clone(), messages.clone());
            let mut tools_only = Conversation::default();
            tools_only.set_tools(self.conv.tools().cloned());
            let len = tokio::task::spawn_blocking(move || tools_only.prompt_len(&m2, &probe))
                .await
                .map_err(|e| Error::ChatTemplate(format!("rendering stopped: {e}")))??;
            if fits(len) {
                let old = self
                    .with_conv(undo, move |c, m, u| c.replace(m, messages, u))
                    .await?;
                // Kept aside, not dropped: a failed turn puts it back.
                if self.turn_state.stash.is_none() {
                    self.turn_state.stash = Some(old);
                }
                return Ok(());
            }
        }
    }

    /// One model call on the current conversation, of at most `max_tokens` tokens,
    /// in a `model_call` span (the engine's spans for the request are its children).
    pub(super) async fn generate(
        &mut self,
        choice: &ToolChoice,
        opts: &TurnOptions,
        max_tokens: usize,
        undo: &mut Undo,
    ) -> Result<(Done, usize)> {
        let span = tracing::debug_span!(
            "model_call",
            agent = %self.config.name,
            reused = tracing::field::Empty,
            computed = tracing::field::Empty,
            generated = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(
            self.generate_inner(choice, opts, max_tokens, undo),
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
        opts: &TurnOptions,
        max_tokens: usize,
        undo: &mut Undo,
    ) -> Result<(Done, usize)> {
        // What was computed before and should be reused: the cache's tokens (here or
        // parked), or, with no cache (evicted, loaded, restarted), what the log's earlier
        // calls fed (all but its last, sampled token). Any of it fed again is recomputed.
        let computed_before = match self.conv.cache.len() {
            0 => self.conv.log().len().saturating_sub(1),
            held => held,
        };
        self.sync_log(undo).await?;
        self.fit_context(max_tokens, undo).await?;
        let expected_cached = self.conv.cache.len();
        let answer = opts.grammar.as_ref().or(self.config.grammar.as_ref());
        let format = super::CallFormat::of(self.engine.model());
        let grammar = reply_grammar(&self.tools, choice, answer, format)?;
        let feed = self.conv.to_feed().to_vec();
        let mut g = match std::mem::take(&mut self.conv.cache) {
            CacheSlot::Empty => {
                let dtype = self.config.kv_dtype.unwrap_or(self.engine.kv_dtype());
                Generate::new(self.engine.model().new_cache(dtype), feed, max_tokens)
            }
            CacheSlot::Here(c) => Generate::new(c, feed, max_tokens),
            CacheSlot::Parked(parked) => {
                let prefix = self.conv.log()[..parked.len()].to_vec();
                let dtype = self.config.kv_dtype.unwrap_or(self.engine.kv_dtype());
                let mut g = Generate::new(self.engine.model().new_cache(dtype), feed, max_tokens);
                g.resume = Some(Resume { parked, prefix });
                g
            }
        };
        g.sampling = opts
            .sampling
            .clone()
            .unwrap_or_else(|| self.config.sampling.clone());
        g.stop = opts.stop.clone();
        g.ignore_eos = opts.ignore_eos;
        g.engine_kv_dtype = self.config.kv_dtype.is_none();
        g.label = Some(self.config.name.clone());
        g.grammar = grammar;
        g.holder = self.holder.clone();
        let mut stream = match self.engine.generate(g).await {
            Ok(s) => s,
            Err(r) => {
                self.conv.cache = match r.resume {
                    Some(resume) => CacheSlot::Parked(resume.parked),
                    None => CacheSlot::Here(r.cache),
                };
                return Err(r.error);
            }
        };
        loop {
            match stream.next().await {
                Some(Event::Token { text, .. }) | Some(Event::Text { text }) => {
                    if let (Some(tx), false) = (&opts.events, text.is_empty()) {
                        if tx.send(AgentEvent::Token(text)).is_err() {
                            // Nobody reads the turn any more: dropping the stream
                            // cancels the request at the engine's next step.
                            return Err(Error::Cancelled);
                        }
                    }
                }
                Some(Event::Done(done)) => {
                    // Counted for an eviction, a park the engine dropped, a loaded or
                    // restarted agent (whose log comes without its cache) alike.
                    let recomputed = computed_before.saturating_sub(done.usage.cached_tokens);
                    if expected_cached > done.usage.cached_tokens {
                        // The engine dropped the park under pressure.
                        self.stats.evictions += 1;
                    }
                    self.stats.recomputed_tokens += recomputed as u64;
                    if done.usage.restored_tokens > 0 {
                        self.stats.restores += 1;
                        self.stats.restored_tokens += done.usage.restored_tokens as u64;
                    }
                    return Ok((*done, recomputed));
                }
                Some(Event::Failed { error, cache }) => {
                    self.conv.cache = CacheSlot::Here(*cache);
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
    pub(super) async fn turn(&mut self, user: String, opts: TurnOptions) -> Result<AgentReply> {
        // A changed MCP tool list is picked up before the turn starts.
        self.refresh_mcp_tools().await?;
        let mut undo = self.begin_turn();
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
        let result =
            tracing::Instrument::instrument(self.turn_steps(user, opts, &mut undo), span.clone())
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
        self.turn_state.asker_alive = None;
        self.turn_state.asked_by.clear();
        self.end_turn(result, |r| &r.usage, undo).await
    }

    /// The undo point of a turn that starts now.
    pub(super) fn begin_turn(&mut self) -> Undo {
        self.turn_state.stash = None;
        self.conv.undo_point()
    }

    /// Commits a finished turn (counters, checkpoint), or undoes a failed one back to
    /// `undo`: conversation, log and cache as they were.
    pub(super) async fn end_turn<T>(
        &mut self,
        result: Result<T>,
        usage: impl Fn(&T) -> &Usage,
        undo: Undo,
    ) -> Result<T> {
        let stash = self.turn_state.stash.take();
        match result {
            Ok(reply) => {
                let u = usage(&reply);
                self.stats.turns += 1;
                self.stats.reused_tokens += u.cached_tokens as u64;
                self.stats.computed_tokens += u.computed_tokens as u64;
                self.save_checkpoint();
                Ok(reply)
            }
            Err(e) => {
                if let Some(old) = stash {
                    self.conv.cache = old;
                }
                self.conv.rollback(undo);
                // A cache handed back without a lease is accounted again.
                self.lease_cache().await;
                Err(e)
            }
        }
    }

    /// The steps of a turn: the user's message, then model calls and tool runs until
    /// a final answer or the step limit. The options' tool choice and answer grammar
    /// override the config's for this turn.
    async fn turn_steps(
        &mut self,
        user: String,
        opts: TurnOptions,
        undo: &mut Undo,
    ) -> Result<AgentReply> {
        let start = Instant::now();
        if self.asker_gone() {
            return Err(Error::Cancelled);
        }
        self.conv.push(Message::user(user));
        let mut choice = opts
            .tool_choice
            .clone()
            .unwrap_or_else(|| self.config.tool_choice.clone());
        let mut usage = Usage::default();
        let mut runs = Vec::new();
        let mut ttft = None;
        let mut recomputed = 0;
        let mut restored = 0;
        let mut restore = Duration::ZERO;
        let mut queue = Duration::ZERO;
        let reply_tokens = opts.max_tokens.unwrap_or(self.config.max_tokens);
        let mut max_tokens = reply_tokens;
        let mut retried = false;
        let text = loop {
            if self.asker_gone() {
                return Err(Error::Cancelled);
            }
            let submitted = start.elapsed();
            let mut result = self.generate(&choice, &opts, max_tokens, undo).await;
            while matches!(result, Err(Error::Preempted)) {
                // Dropped while queued: start again from an empty cache.
                self.drop_cache();
                result = self.generate(&choice, &opts, max_tokens, undo).await;
            }
            let (done, rec) = result?;
            recomputed += rec;
            restored += done.usage.restored_tokens;
            restore += done.timings.restore;
            queue += done.timings.queue;
            ttft.get_or_insert(submitted + done.timings.time_to_first_token);
            add_usage(&mut usage, &done.usage);
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
                cache.truncate(self.conv.log().len().saturating_sub(1));
                self.conv.cache = CacheSlot::Here(cache);
                let room = self
                    .engine
                    .model()
                    .config()
                    .context_length
                    .saturating_sub(self.conv.log().len());
                let more = room.min(reply_tokens.saturating_mul(4));
                if retried || more <= max_tokens {
                    return Err(Error::ToolCallCut { max_tokens });
                }
                retried = true;
                max_tokens = more;
                continue;
            }
            self.conv.cache = CacheSlot::Here(done.cache);
            self.conv
                .record_reply(self.engine.model(), &done.tokens, reply.clone())?;
            let Some(call) = parse_call(&reply) else {
                self.check_answer(&opts, done.finish, &reply)?;
                break reply;
            };
            if runs.len() >= self.config.max_tool_steps {
                break reply;
            }
            if let Some(tx) = &opts.events {
                let _ = tx.send(AgentEvent::ToolCall(call.clone()));
            }
            // Idle while the tool runs: the engine holds the cache and may drop it
            // under pressure without waiting for the tool.
            self.park_cache().await;
            let run = self.run_tool(call).await;
            if let Some(tx) = &opts.events {
                let _ = tx.send(AgentEvent::ToolResult(run.clone()));
            }
            self.conv.push(Message::tool(run.result.clone()));
            runs.push(run);
            max_tokens = reply_tokens;
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
            restored_tokens: restored,
            restore,
            ttft: ttft.unwrap_or_default(),
            queue,
            elapsed: start.elapsed(),
        })
    }

    /// Checks a final answer against what its grammar could not enforce where the
    /// engine did not: an answer grammar inside the tools grammar. (Without tools the
    /// request's grammar is the answer grammar itself, checked by the engine at its
    /// end.)
    pub(super) fn check_answer(
        &self,
        opts: &TurnOptions,
        finish: FinishReason,
        text: &str,
    ) -> Result<()> {
        if self.tools.is_empty() || finish != FinishReason::Grammar {
            return Ok(());
        }
        match opts.grammar.as_ref().or(self.config.grammar.as_ref()) {
            Some(answer) => self.engine.grammars().check_output(answer, text),
            None => Ok(()),
        }
    }

    /// Parks the cache with the engine (see [`Park`]); keeps it here when the engine
    /// cannot take it.
    async fn park_cache(&mut self) {
        let CacheSlot::Here(cache) = std::mem::take(&mut self.conv.cache) else {
            return;
        };
        if cache.is_empty() {
            self.conv.cache = CacheSlot::Here(cache);
            return;
        }
        self.conv.cache = match self.engine.actor().ask(Park(cache)).await {
            Ok(parked) => CacheSlot::Parked(parked),
            Err(kameo::error::SendError::HandlerError(cache)) => CacheSlot::Here(cache),
            Err(_) => CacheSlot::Empty,
        };
    }
}
