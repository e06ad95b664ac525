//! A group chat: agents speak in turn until a termination condition holds (here a
//! phrase, or at most four rounds).
//!
//! Run: `cargo run --release --example group_chat`.

use troupe::agent::AgentConfig;
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};
use troupe::workflow::{group_chat, GroupChat, Named, Speaker, Termination};

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
