//! `troupe bench forward`: the ragged batched forward on one model, against
//! candle-transformers' `quantized_llama` (or `quantized_qwen2` / `quantized_qwen3`) and against this machine's f32 GEMM
//! ceiling, all in one run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;

use super::median;
use crate::kv::{KvCache, KvDtype};
use crate::model::{GgufFile, LlamaConfig, LoadOptions, Model, SeqInput, WeightsMode};
use crate::sampling::argmax;
use crate::Result;

/// What the forward bench measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ForwardReport {
    /// The model file.
    pub model: String,
    /// Weights mode asked for, and what it resolved to.
    pub weights: String,
    /// Threads of the rayon pool (f32 GEMM, attention).
    pub threads: usize,
    /// Single-sequence prefill of a 512-token prompt.
    pub prefill_tok_s: f64,
    /// Single-sequence decode of 128 tokens.
    pub decode_tok_s: f64,
    /// candle-transformers' model of the architecture (`quantized_llama`,
    /// `quantized_qwen2`…), same decode.
    pub reference_decode_tok_s: f64,
    /// Batch size -> generated tokens/s, each sequence holding a 256-token cache.
    pub batched_decode_tok_s: BTreeMap<usize, f64>,
    /// f32 GEMM throughput on the model's MLP shape.
    pub gemm_gflops: f64,
    /// FLOPs of the linear layers per token.
    pub flops_per_token: u64,
    /// `gemm_gflops * 1e9 / flops_per_token`.
    pub compute_ceiling_tok_s: f64,
    /// Element type of the caches.
    pub kv_dtype: KvDtype,
    /// Where a decode step's time goes, by rows (with `--profile`).
    pub profile: Vec<super::profile::ProfileRow>,
}

/// Options of the bench.
#[derive(Debug, Clone)]
pub struct ForwardBench {
    /// Prompt length of the prefill measure.
    pub prefill_tokens: usize,
    /// Tokens decoded in the single-sequence measure.
    pub decode_tokens: usize,
    /// Prompt before the single-sequence decode.
    pub decode_prompt_tokens: usize,
    /// Cache length of every sequence in the batched measure.
    pub batch_context: usize,
    /// Batch sizes of the batched measure.
    pub batch_sizes: Vec<usize>,
    /// Decode steps timed per batch size.
    pub batch_steps: usize,
    /// Element type of the caches.
    pub kv_dtype: KvDtype,
    /// Batch sizes to profile (empty: no profile).
    pub profile_rows: Vec<usize>,
}

impl Default for ForwardBench {
    fn default() -> Self {
        Self {
            prefill_tokens: 512,
            decode_tokens: 128,
            decode_prompt_tokens: 16,
            batch_context: 256,
            batch_sizes: vec![1, 2, 4, 8, 16, 32, 64],
            batch_steps: 6,
            kv_dtype: KvDtype::default(),
            profile_rows: Vec::new(),
        }
    }
}

/// Deterministic ordinary-looking token ids (avoids the specials at the start).
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    // Ids in [lo, lo + span): the middle of any vocabulary, even a tiny one.
    let lo = 1000.min(vocab / 4);
    let span = vocab.saturating_sub(2 * lo).max(1);
    (0..n).map(|i| (lo + i * 7919 % span) as u32).collect()
}

impl ForwardBench {
    /// Runs every measure; `progress` receives one line per finished measure.
    pub fn run(
        &self,
        path: &Path,
        weights: WeightsMode,
        mut progress: impl FnMut(&str),
    ) -> Result<ForwardReport> {
        let model = Model::load(path, LoadOptions { weights })?;
        let cfg = model.config().clone();
        let vocab = cfg.vocab_size;

        // Prefill.
        let p = prompt(self.prefill_tokens.min(cfg.context_length / 2), vocab);
        let mut times = Vec::new();
        for _ in 0..2 {
            let mut cache = model.new_cache(self.kv_dtype);
            let t = Instant::now();
            model.forward(&mut [SeqInput {
                tokens: &p,
                cache: &mut cache,
            }])?;
            times.push(t.elapsed().as_secs_f64());
        }
        let prefill_tok_s = p.len() as f64 / median(&times);
        progress(&format!(
            "prefill {} tokens: {prefill_tok_s:.1} tok/s",
            p.len()
        ));

        // Single-sequence decode after a short prompt.
        let short = prompt(self.decode_prompt_tokens, vocab);
        let times = super::decode_step_times(&model, &short, self.decode_tokens, self.kv_dtype)?;
        let decode_tok_s = self.decode_tokens as f64 / times.iter().sum::<f64>();
        progress(&format!(
            "decode {} tokens: {decode_tok_s:.1} tok/s",
            self.decode_tokens
        ));

        let reference_decode_tok_s = self.reference_decode(path, &short)?;
        progress(&format!(
            "candle-transformers quantized_{} decode: {reference_decode_tok_s:.1} tok/s",
            cfg.arch
        ));

        // Batched decode: one prefilled context forked into every sequence.
        let ctx = prompt(self.batch_context, vocab);
        let base = super::profile::prefilled(&model, &ctx, self.kv_dtype)?;
        let mut batched = BTreeMap::new();
        for &b in &self.batch_sizes {
            let mut caches: Vec<KvCache> = (0..b).map(|_| base.fork()).collect();
            let mut next: Vec<u32> = (0..b).map(|i| ((1000 + i * 31) % vocab) as u32).collect();
            let mut steps = Vec::new();
            for _ in 0..self.batch_steps {
                let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let mut seqs: Vec<SeqInput<'_>> = caches
                    .iter_mut()
                    .zip(&toks)
                    .map(|(cache, t)| SeqInput { tokens: t, cache })
                    .collect();
                let t = Instant::now();
                let logits = model.forward(&mut seqs)?;
                let rows: Vec<Vec<f32>> = logits.to_vec2()?;
                steps.push(t.elapsed().as_secs_f64());
                next = rows.iter().map(|r| argmax(r)).collect();
            }
            let tok_s = b as f64 / median(&steps);
            progress(&format!("batched decode, batch {b}: {tok_s:.1} tok/s"));
            batched.insert(b, tok_s);
        }

        let profile = if self.profile_rows.is_empty() {
            Vec::new()
        } else {
            let mut rows =
                super::profile::profile_steps(&model, &base, &self.profile_rows, self.batch_steps)?;
            rows.push(super::profile::profile_prefill(&model, &p, self.kv_dtype)?);
            rows
        };
        let gemm_gflops = gemm_gflops(cfg.hidden, cfg.intermediate)?;
        let flops_per_token = cfg.flops_per_token();
        let compute_ceiling_tok_s = gemm_gflops * 1e9 / flops_per_token as f64;
        progress(&format!(
            "f32 GEMM 256x{}x{}: {gemm_gflops:.1} GFLOP/s; {flops_per_token} FLOP/token; ceiling {compute_ceiling_tok_s:.1} tok/s",
            cfg.hidden, cfg.intermediate
        ));
        Ok(ForwardReport {
            model: path.display().to_string(),
            weights: model.info().weights_chosen.clone(),
            threads: rayon::current_num_threads(),
            prefill_tok_s,
            decode_tok_s,
            reference_decode_tok_s,
            batched_decode_tok_s: batched,
            gemm_gflops,
            flops_per_token,
            compute_ceiling_tok_s,
            kv_dtype: self.kv_dtype,
            profile,
        })
    }

    /// candle-transformers' single-sequence decode on the same file and prompt.
    fn reference_decode(&self, path: &Path, prompt: &[u32]) -> Result<f64> {
        use crate::model::arch::Arch;
        use candle_transformers::models::{quantized_qwen2, quantized_qwen3};
        let (content, mut reader) = GgufFile::open(path)?.into_parts();
        let arch = LlamaConfig::from_gguf(&content)?.arch;
        // candle-transformers' model of the file's architecture.
        let mut forward: Box<ReferenceForward> = match arch {
            Arch::Llama => {
                let mut m =
                    quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
                Box::new(move |x, pos| m.forward(x, pos))
            }
            Arch::Qwen2 => {
                let mut m =
                    quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
                Box::new(move |x, pos| m.forward(x, pos))
            }
            Arch::Qwen3 => {
                let mut m =
                    quantized_qwen3::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
                Box::new(move |x, pos| m.forward(x, pos))
            }
        };
        let input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
        let logits = forward(&input, 0)?;
        let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        let t = Instant::now();
        for i in 0..self.decode_tokens {
            let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let logits = forward(&input, prompt.len() + i)?;
            next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        }
        Ok(self.decode_tokens as f64 / t.elapsed().as_secs_f64())
    }
}

/// A reference model's `forward(input, position)`.
type ReferenceForward = dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>;

/// GFLOP/s of a plain f32 product `[256, k] x [k, n]`: the best of 20 runs, since
/// a ceiling is what the machine can do, and a shared machine only ever slows a run.
pub fn gemm_gflops(k: usize, n: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (256, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        std::hint::black_box(&c);
        times.push(t.elapsed().as_secs_f64());
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(2.0 * 256.0 * k as f64 * n as f64 / best / 1e9)
}
