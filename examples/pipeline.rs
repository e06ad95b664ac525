//! A pipeline: each agent's answer becomes the next agent's input. Progress arrives
//! as workflow events while it runs.
//!
//! Run: `cargo run --release --example pipeline`.

use troupe::agent::AgentConfig;
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};
use troupe::workflow::{pipeline, Named, WorkflowEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;
    let agent = |name: &str, prompt: &str| -> anyhow::Result<Named> {
        let config = AgentConfig {
            max_tokens: 48,
            ..AgentConfig::new(name, prompt)
        };
        let actor = engine.agent(config, vec![])?;
        Ok(Named::new(name, actor))
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
