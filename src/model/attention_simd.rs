//! The AVX-512 attention of one group of query heads against its KV head, used when
//! the CPU has AVX-512F (checked at run time) and the head width is a multiple of 16.
//!
//! The portable loops in `attention.rs` chain every multiply-add of a dot product on
//! one accumulator and call the library `exp` per score, so a decode step at 256
//! cached tokens waits on latency, not on the arithmetic units. Here each dot product
//! runs on independent vector accumulators, the softmax uses the vectorised `exp` of
//! [`crate::math`], and f16
//! caches are converted 16 values at a time (`vcvtph2ps`).

// The register tiles index several arrays by the same head and chunk counters.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::f16;

use crate::math::simd::exp16;

/// Whether the AVX-512 path can run here (checked once).
pub(crate) fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// A cache element type the vector loads read.
pub(crate) trait Load16: Copy {
    /// 16 consecutive values as f32.
    ///
    /// # Safety
    /// AVX-512F; `p` points at 16 readable values.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl Load16 for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// `scores[g * n + j] = q_g . keys[j] * scale` for the `G` query rows at `q`
/// (stride `q_stride`) and `n` keys of width `d` (a multiple of 16): each key is
/// loaded (and converted) once for the whole group.
#[inline(always)]
unsafe fn scores<T: Load16, const G: usize>(
    q: *const f32,
    q_stride: usize,
    keys: *const T,
    n: usize,
    d: usize,
    scale: f32,
    out: *mut f32,
) {
    let chunks = d / 16;
    for j in 0..n {
        let k = keys.add(j * d);
        let mut acc = [_mm512_setzero_ps(); G];
        let mut acc2 = [_mm512_setzero_ps(); G];
        let mut c = 0;
        while c + 1 < chunks {
            let (k0, k1) = (T::load16(k.add(c * 16)), T::load16(k.add(c * 16 + 16)));
            for g in 0..G {
                let qg = q.add(g * q_stride + c * 16);
                acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg), k0, acc[g]);
                acc2[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg.add(16)), k1, acc2[g]);
            }
            c += 2;
        }
        if c < chunks {
            let k0 = T::load16(k.add(c * 16));
            for g in 0..G {
                let qg = q.add(g * q_stride + c * 16);
                acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg), k0, acc[g]);
            }
        }
        for g in 0..G {
            *out.add(g * n + j) = _mm512_reduce_add_ps(_mm512_add_ps(acc[g], acc2[g])) * scale;
        }
    }
}

/// Softmax of `s[..n]` in place.
#[inline(always)]
unsafe fn softmax(s: &mut [f32]) {
    let n = s.len();
    let p = s.as_mut_ptr();
    let full = n / 16 * 16;
    let mask = ((1u32 << (n - full)) - 1) as u16;
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        mv = _mm512_max_ps(mv, _mm512_loadu_ps(p.add(i)));
    }
    if full < n {
        mv = _mm512_max_ps(
            mv,
            _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, p.add(full)),
        );
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    let mut sum = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if full < n {
        let x = _mm512_mask_loadu_ps(max, mask, p.add(full));
        let e = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(x, max)));
        _mm512_mask_storeu_ps(p.add(full), mask, e);
        sum = _mm512_add_ps(sum, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for i in (0..full).step_by(16) {
        _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
    }
    if full < n {
        let x = _mm512_mask_loadu_ps(_mm512_setzero_ps(), mask, p.add(full));
        _mm512_mask_storeu_ps(p.add(full), mask, _mm512_mul_ps(x, inv));
    }
}

/// `out_g[..d] = sum_j w_g[j] * values[j]` for the `G` weight rows `w` (`G * n`)
/// into the rows `out` (stride `out_stride`), 64 columns at a time: each value row
/// is loaded (and converted) once for the whole group.
#[inline(always)]
unsafe fn weighted_sum<T: Load16, const G: usize>(
    w: &[f32],
    n: usize,
    values: *const T,
    d: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let mut c0 = 0;
    while c0 < d {
        let width = (d - c0).min(64) / 16;
        let mut a = [[_mm512_setzero_ps(); 4]; G];
        for j in 0..n {
            let v0 = values.add(j * d + c0);
            let mut v = [_mm512_setzero_ps(); 4];
            for (c, vc) in v.iter_mut().enumerate().take(width) {
                *vc = T::load16(v0.add(c * 16));
            }
            for g in 0..G {
                let wg = _mm512_set1_ps(*w.get_unchecked(g * n + j));
                for c in 0..width {
                    a[g][c] = _mm512_fmadd_ps(wg, v[c], a[g][c]);
                }
            }
        }
        for (g, ag) in a.iter().enumerate() {
            for (c, v) in ag.iter().enumerate().take(width) {
                _mm512_storeu_ps(out.add(g * out_stride + c0 + c * 16), *v);
            }
        }
        c0 += width * 16;
    }
}

/// One block of `G` query heads of the group for one token.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_block<T: Load16, const G: usize>(
    q: *const f32,
    d: usize,
    keys: &[T],
    values: &[T],
    n_keys: usize,
    buf: &mut Vec<f32>,
    out: *mut f32,
    out_stride: usize,
) {
    buf.clear();
    buf.resize(G * n_keys, 0.0);
    let scale = 1.0 / (d as f32).sqrt();
    scores::<T, G>(q, d, keys.as_ptr(), n_keys, d, scale, buf.as_mut_ptr());
    for g in 0..G {
        softmax(&mut buf[g * n_keys..(g + 1) * n_keys]);
    }
    weighted_sum::<T, G>(buf, n_keys, values.as_ptr(), d, out, out_stride);
}

/// The attention of `group` query heads for `n` new tokens (see
/// `attention::attend_group`): `q` the sequence's rotated queries `[n, n_head, d]`
/// starting at this group's first head, `keys`/`values` this KV head's rows,
/// `out` `[group, n, d]`.
///
/// # Safety
/// AVX-512F ([`available`]); `d % 16 == 0`; the slices hold what the shapes say.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend<T: Load16>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    n_head: usize,
    group: usize,
    d: usize,
    pos0: usize,
    scores_buf: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = out.len() / (group * d);
    for t in 0..n {
        let n_keys = pos0 + t + 1;
        let mut g0 = 0;
        while g0 < group {
            // The group's heads in blocks of up to four (their accumulators fit the
            // 32 vector registers).
            let gb = (group - g0).min(4);
            let qrow = q.as_ptr().add((t * n_head + g0) * d);
            // Head g of the group writes out[(g * n + t) * d..].
            let o = out.as_mut_ptr().add((g0 * n + t) * d);
            let stride = n * d;
            let b = &mut *scores_buf;
            match gb {
                1 => attend_block::<T, 1>(qrow, d, keys, values, n_keys, b, o, stride),
                2 => attend_block::<T, 2>(qrow, d, keys, values, n_keys, b, o, stride),
                3 => attend_block::<T, 3>(qrow, d, keys, values, n_keys, b, o, stride),
                _ => attend_block::<T, 4>(qrow, d, keys, values, n_keys, b, o, stride),
            }
            g0 += gb;
        }
    }
}
