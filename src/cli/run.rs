//! `troupe run` and `troupe agents`: run a ready-made agent (from the `agents/` crate)
//! on one or more tasks and print its trace: each tool call with its arguments, its
//! result and time, the final answer, and the tokens reused from the cache against
//! those computed.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use kameo::actor::Spawn;
use troupe::agent::{AgentEvent, AskStream};
use troupe::engine::{EngineConfig, ModelActor};
use troupe::model::{LoadOptions, Model, WeightsMode};

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
}

/// Prints the catalog of ready-made agents.
pub fn list() {
    println!("{:<12} {:<78} example", "agent", "what it does");
    for a in CATALOG {
        println!("{:<12} {:<78} {:?}", a.name, a.description, a.example);
    }
    println!("\nrun one: troupe run AGENT [--root DIR] [--notes FILE] \"TASK\" [\"NEXT TASK\"...]");
}

/// Shortens a tool result for the trace.
fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " | ");
    match one_line.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// Runs the agent on each task in turn (one conversation) and prints the trace.
pub fn run(o: RunOptions<'_>) -> anyhow::Result<()> {
    // The agent (its name, its folder) is checked before the model is looked for.
    let mut made = ReadyMade::build(o.agent, &o.data)?;
    let model_path = troupe::model::fetch::resolve_model_path(o.model)?;
    if let Some(n) = o.max_tokens {
        made.config.max_tokens = n;
    }
    let tool_names = made.config.tools.join(", ");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let model = Arc::new(Model::load(&model_path, LoadOptions { weights: o.weights })?);
        let engine = ModelActor::spawn(ModelActor::new(model.clone(), EngineConfig::default())?);
        let agent = made.spawn(model, engine)?;
        let mut out = std::io::stdout();
        writeln!(out, "agent {} (tools: {tool_names})", o.agent)?;
        for task in o.tasks {
            writeln!(out, "\ntask: {task}")?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let a = agent.clone();
            let text = task.clone();
            let turn = tokio::spawn(async move {
                a.ask(AskStream {
                    text,
                    events: tx,
                    tool_choice: None,
                })
                .await
            });
            while let Some(ev) = rx.recv().await {
                match ev {
                    AgentEvent::Token(_) => {}
                    AgentEvent::ToolCall(c) => {
                        writeln!(out, "  tool call   {} {}", c.name, c.arguments)?;
                    }
                    AgentEvent::ToolResult(r) => writeln!(
                        out,
                        "  {} ({:.1} ms) {}",
                        if r.failed { "tool error " } else { "tool result" },
                        r.seconds * 1e3,
                        clip(&r.result, 200)
                    )?,
                }
                out.flush()?;
            }
            let r = turn.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
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
