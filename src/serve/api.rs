//! The OpenAI Chat Completions wire types `troupe serve` reads and writes: requests
//! as clients send them (unknown fields ignored), responses, stream chunks and the
//! error body, in OpenAI's shapes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ChatRequest {
    /// The model's id (see `GET /v1/models`).
    pub model: Option<String>,
    /// The whole transcript.
    pub messages: Vec<RequestMessage>,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// Stream options (`include_usage`).
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate (older name).
    pub max_tokens: Option<u64>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature (0 is greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<i64>,
    /// Stop strings: one or a list.
    pub stop: Option<Stop>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Tools the client runs.
    pub tools: Option<Vec<RequestTool>>,
    /// `"auto"`, `"none"`, `"required"` or `{"type":"function","function":{"name":…}}`.
    pub tool_choice: Option<Value>,
    /// `{"type":"text"}`, `{"type":"json_object"}` or
    /// `{"type":"json_schema","json_schema":{"name","schema","strict"}}`.
    pub response_format: Option<Value>,
    /// Free-form metadata; `session_id` names the session.
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// End-user id; names the session when nothing else does.
    pub user: Option<String>,
    /// Generate exactly the token limit, past end-of-generation tokens (as vLLM and
    /// llama.cpp accept, for benchmarks).
    pub ignore_eos: bool,
    /// Number of choices: only 1 is served.
    pub n: Option<u32>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    pub include_usage: bool,
}

/// `stop`: a string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// One message of the transcript.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RequestMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// A string, a list of content parts, or null (an assistant tool call).
    pub content: Option<Value>,
    /// An assistant message's tool calls.
    pub tool_calls: Option<Vec<RequestToolCall>>,
    /// The call a tool message answers.
    pub tool_call_id: Option<String>,
}

/// A tool call in an assistant message.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RequestToolCall {
    /// Its id.
    pub id: Option<String>,
    /// The function and its arguments (a JSON string).
    pub function: FunctionCall,
}

/// A function call: name and JSON-encoded arguments.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FunctionCall {
    /// The function.
    pub name: String,
    /// Its arguments, JSON-encoded.
    pub arguments: String,
}

/// A tool the client offers.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RequestTool {
    /// Only `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionSpec,
}

/// A function tool's definition.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FunctionSpec {
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub parameters: Option<Value>,
    /// Refuse schemas the grammar cannot enforce.
    pub strict: Option<bool>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Serialize)]
pub struct ApiUsage {
    /// Prompt tokens (cached and new).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
    /// `cached_tokens`: prompt tokens reused from the session's KV cache.
    pub prompt_tokens_details: PromptDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Serialize)]
pub struct PromptDetails {
    /// Prompt tokens reused from the cache.
    pub cached_tokens: usize,
}

/// A tool call in a response.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    /// Its position among the message's calls (stream deltas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Its id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The call.
    pub function: FunctionCall,
}

/// The error body: `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// A sentence naming the problem.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `server_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`, ...).
    pub code: Option<&'static str>,
}
