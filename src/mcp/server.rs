//! The MCP server handler: `tools/list` names one `ask_<agent>` tool per agent,
//! `tools/call` asks that agent (spawned at the session's first call of it) and
//! answers with its reply; a cancelled request stops waiting for the turn.

use std::collections::HashMap;
use std::sync::Arc;

use kameo::actor::ActorRef;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::{ErrorData, ServerHandler};

use super::AgentSpec;
use crate::agent::{AgentActor, Ask};
use crate::engine::Engine;

/// One client session's server: the agents offered, and those spawned so far.
#[derive(Clone)]
pub struct AgentsServer {
    engine: Engine,
    specs: Arc<Vec<AgentSpec>>,
    agents: Arc<tokio::sync::Mutex<HashMap<String, ActorRef<AgentActor>>>>,
}

impl AgentsServer {
    /// A session's server over `specs`.
    pub fn new(engine: Engine, specs: Arc<Vec<AgentSpec>>) -> Self {
        Self {
            engine,
            specs,
            agents: Default::default(),
        }
    }

    /// The MCP tools: `ask_<agent>(task: string)`.
    fn tools(&self) -> Vec<rmcp::model::Tool> {
        self.specs
            .iter()
            .map(|s| {
                let schema = serde_json::json!({
                    "type": "object",
                    "properties": {"task": {
                        "type": "string",
                        "description": "What to ask the agent, in plain words."
                    }},
                    "required": ["task"],
                });
                let schema = match schema {
                    serde_json::Value::Object(o) => o,
                    _ => Default::default(),
                };
                rmcp::model::Tool::new(s.tool_name(), s.description.clone(), Arc::new(schema))
            })
            .collect()
    }

    /// The session's agent for `spec`, spawned at its first use.
    async fn agent(&self, spec: &AgentSpec) -> crate::Result<ActorRef<AgentActor>> {
        let mut agents = self.agents.lock().await;
        if let Some(a) = agents.get(&spec.config.name) {
            if a.is_alive() {
                return Ok(a.clone());
            }
        }
        let a = self
            .engine
            .spawn_agent(spec.config.clone(), spec.tools.clone())
            .await?;
        agents.insert(spec.config.name.clone(), a.clone());
        Ok(a)
    }
}

impl ServerHandler for AgentsServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("troupe", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Each tool asks one of troupe's local agents; an agent remembers the earlier calls of this session.",
            )
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(spec) = self
            .specs
            .iter()
            .find(|s| s.tool_name() == request.name.as_ref())
        else {
            return Err(ErrorData::invalid_params(
                format!("no tool `{}`", request.name),
                None,
            ));
        };
        let task = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("task"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| ErrorData::invalid_params("`task` (a string) is required", None))?
            .to_string();
        let agent = match self.agent(spec).await {
            Ok(a) => a,
            Err(e) => {
                return Ok(CallToolResult::error(vec![ContentBlock::text(e.to_string())]).into())
            }
        };
        let reply = tokio::select! {
            r = agent.ask(Ask::new(task)) => r.map_err(crate::agent::ask_error),
            () = context.ct.cancelled() => {
                return Err(ErrorData::internal_error("cancelled", None));
            }
        };
        Ok(match reply {
            Ok(r) => CallToolResult::success(vec![ContentBlock::text(r.text.trim().to_string())]),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
        }
        .into())
    }
}
