//! Products of a few f32 activation rows with Q5_0, Q4_K and Q6_K weights (the
//! formats of a Q4_K_M file beside Q8_0), decoding each weight block on the fly.
//!
//! The same contract as the Q4_0/Q4_1/Q8_0 kernel of [`super::qgemv`]: the result is
//! the product with the exactly dequantized weights (each block is decoded with the
//! arithmetic of candle's `dequantize`, so its values are bitwise the dequantized
//! copy's), summed in f32, while only the stored 4.5-6.5 bits per weight are read.
//! With `round_bf16`, weights and activations are rounded to bfloat16 first, so that
//! the result equals the bf16 kernel's to the order of the f32 sums (`auto`'s small
//! steps next to its bf16 large ones).
//!
//! The block layouts are ggml's (`ggml-common.h`):
//! - Q5_0, 32 weights in 22 bytes: `d: f16`, `qh: u32` (the fifth bit of each
//!   weight), `qs: [u8; 16]` (the low nibbles; weight `j` and `j + 16` share a byte);
//!   `w = (q - 16) * d`.
//! - Q4_K, 256 weights in 144 bytes: `d, dmin: f16`, `scales: [u8; 12]` (eight 6-bit
//!   scales and mins, one per 32 weights), `qs: [u8; 128]` (nibbles: each 32 bytes
//!   hold two runs of 32 weights, low nibbles first); `w = d * sc * q - dmin * m`.
//! - Q6_K, 256 weights in 210 bytes: `ql: [u8; 128]` (low nibbles), `qh: [u8; 64]`
//!   (two high bits each), `scales: [i8; 16]` (one per 16 weights), `d: f16`;
//!   `w = d * sc * (q - 32)`.
//!
//! The decode loops are written over fixed-size arrays so that the compiler
//! vectorises them (AVX-512 where the build targets it); the dot products keep two
//! 16-lane accumulators per row, and each row's sum is formed the same way whatever
//! the number of rows, so a row's result never depends on its batch.

use super::qgemv::{fma, round_bf16 as round};
use candle_core::quantized::GgmlDType;
use half::f16;

/// Weights per super-block of the K formats.
const QK_K: usize = 256;

/// Whether this module multiplies `dtype`.
pub(crate) fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q4K | GgmlDType::Q6K)
}

/// (weights, bytes) of one block of a supported format.
pub(crate) fn layout(dtype: GgmlDType) -> (usize, usize) {
    match dtype {
        GgmlDType::Q5_0 => (32, 22),
        GgmlDType::Q4K => (QK_K, 144),
        _ => (QK_K, 210),
    }
}

/// `x [m, k] -> [m, n]` for the `[n, k]` matrix of `dtype` blocks in `data`
/// (row-major slices); `k` is a multiple of the block width.
pub(crate) fn matmul(
    dtype: GgmlDType,
    data: &[u8],
    n: usize,
    k: usize,
    round_bf16: bool,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if round_bf16 && super::bf16::has_native_bf16() {
        return matmul_dp(dtype, data, n, k, x, m);
    }
    let rounded: Vec<f32>;
    let x = if round_bf16 {
        rounded = x.iter().map(|&v| round(v)).collect();
        &rounded[..]
    } else {
        x
    };
    let (bw, bb) = layout(dtype);
    let row_bytes = k / bw * bb;
    // A weight block is decoded once for all rows.
    super::qgemv::by_column_jobs(n, m, |col0, chunk| {
        let mut acc = vec![[[0f32; 16]; 2]; m];
        let mut buf = [0f32; QK_K];
        for (c, out) in chunk.chunks_exact_mut(m).enumerate() {
            let col = col0 + c;
            let w = &data[col * row_bytes..(col + 1) * row_bytes];
            acc.iter_mut().for_each(|a| *a = [[0.0; 16]; 2]);
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let wv = &mut buf[..bw];
                decode_rounding(dtype, blk, wv, round_bf16);
                for (r, a) in acc.iter_mut().enumerate() {
                    dot_into(a, wv, &x[r * k + b * bw..r * k + (b + 1) * bw]);
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = lanes_sum(a);
            }
        }
    })
}

/// [`matmul`] with bf16 operands by `vdpbf16ps`: each block is decoded to f32 (the
/// dequantized values), rounded to bf16 32 weights at a time by `vcvtne2ps2bf16`
/// and multiplied with every row's bf16 activations: the bf16 kernel's products,
/// summed in another order.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
fn matmul_dp(dtype: GgmlDType, data: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let xb = super::bf16::pack_rows(x, m, k);
    let (bw, bb) = layout(dtype);
    let row_bytes = k / bw * bb;
    super::qgemv::by_column_jobs(n, m, |col0, chunk| {
        let cols = chunk.len() / m;
        let w = &data[col0 * row_bytes..(col0 + cols) * row_bytes];
        // SAFETY: avx512_bf16 was detected; `w` holds `cols` weight rows of this
        // matrix, `xb` `m` rows of k / 2 pairs, `chunk` `cols * m` floats.
        unsafe { simd::columns_dp(dtype, w, row_bytes, &xb, m, k, chunk) };
    })
}

/// Adds `w . x` (equal lengths, a multiple of 32) into the two 16-lane accumulators,
/// alternating between them.
#[inline(always)]
fn dot_into(acc: &mut [[f32; 16]; 2], w: &[f32], x: &[f32]) {
    for (w2, x2) in w.chunks_exact(32).zip(x.chunks_exact(32)) {
        for h in 0..2 {
            for i in 0..16 {
                acc[h][i] = fma(w2[16 * h + i], x2[16 * h + i], acc[h][i]);
            }
        }
    }
}

/// The sum of the 32 lanes, in a fixed order.
#[inline(always)]
fn lanes_sum(acc: &[[f32; 16]; 2]) -> f32 {
    let mut s = [0f32; 16];
    for i in 0..16 {
        s[i] = acc[0][i] + acc[1][i];
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            s[i] += s[i + w];
        }
    }
    s[0]
}

/// [`decode`], then each weight rounded to bf16 if `round_bf16`: with AVX-512 where
/// the build targets it (the same values, 16 weights per instruction).
#[inline(always)]
fn decode_rounding(dtype: GgmlDType, blk: &[u8], out: &mut [f32], round_bf16: bool) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: the build targets AVX-512F; `blk` is one whole block of `dtype`
        // and `out` its width.
        unsafe {
            if round_bf16 {
                simd::decode::<true>(dtype, blk, out)
            } else {
                simd::decode::<false>(dtype, blk, out)
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        decode(dtype, blk, out);
        if round_bf16 {
            out.iter_mut().for_each(|v| *v = round(*v));
        }
    }
}

/// Decodes one block of `dtype` into `out` (its width), with the arithmetic of
/// candle's dequantization (the portable path; with AVX-512 only the tests use it).
#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "avx512f"),
    allow(dead_code)
)]
#[inline(always)]
fn decode(dtype: GgmlDType, blk: &[u8], out: &mut [f32]) {
    match dtype {
        GgmlDType::Q5_0 => decode_q5_0(blk, out),
        GgmlDType::Q4K => decode_q4k(blk, out),
        _ => decode_q6k(blk, out),
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline(always)]
fn decode_q5_0(blk: &[u8], out: &mut [f32]) {
    let d = f16_at(blk, 0);
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let qs = &blk[6..22];
    // Weight j's low nibble, then its fifth bit (bit j of qh): integer steps over
    // fixed arrays, which vectorise, giving the same integers as ggml's loop.
    let mut q = [0u32; 32];
    for j in 0..16 {
        q[j] = qs[j] as u32 & 0x0F;
        q[j + 16] = qs[j] as u32 >> 4;
    }
    for (j, v) in q.iter_mut().enumerate() {
        *v |= ((qh >> j) & 1) << 4;
    }
    for (o, v) in out.iter_mut().zip(q) {
        *o = (v as i32 - 16) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block's 12 bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn decode_q4k(blk: &[u8], out: &mut [f32]) {
    let d = f16_at(blk, 0);
    let dmin = f16_at(blk, 2);
    let scales = &blk[4..16];
    let qs = &blk[16..144];
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        let y = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

#[inline(always)]
fn decode_q6k(blk: &[u8], out: &mut [f32]) {
    let d = f16_at(blk, 208);
    for half in 0..2 {
        let ql = &blk[64 * half..64 * half + 64];
        let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
        let sc = &blk[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for g in 0..2 {
            // Scales of weights l (16 g .. 16 g + 16) and their three partners.
            let s = [0, 2, 4, 6].map(|o| sc[g + o] as i8 as f32);
            for l in 16 * g..16 * g + 16 {
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = d * s[0] * q1 as f32;
                y[l + 32] = d * s[1] * q2 as f32;
                y[l + 64] = d * s[2] * q3 as f32;
                y[l + 96] = d * s[3] * q4 as f32;
            }
        }
    }
}

/// The decoders with AVX-512: each step is the portable decoder's on 16 lanes (the
/// integers are exact, then the same f32 multiplications in the same order), so the
/// values are bitwise the same.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod simd {
    use std::arch::x86_64::*;

    use candle_core::quantized::GgmlDType;

    use super::{f16_at, scale_min_k4};

    /// 16 bytes at `p` as 16 lanes of u32.
    #[inline(always)]
    unsafe fn bytes16(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
    }

    /// Stores 16 floats at `out`, rounded to bf16 (as f32) if `ROUND`.
    #[inline(always)]
    unsafe fn put<const ROUND: bool>(out: *mut f32, v: __m512) {
        let v = if ROUND {
            let b = _mm512_castps_si512(v);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd);
            _mm512_castsi512_ps(_mm512_and_si512(
                r,
                _mm512_set1_epi32(0xFFFF_0000u32 as i32),
            ))
        } else {
            v
        };
        _mm512_storeu_ps(out, v);
    }

    /// The weight rows `w` (`row_bytes` each) times the `m` bf16 activation rows
    /// `xb` (`k / 2` pairs each) into `out` (column-major, `m` per column).
    ///
    /// # Safety
    /// Needs AVX-512F and AVX512_BF16; the slices hold what the shapes say.
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
        let (bw, bb) = super::layout(dtype);
        let kp = k / 2;
        let mut buf = [0f32; super::QK_K];
        // Two accumulators per row (even and odd runs of 32) so that one row's
        // dot products do not wait on each other.
        let mut acc = vec![[_mm512_setzero_ps(); 2]; m];
        for (c, out) in out.chunks_exact_mut(m).enumerate() {
            let wrow = &w[c * row_bytes..(c + 1) * row_bytes];
            acc.iter_mut().for_each(|a| *a = [_mm512_setzero_ps(); 2]);
            for (b, blk) in wrow.chunks_exact(bb).enumerate() {
                decode::<false>(dtype, blk, &mut buf[..bw]);
                for run in 0..bw / 32 {
                    let p = buf.as_ptr().add(32 * run);
                    let wb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p));
                    let at = (b * bw + 32 * run) / 2;
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                            xb.as_ptr().add(r * kp + at) as *const _,
                        ));
                        a[run % 2] = _mm512_dpbf16_ps(a[run % 2], wb, xv);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
    }

    /// # Safety
    /// Needs AVX-512F; `blk` is one whole block of `dtype` (Q5_0, Q4_K or Q6_K) and
    /// `out` holds its width.
    #[inline(always)]
    pub(super) unsafe fn decode<const ROUND: bool>(dtype: GgmlDType, blk: &[u8], out: &mut [f32]) {
        let o = out.as_mut_ptr();
        let b = blk.as_ptr();
        let nib = _mm512_set1_epi32(0x0F);
        match dtype {
            GgmlDType::Q5_0 => {
                let d = _mm512_set1_ps(f16_at(blk, 0));
                let qh = _mm512_set1_epi32(i32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]));
                let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let q = bytes16(b.add(6));
                let one = _mm512_set1_epi32(1);
                let sixteen = _mm512_set1_epi32(16);
                for (h, (nibs, shift)) in [
                    (_mm512_and_si512(q, nib), lanes),
                    (_mm512_srli_epi32::<4>(q), _mm512_add_epi32(lanes, sixteen)),
                ]
                .into_iter()
                .enumerate()
                {
                    let bit = _mm512_and_si512(_mm512_srlv_epi32(qh, shift), one);
                    let v = _mm512_sub_epi32(
                        _mm512_or_si512(nibs, _mm512_slli_epi32::<4>(bit)),
                        sixteen,
                    );
                    put::<ROUND>(o.add(16 * h), _mm512_mul_ps(_mm512_cvtepi32_ps(v), d));
                }
            }
            GgmlDType::Q4K => {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                for c in 0..4 {
                    let (sc, m) = scale_min_k4(2 * c, scales);
                    let (d1, m1) = (
                        _mm512_set1_ps(d * sc as f32),
                        _mm512_set1_ps(dmin * m as f32),
                    );
                    let (sc, m) = scale_min_k4(2 * c + 1, scales);
                    let (d2, m2) = (
                        _mm512_set1_ps(d * sc as f32),
                        _mm512_set1_ps(dmin * m as f32),
                    );
                    for half in 0..2 {
                        let q = bytes16(b.add(16 + 32 * c + 16 * half));
                        let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, nib));
                        let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
                        let y = o.add(64 * c + 16 * half);
                        put::<ROUND>(y, _mm512_sub_ps(_mm512_mul_ps(d1, lo), m1));
                        put::<ROUND>(y.add(32), _mm512_sub_ps(_mm512_mul_ps(d2, hi), m2));
                    }
                }
            }
            _ => {
                let d = f16_at(blk, 208);
                let three = _mm512_set1_epi32(3);
                let bias = _mm512_set1_epi32(32);
                for half in 0..2 {
                    let ql = b.add(64 * half);
                    let qh = b.add(128 + 32 * half);
                    let sc = &blk[192 + 8 * half..200 + 8 * half];
                    for g in 0..2 {
                        let a = bytes16(ql.add(16 * g));
                        let c = bytes16(ql.add(32 + 16 * g));
                        let h = bytes16(qh.add(16 * g));
                        let hb = |s: u32| {
                            _mm512_slli_epi32::<4>(_mm512_and_si512(
                                _mm512_srlv_epi32(h, _mm512_set1_epi32(s as i32)),
                                three,
                            ))
                        };
                        let qs = [
                            _mm512_or_si512(_mm512_and_si512(a, nib), hb(0)),
                            _mm512_or_si512(_mm512_and_si512(c, nib), hb(2)),
                            _mm512_or_si512(_mm512_srli_epi32::<4>(a), hb(4)),
                            _mm512_or_si512(_mm512_srli_epi32::<4>(c), hb(6)),
                        ];
                        for (i, q) in qs.into_iter().enumerate() {
                            let ds = _mm512_set1_ps(d * sc[g + 2 * i] as i8 as f32);
                            let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, bias));
                            put::<ROUND>(o.add(128 * half + 32 * i + 16 * g), _mm512_mul_ps(ds, q));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn dequantized(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Each format's decode gives bitwise the values of candle's dequantization.
    #[test]
    fn decode_equals_candle_dequantize_bitwise() {
        let (n, k) = (7, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let data = q.data().unwrap();
            let (bw, bb) = layout(dtype);
            let want = dequantized(&q);
            let mut portable = vec![0f32; n * k];
            let mut fast = vec![0f32; n * k];
            let mut rounded = vec![0f32; n * k];
            for (i, blk) in data.chunks_exact(bb).enumerate() {
                let at = i * bw..(i + 1) * bw;
                decode(dtype, blk, &mut portable[at.clone()]);
                decode_rounding(dtype, blk, &mut fast[at.clone()], false);
                decode_rounding(dtype, blk, &mut rounded[at], true);
            }
            assert_eq!(portable, want, "{dtype:?} portable");
            assert_eq!(fast, want, "{dtype:?}");
            let want_rounded: Vec<f32> = want.iter().map(|&v| round(v)).collect();
            assert_eq!(rounded, want_rounded, "{dtype:?} rounded");
        }
    }

    /// The kernel equals `x @ dequantize(w)^T` to float rounding on odd shapes (odd
    /// output widths, odd block counts, row counts 1..17), each row bitwise the same
    /// as multiplied alone; with bf16 rounding it equals the bf16 kernel over the
    /// dequantized weights to the order of the f32 sums.
    #[test]
    fn matches_the_exact_dequantized_product() {
        let dev = Device::Cpu;
        for (dtype, n, k) in [
            (GgmlDType::Q5_0, 83, 96),
            (GgmlDType::Q5_0, 19, 224),
            (GgmlDType::Q4K, 37, 768),
            (GgmlDType::Q4K, 5, 256),
            (GgmlDType::Q6K, 41, 768),
            (GgmlDType::Q6K, 3, 256),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let data = q.data().unwrap();
            let dq = dequantized(&q);
            let dqt = Tensor::from_vec(dq.clone(), (n, k), &dev).unwrap();
            let panel = super::super::bf16::Bf16Weights::pack(&dq, n, k);
            for m in [1, 2, 3, 9, 17] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let exact: Vec<f32> = x
                    .matmul(&dqt.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = matmul(dtype, &data, n, k, false, &xs, m);
                let d = max_diff(&got, &exact);
                assert!(d < 2e-6 * k as f32, "{dtype:?} {n}x{k} m={m}: {d}");
                for r in 0..m {
                    let alone = matmul(dtype, &data, n, k, false, &xs[r * k..(r + 1) * k], 1);
                    assert_eq!(alone, got[r * n..(r + 1) * n], "{dtype:?} m={m} row {r}");
                }
                let got = matmul(dtype, &data, n, k, true, &xs, m);
                let d = max_diff(&got, &panel.matmul(&xs, m));
                assert!(d < 2e-5 * k as f32, "{dtype:?} bf16 {n}x{k} m={m}: {d}");
            }
        }
    }

    #[test]
    fn round_equals_to_bf16() {
        for x in [
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3F80_8000),
            1.0117188,
            -3.3e-5,
            6.5e4,
            1e-40,
            f32::MAX,
        ] {
            let want = super::super::bf16::from_bf16(super::super::bf16::to_bf16(x));
            assert_eq!(round(x).to_bits(), want.to_bits(), "{x}");
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }
}
