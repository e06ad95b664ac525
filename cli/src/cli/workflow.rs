//! `troupe workflow NAME`: the bundled demo workflows (pipeline, fan-out, router,
//! group chat), each on one model actor, printing every step as it happens.

use std::path::Path;

use anyhow::Context;
use troupe::agent::AgentConfig;
use troupe::engine::Engine;
use troupe::model::WeightsMode;
use troupe::workflow::{self, GroupChat, Named, Speaker, Termination, WorkflowEvent};

use crate::ready_made::{Options, ReadyMade};

/// The demos: name, what it shows, default input.
pub const DEMOS: &[(&str, &str, &str)] = &[
    (
        "pipeline",
        "outliner -> writer -> editor, each answer the next one's input",
        "Why is the sky blue?",
    ),
    (
        "fan-out",
        "optimist, skeptic and engineer answer at once (one batch), a judge combines",
        "Should our team rewrite the service in Rust?",
    ),
    (
        "router",
        "a router picks calculator, clock or writer (a choice grammar); that agent answers",
        "What is 12 * 12?",
    ),
    (
        "group-chat",
        "planner and critic take turns until one says AGREED or 4 rounds pass",
        "Plan a picnic for four people.",
    ),
];

/// Options of `troupe workflow`.
pub struct WorkflowOptions<'a> {
    /// `--model`, if given (else the default model).
    pub model: Option<&'a Path>,
    /// How weights are stored and multiplied.
    pub weights: WeightsMode,
    /// The demo's name.
    pub name: &'a str,
    /// Input instead of the demo's own.
    pub input: Option<&'a str>,
    /// Most tokens per agent reply.
    pub max_tokens: usize,
}

/// One line of at most 160 characters.
fn clip(s: &str) -> String {
    super::one_line(s.trim(), 160, " ")
}

fn print_event(ev: WorkflowEvent) {
    match ev {
        WorkflowEvent::Asked { agent, input } => println!("-> {agent}: {}", clip(&input)),
        WorkflowEvent::Answered { agent, reply } => {
            for run in &reply.tool_runs {
                println!(
                    "   {agent} called {} {} = {}",
                    run.call.name,
                    run.call.arguments,
                    clip(&run.result)
                );
            }
            println!(
                "<- {agent}: {}  [reused {}, computed {}, generated {}]",
                clip(&reply.text),
                reply.usage.cached_tokens,
                reply.usage.computed_tokens,
                reply.usage.generated_tokens
            );
        }
        WorkflowEvent::Picked { agent } => println!("=> picked {agent}"),
        WorkflowEvent::Ended { reason } => println!("== ended: {reason}"),
    }
}

/// Runs one demo.
pub fn run(o: WorkflowOptions<'_>) -> anyhow::Result<()> {
    let Some(&(name, what, default_input)) = DEMOS.iter().find(|d| d.0 == o.name) else {
        anyhow::bail!(
            "no demo workflow `{}` (workflows: {})",
            o.name,
            DEMOS.iter().map(|d| d.0).collect::<Vec<_>>().join(", ")
        );
    };
    let input = o.input.unwrap_or(default_input).to_string();
    let model_path = troupe::model::fetch::resolve_model_path(o.model)?;
    super::runtime()?.block_on(async move {
        let engine = super::start_model(&model_path, o.weights)?;
        let agent = |name: &str, prompt: &str| -> anyhow::Result<Named> {
            let config = AgentConfig {
                max_tokens: o.max_tokens,
                ..AgentConfig::new(name, prompt)
            };
            Ok(Named::new(name, engine.agent(config, vec![])?))
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                print_event(ev);
            }
        });
        let events = Some(tx);
        println!("workflow {name}: {what}\ninput: {input}\n");
        let result = match name {
            "pipeline" => {
                let stages = [
                    agent("outliner", "List the three key points of an answer, briefly.")?,
                    agent("writer", "Write one short paragraph from the given points.")?,
                    agent("editor", "Rewrite the text as two clear sentences.")?,
                ];
                workflow::pipeline(&stages, &input, &events).await?
            }
            "fan-out" => {
                let panel = [
                    agent("optimist", "You see the upside. Answer in two sentences.")?,
                    agent("skeptic", "You see the risks. Answer in two sentences.")?,
                    agent("engineer", "You think about the work. Answer in two sentences.")?,
                ];
                let judge = agent("judge", "You weigh opinions and decide in two sentences.")?;
                let answers = workflow::fan_out(&panel, &input, &events).await?;
                workflow::gather(&judge, &input, &answers, &events).await?
            }
            "router" => {
                let ready = |n: &str| -> anyhow::Result<Named> {
                    let mut made = ReadyMade::build(n, &Options::default())?;
                    made.config.max_tokens = made.config.max_tokens.max(o.max_tokens);
                    Ok(Named::new(n, made.spawn(&engine)?))
                };
                let team = [
                    ready("calculator")?,
                    ready("clock")?,
                    agent("writer", "You write short texts.")?,
                ];
                let router = agent(
                    "router",
                    "You route tasks: calculator for arithmetic, clock for dates, times and units, writer for anything else.",
                )?;
                let (_, reply) = workflow::route(&router, &team, &input, &events).await?;
                reply.text
            }
            _ => {
                let chat = GroupChat {
                    agents: vec![
                        agent("planner", "You propose a plan in two sentences. Say AGREED when the critic is satisfied.")?,
                        agent("critic", "You point out one problem with the plan in one sentence, or say AGREED.")?,
                    ],
                    speaker: Speaker::RoundRobin,
                    until: Termination {
                        phrase: Some("AGREED".into()),
                        max_rounds: 4,
                        predicate: None,
                    },
                };
                let (transcript, _) = workflow::group_chat(&chat, &input, &events).await?;
                transcript.last().map(|t| t.1.clone()).unwrap_or_default()
            }
        };
        drop(events);
        printer.await?;
        println!("\nresult: {}", result.trim());
        print_batching(&engine).await;
        Ok::<_, anyhow::Error>(())
    })
    .with_context(|| format!("troupe workflow {name}"))
}

/// How the model actor batched the workflow's requests.
async fn print_batching(engine: &Engine) {
    if let Ok(s) = engine.stats().await {
        println!(
            "model: {} steps, largest batch {} sequences, mean {:.2}; {} tokens computed, {} generated",
            s.steps,
            s.max_batch(),
            s.mean_batch(),
            s.tokens_computed,
            s.tokens_generated
        );
    }
}
