//! A pipeline: each agent's answer becomes the next agent's input. Progress arrives
//! as workflow events while it runs.
//!
//! Run: `cargo run --release --example pipeline`.

use std::sync::Arc;

use kameo::actor::Spawn;
use troupe::agent::{AgentActor, AgentConfig};
use troupe::engine::{EngineConfig, ModelActor};
use troupe::model::{fetch, LoadOptions, Model};
use troupe::workflow::{pipeline, Named, WorkflowEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let model = Arc::new(Model::load(&path, LoadOptions::default())?);
    let engine = ModelActor::spawn(ModelActor::new(model.clone(), EngineConfig::default())?);
    let agent = |name: &str, prompt: &str| -> anyhow::Result<Named> {
        let config = AgentConfig {
            max_tokens: 48,
            ..AgentConfig::new(name, prompt)
        };
        let actor = AgentActor::new(config, model.clone(), engine.clone(), vec![])?;
        Ok(Named::new(name, actor.spawn_agent()))
    };
    let stages = [
        agent(
            "poet",
            "Write a two-line poem about the topic you are given.",
        )?,
        agent(
            "critic",
            "Say in one sentence what the poem you are given is about.",
        )?,
    ];

    // Events: who was asked what, and what they answered.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if let WorkflowEvent::Answered { agent, reply } = event {
                println!("[{agent}] {}", reply.text.trim());
            }
        }
    });
    let result = pipeline(&stages, "the sea at night", &Some(tx)).await?;
    printer.await?;
    println!("result: {}", result.trim());
    Ok(())
}
