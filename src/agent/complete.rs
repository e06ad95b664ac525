//! One completion over a transcript the caller keeps (an OpenAI-style request that
//! resends the whole conversation each time): the agent makes its conversation the
//! request's messages, reusing its token log and cache for what they share, and
//! generates the next assistant message. Tool calls are returned, not run: the
//! caller runs its own tools and sends their results in its next request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo::message::{Context, Message as KameoMessage};

use super::conversation::Undo;
use super::messages::TurnOptions;
use super::tools::{parse_call, tools_prompt, Tool, ToolCall};
use super::{AgentActor, CallFormat, ToolChoice};
use crate::engine::{FinishReason, Usage};
use crate::model::{Message, Role};
use crate::Result;

/// Generate the next assistant message of `messages` (the whole transcript: system,
/// user, assistant and tool messages, a tool call written as
/// [`CallFormat::format_call`] spells it). Replies with a [`Completion`].
///
/// When the agent's conversation is a prefix of `messages`, only the new messages
/// are tokenized and fed; otherwise the conversation is replaced and the token log
/// and cache are kept up to the first token that differs. A failure leaves the
/// conversation as it was.
pub struct Complete {
    /// The transcript, oldest first.
    pub messages: Vec<Message>,
    /// Tools the caller runs itself: their schemas constrain a call, their `call` is
    /// never used.
    pub tools: Vec<Arc<dyn Tool>>,
    /// Tool choice, answer grammar, sampling, stop strings, token limit, events.
    pub options: TurnOptions,
}

impl std::fmt::Debug for Complete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Complete")
            .field("messages", &self.messages.len())
            .field("tools", &super::tools::names(&self.tools))
            .finish()
    }
}

/// The next assistant message.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Its text: the answer, or the call as written (see `tool_call`).
    pub text: String,
    /// The tool call, when the reply is one.
    pub tool_call: Option<ToolCall>,
    /// Why the reply ended.
    pub finish: FinishReason,
    /// Token counts: `cached_tokens` were reused from the cache.
    pub usage: Usage,
    /// Tokens computed again that the agent had computed before (an evicted cache,
    /// or a transcript that changed under it).
    pub recomputed_tokens: usize,
    /// Time to the first generated token.
    pub ttft: Duration,
    /// Wall time.
    pub elapsed: Duration,
}

impl KameoMessage<Complete> for AgentActor {
    type Reply = Result<Completion>;
    async fn handle(&mut self, m: Complete, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let mut undo = self.begin_turn();
        let own_tools = std::mem::replace(&mut self.tools, m.tools);
        let result = self.complete(m.messages, m.options, &mut undo).await;
        self.tools = own_tools;
        self.end_turn(result, |c| &c.usage, undo).await
    }
}

impl AgentActor {
    async fn complete(
        &mut self,
        mut messages: Vec<Message>,
        opts: TurnOptions,
        undo: &mut Undo,
    ) -> Result<Completion> {
        let start = Instant::now();
        if messages.is_empty() {
            return Err(crate::Error::BadRequest {
                what: "a completion needs at least one message".into(),
            });
        }
        let format = CallFormat::of(self.engine.model());
        if !self.tools.is_empty() && format.needs_tools_prompt() {
            let paragraph = tools_prompt(&self.tools);
            match messages.first_mut() {
                Some(m) if m.role == Role::System => {
                    m.content = format!("{}\n\n{paragraph}", m.content);
                }
                _ => messages.insert(0, Message::system(paragraph)),
            }
        }
        let tools = format.template_tools(&self.tools);
        let same_tools = self.conv.tools() == tools.as_ref();
        self.conv.set_tools(tools);
        let known = self.conv.messages();
        if same_tools && messages.len() > known.len() && messages[..known.len()] == *known {
            for m in messages.drain(..).skip(known.len()) {
                self.conv.push(m);
            }
        } else {
            self.conv.set_messages(messages, undo);
        }
        let choice = opts
            .tool_choice
            .clone()
            .unwrap_or_else(|| self.config.tool_choice.clone());
        let max_tokens = opts.max_tokens.unwrap_or(self.config.max_tokens);
        let submitted = start.elapsed();
        let mut result = self.generate(&choice, &opts, max_tokens, undo).await;
        while matches!(result, Err(crate::Error::Preempted)) {
            self.drop_cache();
            result = self.generate(&choice, &opts, max_tokens, undo).await;
        }
        let (done, recomputed) = result?;
        self.conv.cache = super::CacheSlot::Here(done.cache);
        self.conv
            .record_reply(self.engine.model(), &done.tokens, done.text.clone())?;
        let tool_call = if choice == ToolChoice::None || self.tools.is_empty() {
            None
        } else {
            parse_call(&done.text)
        };
        if tool_call.is_none() {
            self.check_answer(&opts, done.finish, &done.text)?;
        }
        Ok(Completion {
            text: done.text,
            tool_call,
            finish: done.finish,
            usage: done.usage,
            recomputed_tokens: recomputed,
            ttft: submitted + done.timings.time_to_first_token,
            elapsed: start.elapsed(),
        })
    }
}
