//! Tools an agent can call, and the tool-call format its output is constrained to.
//!
//! The default model's chat template defines no tool format, so troupe uses this
//! documented one: a tool call is the whole reply
//! `<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>`, anything else is a
//! final answer. The agent's output grammar (llguidance Lark) allows exactly the calls
//! whose arguments match a tool's JSON Schema, narrowed by the [`ToolChoice`].

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use super::config::ToolChoice;
use crate::grammar::Grammar;
use crate::{Error, Result};

/// Opens a tool call in a reply.
pub const CALL_OPEN: &str = "<tool_call>";
/// Closes a tool call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// A tool: a name, a description, a JSON Schema for its arguments, and a call.
pub trait Tool: Send + Sync + 'static {
    /// Name the model calls it by.
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// JSON Schema of its arguments (an object).
    fn parameters(&self) -> serde_json::Value;
    /// Whether its call grammar may ignore schema keywords llguidance does not
    /// implement (a schema from elsewhere, such as an MCP server's); `false`: the
    /// schema compiles exactly or the agent does not start.
    fn lenient_schema(&self) -> bool {
        false
    }
    /// Runs it; `Err` is shown to the model as a tool error.
    fn call(
        &self,
        arguments: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<String, String>>;
}

/// A tool made of a typed argument struct (its schema derived with schemars) and an
/// async function.
pub struct FnTool<A, F> {
    name: String,
    description: String,
    schema: serde_json::Value,
    f: Arc<F>,
    _args: std::marker::PhantomData<fn(A)>,
}

/// Makes a [`Tool`] from a function of a typed argument struct.
pub fn tool_fn<A, F, Fut>(name: &str, description: &str, f: F) -> Arc<dyn Tool>
where
    A: JsonSchema + DeserializeOwned + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<String, String>> + Send + 'static,
{
    let mut schema = serde_json::to_value(schemars::schema_for!(A)).unwrap_or_default();
    strip_annotations(&mut schema);
    Arc::new(FnTool {
        name: name.into(),
        description: description.into(),
        schema,
        f: Arc::new(f),
        _args: std::marker::PhantomData,
    })
}

/// Drops schema keys that only annotate (`$schema`, `title`, numeric `format`s such
/// as `int32`), which constrain nothing, and closes objects to their declared
/// properties (as OpenAI's strict mode does), so a call carries exactly the fields of
/// the argument struct.
fn strip_annotations(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        if o.get("type").and_then(|t| t.as_str()) == Some("object")
            && !o.contains_key("additionalProperties")
        {
            o.insert(
                "additionalProperties".into(),
                serde_json::Value::Bool(false),
            );
        }
        o.remove("$schema");
        o.remove("title");
        if let Some(f) = o.get("format").and_then(|f| f.as_str()) {
            if f.starts_with("int") || f.starts_with("uint") || f == "float" || f == "double" {
                o.remove("format");
            }
        }
        for child in o.values_mut() {
            strip_annotations(child);
        }
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(strip_annotations);
    }
}

impl<A, F, Fut> Tool for FnTool<A, F>
where
    A: JsonSchema + DeserializeOwned + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<String, String>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> &str {
        &self.description
    }
    fn parameters(&self) -> serde_json::Value {
        self.schema.clone()
    }
    fn call(
        &self,
        arguments: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<String, String>> {
        let f = self.f.clone();
        Box::pin(async move {
            let args: A =
                serde_json::from_value(arguments).map_err(|e| format!("bad arguments: {e}"))?;
            f(args).await
        })
    }
}

/// A tool call parsed from a reply.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// The tool.
    pub name: String,
    /// Its arguments.
    pub arguments: serde_json::Value,
}

/// A tool call that was run, as a reply reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ToolRun {
    /// The call.
    pub call: ToolCall,
    /// What the model was shown: the result, or the error.
    pub result: String,
    /// Whether it failed (error, timeout, panic).
    pub failed: bool,
    /// How long it took.
    pub seconds: f64,
}

/// A tool call written exactly as the tools grammar makes the model write it
/// (compact JSON, `name` before `arguments`).
pub fn format_call(name: &str, arguments: &serde_json::Value) -> String {
    format!(
        "{CALL_OPEN}{{\"name\":{},\"arguments\":{arguments}}}{CALL_CLOSE}",
        serde_json::Value::String(name.into())
    )
}

/// A demonstrated exchange for [`AgentConfig::examples`](super::AgentConfig): the user
/// asks, the assistant calls `tool` with `arguments`, the tool answers `result`, the
/// assistant answers.
pub fn example_exchange(
    question: &str,
    tool: &str,
    arguments: serde_json::Value,
    result: &str,
    answer: &str,
) -> Vec<crate::model::chat::Message> {
    use crate::model::chat::Message;
    vec![
        Message::user(question),
        Message::assistant(format_call(tool, &arguments)),
        Message::tool(result),
        Message::assistant(answer),
    ]
}

/// Parses a reply as a tool call, if it is one.
pub fn parse_call(reply: &str) -> Option<ToolCall> {
    let body = reply
        .trim()
        .strip_prefix(CALL_OPEN)?
        .strip_suffix(CALL_CLOSE)?;
    serde_json::from_str(body.trim()).ok()
}

/// The system prompt's paragraph that tells the model its tools and the format. Each
/// tool is shown as a signature, `name(arg: type, opt?: type): description`, then what
/// each argument means: compact, and (unlike a JSON Schema, whose `description`
/// strings a small model copies into its calls) unlike the calls themselves. The
/// grammar enforces the schema either way.
pub fn tools_prompt(tools: &[Arc<dyn Tool>]) -> String {
    let mut s = String::from(
        "You can call tools. To call one, reply with only <tool_call>{\"name\": \"TOOL\", \"arguments\": {...}}</tool_call> and wait for its result. Otherwise reply with your answer.\nTools:\n",
    );
    for t in tools {
        let schema = t.parameters();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let mut args = Vec::new();
        let mut notes = Vec::new();
        if let Some(props) = schema["properties"].as_object() {
            for (name, p) in props {
                let opt = if required.contains(&name.as_str()) {
                    ""
                } else {
                    "?"
                };
                args.push(format!("{name}{opt}: {}", type_name(p)));
                if let Some(d) = p["description"].as_str() {
                    notes.push(format!(
                        "{name} is {}",
                        d.trim_end_matches('.').to_lowercase()
                    ));
                }
            }
        }
        s.push_str(&format!(
            "- {}({}): {}",
            t.name(),
            args.join(", "),
            t.description()
        ));
        if !notes.is_empty() {
            s.push_str(&format!(" ({})", notes.join("; ")));
        }
        s.push('\n');
    }
    s
}

/// A short name for the type a JSON Schema describes.
fn type_name(p: &serde_json::Value) -> String {
    if let Some(e) = p["enum"].as_array() {
        return e
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" | ");
    }
    match &p["type"] {
        serde_json::Value::String(t) if t == "array" => format!("{}[]", type_name(&p["items"])),
        serde_json::Value::String(t) => t.clone(),
        serde_json::Value::Array(ts) => ts
            .iter()
            .filter_map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "any".into(),
    }
}

/// The tools' names, comma-separated (for errors naming what an agent has).
pub(crate) fn names(tools: &[Arc<dyn Tool>]) -> String {
    tools
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The grammar of a reply under `choice`, or `None` for an unconstrained reply.
/// `answer` is the agent's own output grammar for final answers, if any.
/// Calls are spelled in `format`.
pub fn reply_grammar(
    tools: &[Arc<dyn Tool>],
    choice: &ToolChoice,
    answer: Option<&Grammar>,
    format: super::CallFormat,
) -> Result<Option<Grammar>> {
    let callable: Vec<&Arc<dyn Tool>> = match choice {
        ToolChoice::None => Vec::new(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Tool(name) => {
            let t = tools
                .iter()
                .find(|t| t.name() == name)
                .ok_or_else(|| Error::UnknownTool {
                    owner: "tool_choice".into(),
                    tool: name.clone(),
                    known: names(tools),
                })?;
            vec![t]
        }
    };
    if tools.is_empty() {
        return Ok(answer.cloned());
    }
    // Compact JSON: no free whitespace for a small model to loop in, and the keys are
    // forced (fast-forwarded) rather than sampled.
    let mut options = format.json_options();
    if callable.iter().any(|t| t.lenient_schema()) {
        options["lenient"] = true.into();
    }
    let schema = serde_json::json!({
        "x-guidance": options,
        "anyOf": callable.iter().map(|t| serde_json::json!({
            "type": "object",
            "properties": {"name": {"const": t.name()}, "arguments": t.parameters()},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })).collect::<Vec<_>>()
    });
    let call = format!(
        "call: {:?} %json {} {:?}",
        format.open(),
        schema,
        format.close()
    );
    let must_call = matches!(choice, ToolChoice::Required | ToolChoice::Tool(_));
    let answer_rule = match answer {
        None => "answer: /[^<](.|\\n)*/".to_string(),
        // Leniently: the keywords llguidance cannot enforce are checked on the
        // finished answer instead (the turn validates it).
        Some(Grammar::JsonSchema(s)) => format!(
            "answer: %json {}",
            crate::grammar::lenient_schema(s).unwrap_or_else(|| s.clone())
        ),
        Some(Grammar::StrictJsonSchema(s)) => format!("answer: %json {s}"),
        Some(Grammar::Regex(r)) => format!("answer: /{}/", r.replace('/', "\\/")),
        Some(Grammar::Choice(c)) => format!(
            "answer: {}",
            c.iter().map(|o| serde_json::to_string(o).unwrap_or_default()).collect::<Vec<_>>().join(" | ")
        ),
        Some(Grammar::Lark(_)) => {
            return Err(Error::Config {
                what: "a Lark answer grammar cannot be combined with tools; use a regex, a JSON Schema or a choice".into(),
            })
        }
    };
    let lark = if callable.is_empty() {
        // Tools exist but may not be called: an answer that does not look like a call.
        format!("start: answer\n{answer_rule}\n")
    } else if must_call {
        format!("start: call\n{call}\n")
    } else {
        format!("start: call | answer\n{call}\n{answer_rule}\n")
    };
    Ok(Some(Grammar::Lark(lark)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_formatted_call_parses_back() {
        let args = serde_json::json!({"b": 2, "a": "x"});
        let text = format_call("add", &args);
        assert!(
            text.starts_with("<tool_call>{\"name\":\"add\",\"arguments\":"),
            "{text}"
        );
        let call = parse_call(&text).unwrap();
        assert_eq!((call.name.as_str(), call.arguments), ("add", args));
    }
}
