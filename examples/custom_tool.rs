//! How to write your own tool: a typed argument struct (its JSON Schema is derived
//! with schemars, and the model's call is constrained to it) and an async function
//! returning text, or an error the model sees.
//!
//! Run: `cargo run --release --example custom_tool`.

use troupe::agent::{tool_fn, AgentConfig, Ask, ToolChoice};
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{fetch, LoadOptions};

/// The tool's arguments. Doc comments become the schema's descriptions.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct StockArgs {
    /// The product to look up.
    product: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = fetch::resolve_model_path(None)?;
    let engine = Engine::start(&path, LoadOptions::default(), EngineConfig::default())?;

    let stock = tool_fn(
        "stock",
        "How many units of a product are in the warehouse.",
        |args: StockArgs| async move {
            match args.product.to_lowercase().as_str() {
                "apples" | "apple" => Ok("120 units".to_string()),
                "pears" | "pear" => Ok("0 units".to_string()),
                other => Err(format!("unknown product `{other}`")),
            }
        },
    );
    let config = AgentConfig {
        tools: vec!["stock".into()],
        // The first reply of each turn must call a tool; then the model may answer.
        tool_choice: ToolChoice::Required,
        max_tool_steps: 1,
        max_tokens: 48,
        ..AgentConfig::new("clerk", "You answer questions about the warehouse stock.")
    };
    let agent = engine.agent(config, vec![stock])?;

    let reply = agent.ask(Ask::new("How many apples do we have?")).await?;
    for run in &reply.tool_runs {
        println!("{} {} -> {}", run.call.name, run.call.arguments, run.result);
    }
    println!("answer: {}", reply.text.trim());
    Ok(())
}
