//! From an OpenAI request to an agent's [`Complete`]: the transcript's messages (an
//! assistant's `tool_calls` written as the model writes calls), the client's tools,
//! `tool_choice`, `response_format` (strict or lenient JSON Schema), sampling, stop
//! strings and the token limit; each bad field a 400 that names it.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use super::api::{ChatRequest, RequestMessage, Stop};
use super::errors::ApiError;
use crate::agent::{CallFormat, Complete, Tool, ToolChoice, TurnOptions};
use crate::grammar::Grammar;
use crate::model::{Message, Role};
use crate::sampling::SamplingParams;

/// A tool the client runs: its schema constrains the call; troupe never calls it.
struct ClientTool {
    name: String,
    description: String,
    parameters: Value,
}

impl Tool for ClientTool {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> &str {
        &self.description
    }
    fn parameters(&self) -> Value {
        self.parameters.clone()
    }
    fn call(&self, _: Value) -> BoxFuture<'static, Result<String, String>> {
        Box::pin(async { Err("this tool is run by the client".to_string()) })
    }
}

/// The text of a message's `content`: a string, or the text parts of a list.
fn content_text(content: &Option<Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(format!(
                            "content parts of type {} are not supported (only text)",
                            kind.unwrap_or("?")
                        ))
                        .param("messages"))
                    }
                }
            }
            Ok(text)
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "message content must be a string or a list of parts, got {other}"
        ))
        .param("messages")),
    }
}

/// One request message as a transcript message.
fn message(m: &RequestMessage, format: CallFormat) -> Result<Message, ApiError> {
    let text = content_text(&m.content)?;
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" | "function" => Role::Tool,
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown message role `{other}` (system, developer, user, assistant, tool)"
            ))
            .param("messages"))
        }
    };
    let calls = m.tool_calls.as_deref().unwrap_or_default();
    if role != Role::Assistant || calls.is_empty() {
        return Ok(Message::new(role, text));
    }
    let mut written = Vec::with_capacity(calls.len());
    for c in calls {
        let args: Value = serde_json::from_str(&c.function.arguments).map_err(|e| {
            ApiError::bad_request(format!(
                "tool call `{}`: arguments are not JSON: {e}",
                c.function.name
            ))
            .param("messages")
        })?;
        written.push(format.format_call(&c.function.name, &args));
    }
    Ok(Message::assistant(written.join("\n")))
}

/// The tool choice: `auto`, `none`, `required` or a named function.
fn tool_choice(v: &Option<Value>, tools: &[Arc<dyn Tool>]) -> Result<ToolChoice, ApiError> {
    let bad = |what: String| ApiError::bad_request(what).param("tool_choice");
    let choice = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => return Err(bad(format!("unknown tool_choice `{other}`"))),
        },
        Some(obj) => match obj["function"]["name"].as_str() {
            Some(name) => ToolChoice::Tool(name.to_string()),
            None => return Err(bad(format!("tool_choice {obj} names no function"))),
        },
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Tool(_)) {
        return Err(bad(
            "tool_choice asks for a tool call but no tools are given".into(),
        ));
    }
    Ok(choice)
}

/// The answer grammar of `response_format`.
fn response_format(v: &Option<Value>) -> Result<Option<Grammar>, ApiError> {
    let bad = |what: String| ApiError::bad_request(what).param("response_format");
    let Some(v) = v else { return Ok(None) };
    match v["type"].as_str() {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonSchema(
            serde_json::json!({"type": "object"}),
        ))),
        Some("json_schema") => {
            let spec = &v["json_schema"];
            let schema = spec
                .get("schema")
                .cloned()
                .ok_or_else(|| bad("json_schema needs a `schema`".into()))?;
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad(format!(
                    "json_schema.schema must be an object, got {schema}"
                )));
            }
            Ok(Some(if spec["strict"].as_bool() == Some(true) {
                Grammar::StrictJsonSchema(schema)
            } else {
                Grammar::JsonSchema(schema)
            }))
        }
        Some(other) => Err(bad(format!(
            "unknown response_format type `{other}` (text, json_object, json_schema)"
        ))),
    }
}

/// What a request asks of a session's agent, and how to answer it.
pub struct Converted {
    /// The agent's message (its `options.events` unset).
    pub complete: Complete,
    /// Stream the answer.
    pub stream: bool,
    /// Send a last chunk with the usage.
    pub include_usage: bool,
}

/// Converts `r`; `max_tokens` is the server's default token limit, `context` the
/// model's.
pub fn convert(
    r: ChatRequest,
    format: CallFormat,
    default_max_tokens: usize,
) -> Result<Converted, ApiError> {
    if r.messages.is_empty() {
        return Err(ApiError::bad_request("`messages` is empty").param("messages"));
    }
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is served").param("n"));
    }
    let messages = r
        .messages
        .iter()
        .map(|m| message(m, format))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tools: Vec<Arc<dyn Tool>> = Vec::new();
    for t in r.tools.unwrap_or_default() {
        if t.kind != "function" || t.function.name.is_empty() {
            return Err(ApiError::bad_request(format!(
                "tools must be functions with a name (got type `{}`, name `{}`)",
                t.kind, t.function.name
            ))
            .param("tools"));
        }
        let parameters = t
            .function
            .parameters
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        tools.push(Arc::new(ClientTool {
            name: t.function.name,
            description: t.function.description,
            parameters,
        }));
    }
    let choice = tool_choice(&r.tool_choice, &tools)?;
    let grammar = response_format(&r.response_format)?;
    let max_tokens = r.max_completion_tokens.or(r.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be at least 1").param("max_tokens"));
    }
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: r.temperature.unwrap_or(defaults.temperature),
        top_p: r.top_p.unwrap_or(defaults.top_p),
        presence_penalty: r.presence_penalty.unwrap_or(0.0),
        frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
        seed: r.seed.unwrap_or(0) as u64,
        ..defaults
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let options = TurnOptions {
        tool_choice: Some(choice),
        grammar,
        events: None,
        max_tokens: Some(max_tokens.map_or(default_max_tokens, |m| m as usize)),
        sampling: Some(sampling),
        stop,
        ignore_eos: r.ignore_eos,
    };
    Ok(Converted {
        complete: Complete {
            messages,
            tools,
            options,
        },
        stream: r.stream,
        include_usage: r.stream_options.is_some_and(|o| o.include_usage),
    })
}
