//! A router: one agent picks which agent handles the input (its answer is
//! constrained to the agents' names by a choice grammar), and that agent answers.
//!
//! Run: `cargo run --release --example router`.

use troupe::agent::AgentConfig;
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};
use troupe::workflow::{route, Named};
use troupe_agents::{Options, ReadyMade};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;

    // Two ready-made agents and a plain one.
    let ready = |name: &str| -> anyhow::Result<Named> {
        let agent = ReadyMade::build(name, &Options::default())?;
        Ok(Named::new(name, agent.spawn(&engine)?))
    };
    let plain = |name: &str, prompt: &str| -> anyhow::Result<Named> {
        let config = AgentConfig {
            max_tokens: 48,
            ..AgentConfig::new(name, prompt)
        };
        let actor = engine.agent(config, vec![])?;
        Ok(Named::new(name, actor))
    };
    let team = [
        ready("calculator")?,
        ready("clock")?,
        plain("writer", "You write short texts.")?,
    ];
    let router = plain(
        "router",
        "You route tasks: calculator for arithmetic, clock for dates and units, writer for anything else.",
    )?;

    for task in ["What is 12 * 12?", "Write a haiku about rain."] {
        let (chosen, reply) = route(&router, &team, task, &None).await?;
        println!("> {task}\n[{chosen}] {}\n", reply.text.trim());
    }
    Ok(())
}
