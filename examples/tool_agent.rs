//! A ready-made tool-using agent from the `troupe-agents` crate: the calculator must
//! call its `calculate` tool before it answers, so even a small model computes
//! rather than guesses.
//!
//! Run: `cargo run --release --example tool_agent`.

use std::sync::Arc;

use kameo::actor::Spawn;
use troupe::agent::Ask;
use troupe::engine::{EngineConfig, ModelActor};
use troupe::model::{fetch, LoadOptions, Model};
use troupe_agents::{Options, ReadyMade};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let model = Arc::new(Model::load(&path, LoadOptions::default())?);
    let engine = ModelActor::spawn(ModelActor::new(model.clone(), EngineConfig::default())?);

    // A ready-made agent is a config plus its tools; change either before spawning.
    let calculator = ReadyMade::build("calculator", &Options::default())?;
    println!("tools: {:?}", calculator.config.tools);
    let agent = calculator.spawn(model, engine)?;

    let reply = agent.ask(Ask("What is 17 * 23?".into())).await?;
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
