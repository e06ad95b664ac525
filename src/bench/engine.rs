//! `troupe bench engine`: concurrent generations through the model actor, batched and
//! with the batch limited to one sequence, in the same run; and the actor's overhead
//! over calling the forward directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::percentiles;
use crate::engine::{Engine, EngineConfig, Event, Generate, SchedulerConfig};
use crate::kv::KvDtype;
use crate::model::{LoadOptions, Model, WeightsMode};
use crate::{Error, Result};

/// Figures of one concurrency level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelReport {
    /// Aggregate generated tokens per second.
    pub tok_s: f64,
    /// Time to first token, median (ms).
    pub ttft_ms_p50: f64,
    /// Time to first token, 95th percentile (ms).
    pub ttft_ms_p95: f64,
    /// Inter-token latency, median (ms).
    pub itl_ms_p50: f64,
    /// Inter-token latency, 95th percentile (ms).
    pub itl_ms_p95: f64,
}

/// What the engine bench measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineReport {
    /// The model file.
    pub model: String,
    /// What the weights mode resolved to.
    pub weights: String,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// Generated tokens per request.
    pub new_tokens: usize,
    /// N -> figures, continuous batching on.
    pub by_concurrency: BTreeMap<usize, LevelReport>,
    /// N -> figures, batch limited to one sequence.
    pub unbatched_by_concurrency: BTreeMap<usize, LevelReport>,
    /// One sequence decoding by calling the forward directly (median time per token).
    pub direct_decode_tok_s: f64,
    /// One sequence decoding through the actor (N = 1, median inter-token latency).
    pub actor_decode_tok_s: f64,
}

/// Options of the engine bench.
#[derive(Debug, Clone)]
pub struct EngineBench {
    /// Concurrency levels.
    pub concurrency: Vec<usize>,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// Generated tokens per request.
    pub new_tokens: usize,
    /// Element type of the caches.
    pub kv_dtype: KvDtype,
}

impl Default for EngineBench {
    fn default() -> Self {
        Self {
            concurrency: vec![1, 4, 16, 64],
            prompt_tokens: 128,
            new_tokens: 64,
            kv_dtype: KvDtype::default(),
        }
    }
}

impl EngineBench {
    /// The decode-heavy shape: 32-token prompts and 256 new tokens, so that the
    /// batched/unbatched ratio shows decode rather than prefill (with 128-token
    /// prompts and 64 new tokens, prefill alone bounds it near 2.7x).
    pub fn decode_heavy() -> Self {
        Self {
            prompt_tokens: 32,
            new_tokens: 256,
            ..Self::default()
        }
    }
}

/// Per-request client-side timings.
struct Trace {
    ttft: f64,
    itl: Vec<f64>,
}

impl EngineBench {
    /// Runs every level, batched and unbatched; `progress` gets a line per level.
    pub async fn run(
        &self,
        path: &Path,
        weights: WeightsMode,
        mut progress: impl FnMut(&str),
    ) -> Result<EngineReport> {
        let model = Arc::new(Model::load(path, LoadOptions { weights })?);
        let direct_decode_tok_s = self.direct_decode(&model)?;
        progress(&format!(
            "direct forward decode: {direct_decode_tok_s:.1} tok/s"
        ));
        let max = self.concurrency.iter().copied().max().unwrap_or(1);
        let batched = self.spawn(&model, max)?;
        let single = self.spawn(&model, 1)?;
        let mut by = BTreeMap::new();
        let mut unbatched = BTreeMap::new();
        let mut actor_decode_tok_s = 0.0;
        for &n in &self.concurrency {
            let (level, traces) = self.level(&model, &batched, n).await?;
            if n == 1 {
                actor_decode_tok_s = 1.0 / super::median(&traces[0].itl);
            }
            progress(&format!("batched   N={n:>3}: {:.1} tok/s", level.tok_s));
            by.insert(n, level);
            let (level, _) = self.level(&model, &single, n).await?;
            progress(&format!("unbatched N={n:>3}: {:.1} tok/s", level.tok_s));
            unbatched.insert(n, level);
        }
        Ok(EngineReport {
            model: path.display().to_string(),
            weights: model.info().weights_chosen.clone(),
            prompt_tokens: self.prompt_tokens,
            new_tokens: self.new_tokens,
            by_concurrency: by,
            unbatched_by_concurrency: unbatched,
            direct_decode_tok_s,
            actor_decode_tok_s,
        })
    }

    fn spawn(&self, model: &Arc<Model>, max_running: usize) -> Result<Engine> {
        let cfg = EngineConfig {
            scheduler: SchedulerConfig {
                max_step_tokens: 512,
                max_running,
                kv_budget_bytes: 8 << 30,
                ..Default::default()
            },
            ..EngineConfig::default()
        };
        Engine::serve(model.clone(), cfg)
    }

    fn prompt(&self, i: usize, vocab: usize) -> Vec<u32> {
        (0..self.prompt_tokens)
            .map(|t| {
                // The middle of any vocabulary, even a tiny one.
                let lo = 500.min(vocab / 4);
                let span = vocab.saturating_sub(2 * lo).max(1);
                (lo + (t * 7919 + i * 104_729) % span) as u32
            })
            .collect()
    }

    /// One sequence: prefill, then decode `new_tokens` calling the forward directly;
    /// tokens/s from the median time per token (as the actor figure is).
    fn direct_decode(&self, model: &Model) -> Result<f64> {
        let p = self.prompt(0, model.config().vocab_size);
        let times = super::decode_step_times(model, &p, self.new_tokens, self.kv_dtype)?;
        Ok(1.0 / super::median(&times))
    }

    /// `n` concurrent generations through `actor`.
    async fn level(
        &self,
        model: &Arc<Model>,
        engine: &Engine,
        n: usize,
    ) -> Result<(LevelReport, Vec<Trace>)> {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut g = Generate::new(
                model.new_cache(self.kv_dtype),
                self.prompt(i, model.config().vocab_size),
                self.new_tokens,
            );
            g.ignore_eos = true;
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let mut stream = engine.generate(g).await.map_err(|r| r.error)?;
                let mut last: Option<Instant> = None;
                let mut trace = Trace {
                    ttft: 0.0,
                    itl: Vec::new(),
                };
                while let Some(ev) = stream.next().await {
                    match ev {
                        Event::Token { .. } => {
                            let now = Instant::now();
                            match last {
                                None => trace.ttft = (now - sent).as_secs_f64(),
                                Some(l) => trace.itl.push((now - l).as_secs_f64()),
                            }
                            last = Some(now);
                        }
                        Event::Text { .. } => {}
                        Event::Done(_) => break,
                        Event::Failed { error, .. } => return Err(error),
                    }
                }
                Ok::<_, Error>(trace)
            }));
        }
        let mut traces = Vec::new();
        for t in tasks {
            traces.push(t.await.map_err(|e| Error::Report {
                what: format!("bench task: {e}"),
            })??);
        }
        let wall = start.elapsed().as_secs_f64();
        let ttft: Vec<f64> = traces.iter().map(|t| t.ttft * 1e3).collect();
        let itl: Vec<f64> = traces
            .iter()
            .flat_map(|t| t.itl.iter().map(|x| x * 1e3))
            .collect();
        let (ttft_q, itl_q) = (
            percentiles(&ttft, &[50.0, 95.0]),
            percentiles(&itl, &[50.0, 95.0]),
        );
        Ok((
            LevelReport {
                tok_s: (n * self.new_tokens) as f64 / wall,
                ttft_ms_p50: ttft_q[0],
                ttft_ms_p95: ttft_q[1],
                itl_ms_p50: itl_q[0],
                itl_ms_p95: itl_q[1],
            },
            traces,
        ))
    }
}
