//! The tool-call format an agent uses with its model: the model's own where its chat
//! template teaches one, else troupe's documented format (see [`super::tools`]).
//!
//! A template that renders a `tools` list and shows calls in `<tool_call>` tags (Qwen's,
//! and the Hermes-style templates like it) gets the agent's tools as OpenAI-style
//! function descriptions through its `tools` variable, and the model writes calls the
//! way the template shows them: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`,
//! with the JSON separators of the template's `tojson` (`", "` and `": "`). The
//! reply grammar is built for that spelling, the few-shot examples are re-spelled in
//! it, and troupe's own tools paragraph is left out of the system prompt (the
//! template writes its own). Parsing accepts both spellings.

use std::sync::Arc;

use super::tools::{parse_call, Tool, CALL_CLOSE, CALL_OPEN};
use crate::model::{Message, Model, Role};

/// How tool calls are written in a reply and shown to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallFormat {
    /// troupe's format, taught by a paragraph of the system prompt:
    /// `<tool_call>{"name":…,"arguments":…}</tool_call>` (compact JSON).
    Troupe,
    /// The chat template's own (Hermes style): the template renders the tools, and a
    /// call is `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`.
    Template,
}

impl CallFormat {
    /// The format for `model`: its template's where the template teaches tool calls.
    pub fn of(model: &Model) -> Self {
        if model.chat_template().teaches_tool_calls() {
            Self::Template
        } else {
            Self::Troupe
        }
    }

    /// What opens a call.
    pub fn open(self) -> &'static str {
        match self {
            Self::Troupe => CALL_OPEN,
            Self::Template => "<tool_call>\n",
        }
    }

    /// What closes a call.
    pub fn close(self) -> &'static str {
        match self {
            Self::Troupe => CALL_CLOSE,
            Self::Template => "\n</tool_call>",
        }
    }

    /// The `x-guidance` options of the call's JSON: compact for troupe's format (no
    /// free whitespace for a small model to loop in), the template's `tojson`
    /// separators for the template's.
    pub fn json_options(self) -> serde_json::Value {
        match self {
            Self::Troupe => serde_json::json!({"whitespace_flexible": false}),
            Self::Template => serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        }
    }

    /// A call written as the grammar makes the model write it.
    pub fn format_call(self, name: &str, arguments: &serde_json::Value) -> String {
        let name = serde_json::Value::String(name.into());
        match self {
            Self::Troupe => format!(
                "{}{{\"name\":{name},\"arguments\":{arguments}}}{}",
                self.open(),
                self.close()
            ),
            Self::Template => format!(
                "{}{{\"name\": {name}, \"arguments\": {}}}{}",
                self.open(),
                spaced_json(arguments),
                self.close()
            ),
        }
    }

    /// Whether troupe's tools paragraph goes into the system prompt.
    pub fn needs_tools_prompt(self) -> bool {
        self == Self::Troupe
    }

    /// The template's `tools` value for these tools (none for troupe's format).
    pub fn template_tools(self, tools: &[Arc<dyn Tool>]) -> Option<serde_json::Value> {
        if self == Self::Troupe || tools.is_empty() {
            return None;
        }
        Some(serde_json::Value::Array(
            tools
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "type": "function",
                        "function": {
                            "name": t.name(),
                            "description": t.description(),
                            "parameters": t.parameters(),
                        }
                    })
                })
                .collect(),
        ))
    }

    /// The few-shot examples with their assistant calls re-spelled in this format.
    pub fn respell(self, messages: &mut [Message]) {
        for m in messages.iter_mut().filter(|m| m.role == Role::Assistant) {
            if let Some(call) = parse_call(&m.content) {
                m.content = self.format_call(&call.name, &call.arguments);
            }
        }
    }
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "`), which Hermes-style
/// templates show the model.
fn spaced_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => format!(
            "[{}]",
            items.iter().map(spaced_json).collect::<Vec<_>>().join(", ")
        ),
        serde_json::Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    serde_json::Value::String(k.clone()),
                    spaced_json(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse_back() {
        let args = serde_json::json!({"expression": "6 * 7", "n": [1, 2]});
        for f in [CallFormat::Troupe, CallFormat::Template] {
            let text = f.format_call("calculate", &args);
            let call = parse_call(&text).unwrap();
            assert_eq!((call.name.as_str(), &call.arguments), ("calculate", &args));
        }
        assert_eq!(
            CallFormat::Template.format_call("f", &serde_json::json!({"a": [1, "x"]})),
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, \"x\"]}}\n</tool_call>"
        );
    }

    #[test]
    fn examples_are_respelled() {
        let mut m = vec![
            Message::user("q"),
            Message::assistant(CallFormat::Troupe.format_call("f", &serde_json::json!({}))),
            Message::assistant("The answer is 42."),
        ];
        CallFormat::Template.respell(&mut m);
        assert_eq!(
            m[1].content,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"
        );
        assert_eq!(m[2].content, "The answer is 42.");
    }
}
