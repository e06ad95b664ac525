//! An agent's conversation as plain data, testable without actors: the messages, the
//! append-only token log (exactly what the KV cache holds, plus the last sampled
//! token, never fed), what the log says as text, and the cache (here and leased,
//! parked with the engine, or gone).
//!
//! A model call needs the log to end with the prompt for the messages added since
//! the last call. [`Conversation::sync`] renders only a window: the last message the
//! log already covers and the new ones, and appends what the new ones add past it.
//! It checks the window against the end of the log's text; when the template does
//! not render a window the way it renders the whole conversation (or anything else
//! disagrees), it falls back to rendering everything and, on disagreement, truncates
//! log and cache to the longest common prefix (counted as a prefix mismatch). So a
//! turn's rendering and tokenizing cost does not grow with the history.

use crate::engine::{LeasedCache, ParkedCache};
use crate::model::{Message, Model, Role};
use crate::Result;

/// Most bytes the template may add after a reply's end-of-generation token, before
/// the next message (ChatML's newline after `<|im_end|>`).
const MAX_TRAILER: usize = 16;

/// Where the conversation's cache is.
#[derive(Debug, Default)]
pub enum CacheSlot {
    /// None (never filled, or evicted): the next call prefills the whole log.
    #[default]
    Empty,
    /// Here, leased from the engine.
    Here(LeasedCache),
    /// Parked with the engine (during a tool call); it may have dropped it.
    Parked(ParkedCache),
}

impl CacheSlot {
    /// Tokens the cache holds (or held when parked).
    pub fn len(&self) -> usize {
        match self {
            CacheSlot::Empty => 0,
            CacheSlot::Here(c) => c.len(),
            CacheSlot::Parked(p) => p.len(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the first `n` tokens (a rollback, or a log that disagreed past
    /// them): a cache here is cut; a parked one (in memory or spilled) is cut by the
    /// request that resumes it; a slot left with nothing is emptied.
    pub fn truncate(&mut self, n: usize) {
        match self {
            CacheSlot::Here(c) if c.len() > n => c.truncate(n),
            CacheSlot::Parked(p) if p.len() > n => {
                if n == 0 {
                    *self = CacheSlot::Empty;
                } else {
                    p.truncate(n);
                }
            }
            _ => {}
        }
    }
}

/// How the last [`Conversation::sync`] went (what it cost, in work that does not
/// depend on the machine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncWork {
    /// It rendered a window rather than the whole conversation.
    pub windowed: bool,
    /// Bytes of template output rendered.
    pub rendered_bytes: usize,
    /// Bytes tokenized.
    pub tokenized_bytes: usize,
    /// Tokens appended to the log.
    pub appended_tokens: usize,
    /// The rendered prompt disagreed with the log (cut to the common prefix).
    pub mismatch: bool,
}

/// The state a failed turn goes back to: the lengths of what only grows within a
/// turn, and a full copy only when something was replaced.
#[derive(Debug)]
pub struct Undo {
    messages: usize,
    log: usize,
    said: usize,
    synced: usize,
    cache: usize,
    replaced: Option<(Vec<Message>, Vec<u32>, String, usize)>,
}

/// Messages, token log, the log's text, and the cache (see the module docs).
#[derive(Debug, Default)]
pub struct Conversation {
    messages: Vec<Message>,
    log: Vec<u32>,
    /// The log decoded (kept as it grows, never decoded again in full).
    said: String,
    /// Messages the log covers.
    synced: usize,
    /// The tools, for a chat template that renders them (see
    /// [`CallFormat`](super::CallFormat)).
    tools: Option<serde_json::Value>,
    /// The cache.
    pub cache: CacheSlot,
}

impl Conversation {
    /// A conversation that starts with `messages` (system prompt, examples).
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }

    /// A conversation restored from its messages and token log (a snapshot, a
    /// checkpoint): the log covers every message.
    pub fn restore(model: &Model, messages: Vec<Message>, log: Vec<u32>) -> Result<Self> {
        let said = model.tokenizer().decode(&log)?;
        let synced = if log.is_empty() { 0 } else { messages.len() };
        Ok(Self {
            messages,
            log,
            said,
            synced,
            tools: None,
            cache: CacheSlot::Empty,
        })
    }

    /// A copy for a forked agent: messages, log and a copy of the cache (a memory
    /// copy, no recomputation; a parked cache is not copied).
    pub fn fork(&self) -> Self {
        Self {
            messages: self.messages.clone(),
            log: self.log.clone(),
            said: self.said.clone(),
            synced: self.synced,
            tools: self.tools.clone(),
            cache: match &self.cache {
                CacheSlot::Here(c) => CacheSlot::Here(c.fork().into()),
                _ => CacheSlot::Empty,
            },
        }
    }

    /// Gives the chat template the agent's tools to render (templates that teach their
    /// own tool calls list the tools themselves).
    pub fn set_tools(&mut self, tools: Option<serde_json::Value>) {
        self.tools = tools;
    }

    /// The tools the template renders, if any.
    pub fn tools(&self) -> Option<&serde_json::Value> {
        self.tools.as_ref()
    }

    /// Renders `messages` with the conversation's tools.
    fn render(&self, model: &Model, messages: &[Message], prompt: bool) -> Result<String> {
        model
            .chat_template()
            .render_with_tools(messages, self.tools.as_ref(), prompt)
    }

    /// The messages.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The token log.
    pub fn log(&self) -> &[u32] {
        &self.log
    }

    /// Adds a message (a user's, a tool result).
    pub fn push(&mut self, m: Message) {
        self.messages.push(m);
    }

    /// Records a model reply: its tokens (which the cache holds but the last) and its
    /// text, as an assistant message the log now covers.
    pub fn record_reply(&mut self, model: &Model, tokens: &[u32], text: String) -> Result<()> {
        self.said.push_str(&model.tokenizer().decode(tokens)?);
        self.log.extend_from_slice(tokens);
        self.messages.push(Message::assistant(text));
        self.synced = self.messages.len();
        Ok(())
    }

    /// The tokens a model call feeds: the log past what the cache holds.
    pub fn to_feed(&self) -> &[u32] {
        &self.log[self.cache.len().min(self.log.len())..]
    }

    /// What a failed turn restores (see [`Self::rollback`]).
    pub fn undo_point(&self) -> Undo {
        Undo {
            messages: self.messages.len(),
            log: self.log.len(),
            said: self.said.len(),
            synced: self.synced,
            cache: self.cache.len(),
            replaced: None,
        }
    }

    /// Puts messages, log and text back as they were at `undo`; the cache is cut back
    /// to what it held then (caches only grow within a turn, or are cut to a common
    /// prefix, so its first tokens are those of before).
    pub fn rollback(&mut self, undo: Undo) {
        match undo.replaced {
            Some((messages, log, said, synced)) => {
                self.messages = messages;
                self.log = log;
                self.said = said;
                self.synced = synced;
            }
            None => {
                self.messages.truncate(undo.messages);
                self.log.truncate(undo.log);
                self.said.truncate(undo.said);
                self.synced = undo.synced;
            }
        }
        let keep = undo.cache.min(self.log.len());
        self.cache.truncate(keep);
    }

    /// Keeps a full copy in `undo` before something is replaced rather than appended.
    fn save_replaced(&self, undo: &mut Undo) {
        if undo.replaced.is_none() {
            let mut messages = self.messages.clone();
            messages.truncate(undo.messages);
            let mut log = self.log.clone();
            log.truncate(undo.log);
            let mut said = self.said.clone();
            said.truncate(undo.said);
            undo.replaced = Some((messages, log, said, undo.synced));
        }
    }

    /// Appends to the log the prompt of the messages added since the last call (see
    /// the module docs).
    pub fn sync(&mut self, model: &Model, undo: &mut Undo) -> Result<SyncWork> {
        if self.synced == self.messages.len() && !self.log.is_empty() {
            return Ok(SyncWork::default());
        }
        if !self.log.is_empty() && self.synced > 0 {
            if let Some(work) = self.sync_window(model)? {
                return Ok(work);
            }
        }
        self.sync_full(model, undo)
    }

    /// The windowed sync; `None` when the window cannot be trusted.
    fn sync_window(&mut self, model: &Model) -> Result<Option<SyncWork>> {
        let head = usize::from(
            self.messages
                .first()
                .is_some_and(|m| m.role == Role::System),
        );
        let start = (self.synced - 1).max(head);
        if start >= self.synced {
            return Ok(None);
        }
        let mut window: Vec<Message> = self.messages[..head].to_vec();
        window.extend_from_slice(&self.messages[start..self.synced]);
        let (Ok(h), Ok(p)) = (
            self.render(model, &self.messages[..head], false),
            self.render(model, &window, false),
        ) else {
            return Ok(None);
        };
        window.extend_from_slice(&self.messages[self.synced..]);
        let Ok(w) = self.render(model, &window, true) else {
            return Ok(None);
        };
        let (Some(body), Some(added)) = (p.strip_prefix(h.as_str()), w.strip_prefix(p.as_str()))
        else {
            return Ok(None);
        };
        // The log ends inside the window's body: after the last reply's end token,
        // before what the template writes after it.
        let Some(covered) = (0..=MAX_TRAILER.min(body.len()))
            .map(|t| body.len() - t)
            .find(|&k| body.is_char_boundary(k) && self.said.ends_with(&body[..k]))
        else {
            return Ok(None);
        };
        if covered == 0 {
            return Ok(None);
        }
        let delta = format!("{}{added}", &body[covered..]);
        let ids = model.tokenizer().encode(&delta)?;
        let work = SyncWork {
            windowed: true,
            rendered_bytes: h.len() + p.len() + w.len(),
            tokenized_bytes: delta.len(),
            appended_tokens: ids.len(),
            mismatch: false,
        };
        self.said.push_str(&delta);
        self.log.extend_from_slice(&ids);
        self.synced = self.messages.len();
        Ok(Some(work))
    }

    /// Renders the whole conversation; appends the delta past the log, or on
    /// disagreement cuts log and cache to the common prefix.
    fn sync_full(&mut self, model: &Model, undo: &mut Undo) -> Result<SyncWork> {
        let full = self.render(model, &self.messages, true)?;
        let tok = model.tokenizer();
        let mut work = SyncWork {
            rendered_bytes: full.len(),
            ..SyncWork::default()
        };
        if let Some(delta) = full.strip_prefix(self.said.as_str()) {
            let ids = if self.log.is_empty() {
                tok.encode_prompt(delta)?
            } else {
                tok.encode(delta)?
            };
            work.tokenized_bytes = delta.len();
            work.appended_tokens = ids.len();
            self.log.extend_from_slice(&ids);
            self.said.push_str(delta);
            self.synced = self.messages.len();
            return Ok(work);
        }
        self.save_replaced(undo);
        let ids = tok.encode_prompt(&full)?;
        let common = self
            .log
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        work.tokenized_bytes = full.len();
        work.appended_tokens = ids.len() - common;
        work.mismatch = true;
        self.log.truncate(common);
        self.log.extend_from_slice(&ids[common..]);
        self.said = tok.decode(&self.log)?;
        self.synced = self.messages.len();
        self.cache.truncate(common);
        Ok(work)
    }

    /// Replaces the conversation by `messages` (the oldest turns dropped to fit the
    /// context), re-rendered and re-tokenized in full; the old state is kept in
    /// `undo` and the cache is handed back (the new log shares no prefix with it
    /// past the system prompt, so it is re-prefilled).
    pub fn replace(
        &mut self,
        model: &Model,
        messages: Vec<Message>,
        undo: &mut Undo,
    ) -> Result<CacheSlot> {
        let full = self.render(model, &messages, true)?;
        let log = model.tokenizer().encode_prompt(&full)?;
        self.save_replaced(undo);
        self.said = model.tokenizer().decode(&log)?;
        self.messages = messages;
        self.log = log;
        self.synced = self.messages.len();
        Ok(std::mem::take(&mut self.cache))
    }

    /// Makes `messages` the conversation; the next [`Self::sync`] renders it whole and
    /// keeps the log and the cache up to the first token that differs (the old state
    /// is kept in `undo`).
    pub fn set_messages(&mut self, messages: Vec<Message>, undo: &mut Undo) {
        self.save_replaced(undo);
        self.messages = messages;
        self.synced = 0;
    }

    /// Renders `messages` and tokenizes the prompt (for checking a cut of the
    /// conversation against the context).
    pub fn prompt_len(&self, model: &Model, messages: &[Message]) -> Result<usize> {
        let full = self.render(model, messages, true)?;
        Ok(model.tokenizer().encode_prompt(&full)?.len())
    }

    /// Forgets everything after the first `keep` messages, and the cache (the tools
    /// stay).
    pub fn reset(&mut self, keep: Vec<Message>) {
        let tools = self.tools.take();
        *self = Self::new(keep);
        self.tools = tools;
    }
}
