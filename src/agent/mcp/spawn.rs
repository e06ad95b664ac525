//! Spawning an agent with MCP servers, and picking up a changed tool list before a
//! turn. Each server tool's call grammar is compiled on its own first, so one schema
//! llguidance cannot compile makes that tool looser ([`SchemaMode`]), not the agent
//! unable to start.

use std::sync::Arc;

use kameo::actor::ActorRef;

use super::{McpTool, McpToolbox, SchemaMode};
use crate::agent::config::ToolChoice;
use crate::agent::tools::{reply_grammar, Tool};
use crate::agent::{AgentActor, AgentConfig, CallFormat, Conversation};
use crate::engine::Engine;
use crate::Result;

/// An agent's MCP servers, the tools it was given in Rust, and the tool-list change
/// count its tools were built from.
#[derive(Clone)]
pub(crate) struct McpAttachment {
    toolbox: Arc<McpToolbox>,
    own: Vec<Arc<dyn Tool>>,
    generation: u64,
}

impl Engine {
    /// Spawns an agent on this engine after connecting the MCP servers its config
    /// names ([`AgentConfig::mcp_servers`]): their tools join `tools`. Without MCP
    /// servers this is [`Engine::agent`]. A server that cannot be started, speaks
    /// another protocol version or does not answer `initialize` in time is an
    /// [`Error::Mcp`](crate::Error::Mcp) naming it.
    pub async fn spawn_agent(
        &self,
        config: AgentConfig,
        tools: Vec<Arc<dyn Tool>>,
    ) -> Result<ActorRef<AgentActor>> {
        Ok(AgentActor::connect(config, self.clone(), tools)
            .await?
            .spawn_agent())
    }
}

impl AgentActor {
    /// An agent on `engine` with `tools` and the tools of its config's MCP servers
    /// (connected now); see [`Engine::spawn_agent`].
    pub async fn connect(
        config: AgentConfig,
        engine: Engine,
        tools: Vec<Arc<dyn Tool>>,
    ) -> Result<Self> {
        if config.mcp_servers.is_empty() {
            return Self::new(config, engine, tools);
        }
        config.validate()?;
        let toolbox = Arc::new(McpToolbox::connect(&config.mcp_servers).await?);
        let generation = toolbox.generation();
        let mcp = checked_tools(&toolbox, &tools, &engine).await?;
        let all = tools.iter().cloned().chain(shared(mcp)).collect();
        let mut agent = Self::build(config, engine, all)?;
        agent.mcp = Some(McpAttachment {
            toolbox,
            own: tools,
            generation,
        });
        Ok(agent)
    }

    /// Before a turn: when a server announced a changed tool list (or restarted),
    /// lists its tools again; if they differ from the agent's, the agent takes the
    /// new ones (its system prompt and grammars too) and keeps its conversation,
    /// whose prompt is re-prefilled on this turn.
    pub(crate) async fn refresh_mcp_tools(&mut self) -> Result<()> {
        let Some(att) = &self.mcp else {
            return Ok(());
        };
        let generation = att.toolbox.generation();
        if generation == att.generation {
            return Ok(());
        }
        let att = att.clone();
        let mcp = checked_tools(&att.toolbox, &att.own, &self.engine).await?;
        let all: Vec<Arc<dyn Tool>> = att.own.iter().cloned().chain(shared(mcp)).collect();
        let all = self.config.filter_tools(all);
        let same = all.len() == self.tools.len()
            && all.iter().zip(&self.tools).all(|(a, b)| {
                a.name() == b.name()
                    && a.description() == b.description()
                    && a.parameters() == b.parameters()
            });
        if !same {
            tracing::info!(
                agent = %self.config.name,
                tools = %super::super::tools::names(&all),
                "MCP tool list changed"
            );
            self.check_grammars(&all)?;
            let format = CallFormat::of(self.engine.model());
            let old_initial = Self::initial_messages(&self.config, &self.tools, format).len();
            let mut messages = Self::initial_messages(&self.config, &all, format);
            messages.extend(self.conv.messages()[old_initial..].iter().cloned());
            let mut conv = Conversation::new(messages);
            conv.set_tools(format.template_tools(&all));
            self.drop_cache();
            self.conv = conv;
            self.tools = all;
        }
        if let Some(a) = &mut self.mcp {
            a.generation = generation;
        }
        Ok(())
    }
}

/// The tools as the agent holds them.
fn shared(tools: Vec<McpTool>) -> impl Iterator<Item = Arc<dyn Tool>> {
    tools.into_iter().map(|t| Arc::new(t) as Arc<dyn Tool>)
}

/// The toolbox's tools, each with the strictest call grammar that compiles.
async fn checked_tools(
    toolbox: &McpToolbox,
    own: &[Arc<dyn Tool>],
    engine: &Engine,
) -> Result<Vec<McpTool>> {
    let format = CallFormat::of(engine.model());
    let compiles = |t: &McpTool| -> std::result::Result<(), String> {
        let tools: Vec<Arc<dyn Tool>> = vec![Arc::new(t.clone())];
        let g = reply_grammar(&tools, &ToolChoice::Required, None, format)
            .map_err(|e| e.to_string())?;
        match g {
            Some(g) => engine
                .grammars()
                .compile(&g)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => Ok(()),
        }
    };
    let mut out = Vec::new();
    for t in toolbox.tools(own).await? {
        let t = match compiles(&t) {
            Ok(()) => t,
            Err(strict) => {
                let lenient = t.clone().with_mode(SchemaMode::Lenient(strict.clone()));
                if compiles(&lenient).is_ok() {
                    tracing::warn!(tool = %t.name(), server = %t.server(),
                        "schema compiled leniently (unsupported keywords ignored): {strict}");
                    lenient
                } else {
                    tracing::warn!(tool = %t.name(), server = %t.server(),
                        "schema does not compile, calls take any JSON object: {strict}");
                    t.with_mode(SchemaMode::Loose(strict))
                }
            }
        };
        out.push(t);
    }
    Ok(out)
}

/// The tools of `servers` as an agent would see them (with the strictest grammar
/// that compiles on `engine`), for listing (`troupe mcp tools`); the servers stop
/// when the tools are dropped.
pub async fn server_tools(
    servers: &[super::McpServerConfig],
    engine: &Engine,
) -> Result<Vec<McpTool>> {
    let toolbox = McpToolbox::connect(servers).await?;
    checked_tools(&toolbox, &[], engine).await
}
