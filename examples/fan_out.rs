//! Fan-out and gather: one task goes to several agents at once (their requests share
//! the model actor's batches), and a judge combines the answers.
//!
//! Run: `cargo run --release --example fan_out`.

use troupe::agent::AgentConfig;
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};
use troupe::workflow::{fan_out, gather, Named};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;
    let agent = |name: &str, prompt: &str| -> anyhow::Result<Named> {
        let config = AgentConfig {
            max_tokens: 40,
            ..AgentConfig::new(name, prompt)
        };
        let actor = engine.agent(config, vec![])?;
        Ok(Named::new(name, actor))
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
    let stats = engine.stats().await?;
    println!("largest batch: {} sequences", stats.max_batch());
    Ok(())
}
