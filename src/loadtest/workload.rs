//! The in-process workload: agents with a shared system prompt, synthetic user
//! messages of a given length, exponential think time, an optional simulated tool call
//! per turn, and the two ablations (no cache reuse, no batching), in the closed or
//! the open loop. The same texts ([`texts`]) drive the HTTP workload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::arrivals::Arrivals;
use super::options::{GrammarKind, LoadtestOptions, LIMITS};
use super::report::{Recorder, RunReport, TurnDone, TurnRecord};
use super::serving::RequestSample;
use crate::agent::{ask_streaming, tool_fn, AgentConfig, AgentEvent, Ask, Evict, Tool, ToolChoice};
use crate::engine::{Engine, EngineConfig, SchedulerConfig};
use crate::grammar::Grammar;
use crate::model::{Model, Tokenizer};
use crate::sampling::SamplingParams;
use crate::Result;

const WORDS: &[&str] = &[
    "river", "stone", "light", "market", "garden", "window", "paper", "engine", "cloud", "signal",
    "forest", "letter", "orange", "bridge", "silver", "planet", "harbor", "winter", "candle",
    "mirror", "number", "travel",
];

/// Text of about `tokens` tokens (measured with the model's tokenizer).
fn text_of(tokenizer: &Tokenizer, tokens: usize, rng: &mut StdRng) -> Result<String> {
    let mut s = String::new();
    while tokenizer.encode(&s)?.len() < tokens {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    Ok(s)
}

/// The texts of a run: the shared system prompt and each agent's user messages, the
/// same for the same options and tokenizer, in process and over HTTP.
pub(super) fn texts(
    tokenizer: &Tokenizer,
    o: &LoadtestOptions,
) -> Result<(String, Vec<Vec<String>>)> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let system = text_of(tokenizer, o.system_tokens, &mut rng)?;
    let mut all = Vec::with_capacity(o.agents);
    for _ in 0..o.agents {
        let mut msgs = Vec::with_capacity(o.turns);
        for _ in 0..o.turns {
            msgs.push(text_of(tokenizer, o.user_tokens, &mut rng)?);
        }
        all.push(msgs);
    }
    Ok((system, all))
}

/// Sleeps the exponential think time before a turn after the first.
pub(super) async fn think(o: &LoadtestOptions, turn: usize, rng: &mut StdRng) {
    if o.think_ms > 0.0 && turn > 0 {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        let secs = (-u.ln() * o.think_ms / 1e3).clamp(0.0, LIMITS.millis / 1e3);
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
}

/// The seed of agent `i`'s think times.
/// Waits for the agents' tasks, or until `deadline`; those still running then are
/// aborted.
pub(super) async fn join_until(tasks: Vec<tokio::task::JoinHandle<()>>, deadline: Option<Instant>) {
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
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
    for a in aborts {
        a.abort();
    }
}

pub(super) fn think_seed(o: &LoadtestOptions, i: usize) -> u64 {
    o.seed ^ (0x9E37 + i as u64)
}

/// The sampling of agent `i`.
pub(super) fn sampling(o: &LoadtestOptions, i: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: o.ignore_eos,
        ..SamplingParams::with_temperature(0.7, o.seed.wrapping_add(i as u64))
    }
}

/// The reply grammar of a grammar kind.
pub(super) fn grammar(kind: GrammarKind) -> Option<Grammar> {
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

/// What the simulated tool answers.
pub(super) fn lookup_result(query: &str) -> String {
    format!("found {}", query.len())
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
    let (system, texts) = texts(model.tokenizer(), o)?;
    let tools: Vec<Arc<dyn Tool>> = if o.tool_ms > 0.0 {
        let ms = o.tool_ms;
        vec![tool_fn(
            "lookup",
            "Looks something up.",
            move |a: LookupArgs| async move {
                tokio::time::sleep(Duration::from_secs_f64(ms / 1e3)).await;
                Ok(lookup_result(&a.query))
            },
        )]
    } else {
        Vec::new()
    };
    let recorder = Arc::new(Recorder::new(o, o.progress));
    let arrivals = Arc::new(Arrivals::new(o));
    let start = Instant::now();
    let deadline = o.duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for (i, msgs) in texts.into_iter().enumerate() {
        let config = AgentConfig {
            name: format!("agent-{i}"),
            system_prompt: system.clone(),
            grammar: grammar(o.grammar),
            sampling: sampling(o, i),
            max_tokens: o.max_tokens,
            max_tool_steps: 1,
            ..AgentConfig::default()
        };
        let agent = engine.agent(config, tools.clone())?;
        let mut think_rng = StdRng::seed_from_u64(think_seed(o, i));
        let (recorder, arrivals, o) = (recorder.clone(), arrivals.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            for (turn, text) in msgs.into_iter().enumerate() {
                think(&o, turn, &mut think_rng).await;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let Some(admitted) = arrivals.admit().await else {
                    break;
                };
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
                let end = Instant::now();
                match reply {
                    Ok(r) => {
                        if token_times.is_empty() {
                            token_times.push(sent + r.ttft);
                        }
                        let u = &r.usage;
                        recorder.turn(TurnDone {
                            record: TurnRecord {
                                agent: i,
                                turn,
                                prompt_tokens: u.prompt_tokens,
                                reused_tokens: u.cached_tokens,
                                generated_tokens: u.generated_tokens,
                            },
                            requests: vec![RequestSample {
                                sent,
                                token_times,
                                end,
                                prompt_tokens: u.prompt_tokens,
                                cached_tokens: Some(u.cached_tokens),
                                generated_tokens: u.generated_tokens,
                            }],
                            elapsed: r.elapsed,
                            queue: r.queue + sent.saturating_duration_since(admitted.arrived),
                            recomputed: r.recomputed_tokens,
                            restored: r.restored_tokens,
                        });
                    }
                    Err(e) => recorder.error(1, e.to_string()),
                }
            }
        }));
    }
    join_until(tasks, deadline).await;
    let wall = start.elapsed();
    let stats = engine.stats().await?;
    engine.stop().await;
    Ok(recorder.report(o, wall, Some(&stats)))
}
