//! Linear layers and the choice of kernel path per weight tensor and batch shape
//! ([`WeightsMode`]).
//!
//! candle's CPU kernel for the default model's Q4_1 weights is fast for one row and
//! does not get faster with more rows, while a GEMM is slow for one row and scales
//! with the batch. So, per tensor, the forward keeps one [`Kernel`]: the stored
//! quantized weights with candle's kernels, a dense f32 copy, a requantized Q8_0
//! copy, a packed bf16 copy, or (in `auto` and `exact`) the stored blocks for small
//! steps beside a copy for large ones, picked by the number of rows.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use super::bf16::Bf16Weights;
use super::qgemv::QuantRows;
use crate::Result;

/// How the forward stores and multiplies weight matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsMode {
    /// The fastest path of this CPU that memory allows. Where the CPU has
    /// `avx512_bf16`: bf16-rounded weights and activations with f32 sums for every
    /// step, read from the stored quantized blocks for steps of at most
    /// [`AUTO_BF16_SMALL_ROWS`] rows (single-sequence decode, bound by memory
    /// bandwidth) and from a packed bf16 copy with `vdpbf16ps` for larger steps
    /// (batched decode, prefill; bound by compute). The two paths compute the same
    /// products and differ only in the order of the f32 sums. Elsewhere, as `exact`.
    #[default]
    Auto,
    /// The weights as stored in the file, with candle's quantized kernels.
    Native,
    /// Dequantized f32 weights: exact dequantized values, GEMM for every step.
    F32,
    /// Weights requantized to Q8_0 (candle's fastest quantized x86 kernels).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// bf16 weights and activations, f32 sums, for every step (`vdpbf16ps` where
    /// the CPU has it, a portable loop elsewhere).
    Bf16,
    /// Exact f32 activations: the stored blocks for steps of at most
    /// [`AUTO_QUANT_MAX_ROWS`] rows, an f32 copy with the GEMM for larger steps
    /// (both the products of the exact dequantized weights, so switching stays
    /// within float rounding).
    Exact,
}

impl std::fmt::Display for WeightsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightsMode::Auto => "auto",
            WeightsMode::Native => "native",
            WeightsMode::F32 => "f32",
            WeightsMode::Q8_0 => "q8_0",
            WeightsMode::Bf16 => "bf16",
            WeightsMode::Exact => "exact",
        })
    }
}

/// In `exact`, steps of at most this many rows use the quantized blocks directly.
pub const AUTO_QUANT_MAX_ROWS: usize = 16;

/// In `auto` with bf16, steps of at most this many rows use the quantized blocks
/// (they read 3x fewer bytes than bf16 weights, which is what one row costs).
pub const AUTO_BF16_SMALL_ROWS: usize = 2;

/// The mode after `auto` was resolved against the CPU and the memory available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResolvedMode {
    Native,
    F32,
    Q8_0,
    Bf16,
    /// The stored blocks for steps of at most `small_rows` rows, `large` above.
    Split {
        small_rows: usize,
        large: Large,
    },
}

/// The copy a [`ResolvedMode::Split`] uses for large steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Large {
    F32,
    Bf16,
}

/// How one weight matrix is multiplied.
#[derive(Debug, Clone)]
enum Kernel {
    /// candle's quantized kernels (native or requantized weights).
    Quant(QMatMul),
    /// Dense f32 weights `[out, in]` with the GEMM.
    Dense(Tensor),
    /// Packed bf16 weights.
    Bf16(Bf16Weights),
    /// The stored blocks with our f32-activation kernel up to `small_rows` rows, then
    /// `large`.
    Split {
        small: QuantRows,
        small_rows: usize,
        large: Box<Kernel>,
    },
}

/// A weight matrix `[out, in]` in the form the chosen mode keeps.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    kernel: Kernel,
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
        let is_float = matches!(
            stored.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let kernel = match mode {
            // Float tensors have no quantized kernel: dense f32, or bf16 in bf16 modes.
            ResolvedMode::Bf16
            | ResolvedMode::Split {
                large: Large::Bf16, ..
            } if is_float => bf16_of(&stored)?,
            _ if is_float => Kernel::Dense(stored.dequantize(&Device::Cpu)?),
            ResolvedMode::Native => Kernel::Quant(qmatmul(stored)),
            ResolvedMode::F32 => Kernel::Dense(stored.dequantize(&Device::Cpu)?),
            ResolvedMode::Bf16 => bf16_of(&stored)?,
            ResolvedMode::Q8_0 => {
                let (_, k) = stored.shape().dims2()?;
                if stored.dtype() == GgmlDType::Q8_0 || k % 32 != 0 {
                    Kernel::Quant(qmatmul(stored))
                } else {
                    let w = stored.dequantize(&Device::Cpu)?;
                    Kernel::Quant(qmatmul(QTensor::quantize(&w, GgmlDType::Q8_0)?))
                }
            }
            ResolvedMode::Split { small_rows, large } => {
                let large = match large {
                    Large::F32 => Kernel::Dense(stored.dequantize(&Device::Cpu)?),
                    Large::Bf16 => bf16_of(&stored)?,
                };
                let small = QuantRows::new(&stored)?;
                // Next to bf16, the small steps round their operands the same way, so
                // the two paths differ only in the order of the f32 sums.
                // Where decoding a format costs more than reading the bf16 copy
                // (Q5_0 and the K formats: see `QuantRows::reads_faster_than_bf16`),
                // the copy serves every step.
                let small = match large {
                    Kernel::Bf16(_) => small
                        .filter(QuantRows::reads_faster_than_bf16)
                        .map(QuantRows::rounding_to_bf16),
                    _ => small,
                };
                match small {
                    Some(small) => Kernel::Split {
                        small,
                        small_rows,
                        large: Box::new(large),
                    },
                    // No f32-activation kernel for this format: the copy serves all.
                    None => large,
                }
            }
        };
        Ok(Self {
            kernel,
            out_features,
        })
    }

    /// Output width.
    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x [rows, in] -> [rows, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        forward_with(&self.kernel, x, self.out_features)
    }
}

fn forward_with(kernel: &Kernel, x: &Tensor, out_features: usize) -> Result<Tensor> {
    let rows = x.dim(0)?;
    match kernel {
        Kernel::Quant(q) => Ok(q.forward(x)?),
        Kernel::Dense(w) => dense_forward(w, x, out_features),
        Kernel::Bf16(w) => {
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let out = w.matmul(&xs, rows);
            Ok(Tensor::from_vec(out, (rows, w.n()), &Device::Cpu)?)
        }
        Kernel::Split {
            small,
            small_rows,
            large,
        } => {
            if rows > *small_rows {
                return forward_with(large, x, out_features);
            }
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let out = small.matmul(&xs, rows);
            Ok(Tensor::from_vec(out, (rows, out_features), &Device::Cpu)?)
        }
    }
}

/// The packed bf16 copy of a stored tensor.
fn bf16_of(stored: &QTensor) -> Result<Kernel> {
    let (n, k) = stored.shape().dims2()?;
    let w: Vec<f32> = stored.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    Ok(Kernel::Bf16(Bf16Weights::pack(&w, n, k)))
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
