//! A tiny random-weight GGUF (llama, qwen2 or qwen3), with a byte-level BPE
//! tokenizer, written on demand: the test suite and examples that need no real model
//! run on it.
//!
//! The weights are seeded pseudo-random numbers, quantized like a real file (Q4_1
//! linear layers, a Q8_0 embedding tied to the output head by default), so the same
//! kernel paths run as with the default model. The Qwen architectures add their own
//! tensors (qwen2's Q/K/V biases, qwen3's per-head Q/K norms) under their own
//! metadata prefix, as llama.cpp writes them.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::arch::Arch;
use crate::Result;

/// Shape and contents of a tiny model.
#[derive(Debug, Clone)]
pub struct TinyConfig {
    /// Model width (a multiple of 32 for the quantized formats).
    pub hidden: usize,
    /// MLP width (a multiple of 32).
    pub intermediate: usize,
    /// Blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Context length written to the metadata.
    pub context_length: usize,
    /// Seed of the weights.
    pub seed: u64,
    /// Storage type of the linear layers.
    pub linear_dtype: GgmlDType,
    /// A chat template to embed (None: the model falls back to ChatML).
    pub chat_template: Option<String>,
    /// The architecture written (its metadata prefix and its own tensors).
    pub arch: Arch,
    /// A head width of its own (`<arch>.attention.key_length`), else the width over
    /// the heads.
    pub head_dim: Option<usize>,
    /// Storage type of the token embedding.
    pub embedding_dtype: GgmlDType,
    /// Write an `output.weight` of its own (of `linear_dtype`) instead of tying the
    /// head to the embedding.
    pub untied_head: bool,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            n_layers: 2,
            n_head: 4,
            n_kv_head: 2,
            context_length: 512,
            seed: 7,
            linear_dtype: GgmlDType::Q4_1,
            chat_template: None,
            arch: Arch::Llama,
            head_dim: None,
            embedding_dtype: GgmlDType::Q8_0,
            untied_head: false,
        }
    }
}

/// Special tokens of the tiny vocabulary, at ids 0, 1, 2.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny vocabulary, in GPT-2's byte-level spelling (`Ġ` is a space).
const TINY_MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġt", "he"),
    ("Ġ", "a"),
    ("r", "e"),
    ("o", "r"),
    ("e", "n"),
    ("Ġ", "w"),
    ("i", "s"),
    ("Ġ", "s"),
    ("Ġ", "c"),
    ("a", "t"),
    ("l", "l"),
    ("Ġ", "o"),
    ("e", "s"),
];

/// splitmix64: a small seeded generator, enough for test weights.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn tensor(&mut self, rows: usize, cols: usize, scale: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| self.next_f32() * scale).collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    }
}

/// Writes a tiny GGUF of `cfg.arch` to `path`.
pub fn write_tiny_model(path: &Path, cfg: &TinyConfig) -> Result<()> {
    use gguf_file::Value as V;
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(super::tokenizer::byte_chars().into_iter().map(String::from));
    let merges: Vec<String> = TINY_MERGES
        .iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();
    tokens.extend(TINY_MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let types: Vec<V> = (0..tokens.len())
        .map(|i| V::I32(if i < TINY_SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let vocab = tokens.len();
    let head_dim = cfg.head_dim.unwrap_or(cfg.hidden / cfg.n_head);
    let p = cfg.arch.name();
    let u = |v: usize| V::U32(v as u32);

    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(p.into())),
        ("general.name".into(), V::String("troupe-tiny".into())),
        (format!("{p}.context_length"), u(cfg.context_length)),
        (format!("{p}.embedding_length"), u(cfg.hidden)),
        (format!("{p}.feed_forward_length"), u(cfg.intermediate)),
        (format!("{p}.block_count"), u(cfg.n_layers)),
        (format!("{p}.attention.head_count"), u(cfg.n_head)),
        (format!("{p}.attention.head_count_kv"), u(cfg.n_kv_head)),
        (format!("{p}.rope.dimension_count"), u(head_dim)),
        (format!("{p}.rope.freq_base"), V::F32(10_000.0)),
        (
            format!("{p}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            V::String(match cfg.arch {
                Arch::Llama => "smollm".into(),
                _ => "qwen2".into(),
            }),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
    ];
    // qwen3 files always carry it (candle-transformers' loader requires it).
    if cfg.head_dim.is_some() || cfg.arch == Arch::Qwen3 {
        let d = head_dim;
        meta.push((format!("{p}.attention.key_length"), u(d)));
        meta.push((format!("{p}.attention.value_length"), u(d)));
    }
    if let Some(t) = &cfg.chat_template {
        meta.push(("tokenizer.chat_template".into(), V::String(t.clone())));
    }

    let mut rng = Rng(cfg.seed);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let lin = |rng: &mut Rng, rows: usize, cols: usize| -> Result<QTensor> {
        let t = rng.tensor(rows, cols, 1.0 / (cols as f32).sqrt() * 1.7)?;
        Ok(QTensor::quantize(&t, cfg.linear_dtype)?)
    };
    // A vector of f32 around `centre` (norm weights, biases).
    let vector = |rng: &mut Rng, n: usize, centre: f32| -> Result<QTensor> {
        let v: Vec<f32> = (0..n).map(|_| centre + 0.1 * rng.next_f32()).collect();
        Ok(QTensor::quantize(
            &Tensor::from_vec(v, n, &Device::Cpu)?,
            GgmlDType::F32,
        )?)
    };
    let norm = |rng: &mut Rng| vector(rng, h, 1.0);
    tensors.push((
        "token_embd.weight".into(),
        QTensor::quantize(&rng.tensor(vocab, h, 1.0)?, cfg.embedding_dtype)?,
    ));
    tensors.push(("output_norm.weight".into(), norm(&mut rng)?));
    let (qd, kvd) = (cfg.n_head * head_dim, cfg.n_kv_head * head_dim);
    for l in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push((n("attn_norm"), norm(&mut rng)?));
        tensors.push((n("attn_q"), lin(&mut rng, qd, h)?));
        tensors.push((n("attn_k"), lin(&mut rng, kvd, h)?));
        tensors.push((n("attn_v"), lin(&mut rng, kvd, h)?));
        tensors.push((n("attn_output"), lin(&mut rng, h, qd)?));
        tensors.push((n("ffn_norm"), norm(&mut rng)?));
        tensors.push((n("ffn_gate"), lin(&mut rng, i, h)?));
        tensors.push((n("ffn_up"), lin(&mut rng, i, h)?));
        tensors.push((n("ffn_down"), lin(&mut rng, h, i)?));
        // Drawn after the shared tensors, so a llama file stays what it was.
        match cfg.arch {
            Arch::Llama => {}
            Arch::Qwen2 => {
                for (name, width) in [("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)] {
                    let bias = vector(&mut rng, width, 0.0)?;
                    tensors.push((format!("blk.{l}.{name}.bias"), bias));
                }
            }
            Arch::Qwen3 => {
                tensors.push((n("attn_q_norm"), vector(&mut rng, head_dim, 1.0)?));
                tensors.push((n("attn_k_norm"), vector(&mut rng, head_dim, 1.0)?));
            }
        }
    }
    if cfg.untied_head {
        tensors.push(("output.weight".into(), lin(&mut rng, vocab, h)?));
    }
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        std::io::Write::flush(&mut f)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
