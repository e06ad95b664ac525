//! Tools from Model Context Protocol servers, for any agent: the agent's config names
//! its servers ([`McpServerConfig`], stdio or streamable HTTP), the agent connects to
//! them when it is spawned ([`Engine::spawn_agent`](crate::engine::Engine::spawn_agent)),
//! and each server tool becomes an ordinary [`Tool`] whose call grammar is the tool's
//! own `inputSchema`, so a small model cannot write a malformed call.
//!
//! The client lives on the agent's floor (an agent connects on spawn, so the agent
//! code needs it); `crate::mcp` on floor 4 is the other side: troupe's agents offered
//! to other MCP hosts. A server's connection ([`link`]) is shared by the agent and its
//! forks through an `Arc`: it stops (a stdio server's process is killed) when the last
//! of them is dropped. It restarts once if the server dies mid-session.

mod link;
mod spawn;
mod tool;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use link::{RemoteTool, ServerLink};
pub use spawn::server_tools;
pub(crate) use spawn::McpAttachment;
pub use tool::{McpTool, SchemaMode};

use super::tools::Tool;
use crate::{Error, Result};

/// One MCP server an agent uses: either a command troupe starts (stdio transport:
/// `command`, `args`, `env`, `cwd`) or a `url` it connects to (streamable HTTP, with
/// `headers`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct McpServerConfig {
    /// The server's name: in errors, and as the prefix of its tools' names where two
    /// sources offer a tool of the same name (`NAME_TOOL`).
    pub name: String,
    /// The program to start (stdio transport).
    pub command: Option<String>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables set for it (on top of troupe's own).
    pub env: BTreeMap<String, String>,
    /// Its working directory (troupe's when `None`).
    pub cwd: Option<PathBuf>,
    /// The server's streamable HTTP endpoint (`http://127.0.0.1:8000/mcp`).
    pub url: Option<String>,
    /// HTTP headers sent with every request (e.g. `Authorization`).
    pub headers: BTreeMap<String, String>,
    /// Only these of the server's tools (by the server's names); all when empty.
    pub tools: Vec<String>,
    /// None of these of the server's tools.
    pub exclude_tools: Vec<String>,
    /// Seconds the server may take to start and answer `initialize` and `tools/list`
    /// (default 30).
    pub startup_timeout_secs: Option<f64>,
}

/// Seconds a server may take to start when its config does not say.
pub const DEFAULT_STARTUP_TIMEOUT_SECS: f64 = 30.0;

impl McpServerConfig {
    /// A stdio server: `command` started with `args`.
    pub fn stdio(name: impl Into<String>, command: impl Into<String>, args: &[&str]) -> Self {
        Self {
            name: name.into(),
            command: Some(command.into()),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Self::default()
        }
    }

    /// A streamable HTTP server at `url`.
    pub fn http(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// Parses the command line's `NAME=COMMAND ARGS...` (or `NAME=http://...`): the
    /// command and its arguments split at whitespace, quotes grouping.
    pub fn parse_spec(spec: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config {
            what: format!("MCP server `{spec}`: {why} (expected NAME=COMMAND ARGS... or NAME=URL)"),
        };
        let (name, rest) = spec.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let name = name.trim();
        let rest = rest.trim();
        if rest.starts_with("http://") || rest.starts_with("https://") {
            let c = Self::http(name, rest);
            c.validate()?;
            return Ok(c);
        }
        let words = split_words(rest).map_err(bad)?;
        let (command, args) = words.split_first().ok_or_else(|| bad("no command"))?;
        let c = Self {
            name: name.into(),
            command: Some(command.clone()),
            args: args.to_vec(),
            ..Self::default()
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the config: a name of letters, digits, `_` and `-`; exactly one of
    /// `command` and `url`; a startup timeout in (0, 3600] seconds.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| {
            Err(Error::Config {
                what: format!("MCP server `{}`: {why}", self.name),
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("the name must be letters, digits, `_` or `-`".into());
        }
        match (&self.command, &self.url) {
            (Some(c), None) if c.trim().is_empty() => return bad("empty command".into()),
            (Some(_), None) => {
                if !self.headers.is_empty() {
                    return bad("`headers` need a `url` (HTTP), not a `command`".into());
                }
            }
            (None, Some(u)) => {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return bad(format!("url `{u}` is not http:// or https://"));
                }
                if !self.args.is_empty() || !self.env.is_empty() || self.cwd.is_some() {
                    return bad("`args`, `env` and `cwd` need a `command` (stdio)".into());
                }
            }
            (Some(_), Some(_)) => return bad("give either `command` or `url`, not both".into()),
            (None, None) => return bad("give a `command` (stdio) or a `url` (HTTP)".into()),
        }
        if let Some(t) = self.startup_timeout_secs {
            if !(t.is_finite() && t > 0.0 && t <= 3600.0) {
                return bad(format!(
                    "startup_timeout_secs {t} must be a number of seconds in (0, 3600]"
                ));
            }
        }
        Ok(())
    }

    /// How long it may take to start.
    pub fn startup_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.startup_timeout_secs
                .unwrap_or(DEFAULT_STARTUP_TIMEOUT_SECS),
        )
    }

    /// Whether this server tool is kept by the `tools` / `exclude_tools` filters.
    fn keeps(&self, tool: &str) -> bool {
        (self.tools.is_empty() || self.tools.iter().any(|t| t == tool))
            && !self.exclude_tools.iter().any(|t| t == tool)
    }
}

/// Splits a command line into words at whitespace; single or double quotes group.
fn split_words(s: &str) -> std::result::Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("an unclosed quote");
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The connected MCP servers of an agent (shared with its forks), and the tools they
/// offer now.
pub struct McpToolbox {
    links: Vec<Arc<ServerLink>>,
}

impl std::fmt::Debug for McpToolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.links.iter().map(|l| l.name()))
            .finish()
    }
}

impl McpToolbox {
    /// Starts (or connects to) every server, checks its protocol and lists its tools;
    /// the first that fails gives an [`Error::Mcp`] naming it.
    pub async fn connect(servers: &[McpServerConfig]) -> Result<Self> {
        let mut links = Vec::new();
        for s in servers {
            s.validate()?;
            links.push(Arc::new(ServerLink::connect(s.clone()).await?));
        }
        Ok(Self { links })
    }

    /// The servers' connections.
    pub fn links(&self) -> &[Arc<ServerLink>] {
        &self.links
    }

    /// Changes to the servers' tool lists announced so far (`list_changed`
    /// notifications); an agent compares it with the count it last built from.
    pub fn generation(&self) -> u64 {
        self.links.iter().map(|l| l.generation()).sum()
    }

    /// The servers' tools (re-listed where a server announced a change), filtered by
    /// each server's config and named so that no two clash with each other or with
    /// `others` (a clashing name gets its server's name as a prefix).
    pub async fn tools(&self, others: &[Arc<dyn Tool>]) -> Result<Vec<McpTool>> {
        let mut listed = Vec::new();
        for link in &self.links {
            for t in link.tools().await? {
                if link.config().keeps(&t.remote) {
                    listed.push((link.clone(), t));
                }
            }
        }
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for name in others.iter().map(|t| t.name().to_string()) {
            *count.entry(name).or_default() += 1;
        }
        for (_, t) in &listed {
            *count.entry(t.remote.clone()).or_default() += 1;
        }
        Ok(listed
            .into_iter()
            .map(|(link, t)| {
                let name = if count[&t.remote] > 1 {
                    format!("{}_{}", link.name(), t.remote)
                } else {
                    t.remote.clone()
                };
                McpTool::new(name, t, link)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_mistakes_are_named() {
        let c = McpServerConfig::parse_spec("fs=npx -y 'a b' \"c\" d").unwrap();
        assert_eq!(c.name, "fs");
        assert_eq!(c.command.as_deref(), Some("npx"));
        assert_eq!(c.args, ["-y", "a b", "c", "d"]);
        let h = McpServerConfig::parse_spec("web=http://127.0.0.1:9/mcp").unwrap();
        assert_eq!(h.url.as_deref(), Some("http://127.0.0.1:9/mcp"));
        for (spec, what) in [
            ("noequals", "no `=`"),
            ("x=", "no command"),
            ("x='open", "unclosed quote"),
            ("bad name=cmd", "the name must be"),
        ] {
            let e = McpServerConfig::parse_spec(spec).unwrap_err().to_string();
            assert!(e.contains(what), "{spec}: {e}");
        }
        let both = McpServerConfig {
            url: Some("http://x".into()),
            ..McpServerConfig::stdio("s", "cmd", &[])
        };
        assert!(both
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both"));
    }
}
