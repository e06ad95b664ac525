//! Linear layers and the choice of kernel path per weight tensor and batch shape
//! ([`WeightsMode`]).
//!
//! candle's CPU kernel for the default model's Q4_1 weights is fast for one row and
//! does not get faster with more rows, while a dequantized f32 GEMM is slow for one
//! row and scales with the batch (ANCHORS.md). So the forward keeps, per tensor, the
//! stored quantized weights, a dense f32 copy, a requantized Q8_0 copy, or (in
//! `auto`) both the quantized and the f32 copy, and picks by the number of rows.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use super::qgemv::QuantRows;
use crate::Result;

/// How the forward stores and multiplies weight matrices.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum WeightsMode {
    /// Decide from the model size and the memory available: for steps of at most
    /// [`AUTO_QUANT_MAX_ROWS`] rows, multiply the stored quantized blocks with f32
    /// activations (our kernel, no activation rounding), and an f32 copy with the GEMM
    /// for larger steps (batched decode, prefill), when memory allows. Both compute
    /// the products of the exact dequantized weights, so switching stays within
    /// float rounding.
    #[default]
    Auto,
    /// The weights as stored in the file, with candle's quantized kernels.
    Native,
    /// Dequantized f32 weights: exact dequantized values, GEMM for every step.
    F32,
    /// Weights requantized to Q8_0 (candle's fastest quantized x86 kernels).
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl std::fmt::Display for WeightsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightsMode::Auto => "auto",
            WeightsMode::Native => "native",
            WeightsMode::F32 => "f32",
            WeightsMode::Q8_0 => "q8_0",
        })
    }
}

/// In `auto`, steps of at most this many rows use the quantized blocks directly.
pub const AUTO_QUANT_MAX_ROWS: usize = 16;

/// A weight matrix `[out, in]` in the form(s) the chosen mode keeps.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// Quantized weights with candle's kernels (native or requantized), if kept.
    quant: Option<QMatMul>,
    /// The stored blocks for our f32-activation kernel (`auto`'s small steps).
    exact: Option<QuantRows>,
    /// Dense f32 weights `[out, in]`, if kept.
    dense: Option<Tensor>,
    out_features: usize,
}

impl Linear {
    /// Builds the layer from the stored tensor(s). Several tensors with the same input
    /// width are fused into one matrix (their rows stacked), so that Q, K and V (or
    /// gate and up) take one product.
    pub(crate) fn new(parts: Vec<QTensor>, mode: ResolvedMode) -> Result<Self> {
        let out_features = parts
            .iter()
            .map(|p| p.shape().dims2().map(|d| d.0))
            .sum::<candle_core::Result<usize>>()?;
        let stored = fuse_quantized(parts)?;
        let dense_from = |q: &QTensor| -> Result<Tensor> { Ok(q.dequantize(&Device::Cpu)?) };
        let is_float = matches!(
            stored.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let (quant, exact, dense) = match mode {
            // Float tensors have no quantized kernel: they are dense in every mode.
            _ if is_float => (None, None, Some(dense_from(&stored)?)),
            ResolvedMode::Native => (Some(qmatmul(stored)), None, None),
            ResolvedMode::F32 => (None, None, Some(dense_from(&stored)?)),
            ResolvedMode::Q8_0 => {
                let (_, k) = stored.shape().dims2()?;
                if stored.dtype() == GgmlDType::Q8_0 || k % 32 != 0 {
                    (Some(qmatmul(stored)), None, None)
                } else {
                    let w = dense_from(&stored)?;
                    (
                        Some(qmatmul(QTensor::quantize(&w, GgmlDType::Q8_0)?)),
                        None,
                        None,
                    )
                }
            }
            ResolvedMode::Both => (None, QuantRows::new(&stored)?, Some(dense_from(&stored)?)),
        };
        Ok(Self {
            quant,
            exact,
            dense,
            out_features,
        })
    }

    /// Output width.
    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x [rows, in] -> [rows, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        match (&self.quant, &self.exact, &self.dense) {
            (Some(q), _, _) => Ok(q.forward(x)?),
            (None, Some(e), _) if rows <= AUTO_QUANT_MAX_ROWS => {
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let out = e.matmul(&xs, rows);
                Ok(Tensor::from_vec(
                    out,
                    (rows, self.out_features),
                    &Device::Cpu,
                )?)
            }
            (None, _, Some(w)) => dense_forward(w, x, self.out_features),
            (None, _, None) => unreachable!("a Linear keeps at least one form of its weights"),
        }
    }
}

/// The mode after `auto` was resolved against the memory available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResolvedMode {
    Native,
    F32,
    Q8_0,
    /// Quantized for small steps and f32 for large ones.
    Both,
}

fn qmatmul(q: QTensor) -> QMatMul {
    // `from_arc` would dequantize when CANDLE_DEQUANTIZE_ALL is set; we decide here.
    QMatMul::QTensor(Arc::new(q))
}

/// `x @ w^T` with the f32 GEMM, keeping every row's result independent of how many
/// rows the product has.
///
/// The GEMM takes a different code path (GEMV, or a small-matrix kernel) when the
/// product has one row or fewer than ~256 outputs, with another summation order; so
/// a product with too few rows is padded with copies of its first row. With that,
/// each row is summed in the same order whatever the batch, which makes the forward
/// bitwise batch-invariant in a fixed weights mode.
fn dense_forward(w: &Tensor, x: &Tensor, out_features: usize) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let min_rows = (256 / out_features.max(1) + 1).max(2);
    if rows >= min_rows {
        return Ok(x.matmul(&w.t()?)?);
    }
    let first = x.narrow(0, 0, 1)?;
    let mut parts = vec![x.clone()];
    parts.extend(std::iter::repeat_n(first, min_rows - rows));
    let padded = Tensor::cat(&parts, 0)?;
    Ok(padded.matmul(&w.t()?)?.narrow(0, 0, rows)?)
}

/// Stacks the rows of several quantized matrices of one dtype and input width into
/// one; falls back to a dense f32 matrix when they differ.
fn fuse_quantized(mut parts: Vec<QTensor>) -> Result<QTensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let dtype = parts[0].dtype();
    let k = parts[0].shape().dims2()?.1;
    let same = parts
        .iter()
        .all(|p| p.dtype() == dtype && p.shape().dims2().map(|d| d.1).ok() == Some(k));
    let rows: usize = parts
        .iter()
        .map(|p| p.shape().dims2().map(|d| d.0))
        .sum::<candle_core::Result<usize>>()?;
    if same {
        let mut bytes = Vec::new();
        for p in &parts {
            bytes.extend_from_slice(&p.data()?);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
        return Ok(QTensor::new(storage, (rows, k))?);
    }
    let dense = parts
        .iter()
        .map(|p| p.dequantize(&Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(QTensor::quantize(&Tensor::cat(&dense, 0)?, GgmlDType::F32)?)
}
