//! Forked exploration: an agent builds up shared context once, then is forked into
//! several copies (the cache is copied, never recomputed) that each try the task with
//! their own sampling seed; a scorer keeps the best answer.
//!
//! Run: `cargo run --release --example fork_explore`.

use troupe::agent::{AgentConfig, Ask};
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};
use troupe::sampling::SamplingParams;
use troupe::workflow::fork_explore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;
    let config = AgentConfig {
        max_tokens: 32,
        // Forks differ only when they sample.
        sampling: SamplingParams::with_temperature(0.9, 1),
        ..AgentConfig::new("namer", "You name products. Answer with the name only.")
    };
    let agent = engine.agent(config, vec![])?;

    // The shared prefix: computed once, then shared by every fork.
    agent
        .ask(Ask::new("We make a quiet, solar-powered lawn mower."))
        .await?;

    // Score: prefer short names (a real scorer could be a test, a judge agent...).
    let score = |reply: &troupe::agent::AgentReply| -(reply.text.trim().len() as f64);
    let (best, reply) = fork_explore(&agent, 4, "Suggest a name for it.", score, &None).await?;
    println!("best of 4 (fork {best}): {}", reply.text.trim());
    println!(
        "that fork reused {} cached tokens and computed {}",
        reply.usage.cached_tokens, reply.usage.computed_tokens
    );
    Ok(())
}
