//! Fan-out and gather: one task goes to several agents at once (their requests share
//! the model actor's batches), and a judge combines the answers.
//!
//! Run: `cargo run --release --example fan_out`.

use std::sync::Arc;

use kameo::actor::Spawn;
use troupe::agent::{AgentActor, AgentConfig};
use troupe::engine::{EngineConfig, GetStats, ModelActor};
use troupe::model::{fetch, LoadOptions, Model};
use troupe::workflow::{fan_out, gather, Named};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let model = Arc::new(Model::load(&path, LoadOptions::default())?);
    let engine = ModelActor::spawn(ModelActor::new(model.clone(), EngineConfig::default())?);
    let agent = |name: &str, prompt: &str| -> anyhow::Result<Named> {
        let config = AgentConfig {
            max_tokens: 40,
            ..AgentConfig::new(name, prompt)
        };
        let actor = AgentActor::new(config, model.clone(), engine.clone(), vec![])?;
        Ok(Named::new(name, actor.spawn_agent()))
    };
    let panel = [
        agent("chef", "You are a chef. Answer in one sentence.")?,
        agent("doctor", "You are a doctor. Answer in one sentence.")?,
        agent("farmer", "You are a farmer. Answer in one sentence.")?,
    ];
    let judge = agent(
        "judge",
        "Combine the answers you are given into one sentence.",
    )?;

    let task = "Why should people eat more vegetables?";
    let answers = fan_out(&panel, task, &None).await?;
    for (name, reply) in &answers {
        println!("[{name}] {}", reply.text.trim());
    }
    println!(
        "[judge] {}",
        gather(&judge, task, &answers, &None).await?.trim()
    );

    // The three answers were generated side by side in shared forward steps.
    let stats = engine.ask(GetStats).await?;
    println!("largest batch: {} sequences", stats.max_batch());
    Ok(())
}
