//! What an agent is made of, as a user writes it: [`AgentConfig`] (serde, loadable
//! from TOML or JSON).

use std::path::Path;

use crate::grammar::Grammar;
use crate::sampling::SamplingParams;
use crate::{Error, Result};

/// What happens when a turn would not fit the model's context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextPolicy {
    /// Refuse the turn with an error naming the lengths; the conversation is untouched.
    #[default]
    Error,
    /// Keep the system prompt, drop the oldest turns until it fits, rebuild the cache.
    DropOldest,
}

/// Which tools the model may (or must) call, as in the OpenAI API. A forced choice
/// (`Required`, `Tool`) applies to the first model reply of a turn; once that call has
/// run, the rest of the turn is `Auto` (a final answer or more calls, up to
/// `max_tool_steps`), so a forced choice cannot loop.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// A final answer or a call of any tool.
    #[default]
    Auto,
    /// A call of some tool.
    Required,
    /// No tool call: a final answer.
    None,
    /// A call of this tool.
    Tool(String),
}

/// An agent's configuration.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's name.
    pub name: String,
    /// The system prompt (none when empty).
    pub system_prompt: String,
    /// Few-shot example messages placed after the system prompt, before the first
    /// turn (say a user question, the assistant's tool call, the tool's result and the
    /// answer): a small model copies the shape of a demonstrated exchange far more
    /// reliably than it follows a description. They are part of the cached prefix and
    /// are never dropped by `DropOldest`.
    pub examples: Vec<crate::model::chat::Message>,
    /// Names of the tools it may call (the tools themselves are given at spawn, or
    /// come from its MCP servers); all of them when empty.
    pub tools: Vec<String>,
    /// Names of tools it may not call (applied after `tools`), e.g. an MCP server's
    /// tool the agent should not see.
    pub exclude_tools: Vec<String>,
    /// MCP servers whose tools the agent gets (connected by
    /// [`Engine::spawn_agent`](crate::engine::Engine::spawn_agent)).
    pub mcp_servers: Vec<super::McpServerConfig>,
    /// Which tools the model may call by default.
    pub tool_choice: ToolChoice,
    /// A grammar every final answer must follow.
    pub grammar: Option<Grammar>,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Most tokens per model reply.
    pub max_tokens: usize,
    /// Most tool calls in one turn.
    pub max_tool_steps: usize,
    /// Seconds a tool call may take.
    pub tool_timeout_secs: f64,
    /// What to do when a turn does not fit the context.
    pub context_policy: ContextPolicy,
    /// Element type of the agent's KV cache; `None`: the model actor's
    /// [`EngineConfig::kv_dtype`](crate::engine::EngineConfig::kv_dtype).
    pub kv_dtype: Option<crate::kv::KvDtype>,
    /// Longest tool result or tool error shown to the model, in bytes; a longer one
    /// is cut (at a character boundary) and ends with a `…[truncated N bytes]` marker.
    pub max_tool_result_bytes: usize,
}

/// Bounds of the numbers of an [`AgentConfig`].
pub const MAX_REPLY_TOKENS: usize = 1 << 20;
/// Most tool calls in one turn.
pub const MAX_TOOL_STEPS: usize = 1000;
/// Longest tool timeout: a day.
pub const MAX_TOOL_TIMEOUT_SECS: f64 = 86_400.0;

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            name: "agent".into(),
            system_prompt: String::new(),
            examples: Vec::new(),
            tools: Vec::new(),
            exclude_tools: Vec::new(),
            mcp_servers: Vec::new(),
            tool_choice: ToolChoice::Auto,
            grammar: None,
            sampling: SamplingParams::default(),
            max_tokens: 256,
            max_tool_steps: 4,
            tool_timeout_secs: 30.0,
            context_policy: ContextPolicy::Error,
            kv_dtype: None,
            max_tool_result_bytes: 4096,
        }
    }
}

impl AgentConfig {
    /// A config with this name and system prompt, defaults elsewhere.
    pub fn new(name: impl Into<String>, system_prompt: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            system_prompt: system_prompt.into(),
            ..Self::default()
        }
    }

    /// Reads a config from a `.toml` or `.json` file, and [validates](Self::validate)
    /// it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let bad = |e: String| Error::Config {
            what: format!("agent config {}: {e}", path.display()),
        };
        let config: Self = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| bad(e.to_string()))?,
            Some("json") => serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?,
            _ => return Err(bad("expected a .toml or .json file".into())),
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        Ok(config)
    }

    /// `tools` narrowed to the names in [`tools`](Self::tools) (when any), less those
    /// in [`exclude_tools`](Self::exclude_tools).
    pub fn filter_tools(
        &self,
        tools: Vec<std::sync::Arc<dyn super::Tool>>,
    ) -> Vec<std::sync::Arc<dyn super::Tool>> {
        tools
            .into_iter()
            .filter(|t| self.tools.is_empty() || self.tools.iter().any(|n| n == t.name()))
            .filter(|t| !self.exclude_tools.iter().any(|n| n == t.name()))
            .collect()
    }

    /// Rejects numbers out of their bounds, naming the field: `max_tokens` in
    /// `1..=2^20`, `max_tool_steps` at most 1000, `tool_timeout_secs` a finite number
    /// of seconds in `(0, 86400]`, `max_tool_result_bytes` at least 64; and the
    /// sampling parameters.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| {
            Err(Error::Config {
                what: format!("agent `{}`: {field} {why}", self.name),
            })
        };
        if !(1..=MAX_REPLY_TOKENS).contains(&self.max_tokens) {
            return bad(
                "max_tokens",
                format!("{} is out of range 1..={MAX_REPLY_TOKENS}", self.max_tokens),
            );
        }
        if self.max_tool_steps > MAX_TOOL_STEPS {
            return bad(
                "max_tool_steps",
                format!("{} is more than {MAX_TOOL_STEPS}", self.max_tool_steps),
            );
        }
        let t = self.tool_timeout_secs;
        if !(t.is_finite() && t > 0.0 && t <= MAX_TOOL_TIMEOUT_SECS) {
            return bad(
                "tool_timeout_secs",
                format!("{t} must be a number of seconds in (0, {MAX_TOOL_TIMEOUT_SECS}]"),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for server in &self.mcp_servers {
            server.validate()?;
            if !names.insert(server.name.as_str()) {
                return bad(
                    "mcp_servers",
                    format!("name `{}` is used twice", server.name),
                );
            }
        }
        if self.max_tool_result_bytes < 64 {
            return bad(
                "max_tool_result_bytes",
                format!("{} is less than 64", self.max_tool_result_bytes),
            );
        }
        self.sampling.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_toml_and_json_and_names_mistakes() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("a.toml");
        std::fs::write(
            &t,
            "name = \"calc\"\nsystem_prompt = \"You compute.\"\ntools = [\"add\"]\nmax_tool_steps = 2\ncontext_policy = \"drop_oldest\"\n[sampling]\ntemperature = 0.5\n[grammar]\nregex = \"[0-9]+\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(&t).unwrap();
        assert_eq!(c.name, "calc");
        assert_eq!(c.tools, vec!["add"]);
        assert_eq!(c.context_policy, ContextPolicy::DropOldest);
        assert_eq!(c.sampling.temperature, 0.5);
        assert_eq!(c.grammar, Some(Grammar::Regex("[0-9]+".into())));
        let j = dir.path().join("a.json");
        std::fs::write(&j, serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(AgentConfig::load(&j).unwrap(), c);
        std::fs::write(&t, "nmae = \"typo\"\n").unwrap();
        let e = AgentConfig::load(&t).unwrap_err().to_string();
        assert!(e.contains("nmae"), "{e}");
    }

    #[test]
    fn out_of_range_numbers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("a.toml");
        for (line, field) in [
            ("max_tokens = 9223372036854775807", "max_tokens"),
            ("max_tokens = 0", "max_tokens"),
            ("tool_timeout_secs = 1e300", "tool_timeout_secs"),
            ("tool_timeout_secs = inf", "tool_timeout_secs"),
            ("tool_timeout_secs = nan", "tool_timeout_secs"),
            ("tool_timeout_secs = -1.0", "tool_timeout_secs"),
            ("tool_timeout_secs = 0.0", "tool_timeout_secs"),
            ("max_tool_steps = 9223372036854775807", "max_tool_steps"),
            ("max_tool_result_bytes = 0", "max_tool_result_bytes"),
            ("[sampling]\ntemperature = -1.0", "temperature"),
        ] {
            std::fs::write(&t, format!("{line}\n")).unwrap();
            let e = AgentConfig::load(&t).unwrap_err().to_string();
            assert!(e.contains(field), "{line}: {e}");
        }
    }
}
