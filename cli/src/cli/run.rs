//! `troupe run` and `troupe agents`: run a ready-made agent (from the `agents/` crate)
//! on one or more tasks and print its trace: each tool call with its arguments, its
//! result and time, the final answer, and the tokens reused from the cache against
//! those computed.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use troupe::agent::{ask_streaming, AgentEvent, Ask};
use troupe::model::WeightsMode;

use crate::ready_made::{Options, ReadyMade, CATALOG};

/// Options of `troupe run`.
pub struct RunOptions<'a> {
    /// `--model`, if given (else the default model).
    pub model: Option<&'a Path>,
    /// How weights are stored and multiplied.
    pub weights: WeightsMode,
    /// The ready-made agent's name.
    pub agent: &'a str,
    /// The tasks, one turn each.
    pub tasks: &'a [String],
    /// Where the agents find their data.
    pub data: Options,
    /// Most tokens per model reply, overriding the agent's.
    pub max_tokens: Option<usize>,
    /// MCP servers whose tools the agent gets too (`--mcp`).
    pub mcp: Vec<troupe::agent::McpServerConfig>,
}

/// Prints the catalog of ready-made agents.
pub fn list() {
    println!("{:<12} {:<78} example", "agent", "what it does");
    for a in CATALOG {
        println!("{:<12} {:<78} {:?}", a.name, a.description, a.example);
    }
    println!("\nrun one: troupe run AGENT [--root DIR] [--notes FILE] \"TASK\" [\"NEXT TASK\"...]");
}

/// Runs the agent on each task in turn (one conversation) and prints the trace.
pub fn run(o: RunOptions<'_>) -> anyhow::Result<()> {
    // The agent (its name, its folder) is checked before the model is looked for.
    let mut made = ReadyMade::build(o.agent, &o.data)?;
    let model_path = troupe::model::fetch::resolve_model_path(o.model)?;
    if let Some(n) = o.max_tokens {
        made.config.max_tokens = n;
    }
    let mut tool_names = made.config.tools.join(", ");
    for s in &o.mcp {
        tool_names.push_str(&format!(", the tools of MCP server `{}`", s.name));
    }
    super::mcp::add_servers(&mut made.config, o.mcp);
    super::runtime()?.block_on(async move {
        let engine = super::start_model(&model_path, o.weights)?;
        let agent = engine.spawn_agent(made.config, made.tools).await?;
        let mut out = std::io::stdout();
        writeln!(out, "agent {} (tools: {tool_names})", o.agent)?;
        for task in o.tasks {
            writeln!(out, "\ntask: {task}")?;
            let mut written = Ok(());
            let reply = ask_streaming(&agent, Ask::new(task.clone()), |ev| {
                let line = match ev {
                    AgentEvent::Token(_) => return,
                    AgentEvent::ToolCall(c) => {
                        format!("  tool call   {} {}", c.name, c.arguments)
                    }
                    AgentEvent::ToolResult(r) => format!(
                        "  {} ({:.1} ms) {}",
                        if r.failed { "tool error " } else { "tool result" },
                        r.seconds * 1e3,
                        super::one_line(&r.result, 200, " | ")
                    ),
                };
                if written.is_ok() {
                    written = writeln!(out, "{line}").and_then(|()| out.flush());
                }
            })
            .await;
            written?;
            let r = reply?;
            writeln!(out, "answer: {}", r.text.trim())?;
            writeln!(
                out,
                "tokens: reused {} from the cache, computed {}, generated {} (prompt {}); first token {:.0} ms; turn {:.2} s",
                r.usage.cached_tokens,
                r.usage.computed_tokens,
                r.usage.generated_tokens,
                r.usage.prompt_tokens,
                r.ttft.as_secs_f64() * 1e3,
                r.elapsed.as_secs_f64()
            )?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .with_context(|| format!("troupe run {}", o.agent))
}
