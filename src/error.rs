//! The library's error type: one enum whose variants carry the facts a user needs
//! to fix the problem (paths, sizes, names), so the CLI can print them as they are.

use std::path::PathBuf;

/// Everything that can go wrong in the troupe library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No model file where one was expected.
    #[error("model file not found at {path}: run `troupe model fetch` for the default model or `troupe model fetch NAME` for a catalogue model (`troupe model list`), or pass --model PATH / set TROUPE_MODEL")]
    ModelNotFound {
        /// Where we looked.
        path: PathBuf,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path} is not a GGUF file (its first bytes are {magic:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        magic: Vec<u8>,
    },
    /// The GGUF header parsed but the tensor data is shorter than the header says.
    #[error("{path} is truncated: its tensors need {expected} bytes but the file has {actual}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises.
        expected: u64,
        /// Bytes on disk.
        actual: u64,
    },
    /// The GGUF header itself could not be parsed.
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A model architecture this crate has no forward pass for.
    #[error("unsupported model architecture `{arch}` (troupe runs: llama)")]
    UnsupportedArchitecture {
        /// `general.architecture` from the file.
        arch: String,
    },
    /// A metadata key the model needs is missing or has the wrong type.
    #[error("GGUF metadata `{key}`: {reason}")]
    Metadata {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight tensor is missing or has an unexpected shape.
    #[error("weight tensor `{name}`: {reason}")]
    Tensor {
        /// Tensor name in the GGUF.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token id that the vocabulary does not have.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Rendering the chat template ran past one of its bounds (a template that loops,
    /// or renders a huge prompt).
    #[error("chat template: rendering exceeded its {limit}")]
    TemplateLimit {
        /// Which bound, with its value.
        limit: String,
    },
    /// A sequence would grow past the model's context window.
    #[error("sequence of {needed} tokens exceeds the model's context of {context} tokens")]
    ContextOverflow {
        /// Tokens the sequence would hold.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// A generation request that can never fit the model's context.
    #[error("request needs {cached} cached + {new} new + {max_tokens} max_tokens = {} tokens, more than the model's context of {context}", cached.saturating_add(*new).saturating_add(*max_tokens))]
    RequestTooLong {
        /// Tokens already in the cache.
        cached: usize,
        /// New tokens to feed.
        new: usize,
        /// Tokens to generate at most.
        max_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// A request whose cache alone would exceed the KV memory budget.
    #[error("request needs a KV cache of {needed} bytes ({tokens} tokens), more than the whole KV budget of {budget} bytes")]
    KvBudgetExceeded {
        /// Bytes its cache would hold.
        needed: usize,
        /// Tokens it would hold.
        tokens: usize,
        /// The budget.
        budget: usize,
    },
    /// The request's cache was dropped while it waited, to admit the requests before
    /// it under the KV budget; resubmit with the whole context (re-prefill).
    #[error("preempted under the KV budget: the cache was dropped, resubmit from an empty cache")]
    Preempted,
    /// The engine thread is gone (the model actor stopped, or the thread died with
    /// this request in it; the actor restarts it for the next request).
    #[error("the model engine stopped")]
    EngineStopped,
    /// The forward panicked on this sequence (alone: the others of its step went on).
    #[error("the forward panicked on this sequence: {what}")]
    EnginePanic {
        /// The panic's message.
        what: String,
    },
    /// The model produced a NaN logit for this sequence.
    #[error("the model produced a NaN logit (token {index}); the sequence cannot be sampled")]
    NanLogits {
        /// The first token whose logit is NaN.
        index: usize,
    },
    /// A grammar that does not compile, or a generation it cannot continue.
    #[error("{kind}: {message}")]
    Grammar {
        /// Which kind of grammar (regex, JSON Schema, Lark grammar, choice).
        kind: &'static str,
        /// llguidance's message.
        message: String,
    },
    /// A reply that `max_tokens` cut inside a tool call, even after one retry with
    /// more room: the turn fails rather than return the broken call as an answer.
    #[error("the reply was cut by max_tokens ({max_tokens}) inside a tool call; raise max_tokens")]
    ToolCallCut {
        /// The budget of the last try.
        max_tokens: usize,
    },
    /// An agent called as a tool would ask an agent already waiting on it.
    #[error("agent-as-tool cycle refused: {chain}")]
    ToolCycle {
        /// The agents of the cycle, in order.
        chain: String,
    },
    /// The turn was stopped because whoever asked it gave up on it: the agent that
    /// asked it as a tool (its tool call timed out), or a streamed turn's reader.
    #[error("the turn was cancelled: whoever asked it gave up")]
    Cancelled,
    /// A finished output broke a JSON Schema keyword the grammar could not enforce
    /// while decoding (see [`Grammar::JsonSchema`](crate::grammar::Grammar)).
    #[error("the output violates its JSON Schema: {violations}")]
    SchemaViolation {
        /// Each violation: where in the output, what, and the schema keyword.
        violations: String,
    },
    /// A generation request or forward call that makes no sense (an empty prompt,
    /// `max_tokens` of 0, a forward with no sequences).
    #[error("bad request: {what}")]
    BadRequest {
        /// What is wrong with it.
        what: String,
    },
    /// Sampling parameters out of range.
    #[error("sampling: {param} must be {want}, got {got}")]
    Sampling {
        /// The parameter.
        param: &'static str,
        /// What it must be.
        want: &'static str,
        /// What it was.
        got: f32,
    },
    /// The forward failed on a sequence for a reason other than a panic.
    #[error("forward: {what}")]
    Forward {
        /// What failed.
        what: String,
    },
    /// An agent snapshot that cannot be written, or read back (corrupt, another
    /// format version, another model).
    #[error("agent snapshot {path}: {what}")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A configuration (an agent's, a workflow's, a load test's options) that cannot
    /// be used.
    #[error("{what}")]
    Config {
        /// Which setting and why, as the user wrote it.
        what: String,
    },
    /// A tool an agent's configuration or tool choice names that it does not have.
    #[error("{owner}: unknown tool `{tool}` (tools: {known})")]
    UnknownTool {
        /// Who names it (an agent's config, a tool choice).
        owner: String,
        /// The tool named.
        tool: String,
        /// The tools it has.
        known: String,
    },
    /// An MCP server an agent uses that could not be started, spoke something other
    /// than MCP (or a protocol version troupe does not know), or did not answer in
    /// time.
    #[error("MCP server `{server}`: {what}")]
    Mcp {
        /// The server's name in the agent's config.
        server: String,
        /// What went wrong.
        what: String,
    },
    /// An agent that cannot be reached (stopped, or its mailbox gone).
    #[error("agent unreachable: {what}")]
    AgentUnreachable {
        /// What the actor system said.
        what: String,
    },
    /// A workflow's picking agent (a router, a moderator) picked something that is
    /// not one of the choices.
    #[error("{picker} picked `{picked}`, not one of {choices}")]
    Pick {
        /// The agent that picked.
        picker: String,
        /// What it picked.
        picked: String,
        /// The choices.
        choices: String,
    },
    /// A request to a server over HTTP failed (`troupe loadtest --url`).
    #[error("{url}: {what}")]
    Http {
        /// The server.
        url: String,
        /// What went wrong.
        what: String,
    },
    /// Writing a report (a plot, a JSON file) failed.
    #[error("report {what}")]
    Report {
        /// What failed.
        what: String,
    },
    /// A KV cache built for another model shape was passed to the forward.
    #[error("KV cache layout {found} does not match the model's {expected}")]
    CacheMismatch {
        /// The model's layout.
        expected: String,
        /// The cache's layout.
        found: String,
    },
    /// A model name that is not in the built-in catalogue.
    #[error("no model named `{name}` in the catalogue (known: {known}); pass a path to a GGUF file instead")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The catalogue's names, comma-separated.
        known: String,
    },
    /// Fetching the default model failed.
    #[error("model fetch: {0}")]
    Fetch(String),
    /// The downloaded file's checksum is not the expected one.
    #[error("model fetch: SHA-256 mismatch for {file}: expected {expected}, got {actual}")]
    HashMismatch {
        /// File that was checked.
        file: String,
        /// Expected digest (hex).
        expected: String,
        /// Computed digest (hex).
        actual: String,
    },
    /// An allocation the system refused.
    #[error("out of memory: {what} need {bytes} bytes")]
    OutOfMemory {
        /// What was being allocated.
        what: &'static str,
        /// Its size.
        bytes: usize,
    },
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A filesystem or process error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
