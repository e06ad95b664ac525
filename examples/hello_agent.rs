//! An agent owns its conversation and its KV cache: the second question reuses every
//! token of the first turn from the cache and computes only the new ones.
//!
//! Run: `cargo run --release --example hello_agent` (after `troupe model fetch`).

use troupe::agent::{AgentConfig, Ask};
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One model, one model actor: it batches the requests of every agent.
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;

    // An agent is configured, then spawned as an actor.
    let config = AgentConfig {
        max_tokens: 48,
        ..AgentConfig::new(
            "guide",
            "You are a friendly travel guide. Answer in one sentence.",
        )
    };
    let agent = engine.agent(config, vec![])?;

    for question in ["What is Lisbon famous for?", "And what should I eat there?"] {
        let reply = agent.ask(Ask::new(question)).await?;
        println!("> {question}\n{}", reply.text);
        println!(
            "  (reused {} tokens from the cache, computed {})\n",
            reply.usage.cached_tokens, reply.usage.computed_tokens
        );
    }
    Ok(())
}
