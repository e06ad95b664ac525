//! `troupe chat`: a multi-turn conversation with one agent in the terminal, streamed,
//! or driven line by line by a script when stdin is not a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::Context;
use troupe::agent::{ask_streaming, AgentConfig, AgentEvent, AgentReply, Ask};
use troupe::model::WeightsMode;

/// Options of `troupe chat`.
pub struct ChatOptions<'a> {
    pub model: &'a Path,
    pub weights: WeightsMode,
    pub agent: Option<&'a Path>,
    pub system: Option<&'a str>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
    /// MCP servers whose tools the agent gets (`--mcp`).
    pub mcp: Vec<troupe::agent::McpServerConfig>,
}

fn usage_line(r: &AgentReply) -> String {
    format!(
        "usage: reused={} computed={} ttft_ms={:.0}",
        r.usage.cached_tokens,
        r.usage.computed_tokens,
        r.ttft.as_secs_f64() * 1e3
    )
}

pub fn run(o: ChatOptions<'_>) -> anyhow::Result<()> {
    let mut config = match o.agent {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::new("chat", ""),
    };
    if let Some(s) = o.system {
        config.system_prompt = s.to_string();
    }
    if let Some(n) = o.max_tokens {
        config.max_tokens = n;
    }
    if let Some(t) = o.temperature {
        config.sampling.temperature = t;
    }
    if let Some(s) = o.seed {
        config.sampling.seed = s;
    }
    super::mcp::add_servers(&mut config, o.mcp);
    super::runtime()?
        .block_on(async move {
            let engine = super::start_model(o.model, o.weights)?;
            let agent = engine.spawn_agent(config, vec![]).await?;
            let stdin = std::io::stdin();
            let interactive = stdin.is_terminal();
            let mut out = std::io::stdout();
            if interactive {
                eprintln!("troupe chat: one message per line, Ctrl-D to quit.");
            }
            loop {
                if interactive {
                    eprint!("> ");
                }
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 {
                    break;
                }
                let text = line.trim_end_matches(['\n', '\r']).to_string();
                if text.is_empty() {
                    continue;
                }
                if interactive {
                    let mut written = Ok(());
                    let reply = ask_streaming(&agent, Ask::new(text), |ev| match ev {
                        AgentEvent::Token(t) => {
                            if written.is_ok() {
                                written = write!(out, "{t}").and_then(|()| out.flush());
                            }
                        }
                        AgentEvent::ToolCall(c) => {
                            eprintln!("\n[tool call {} {}]", c.name, c.arguments)
                        }
                        AgentEvent::ToolResult(r) => eprintln!("[tool result {}]", r.result),
                    })
                    .await;
                    written?;
                    match reply {
                        Ok(r) => {
                            writeln!(out)?;
                            eprintln!(
                                "[reused {} tokens, computed {}, time to first token {:.0} ms]",
                                r.usage.cached_tokens,
                                r.usage.computed_tokens,
                                r.ttft.as_secs_f64() * 1e3
                            );
                        }
                        Err(e) => eprintln!("\nerror: {e}"),
                    }
                } else {
                    match agent.ask(Ask::new(text)).await {
                        Ok(r) => {
                            writeln!(out, "{}", r.text)?;
                            writeln!(out, "{}", usage_line(&r))?;
                        }
                        Err(e) => writeln!(out, "error: {e}")?,
                    }
                    out.flush()?;
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .context("troupe chat")
}
