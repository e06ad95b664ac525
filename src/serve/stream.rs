//! Building responses: the JSON body of a finished completion, and the chunks of a
//! streamed one. While streaming, text that may open a tool call is held back until
//! it is known to be an answer; a call is sent as OpenAI streams tool calls (a
//! delta naming the function, then one with its arguments).

use serde_json::{json, Value};

use super::api::{ApiUsage, FunctionCall, PromptDetails, ToolCallOut};
use crate::agent::{Completion, ToolCall};
use crate::engine::{FinishReason, Usage};

/// The response's usage.
pub fn usage(u: &Usage) -> ApiUsage {
    ApiUsage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.generated_tokens,
        total_tokens: u.prompt_tokens + u.generated_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: u.cached_tokens,
        },
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(c: &Completion) -> &'static str {
    if c.tool_call.is_some() {
        return "tool_calls";
    }
    match c.finish {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// A tool call as the response shows it.
pub fn tool_call(call: &ToolCall, id: &str, index: Option<usize>) -> ToolCallOut {
    ToolCallOut {
        index,
        id: format!("call_{id}"),
        kind: "function",
        function: FunctionCall {
            name: call.name.clone(),
            arguments: call.arguments.to_string(),
        },
    }
}

/// The body of a non-streamed completion.
pub fn body(id: &str, created: u64, model: &str, c: &Completion) -> Value {
    let message = match &c.tool_call {
        Some(call) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [tool_call(call, id, None)],
        }),
        None => json!({"role": "assistant", "content": c.text}),
    };
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(c),
            "logprobs": null,
        }],
        "usage": usage(&c.usage),
    })
}

/// One stream chunk with `delta` (and a finish reason on the last).
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    })
}

/// The last chunk of a stream with `include_usage`: no choices, the usage.
pub fn usage_chunk(id: &str, created: u64, model: &str, u: &Usage) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(u),
    })
}

/// Holds back streamed text while it may still be the opening of a tool call.
#[derive(Debug)]
pub struct CallFilter {
    open: &'static str,
    held: String,
    /// The text is a call (or may only be one): nothing more is released.
    call: bool,
    /// The text is an answer: everything is released as it comes.
    answer: bool,
}

impl CallFilter {
    /// A filter for calls opened by `open`; `may_call` is false when the reply
    /// cannot be a call (no tools, or `tool_choice` none).
    pub fn new(open: &'static str, may_call: bool) -> Self {
        Self {
            open,
            held: String::new(),
            call: false,
            answer: !may_call,
        }
    }

    /// Text to send now for `piece`.
    pub fn push(&mut self, piece: &str) -> String {
        if self.answer {
            return piece.to_string();
        }
        self.held.push_str(piece);
        if self.call {
            return String::new();
        }
        let head = self.held.trim_start();
        if head.starts_with(self.open) {
            self.call = true;
            String::new()
        } else if self.open.starts_with(head) {
            String::new()
        } else {
            self.answer = true;
            std::mem::take(&mut self.held)
        }
    }

    /// What was held back (sent as content when the reply is not a call).
    pub fn rest(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_released_once_it_cannot_be_a_call() {
        let mut f = CallFilter::new("<tool_call>", true);
        assert_eq!(f.push("<to"), "");
        assert_eq!(f.push("p"), "<top");
        assert_eq!(f.push(" hat"), " hat");
        let mut f = CallFilter::new("<tool_call>", true);
        assert_eq!(f.push(" <tool_"), "");
        assert_eq!(f.push("call>{"), "");
        assert_eq!(f.push("}"), "");
        assert_eq!(f.rest(), " <tool_call>{}");
        let mut f = CallFilter::new("<tool_call>", false);
        assert_eq!(f.push("<tool_call>"), "<tool_call>");
    }
}
