//! An agent owns its conversation and its KV cache: the second question reuses every
//! token of the first turn from the cache and computes only the new ones.
//!
//! Run: `cargo run --release --example hello_agent` (after `troupe model fetch`).

use std::sync::Arc;

use kameo::actor::Spawn;
use troupe::agent::{AgentActor, AgentConfig, Ask};
use troupe::engine::{EngineConfig, ModelActor};
use troupe::model::{fetch, LoadOptions, Model};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One model, one model actor: it batches the requests of every agent.
    let path = fetch::resolve_model_path(None)?;
    let model = Arc::new(Model::load(&path, LoadOptions::default())?);
    let engine = ModelActor::spawn(ModelActor::new(model.clone(), EngineConfig::default())?);

    // An agent is configured, then spawned as an actor.
    let config = AgentConfig {
        max_tokens: 48,
        ..AgentConfig::new(
            "guide",
            "You are a friendly travel guide. Answer in one sentence.",
        )
    };
    let agent = AgentActor::new(config, model, engine, vec![])?.spawn_agent();

    for question in ["What is Lisbon famous for?", "And what should I eat there?"] {
        let reply = agent.ask(Ask(question.into())).await?;
        println!("> {question}\n{}", reply.text);
        println!(
            "  (reused {} tokens from the cache, computed {})\n",
            reply.usage.cached_tokens, reply.usage.computed_tokens
        );
    }
    Ok(())
}
