//! `troupe bench perplexity FILE [--ctx N]`: the perplexity of a text under the model,
//! by the method of llama.cpp's `llama-perplexity`, for each weights mode asked for.
//! This is how a faster, less exact path shows that it is still the same model.
//!
//! The text is tokenized once and cut into chunks of `ctx` tokens (a trailing part
//! shorter than a chunk is left out). Each chunk starts a fresh cache, with its first
//! token replaced by BOS where the model adds one; the first half of the chunk is
//! context only, and every token of the second half is scored: the negative log
//! probability the model gave it from the tokens before it. The perplexity is
//! `exp(mean score)`.

use std::path::Path;
use std::time::Instant;

use crate::kv::KvDtype;
use crate::model::{LoadOptions, Model, SeqInput, WeightsMode};
use crate::{Error, Result};

/// The perplexity of one weights mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityRun {
    /// Weights mode asked for.
    pub weights: WeightsMode,
    /// What it resolved to.
    pub weights_chosen: String,
    /// `exp(mean negative log-likelihood)` of the scored tokens.
    pub perplexity: f64,
    /// Tokens scored (half of each chunk).
    pub scored_tokens: usize,
    /// Tokens fed through the model per second (context and scored halves).
    pub tok_s: f64,
}

/// What the perplexity bench measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    /// The model file.
    pub model: String,
    /// The text file.
    pub text: String,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks scored.
    pub chunks: usize,
    /// One run per weights mode.
    pub runs: Vec<PerplexityRun>,
}

/// The chunks of `tokens` the method scores: `ctx` tokens each, the first replaced
/// by `bos` when given.
pub fn chunks(tokens: &[u32], ctx: usize, bos: Option<u32>) -> Vec<Vec<u32>> {
    tokens
        .chunks_exact(ctx)
        .map(|c| {
            let mut c = c.to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect()
}

/// `-log softmax(logits)[target]`, in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    z.ln() + max - logits[target as usize] as f64
}

/// Sum of the scores of one chunk's second half and the number of tokens scored:
/// the first half in one forward, the second half in one forward that returns every
/// token's logits.
pub fn score_chunk(model: &Model, chunk: &[u32], kv_dtype: KvDtype) -> Result<(f64, usize)> {
    let first = chunk.len() / 2;
    if first == 0 {
        return Ok((0.0, 0));
    }
    let mut cache = model.new_cache(kv_dtype);
    model.forward(&mut [SeqInput {
        tokens: &chunk[..first],
        cache: &mut cache,
    }])?;
    // Logits at positions first..len-1 predict tokens first+1..len.
    let logits: Vec<Vec<f32>> = model
        .forward_all(&mut [SeqInput {
            tokens: &chunk[first..chunk.len() - 1],
            cache: &mut cache,
        }])?
        .to_vec2()?;
    let sum = logits
        .iter()
        .zip(&chunk[first + 1..])
        .map(|(row, &t)| nll(row, t))
        .sum();
    Ok((sum, logits.len()))
}

/// Options of the bench.
#[derive(Debug, Clone)]
pub struct PerplexityBench {
    /// Tokens per chunk.
    pub ctx: usize,
    /// Most chunks to score (0: all).
    pub max_chunks: usize,
    /// Weights modes, each loaded in turn.
    pub modes: Vec<WeightsMode>,
    /// Element type of the caches.
    pub kv_dtype: KvDtype,
}

impl PerplexityBench {
    /// Scores `text` under the model at `path` in every mode.
    pub fn run(
        &self,
        path: &Path,
        text_path: &Path,
        mut progress: impl FnMut(&str),
    ) -> Result<PerplexityReport> {
        let text = std::fs::read_to_string(text_path)?;
        let mut runs = Vec::new();
        let mut n_chunks = 0;
        for &weights in &self.modes {
            let model = Model::load(path, LoadOptions { weights })?;
            if self.ctx < 4 || self.ctx > model.config().context_length {
                return Err(Error::ContextOverflow {
                    needed: self.ctx,
                    context: model.config().context_length,
                });
            }
            let tokens = model.tokenizer().encode(&text)?;
            let bos = model.tokenizer().encode_prompt("")?.first().copied();
            let mut cs = chunks(&tokens, self.ctx, bos);
            if self.max_chunks > 0 {
                cs.truncate(self.max_chunks);
            }
            if cs.is_empty() {
                return Err(Error::ContextOverflow {
                    needed: self.ctx,
                    context: tokens.len(),
                });
            }
            n_chunks = cs.len();
            let t = Instant::now();
            let (mut sum, mut n) = (0f64, 0usize);
            for c in &cs {
                let (s, k) = score_chunk(&model, c, self.kv_dtype)?;
                sum += s;
                n += k;
            }
            let secs = t.elapsed().as_secs_f64();
            let run = PerplexityRun {
                weights,
                weights_chosen: model.info().weights_chosen.clone(),
                perplexity: (sum / n as f64).exp(),
                scored_tokens: n,
                tok_s: (cs.len() * (self.ctx - 1)) as f64 / secs,
            };
            progress(&format!(
                "{weights}: perplexity {:.4} over {n} tokens ({:.1} tok/s)",
                run.perplexity, run.tok_s
            ));
            runs.push(run);
        }
        Ok(PerplexityReport {
            model: path.display().to_string(),
            text: text_path.display().to_string(),
            ctx: self.ctx,
            chunks: n_chunks,
            runs,
        })
    }
}
