//! The llama-family forward over a ragged batch: each sequence brings its new tokens
//! and its own [`KvCache`], at its own position.
//!
//! All linear layers run once over the concatenated tokens of every sequence; the
//! rotary embedding and the attention run per sequence against that sequence's
//! cache; the output head runs only on each sequence's last token.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::arch::{Arch, BlockExtras};
use super::attention::{attend_group, AttnShape, Rope, Scratch};
use super::embedding::TokenEmbedding;
use super::linear::{Linear, ResolvedMode};
use super::profile::{Lap, Phase};
use super::GgufFile;
use crate::kv::{KvCache, KvLayout};
use crate::{Error, Result};

/// Longest context a model is loaded with, whatever its file says (the rotary
/// tables are sized by it): a file's larger `llama.context_length` is capped to it.
pub const MAX_CONTEXT: usize = 1 << 20;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// The architecture (`general.architecture`).
    pub arch: Arch,
    /// Model width.
    pub hidden: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// RMS norm epsilon.
    pub rms_eps: f64,
    /// Rotary base frequency.
    pub rope_base: f32,
}

impl LlamaConfig {
    /// Reads and checks the hyper-parameters of a GGUF of one of the [`Arch`]s, under
    /// that architecture's metadata prefix (`llama.`, `qwen2.`…).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::Metadata {
                key: "general.architecture".into(),
                reason: "missing".into(),
            })?;
        let arch = Arch::from_name(arch_name)?;
        let p = arch.name();
        let get = |key: &str| -> Result<&gguf_file::Value> {
            ct.metadata.get(key).ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                reason: "missing".into(),
            })
        };
        let usize_of = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| Error::Metadata {
                    key: key.to_string(),
                    reason: e.to_string(),
                })
        };
        let f32_of = |key: &str| -> Result<f32> {
            get(key)?.to_f32().map_err(|e| Error::Metadata {
                key: key.to_string(),
                reason: e.to_string(),
            })
        };
        let hidden = usize_of(&format!("{p}.embedding_length"))?;
        let n_head = usize_of(&format!("{p}.attention.head_count"))?;
        let n_kv_head = usize_of(&format!("{p}.attention.head_count_kv")).unwrap_or(n_head);
        let bad = |key: &str, reason: String| Error::Metadata {
            key: format!("{p}.{key}"),
            reason,
        };
        // A head width of its own (qwen3), else the width over the heads.
        let key_length = usize_of(&format!("{p}.attention.key_length")).ok();
        if n_head == 0 || (key_length.is_none() && hidden % n_head != 0) {
            return Err(bad(
                "attention.head_count",
                format!("{n_head} heads do not divide the width {hidden}"),
            ));
        }
        if n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{n_kv_head} KV heads do not divide {n_head} query heads"),
            ));
        }
        let head_dim = key_length.unwrap_or(hidden / n_head);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(
                "embedding_length",
                format!(
                    "width {hidden} over {n_head} heads gives a head width of {head_dim}: it must be even and non-zero"
                ),
            ));
        }
        if let Ok(v) = usize_of(&format!("{p}.attention.value_length")) {
            if v != head_dim {
                return Err(bad(
                    "attention.value_length",
                    format!("{v}, but keys are {head_dim} wide: they must be equal"),
                ));
            }
        }
        let rope_dim = usize_of(&format!("{p}.rope.dimension_count")).unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(bad(
                "rope.dimension_count",
                format!("partial rotary ({rope_dim} of {head_dim} dims) is not supported"),
            ));
        }
        if usize_of(&format!("{p}.expert_count")).unwrap_or(0) > 1 {
            return Err(Error::UnsupportedArchitecture {
                arch: format!("{p} (mixture of experts)"),
            });
        }
        let tensor = |name: &str| {
            ct.tensor_infos.get(name).ok_or_else(|| Error::Tensor {
                name: name.into(),
                reason: "missing".into(),
            })
        };
        let embd = tensor("token_embd.weight")?;
        let (vocab_size, embd_width) = match embd.shape.dims() {
            &[v, w] => (v, w),
            d => {
                return Err(Error::Tensor {
                    name: "token_embd.weight".into(),
                    reason: format!("shape {d:?}, expected [vocab, {hidden}]"),
                })
            }
        };
        if embd_width != hidden || vocab_size == 0 || vocab_size > u32::MAX as usize {
            return Err(Error::Tensor {
                name: "token_embd.weight".into(),
                reason: format!(
                    "shape [{vocab_size}, {embd_width}], expected [vocab, {hidden}] with 1 <= vocab <= 2^32 - 1"
                ),
            });
        }
        let n_layers = usize_of(&format!("{p}.block_count"))?;
        // Bounded by the file: the last block's weights must be there (a huge count
        // would otherwise size allocations before any tensor is read).
        if n_layers == 0
            || !ct
                .tensor_infos
                .contains_key(&format!("blk.{}.attn_q.weight", n_layers - 1))
        {
            return Err(bad(
                "block_count",
                format!(
                    "{n_layers} blocks, but the file has no weights for block {}",
                    n_layers.saturating_sub(1)
                ),
            ));
        }
        let intermediate = usize_of(&format!("{p}.feed_forward_length"))?;
        let up = tensor("blk.0.ffn_up.weight")?;
        if intermediate == 0 || up.shape.dims() != [intermediate, hidden] {
            return Err(bad(
                "feed_forward_length",
                format!(
                    "{intermediate}, but blk.0.ffn_up.weight has shape {:?}",
                    up.shape.dims()
                ),
            ));
        }
        let context_length = usize_of(&format!("{p}.context_length"))?;
        if context_length == 0 {
            return Err(bad("context_length", "must be at least 1".into()));
        }
        let rms_eps = f32_of(&format!("{p}.attention.layer_norm_rms_epsilon"))? as f64;
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(bad(
                "attention.layer_norm_rms_epsilon",
                format!("must be a finite number >= 0, got {rms_eps}"),
            ));
        }
        let rope_base = f32_of(&format!("{p}.rope.freq_base")).unwrap_or(10_000.0);
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(bad(
                "rope.freq_base",
                format!("must be a finite number > 0, got {rope_base}"),
            ));
        }
        Ok(Self {
            arch,
            hidden,
            intermediate,
            n_layers,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size,
            // Capped: the rotary tables are sized by it when the model loads.
            context_length: context_length.min(MAX_CONTEXT),
            rms_eps,
            rope_base,
        })
    }

    /// The KV cache layout of this model.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }

    /// Multiply-add FLOPs (2 per MAC) of the linear layers for one token, attention
    /// scores excluded.
    pub fn flops_per_token(&self) -> u64 {
        let d = self.hidden as u64;
        let qkv = d * (self.n_head + 2 * self.n_kv_head) as u64 * self.head_dim as u64;
        let o = d * (self.n_head * self.head_dim) as u64;
        let mlp = 3 * d * self.intermediate as u64;
        2 * (self.n_layers as u64 * (qkv + o + mlp) + d * self.vocab_size as u64)
    }
}

/// One new chunk of a sequence: the tokens to feed and the cache they extend.
#[derive(Debug)]
pub struct SeqInput<'a> {
    /// New tokens (at least one), placed at positions `cache.len()..`.
    pub tokens: &'a [u32],
    /// The sequence's cache; the forward appends the new tokens' keys and values.
    pub cache: &'a mut KvCache,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    qkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate_up: Linear,
    down: Linear,
    /// The architecture's own weights (Q/K/V biases, Q/K head norms).
    extras: BlockExtras,
}

/// The weights of a llama-family model and its batched forward.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    /// The token embedding as stored (rows dequantized on lookup).
    embedding: TokenEmbedding,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Linear,
    rope: Rope,
}

impl Llama {
    /// Loads the weights from an opened GGUF in the given resolved mode.
    pub(crate) fn load(
        file: &mut GgufFile,
        config: LlamaConfig,
        mode: ResolvedMode,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let embd_q = file.tensor("token_embd.weight", &[config.vocab_size, config.hidden])?;
        let embedding = TokenEmbedding::new(&embd_q)?;
        let head_q = if file.has_tensor("output.weight") {
            file.tensor("output.weight", &[config.vocab_size, config.hidden])?
        } else {
            embd_q
        };
        let norm_of = |file: &mut GgufFile, name: &str| -> Result<Tensor> {
            Ok(file.tensor(name, &[config.hidden])?.dequantize(&dev)?)
        };
        let (h, i) = (config.hidden, config.intermediate);
        let (qd, kvd) = (
            config.n_head * config.head_dim,
            config.n_kv_head * config.head_dim,
        );
        let mut blocks = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}.weight");
            let qkv = vec![
                file.tensor(&name("attn_q"), &[qd, h])?,
                file.tensor(&name("attn_k"), &[kvd, h])?,
                file.tensor(&name("attn_v"), &[kvd, h])?,
            ];
            let gate_up = vec![
                file.tensor(&name("ffn_gate"), &[i, h])?,
                file.tensor(&name("ffn_up"), &[i, h])?,
            ];
            blocks.push(Block {
                attn_norm: norm_of(file, &name("attn_norm"))?,
                qkv: Linear::new(qkv, mode)?,
                wo: Linear::new(vec![file.tensor(&name("attn_output"), &[h, qd])?], mode)?,
                ffn_norm: norm_of(file, &name("ffn_norm"))?,
                gate_up: Linear::new(gate_up, mode)?,
                down: Linear::new(vec![file.tensor(&name("ffn_down"), &[h, i])?], mode)?,
                extras: BlockExtras::load(file, config.arch, l, config.head_dim, qd, kvd)?,
            });
        }
        Ok(Self {
            rope: Rope::new(
                config.head_dim,
                config.rope_base,
                config.context_length,
                config.arch.neox_rope(),
            )?,
            norm: norm_of(file, "output_norm.weight")?,
            head: Linear::new(vec![head_q], mode)?,
            embedding,
            blocks,
            config,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Runs the new tokens of every sequence through the model, appends their keys
    /// and values to each sequence's cache, and returns the logits of each sequence's
    /// last token, `[n_sequences, vocab]`.
    ///
    /// On error no cache has grown (their `len` is unchanged).
    pub fn forward(&self, seqs: &mut [SeqInput<'_>]) -> Result<Tensor> {
        self.run(seqs, false)
    }

    /// As [`forward`](Self::forward), but returns the logits of every new token of
    /// every sequence, `[total_new_tokens, vocab]` in input order (for scoring text,
    /// e.g. perplexity).
    pub fn forward_all(&self, seqs: &mut [SeqInput<'_>]) -> Result<Tensor> {
        self.run(seqs, true)
    }

    fn run(&self, seqs: &mut [SeqInput<'_>], all_logits: bool) -> Result<Tensor> {
        let cfg = &self.config;
        self.check(seqs)?;
        let _span = tracing::trace_span!("forward", seqs = seqs.len()).entered();
        let mut lap = Lap::start();
        let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |acc, n| {
                let s = *acc;
                *acc += n;
                Some(s)
            })
            .collect();
        let total: usize = lens.iter().sum();
        for s in seqs.iter_mut() {
            let need = s.cache.len() + s.tokens.len();
            s.cache.reserve(need);
        }
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut x = self.embedding.rows(&ids)?;

        let shape = AttnShape {
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
        };
        let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        for (li, block) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("block", li).entered();
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, cfg.rms_eps as f32)?;
            lap.lap(Phase::Other);
            let qkv = block.extras.add_bias(block.qkv.forward(&h)?)?;
            lap.lap(Phase::Linear);
            let qkv: Vec<f32> = qkv.flatten_all()?.to_vec1()?;
            let width = qd + 2 * kvd;
            let mut q = Vec::with_capacity(total * qd);
            let mut k = Vec::with_capacity(total * kvd);
            let mut v = Vec::with_capacity(total * kvd);
            for row in qkv.chunks_exact(width) {
                q.extend_from_slice(&row[..qd]);
                k.extend_from_slice(&row[qd..qd + kvd]);
                v.extend_from_slice(&row[qd + kvd..]);
            }
            block.extras.norm_heads(&mut q, &mut k, cfg.rms_eps as f32);
            for (si, s) in seqs.iter_mut().enumerate() {
                let (a, n, pos) = (starts[si], lens[si], s.cache.len());
                self.rope
                    .apply(&mut q[a * qd..(a + n) * qd], cfg.n_head, pos);
                self.rope
                    .apply(&mut k[a * kvd..(a + n) * kvd], cfg.n_kv_head, pos);
                s.cache.write(
                    li,
                    pos,
                    &k[a * kvd..(a + n) * kvd],
                    &v[a * kvd..(a + n) * kvd],
                );
            }
            lap.lap(Phase::Other);
            let attn = self.attention(seqs, &q, &starts, &lens, li, shape)?;
            lap.lap(Phase::Attention);
            let o = block.wo.forward(&attn)?;
            lap.lap(Phase::Linear);
            x = (x + o)?;
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, cfg.rms_eps as f32)?;
            lap.lap(Phase::Other);
            let gu = block.gate_up.forward(&h)?;
            lap.lap(Phase::Linear);
            let half = block.gate_up.out_features() / 2;
            let gu: Vec<f32> = gu.flatten_all()?.to_vec1()?;
            let act = Tensor::from_vec(
                crate::math::silu_mul(&gu, half),
                (total, half),
                &Device::Cpu,
            )?;
            lap.lap(Phase::Other);
            let down = block.down.forward(&act)?;
            lap.lap(Phase::Linear);
            x = (x + down)?;
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        let x = if all_logits {
            x
        } else {
            let last: Vec<u32> = starts
                .iter()
                .zip(&lens)
                .map(|(a, n)| (a + n - 1) as u32)
                .collect();
            let last = Tensor::from_vec(last, seqs.len(), &Device::Cpu)?;
            x.index_select(&last, 0)?
        };
        lap.lap(Phase::Other);
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.rms_eps as f32)?;
        let _span = tracing::trace_span!("head").entered();
        let logits = self.head.forward(&x)?;
        lap.lap(Phase::Head);
        Ok(logits)
    }

    /// Attention of every sequence, in parallel over (sequence, head); returns
    /// `[total_tokens, n_head * head_dim]`.
    fn attention(
        &self,
        seqs: &[SeqInput<'_>],
        q: &[f32],
        starts: &[usize],
        lens: &[usize],
        layer: usize,
        shape: AttnShape,
    ) -> Result<Tensor> {
        let (nh, d) = (shape.n_head, shape.head_dim);
        let total: usize = lens.iter().sum();
        // Head-major per sequence ([n_head, n, d] at the sequence's offset) so that
        // each (sequence, KV head) job owns one contiguous chunk: its query heads.
        let group = nh / shape.n_kv_head;
        let mut head_major = vec![0f32; total * nh * d];
        let mut jobs = Vec::with_capacity(seqs.len() * shape.n_kv_head);
        let mut rest: &mut [f32] = &mut head_major;
        for (si, n) in lens.iter().enumerate() {
            for kv_head in 0..shape.n_kv_head {
                let (chunk, tail) = rest.split_at_mut(group * n * d);
                rest = tail;
                jobs.push((si, kv_head, chunk));
            }
        }
        jobs.into_par_iter()
            .for_each_init(Scratch::default, |scratch, (si, kv_head, out)| {
                let s = &seqs[si];
                let a = starts[si];
                let q = &q[a * nh * d..(a + lens[si]) * nh * d];
                let cache = &*s.cache;
                attend_group(
                    q,
                    cache.layer(layer),
                    cache.capacity(),
                    cache.len(),
                    shape,
                    kv_head,
                    scratch,
                    out,
                );
            });
        let mut out = vec![0f32; total * nh * d];
        for (&a, &n) in starts.iter().zip(lens) {
            for head in 0..nh {
                for t in 0..n {
                    let src = (a * nh + head * n + t) * d;
                    let dst = ((a + t) * nh + head) * d;
                    out[dst..dst + d].copy_from_slice(&head_major[src..src + d]);
                }
            }
        }
        Ok(Tensor::from_vec(out, (total, nh * d), &Device::Cpu)?)
    }

    /// Rejects a batch the forward cannot run, before anything is written.
    fn check(&self, seqs: &[SeqInput<'_>]) -> Result<()> {
        let cfg = &self.config;
        if seqs.is_empty() {
            return Err(Error::BadRequest {
                what: "a forward needs at least one sequence".into(),
            });
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(Error::BadRequest {
                    what: format!("sequence {i} has no new tokens"),
                });
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab_size: cfg.vocab_size,
                });
            }
            s.cache.check_layout(cfg.kv_layout())?;
            let needed = s.cache.len() + s.tokens.len();
            if needed > cfg.context_length {
                return Err(Error::ContextOverflow {
                    needed,
                    context: cfg.context_length,
                });
            }
        }
        Ok(())
    }
}
