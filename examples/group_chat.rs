//! A group chat: agents speak in turn until a termination condition holds (here a
//! phrase, or at most four rounds).
//!
//! Run: `cargo run --release --example group_chat`.

use std::sync::Arc;

use kameo::actor::Spawn;
use troupe::agent::{AgentActor, AgentConfig};
use troupe::engine::{EngineConfig, ModelActor};
use troupe::model::{fetch, LoadOptions, Model};
use troupe::workflow::{group_chat, GroupChat, Named, Speaker, Termination};

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

    let chat = GroupChat {
        agents: vec![
            agent(
                "host",
                "You plan a dinner party. Propose one idea per message.",
            )?,
            agent(
                "guest",
                "You react to the plan in one sentence. Say DEAL if you like it.",
            )?,
        ],
        // Or Speaker::Moderator(agent): it picks each next speaker with a choice grammar.
        speaker: Speaker::RoundRobin,
        until: Termination {
            phrase: Some("DEAL".into()),
            max_rounds: 4,
            predicate: None,
        },
    };
    let (transcript, reason) = group_chat(&chat, "Let's plan Saturday's dinner.", &None).await?;
    for (speaker, text) in &transcript {
        println!("[{speaker}] {}", text.trim());
    }
    println!("ended after {reason}");
    Ok(())
}
