//! A ready-made tool-using agent from the `troupe-agents` crate: the calculator must
//! call its `calculate` tool before it answers, so even a small model computes
//! rather than guesses.
//!
//! Run: `cargo run --release --example tool_agent`.

use troupe::agent::Ask;
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};
use troupe_agents::{Options, ReadyMade};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;

    // A ready-made agent is a config plus its tools; change either before spawning.
    let calculator = ReadyMade::build("calculator", &Options::default())?;
    println!("tools: {:?}", calculator.config.tools);
    let agent = calculator.spawn(&engine)?;

    let reply = agent.ask(Ask::new("What is 17 * 23?")).await?;
    for run in &reply.tool_runs {
        println!(
            "called {} with {} -> {} ({:.2} ms)",
            run.call.name,
            run.call.arguments,
            run.result,
            run.seconds * 1e3
        );
    }
    println!("answer: {}", reply.text);
    Ok(())
}
