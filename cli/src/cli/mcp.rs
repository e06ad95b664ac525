//! `troupe mcp`: `tools` lists an MCP server's tools as an agent's model sees them
//! (compact signatures, and whether each call grammar follows the tool's schema
//! exactly); `serve` offers ready-made or configured agents to other MCP hosts, as
//! `ask_<agent>` tools, on stdio or streamable HTTP. Also the `--mcp` option of
//! `troupe run` and `troupe chat`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use troupe::agent::{tools_prompt, AgentConfig, McpServerConfig, SchemaMode, Tool};
use troupe::mcp::AgentSpec;
use troupe::model::WeightsMode;

use crate::ready_made::{Options, ReadyMade, CATALOG};

/// The servers of `--mcp NAME=COMMAND ARGS...` options.
pub fn parse_servers(specs: &[String]) -> anyhow::Result<Vec<McpServerConfig>> {
    specs
        .iter()
        .map(|s| McpServerConfig::parse_spec(s).map_err(anyhow::Error::from))
        .collect()
}

/// Adds `servers` to `config`. The tools named in a ready-made config are all the
/// tools it is given, so that list is dropped to let the servers' tools in.
pub fn add_servers(config: &mut AgentConfig, servers: Vec<McpServerConfig>) {
    if !servers.is_empty() {
        config.tools.clear();
        config.mcp_servers.extend(servers);
    }
}

/// `troupe mcp tools 'COMMAND ARGS...'` (or a URL): prints the server's tools.
pub fn tools(model: &Path, weights: WeightsMode, server: &str) -> anyhow::Result<()> {
    let config = McpServerConfig::parse_spec(&format!("server={server}"))?;
    super::runtime()?.block_on(async move {
        let engine = super::start_model(model, weights)?;
        let tools = troupe::agent::server_tools(&[config], &engine).await?;
        let shared: Vec<Arc<dyn Tool>> = tools
            .iter()
            .map(|t| Arc::new(t.clone()) as Arc<dyn Tool>)
            .collect();
        let prompt = tools_prompt(&shared);
        let signatures: Vec<&str> = prompt.lines().filter(|l| l.starts_with("- ")).collect();
        for (t, line) in tools.iter().zip(signatures) {
            println!("{line}");
            match t.mode() {
                SchemaMode::Strict => {}
                SchemaMode::Lenient(why) => {
                    println!("    (grammar ignores what llguidance does not implement: {why})")
                }
                SchemaMode::Loose(why) => {
                    println!("    (schema does not compile, calls take any JSON object: {why})")
                }
            }
        }
        println!(
            "{} tools; each call is constrained to its tool's inputSchema",
            tools.len()
        );
        Ok::<_, anyhow::Error>(())
    })
}

/// Options of `troupe mcp serve`.
pub struct ServeOptions<'a> {
    pub model: &'a Path,
    pub weights: WeightsMode,
    /// Ready-made agent names or config files (all ready-made agents when empty).
    pub agents: &'a [String],
    /// Streamable HTTP on 127.0.0.1 at this port (0: any free one), else stdio.
    pub http: Option<u16>,
    pub data: Options,
}

/// The agents to offer.
fn specs(agents: &[String], data: &Options) -> anyhow::Result<Vec<AgentSpec>> {
    let names: Vec<String> = if agents.is_empty() {
        CATALOG.iter().map(|a| a.name.to_string()).collect()
    } else {
        agents.to_vec()
    };
    names
        .iter()
        .map(|a| {
            let is_file = a.ends_with(".toml") || a.ends_with(".json");
            if is_file {
                let config = AgentConfig::load(Path::new(a))?;
                let description = format!("Asks the agent `{}`.", config.name);
                return Ok(AgentSpec {
                    config,
                    tools: Vec::new(),
                    description,
                });
            }
            let made = ReadyMade::build(a, data)?;
            let description = CATALOG
                .iter()
                .find(|c| c.name == a)
                .map(|c| format!("{} Example: {:?}", c.description, c.example))
                .unwrap_or_default();
            Ok(AgentSpec {
                config: made.config,
                tools: made.tools,
                description,
            })
        })
        .collect()
}

/// `troupe mcp serve`: serves until the client hangs up (stdio) or Ctrl-C (HTTP).
pub fn serve(o: ServeOptions<'_>) -> anyhow::Result<()> {
    let specs = specs(o.agents, &o.data)?;
    super::runtime()?
        .block_on(async move {
            let engine = super::start_model(o.model, o.weights)?;
            match o.http {
                None => troupe::mcp::serve_stdio(engine, specs).await?,
                Some(port) => {
                    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
                    let addr = listener.local_addr()?;
                    eprintln!("troupe mcp serve: listening on http://{addr}/mcp");
                    let shutdown = async {
                        let _ = tokio::signal::ctrl_c().await;
                    };
                    troupe::mcp::serve_http(engine, specs, listener, shutdown).await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .context("troupe mcp serve")
}
