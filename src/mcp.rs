//! troupe as an MCP server: each configured agent is offered to other MCP hosts as
//! a tool, `ask_<agent>`, taking a `task` string and answering with the agent's final
//! reply. Each client session gets its own agents (spawned at its first call of
//! them), so an agent's conversation persists across the calls of one session.
//! Served on stdio ([`serve_stdio`]) or streamable HTTP ([`serve_http`], loopback
//! hosts only). The other side, agents using MCP servers' tools, is
//! [`agent::McpServerConfig`](crate::agent::McpServerConfig) on the agent's floor.

mod server;

use std::sync::Arc;

pub use server::AgentsServer;

use crate::agent::{AgentConfig, Tool};
use crate::engine::Engine;
use crate::{Error, Result};

/// An agent to offer: its config, its tools and what the tool says it does.
#[derive(Clone)]
pub struct AgentSpec {
    /// The agent's configuration (its name makes the tool's: `ask_<name>`).
    pub config: AgentConfig,
    /// Its tools.
    pub tools: Vec<Arc<dyn Tool>>,
    /// The tool's description (what to ask the agent).
    pub description: String,
}

impl AgentSpec {
    /// The MCP tool's name.
    pub fn tool_name(&self) -> String {
        format!("ask_{}", self.config.name)
    }
}

/// Checks that the agents' tool names are distinct and valid MCP tool names.
fn check_specs(specs: &[AgentSpec]) -> Result<()> {
    if specs.is_empty() {
        return Err(Error::Config {
            what: "troupe mcp serve: no agents to offer".into(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in specs {
        let name = s.tool_name();
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(Error::Config {
                what: format!(
                    "agent name `{}` cannot make an MCP tool name (letters, digits, `_`, `-`, `.`)",
                    s.config.name
                ),
            });
        }
        if !seen.insert(name) {
            return Err(Error::Config {
                what: format!("two agents are called `{}`", s.config.name),
            });
        }
    }
    Ok(())
}

/// Serves the agents on stdin/stdout (one client session) until the client closes
/// the connection.
pub async fn serve_stdio(engine: Engine, specs: Vec<AgentSpec>) -> Result<()> {
    use rmcp::ServiceExt;
    check_specs(&specs)?;
    let server = AgentsServer::new(engine, Arc::new(specs));
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| Error::Config {
            what: format!("MCP session did not start: {e}"),
        })?;
    let _ = running.waiting().await;
    Ok(())
}

/// Serves the agents over streamable HTTP on `listener` (at `/mcp`) until
/// `shutdown` resolves; each session gets its own agents.
pub async fn serve_http(
    engine: Engine,
    specs: Vec<AgentSpec>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
    check_specs(&specs)?;
    let specs = Arc::new(specs);
    let mut config = StreamableHttpServerConfig::default();
    config.legacy_session_mode = true;
    let ct = config.cancellation_token.clone();
    let service: StreamableHttpService<AgentsServer, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(AgentsServer::new(engine.clone(), specs.clone())),
            Default::default(),
            config,
        );
    let router = axum::Router::new().nest_service("/mcp", service);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            ct.cancel();
        })
        .await?;
    Ok(())
}
