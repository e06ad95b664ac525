//! Products of a few f32 activation rows with quantized weights (Q4_0, Q4_1, Q8_0
//! here; Q5_0, Q4_K and Q6_K in [`super::kquants`]),
//! dequantizing each weight block on the fly and keeping the activations in f32.
//!
//! candle's quantized kernels first round every activation row to 8 bits, which moves
//! the logits of the default model by up to ~0.8 and makes them flip with any float
//! perturbation. This kernel computes the same products as the dense f32 GEMM over
//! the exactly dequantized weights (to float rounding, ~1e-6), while reading only the
//! 4.5 bits per weight of the stored format: the fast path for one or two rows in
//! `auto`, where the f32 GEMM takes over for larger steps without changing results
//! beyond float rounding.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::Result;

/// Weights per block in the supported formats.
const BLOCK: usize = 32;

/// A quantized weight matrix `[n, k]` as raw ggml blocks.
#[derive(Debug, Clone)]
pub(crate) struct QuantRows {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    data: Vec<u8>,
    /// Round the dequantized weights and the activations to bfloat16 before their
    /// products (which are then exact), so that the results equal the bf16 kernel's
    /// to f32 summation order: `auto`'s small steps next to its bf16 large ones.
    round_bf16: bool,
}

impl QuantRows {
    /// The matrix's blocks, if its format has this kernel.
    pub(crate) fn new(q: &QTensor) -> Result<Option<Self>> {
        let dtype = q.dtype();
        // Q5_0, Q4_K and Q6_K are multiplied by `kquants`, with their own blocks.
        let block = if super::kquants::supports(dtype) {
            super::kquants::layout(dtype).0
        } else if matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) {
            BLOCK
        } else {
            return Ok(None);
        };
        let (n, k) = q.shape().dims2()?;
        if k % block != 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            dtype,
            n,
            k,
            data: q.data()?.into_owned(),
            round_bf16: false,
        }))
    }

    /// Whether one or two rows are multiplied faster from these blocks than from a
    /// packed bf16 copy with `vdpbf16ps`. Measured with Qwen2.5-Coder-0.5B (`troupe
    /// bench forward --profile`): the linear layers of a one-row step took 38-44 ms
    /// from the Q5_0/Q4_K/Q6_K blocks (decoding costs more than the bytes saved)
    /// against 20 ms for four rows from the bf16 copy; Q4_0, Q4_1 and Q8_0 decode in
    /// a few instructions per 32 weights and win.
    pub(crate) fn reads_faster_than_bf16(&self) -> bool {
        !super::kquants::supports(self.dtype)
    }

    /// The same matrix, multiplied with bf16-rounded operands (see `round_bf16`).
    pub(crate) fn rounding_to_bf16(mut self) -> Self {
        self.round_bf16 = true;
        self
    }

    fn block_bytes(&self) -> usize {
        match self.dtype {
            GgmlDType::Q4_0 => 18,
            GgmlDType::Q4_1 => 20,
            _ => 34,
        }
    }

    /// `x [m, k] -> [m, n]` (row-major slices).
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        if super::kquants::supports(self.dtype) {
            let (n, k) = (self.n, self.k);
            return super::kquants::matmul(self.dtype, &self.data, n, k, self.round_bf16, x, m);
        }
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        if self.round_bf16 && self.dtype != GgmlDType::Q4_0 && super::bf16::has_native_bf16() {
            return self.matmul_dp(x, m);
        }
        let rounded: Vec<f32>;
        let x = if self.round_bf16 {
            rounded = x.iter().map(|&v| round_bf16(v)).collect();
            &rounded[..]
        } else {
            x
        };
        let (n, k) = (self.n, self.k);
        let row_bytes = k / BLOCK * self.block_bytes();
        // Per row and block, the sum of the activations: the Q4_1 offset `m` of a
        // block contributes `m * sum(x)`, added once per block instead of per weight
        // (the portable path; the AVX-512 kernel folds `m` into the decoded weights).
        let xsum: Vec<f32> = if simd_path(self.dtype) {
            Vec::new()
        } else {
            x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect()
        };
        // Each column's m values are computed together so that a weight block is
        // decoded once for all rows.
        by_column_jobs(n, m, |col0, chunk| {
            let mut acc = vec![[0f32; BLOCK]; m];
            let mut offs = vec![0f32; m];
            for (c, out) in chunk.chunks_exact_mut(m).enumerate() {
                let col = col0 + c;
                let w = &self.data[col * row_bytes..(col + 1) * row_bytes];
                self.column(w, x, &xsum, &mut acc, &mut offs, out);
            }
        })
    }

    /// [`matmul`](Self::matmul) with bf16 operands by `vdpbf16ps`: each block is
    /// decoded to f32 as the dequantized copy is, converted to bf16 once, and
    /// multiplied with every row's bf16 activations (the products of the bf16 kernel,
    /// in another order of the f32 sums).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    fn matmul_dp(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let xb = super::bf16::pack_rows(x, m, k);
        let row_bytes = k / BLOCK * self.block_bytes();
        by_column_jobs(n, m, |col0, chunk| {
            let cols = chunk.len() / m;
            let w = &self.data[col0 * row_bytes..(col0 + cols) * row_bytes];
            // SAFETY: avx512_bf16 was detected; `w` holds `cols` weight rows of this
            // matrix, `xb` `m` rows of k / 2 pairs, `chunk` `cols * m` floats.
            unsafe { simd::columns_dp(self.dtype, w, row_bytes, &xb, m, k, chunk) };
        })
    }

    /// Dot products of one weight row with the `m` activation rows.
    #[inline]
    fn column(
        &self,
        w: &[u8],
        x: &[f32],
        xsum: &[f32],
        acc: &mut [[f32; BLOCK]],
        offs: &mut [f32],
        out: &mut [f32],
    ) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        if simd_path(self.dtype) {
            // Rows in groups that keep their accumulators in registers; the weight row
            // stays in L1 across groups.
            let k = self.k;
            for (g, out) in out.chunks_mut(simd::MAX_ROWS).enumerate() {
                let r0 = g * simd::MAX_ROWS;
                let rows = out.len();
                // SAFETY: the build targets AVX-512F (cfg above); `w` is one weight row
                // of this matrix and the x slice holds exactly `rows` rows.
                unsafe {
                    let x = &x[r0 * k..(r0 + rows) * k];
                    if self.round_bf16 {
                        simd::column::<true>(self.dtype, w, x, k, out)
                    } else {
                        simd::column::<false>(self.dtype, w, x, k, out)
                    }
                };
            }
            return;
        }
        self.column_portable(w, x, xsum, acc, offs, out);
    }

    /// [`column`](Self::column) in portable Rust.
    fn column_portable(
        &self,
        w: &[u8],
        x: &[f32],
        xsum: &[f32],
        acc: &mut [[f32; BLOCK]],
        offs: &mut [f32],
        out: &mut [f32],
    ) {
        let k = self.k;
        let blocks = k / BLOCK;
        acc.iter_mut().for_each(|a| *a = [0.0; BLOCK]);
        offs.iter_mut().for_each(|o| *o = 0.0);
        let mut wv = [0f32; BLOCK];
        for (b, blk) in w.chunks_exact(self.block_bytes()).enumerate() {
            let mut offset = decode(self.dtype, blk, &mut wv);
            if self.round_bf16 {
                // The weights themselves, rounded: no separate offset term.
                for v in wv.iter_mut() {
                    *v = round_bf16(*v + offset);
                }
                offset = 0.0;
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xs = &x[r * k + b * BLOCK..r * k + (b + 1) * BLOCK];
                for i in 0..BLOCK {
                    a[i] = fma(wv[i], xs[i], a[i]);
                }
                offs[r] += offset * xsum[r * blocks + b];
            }
        }
        for ((o, a), off) in out.iter_mut().zip(acc.iter()).zip(offs.iter()) {
            *o = sum32(a) + off;
        }
    }
}

/// An `[m, n]` product computed by columns: `job(first_col, chunk)` fills the `m`
/// values of each of a run of whole columns (column-major in `chunk`), the runs in
/// parallel; the result comes back as `[m, n]` rows. Shared by every kernel that
/// decodes a weight block once for all activation rows.
pub(super) fn by_column_jobs(
    n: usize,
    m: usize,
    job: impl Fn(usize, &mut [f32]) + Send + Sync,
) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let cols_per_job = (n / (4 * rayon::current_num_threads().max(1))).clamp(16, 256);
    out_t
        .par_chunks_mut(cols_per_job * m)
        .enumerate()
        .for_each(|(j, chunk)| job(j * cols_per_job, chunk));
    rows_of(&out_t, m, n)
}

/// `[n, m]` column-major results as `[m, n]` rows.
fn rows_of(out_t: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for (col, vals) in out_t.chunks_exact(m).enumerate() {
        for (r, v) in vals.iter().enumerate() {
            out[r * n + col] = *v;
        }
    }
    out
}

/// The AVX-512 kernel: nibbles become floats through a 16-entry table lookup
/// (`vpermps` reads the low four bits of each index), so a block of 32 weights costs a
/// handful of instructions and is shared by every activation row.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod simd {
    use std::arch::x86_64::*;

    use candle_core::quantized::GgmlDType;
    use half::f16;

    /// Most activation rows one call handles.
    pub(super) const MAX_ROWS: usize = 8;

    /// # Safety
    /// Needs AVX-512F; `w` holds `k / 32` blocks of `dtype` (Q4_1 or Q8_0), `x` holds
    /// `out.len()` rows of `k` floats.
    pub(super) unsafe fn column<const ROUND: bool>(
        dtype: GgmlDType,
        w: &[u8],
        x: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let m = out.len();
        let blocks = k / 32;
        // Two accumulators per row (low and high half of each block) so that the
        // fused multiply-adds of one row do not wait on each other.
        let mut acc_lo = [_mm512_setzero_ps(); MAX_ROWS];
        let mut acc_hi = [_mm512_setzero_ps(); MAX_ROWS];
        let table = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let xp = x.as_ptr();
        for b in 0..blocks {
            // The block's 32 weights as floats: q * d + m (Q4_1) or q * d (Q8_0).
            let (lo, hi) = match dtype {
                GgmlDType::Q4_1 => {
                    let blk = w.as_ptr().add(b * 20);
                    let d = _mm512_set1_ps(f16::from_le_bytes([*blk, *blk.add(1)]).to_f32());
                    let mn =
                        _mm512_set1_ps(f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32());
                    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
                    let lo = _mm512_permutexvar_ps(idx, table);
                    let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), table);
                    if ROUND {
                        // q * d + m rounded twice, as the dequantized f32 copy is,
                        // then to bf16.
                        (
                            round16(_mm512_add_ps(_mm512_mul_ps(lo, d), mn)),
                            round16(_mm512_add_ps(_mm512_mul_ps(hi, d), mn)),
                        )
                    } else {
                        (_mm512_fmadd_ps(lo, d, mn), _mm512_fmadd_ps(hi, d, mn))
                    }
                }
                _ => {
                    let blk = w.as_ptr().add(b * 34);
                    let d = _mm512_set1_ps(f16::from_le_bytes([*blk, *blk.add(1)]).to_f32());
                    let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
                    if ROUND {
                        (round16(_mm512_mul_ps(lo, d)), round16(_mm512_mul_ps(hi, d)))
                    } else {
                        (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                    }
                }
            };
            for r in 0..m {
                let xr = xp.add(r * k + b * 32);
                acc_lo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc_lo[r]);
                acc_hi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr.add(16)), acc_hi[r]);
            }
        }
        for r in 0..m {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
        }
    }

    /// The weight rows `w` (`row_bytes` each) times the `m` bf16 activation rows
    /// `xb` (`k / 2` pairs each) into `out` (column-major, `m` per column).
    ///
    /// # Safety
    /// Needs AVX-512F and AVX512_BF16; `dtype` is Q4_1 or Q8_0; the slices hold
    /// what the shapes say.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn columns_dp(
        dtype: GgmlDType,
        w: &[u8],
        row_bytes: usize,
        xb: &[u32],
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        let blocks = k / 32;
        let kp = k / 2;
        let table = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let xp = xb.as_ptr();
        for (c, out) in out.chunks_exact_mut(m).enumerate() {
            let wrow = w.as_ptr().add(c * row_bytes);
            for r0 in (0..m).step_by(MAX_ROWS) {
                let rows = MAX_ROWS.min(m - r0);
                // Two accumulators per row (even and odd blocks) so that the
                // dot products of one row do not wait on each other.
                let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
                let mut acc2 = [_mm512_setzero_ps(); MAX_ROWS];
                for b in 0..blocks {
                    // The block's 32 weights as f32 (q * d + m, or q * d), then bf16.
                    let (lo, hi) = match dtype {
                        GgmlDType::Q4_1 => {
                            let blk = wrow.add(b * 20);
                            let d =
                                _mm512_set1_ps(f16::from_le_bytes([*blk, *blk.add(1)]).to_f32());
                            let mn = _mm512_set1_ps(
                                f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32(),
                            );
                            let idx =
                                _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
                            let lo = _mm512_permutexvar_ps(idx, table);
                            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), table);
                            (
                                _mm512_add_ps(_mm512_mul_ps(lo, d), mn),
                                _mm512_add_ps(_mm512_mul_ps(hi, d), mn),
                            )
                        }
                        _ => {
                            let blk = wrow.add(b * 34);
                            let d =
                                _mm512_set1_ps(f16::from_le_bytes([*blk, *blk.add(1)]).to_f32());
                            let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                            let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                            (
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d),
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d),
                            )
                        }
                    };
                    let wb = _mm512_cvtne2ps_pbh(hi, lo);
                    for r in 0..rows {
                        let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                            xp.add((r0 + r) * kp + b * 16) as *const _,
                        ));
                        if b % 2 == 0 {
                            acc[r] = _mm512_dpbf16_ps(acc[r], wb, xv);
                        } else {
                            acc2[r] = _mm512_dpbf16_ps(acc2[r], wb, xv);
                        }
                    }
                }
                for r in 0..rows {
                    out[r0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
                }
            }
        }
    }

    /// 16 floats rounded to bfloat16 (to nearest, ties to even), kept as f32.
    #[inline(always)]
    unsafe fn round16(x: __m512) -> __m512 {
        let b = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd);
        _mm512_castsi512_ps(_mm512_and_si512(
            r,
            _mm512_set1_epi32(0xFFFF_0000u32 as i32),
        ))
    }
}

/// `x` rounded to bfloat16 (to nearest, ties to even), kept as f32: the value
/// `bf16::to_bf16` gives, in a form that vectorises for every non-NaN input.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return super::bf16::from_bf16(super::bf16::to_bf16(x));
    }
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// Whether this build multiplies `dtype` with the AVX-512 kernel.
fn simd_path(dtype: GgmlDType) -> bool {
    cfg!(all(target_arch = "x86_64", target_feature = "avx512f")) && dtype != GgmlDType::Q4_0
}

/// Decodes one block into `wv = d * q` and returns the block's offset (`m` for
/// Q4_1, else 0): the weights are `wv + offset`, as ggml defines the formats.
#[inline(always)]
fn decode(dtype: GgmlDType, blk: &[u8], wv: &mut [f32; BLOCK]) -> f32 {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    match dtype {
        GgmlDType::Q4_1 => {
            let qs = &blk[4..20];
            for i in 0..16 {
                wv[i] = (qs[i] & 0x0F) as f32 * d;
                wv[i + 16] = (qs[i] >> 4) as f32 * d;
            }
            f16::from_le_bytes([blk[2], blk[3]]).to_f32()
        }
        GgmlDType::Q4_0 => {
            let qs = &blk[2..18];
            for i in 0..16 {
                wv[i] = ((qs[i] & 0x0F) as i32 - 8) as f32 * d;
                wv[i + 16] = ((qs[i] >> 4) as i32 - 8) as f32 * d;
            }
            0.0
        }
        _ => {
            let qs = &blk[2..34];
            for i in 0..BLOCK {
                wv[i] = (qs[i] as i8) as f32 * d;
            }
            0.0
        }
    }
}

/// `a * b + c`: one fused instruction where the build targets FMA (see
/// `.cargo/config.toml`); without it `mul_add` would be a slow library call.
#[inline(always)]
pub(super) fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Pairwise sum of 32 lanes.
#[inline(always)]
fn sum32(a: &[f32; BLOCK]) -> f32 {
    let mut s = [0f32; 8];
    for c in a.chunks_exact(8) {
        for i in 0..8 {
            s[i] += c[i];
        }
    }
    (s[0] + s[4]) + (s[1] + s[5]) + ((s[2] + s[6]) + (s[3] + s[7]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The dense product of `x [m, 96]` with the dequantized `q`.
    fn dense(q: &QTensor, x: &Tensor) -> Vec<f32> {
        let w = q.dequantize(&Device::Cpu).unwrap();
        x.matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    /// Every supported format: the kernel equals x @ dequantize(w)^T to float rounding,
    /// for row counts below, at and across the kernel's group of 8 rows and an odd
    /// output width; and each row's result is bitwise the same as when that row is
    /// multiplied alone.
    #[test]
    fn matches_dense_product_of_dequantized_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (83, 96), &dev).unwrap();
        for m in [1, 3, 7, 8, 9, 17] {
            let x = Tensor::randn(0f32, 1.0, (m, 96), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let q = QTensor::quantize(&w, dtype).unwrap();
                let rows = QuantRows::new(&q).unwrap().unwrap();
                let got = rows.matmul(&xs, m);
                let diff = max_diff(&dense(&q, &x), &got);
                assert!(diff < 1e-4, "{dtype:?} m={m}: {diff}");
                for r in (0..m).filter(|_| m > 1) {
                    let alone = rows.matmul(&xs[r * 96..(r + 1) * 96], 1);
                    assert_eq!(alone, got[r * 83..(r + 1) * 83], "{dtype:?} m={m} row {r}");
                }
            }
        }
    }

    /// Rounding to bf16, the kernel equals the bf16 kernel over the dequantized
    /// weights to f32 summation order (portable and AVX-512 paths alike), for row
    /// counts across the groups of 8, an odd width and odd block counts.
    #[test]
    fn rounding_to_bf16_equals_the_bf16_kernel() {
        let dev = Device::Cpu;
        for &(n, k) in &[(83usize, 96usize), (19, 160)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let q = QTensor::quantize(&w, dtype).unwrap();
                let dq: Vec<f32> = q
                    .dequantize(&dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let panel = super::super::bf16::Bf16Weights::pack(&dq, n, k);
                let rows = QuantRows::new(&q).unwrap().unwrap().rounding_to_bf16();
                for m in [1, 2, 3, 9, 17] {
                    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let d = max_diff(&rows.matmul(&xs, m), &panel.matmul(&xs, m));
                    assert!(d < 2e-5 * k as f32, "{dtype:?} n={n} k={k} m={m}: {d}");
                }
            }
        }
    }

    /// The portable column kernel, which an AVX-512 build does not use for Q4_1 and
    /// Q8_0, equals the dense product too.
    #[test]
    fn portable_kernel_matches_dense_product() {
        let dev = Device::Cpu;
        let (m, n, k) = (5, 40, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xsum: Vec<f32> = xs.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let rows = QuantRows::new(&q).unwrap().unwrap();
            let row_bytes = k / BLOCK * rows.block_bytes();
            let (mut acc, mut offs) = (vec![[0f32; BLOCK]; m], vec![0f32; m]);
            let mut got = vec![0f32; m * n];
            for col in 0..n {
                let mut out = vec![0f32; m];
                let wcol = &rows.data[col * row_bytes..(col + 1) * row_bytes];
                rows.column_portable(wcol, &xs, &xsum, &mut acc, &mut offs, &mut out);
                for (r, v) in out.into_iter().enumerate() {
                    got[r * n + col] = v;
                }
            }
            let diff = max_diff(&dense(&q, &x), &got);
            assert!(diff < 1e-4, "{dtype:?}: {diff}");
        }
    }
}
