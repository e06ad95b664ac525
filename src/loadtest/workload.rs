//! The closed-loop workload: agents with a shared system prompt, synthetic user
//! messages of a given length, exponential think time, an optional simulated tool call
//! per turn, and the two ablations (no cache reuse, no batching).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::options::{GrammarKind, LoadtestOptions, LIMITS};
use super::report::{Recorder, RunReport};
use crate::agent::{ask_streaming, tool_fn, AgentConfig, AgentEvent, Ask, Evict, Tool, ToolChoice};
use crate::engine::{Engine, EngineConfig, SchedulerConfig};
use crate::grammar::Grammar;
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::Result;

const WORDS: &[&str] = &[
    "river", "stone", "light", "market", "garden", "window", "paper", "engine", "cloud", "signal",
    "forest", "letter", "orange", "bridge", "silver", "planet", "harbor", "winter", "candle",
    "mirror", "number", "travel",
];

/// Text of about `tokens` tokens (measured with the model's tokenizer).
fn text_of(model: &Model, tokens: usize, rng: &mut StdRng) -> Result<String> {
    let mut s = String::new();
    while model.tokenizer().encode(&s)?.len() < tokens {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    Ok(s)
}

fn grammar(kind: GrammarKind) -> Option<Grammar> {
    match kind {
        GrammarKind::None => None,
        GrammarKind::Json => Some(Grammar::JsonSchema(json!({
            "type": "object",
            "properties": {"answer": {"type": "string", "maxLength": 80}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["answer", "confidence"], "additionalProperties": false
        }))),
        GrammarKind::Regex => Some(Grammar::Regex(r"[A-Z][a-z ,]{10,120}\.".into())),
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct LookupArgs {
    query: String,
}

/// Runs one load test.
pub async fn run(model: Arc<Model>, o: &LoadtestOptions) -> Result<RunReport> {
    o.validate()?;
    let engine = Engine::serve(
        model.clone(),
        EngineConfig {
            scheduler: SchedulerConfig {
                max_step_tokens: 512,
                max_running: if o.no_batching { 1 } else { 64 },
                kv_budget_bytes: o.kv_budget,
                max_prefill_while_decoding: o.max_prefill_while_decoding,
            },
            kv_dtype: o.kv_dtype,
            spill: o.spill.clone(),
            test_hooks: o.engine_hooks.clone(),
        },
    )?;
    let mut rng = StdRng::seed_from_u64(o.seed);
    let system = text_of(&model, o.system_tokens, &mut rng)?;
    let tools: Vec<Arc<dyn Tool>> = if o.tool_ms > 0.0 {
        let ms = o.tool_ms;
        vec![tool_fn(
            "lookup",
            "Looks something up.",
            move |a: LookupArgs| async move {
                tokio::time::sleep(Duration::from_secs_f64(ms / 1e3)).await;
                Ok(format!("found {}", a.query.len()))
            },
        )]
    } else {
        Vec::new()
    };
    let recorder = Arc::new(Recorder::new(o, o.progress));
    let start = Instant::now();
    let deadline = o.duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for i in 0..o.agents {
        let config = AgentConfig {
            name: format!("agent-{i}"),
            system_prompt: system.clone(),
            grammar: grammar(o.grammar),
            sampling: SamplingParams::with_temperature(0.7, o.seed.wrapping_add(i as u64)),
            max_tokens: o.max_tokens,
            max_tool_steps: 1,
            ..AgentConfig::default()
        };
        let agent = engine.agent(config, tools.clone())?;
        let mut msgs = Vec::new();
        for _ in 0..o.turns {
            msgs.push(text_of(&model, o.user_tokens, &mut rng)?);
        }
        let mut think_rng = StdRng::seed_from_u64(o.seed ^ (0x9E37 + i as u64));
        let (recorder, o) = (recorder.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            for (turn, text) in msgs.into_iter().enumerate() {
                if o.think_ms > 0.0 && turn > 0 {
                    let u: f64 = think_rng.random_range(f64::EPSILON..1.0);
                    let secs = (-u.ln() * o.think_ms / 1e3).clamp(0.0, LIMITS.millis / 1e3);
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if o.no_cache_reuse {
                    let _ = agent.tell(Evict::ANY).await;
                }
                let choice = if o.tool_ms > 0.0 {
                    ToolChoice::Tool("lookup".into())
                } else {
                    ToolChoice::Auto
                };
                let sent = Instant::now();
                let mut token_times = Vec::new();
                let reply = ask_streaming(&agent, Ask::new(text).tool_choice(choice), |ev| {
                    if let AgentEvent::Token(_) = ev {
                        token_times.push(Instant::now());
                    }
                })
                .await;
                match reply {
                    Ok(reply) => recorder.turn((i, turn), &reply, sent, &token_times),
                    Err(_) => recorder.error(),
                }
            }
        }));
    }
    let all = futures::future::join_all(tasks);
    match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, all).await;
        }
        None => {
            all.await;
        }
    }
    let wall = start.elapsed();
    let stats = engine.stats().await?;
    engine.stop().await;
    Ok(recorder.report(o, wall, &stats))
}
