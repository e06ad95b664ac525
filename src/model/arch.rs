//! The architectures the batched forward runs (`llama`, `qwen2`, `qwen3`) and the
//! few places where they differ; everything else (the ragged batch, the fused
//! linear layers, the grouped attention over each sequence's cache) is shared in
//! [`super::llama`].
//!
//! What differs, as llama.cpp and candle-transformers' `quantized_qwen2` /
//! `quantized_qwen3` define the GGUF layouts:
//! - the metadata prefix (`llama.`, `qwen2.`, `qwen3.`);
//! - the rotary layout: llama's GGUF weights pair elements `2i, 2i + 1`; Qwen's pair
//!   `i, i + head_dim / 2` (the "NeoX" layout);
//! - qwen2 adds a bias to each of Q, K and V;
//! - qwen3 normalises each query and key head (RMS norm over the head width) before
//!   the rotary embedding, and its head width (`qwen3.attention.key_length`) need not
//!   be the model width over the head count.

use candle_core::{Device, Tensor};

use super::GgufFile;
use crate::{Error, Result};

/// A model architecture the forward runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama and its many relatives (SmolLM2, Mistral without sliding window…).
    Llama,
    /// Qwen 2 and 2.5: biases on Q, K and V; NeoX rotary layout.
    Qwen2,
    /// Qwen 3 (dense): per-head Q and K RMS norms; NeoX rotary layout.
    Qwen3,
}

impl Arch {
    /// The architecture named by a GGUF's `general.architecture`, or
    /// [`Error::UnsupportedArchitecture`].
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(Error::UnsupportedArchitecture { arch: other.into() }),
        }
    }

    /// The name, which is also the prefix of its metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// Whether the rotary embedding pairs element `i` with `i + head_dim / 2` (else
    /// with its neighbour).
    pub(crate) fn neox_rope(self) -> bool {
        !matches!(self, Self::Llama)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The per-block weights only some architectures have.
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockExtras {
    /// qwen2: the Q, K and V biases, concatenated as the fused QKV product's columns.
    qkv_bias: Option<Tensor>,
    /// qwen3: the RMS norm weights of each query head and each key head.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

impl BlockExtras {
    /// Reads block `l`'s extra weights for `arch`; `qd` and `kvd` are the widths of
    /// the query and of the key (= value) projections.
    pub(crate) fn load(
        file: &mut GgufFile,
        arch: Arch,
        l: usize,
        head_dim: usize,
        qd: usize,
        kvd: usize,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let mut vec_of = |name: String, n: usize| -> Result<Vec<f32>> {
            Ok(file
                .tensor(&name, &[n])?
                .dequantize(&dev)?
                .to_vec1::<f32>()?)
        };
        Ok(match arch {
            Arch::Llama => Self::default(),
            Arch::Qwen2 => {
                let mut bias = vec_of(format!("blk.{l}.attn_q.bias"), qd)?;
                bias.extend(vec_of(format!("blk.{l}.attn_k.bias"), kvd)?);
                bias.extend(vec_of(format!("blk.{l}.attn_v.bias"), kvd)?);
                let n = bias.len();
                Self {
                    qkv_bias: Some(Tensor::from_vec(bias, n, &dev)?),
                    qk_norm: None,
                }
            }
            Arch::Qwen3 => Self {
                qkv_bias: None,
                qk_norm: Some((
                    vec_of(format!("blk.{l}.attn_q_norm.weight"), head_dim)?,
                    vec_of(format!("blk.{l}.attn_k_norm.weight"), head_dim)?,
                )),
            },
        })
    }

    /// The fused QKV product `[rows, qd + 2 kvd]` with the biases added, if any.
    pub(crate) fn add_bias(&self, qkv: Tensor) -> Result<Tensor> {
        Ok(match &self.qkv_bias {
            Some(b) => qkv.broadcast_add(b)?,
            None => qkv,
        })
    }

    /// Normalises each query head in `q` and each key head in `k` (rows of
    /// `head_dim`), if the architecture does.
    pub(crate) fn norm_heads(&self, q: &mut [f32], k: &mut [f32], eps: f32) {
        if let Some((qw, kw)) = &self.qk_norm {
            rms_norm_rows(q, qw, eps);
            rms_norm_rows(k, kw, eps);
        }
    }
}

/// RMS norm of each row of `x` (rows as wide as `w`) in place, as candle's
/// `rms_norm` computes it: `x / sqrt(mean(x^2) + eps) * w`.
fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / d as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *v / m * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_a_named_error() {
        for a in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
            assert_eq!(Arch::from_name(a.name()).ok(), Some(a));
        }
        match Arch::from_name("mamba") {
            Err(Error::UnsupportedArchitecture { arch }) => assert_eq!(arch, "mamba"),
            other => panic!("expected UnsupportedArchitecture, got {other:?}"),
        }
    }

    #[test]
    fn rms_norm_rows_matches_candle() {
        let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut ours = x.clone();
        rms_norm_rows(&mut ours, &w, 1e-6);
        let xt = Tensor::from_vec(x, (3, 8), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w, 8, &Device::Cpu).unwrap();
        let theirs: Vec<f32> = candle_nn::ops::rms_norm(&xt, &wt, 1e-6)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
