//! `troupe bench grammar`: per-token mask time of each grammar kind on the model's
//! vocabulary, and the throughput of constrained against unconstrained concurrent
//! generations in the same run.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::Quantiles;
use crate::engine::{generate, Engine, EngineConfig, Generate, SchedulerConfig, Sequence};
use crate::grammar::Grammar;
use crate::kv::KvDtype;
use crate::model::{LoadOptions, Message, Model, WeightsMode};
use crate::sampling::{Sampler, SamplingParams};
use crate::Result;

/// What the grammar bench measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrammarReport {
    /// The model file.
    pub model: String,
    /// Grammar kind -> mask computation time per token (µs).
    pub mask_us: BTreeMap<String, Quantiles>,
    /// Masks measured per kind.
    pub masks_measured: BTreeMap<String, usize>,
    /// Generated tokens/s of 16 concurrent JSON-Schema-constrained generations.
    pub constrained_tok_s: f64,
    /// Generated tokens/s of 16 concurrent unconstrained generations.
    pub unconstrained_tok_s: f64,
}

/// The nested JSON Schema of the bench.
pub fn nested_schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {"type": "object", "properties": {
                "street": {"type": "string", "maxLength": 30},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"], "additionalProperties": false},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["name", "age", "address", "tags"],
        "additionalProperties": false
    })
}

fn chat(model: &Model, user: &str) -> Result<Vec<u32>> {
    let text = model.chat_template().render(&[Message::user(user)], true)?;
    model.tokenizer().encode_prompt(&text)
}

/// Runs the bench; `progress` gets a line per measure.
pub async fn run(
    path: &Path,
    weights: WeightsMode,
    mut progress: impl FnMut(&str),
) -> Result<GrammarReport> {
    let model = Arc::new(Model::load(path, LoadOptions { weights })?);
    let compiler = crate::grammar::GrammarCompiler::new(model.tokenizer())?;
    let kinds = [
        ("regex", Grammar::Regex(r"[A-Z][a-z]+ (is|was) [a-z ,]{5,60}\.".into()), "Describe the sea."),
        ("json_schema", Grammar::JsonSchema(nested_schema()), "Describe a person as JSON."),
        (
            "lark",
            Grammar::Lark(
                "start: sentence (\" \" sentence){0,3}\nsentence: WORD (\" \" WORD){1,8} \".\"\nWORD: /[a-zA-Z]{1,12}/"
                    .into(),
            ),
            "Write about cats.",
        ),
    ];
    let mut mask_us = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for (name, grammar, prompt) in &kinds {
        let compiled = compiler.compile(grammar)?;
        let ids = chat(&model, prompt)?;
        let mut times = Vec::new();
        for seed in 0..4 {
            let mut cache = model.new_cache(KvDtype::F32);
            let sampler = Sampler::new(SamplingParams::with_temperature(0.8, seed))?;
            let c: Box<dyn crate::sampling::TokenConstraint> = Box::new(compiled.constraint());
            let seq = Sequence::new(ids.clone(), sampler, Some(c), &[], 64, false);
            let out = generate(&model, &mut cache, seq, |_| {})?;
            times.extend_from_slice(&out.mask_times);
        }
        let q = Quantiles::of(&times);
        progress(&format!(
            "{name}: mask p50 {:.0} µs, p99 {:.0} µs over {} masks",
            q.p50,
            q.p99,
            times.len()
        ));
        counts.insert(name.to_string(), times.len());
        mask_us.insert(name.to_string(), q);
    }

    let engine = Engine::serve(
        model.clone(),
        EngineConfig {
            scheduler: SchedulerConfig {
                max_step_tokens: 512,
                max_running: 32,
                kv_budget_bytes: 8 << 30,
                ..Default::default()
            },
            ..EngineConfig::default()
        },
    )?;
    let json_prompt = chat(&model, "Describe a person as JSON.")?;
    let mut rates = Vec::new();
    for constrained in [true, false] {
        let start = Instant::now();
        let mut streams = Vec::new();
        for i in 0..16u64 {
            let mut g = Generate::new(model.new_cache(KvDtype::F32), json_prompt.clone(), 64);
            g.sampling = SamplingParams::with_temperature(0.8, i);
            if constrained {
                g.grammar = Some(Grammar::JsonSchema(nested_schema()));
            } else {
                g.ignore_eos = true;
            }
            streams.push(engine.generate(g).await.map_err(|r| r.error)?);
        }
        let mut generated = 0;
        for s in streams {
            generated += s
                .finish()
                .await
                .map_err(|e| e.error)?
                .usage
                .generated_tokens;
        }
        let rate = generated as f64 / start.elapsed().as_secs_f64();
        progress(&format!(
            "16 concurrent {}: {generated} tokens, {rate:.1} tok/s",
            if constrained {
                "JSON-Schema-constrained"
            } else {
                "unconstrained"
            }
        ));
        rates.push(rate);
    }
    Ok(GrammarReport {
        model: path.display().to_string(),
        mask_us,
        masks_measured: counts,
        constrained_tok_s: rates[0],
        unconstrained_tok_s: rates[1],
    })
}
