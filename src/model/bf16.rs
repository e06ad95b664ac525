//! Weight matrices in bfloat16, multiplied with bfloat16-rounded activations and f32
//! accumulation: the precision of batched steps where the CPU has `avx512_bf16`.
//!
//! `vdpbf16ps` multiplies 32 pairs of bf16 values and adds them into 16 f32 lanes,
//! twice the multiply-adds per instruction of f32 FMA. The products of two bf16
//! values are exact in f32, so the only rounding besides the f32 sums is that of the
//! operands to bf16 (8 bits of mantissa; the default model's Q4_1 weights need at
//! most 4 bits plus their block scale and offset). `troupe bench perplexity` shows
//! the model stays the same model.
//!
//! Layout: the weights `[n, k]` are packed in panels of [`PANEL`] output columns;
//! inside a panel, for each pair of inputs `(2p, 2p + 1)`, the 64 columns' two weights
//! as adjacent bf16 values (one `u32` per column). A broadcast of the activation pair
//! `(x[2p], x[2p + 1])` against four such vectors updates 64 outputs of one row, so
//! the accumulators of up to [`MR`] rows x 64 columns stay in registers while the
//! panel streams through once. Every output is a sum over `p` in the same order
//! whatever the number of rows, so a row's result never depends on its batch.

use rayon::prelude::*;

/// Output columns per panel: four vectors of 16 f32 lanes.
pub(crate) const PANEL: usize = 64;
/// Most rows one register tile holds.
const MR: usize = 6;

/// Whether this CPU runs the bf16 kernel natively (checked once, at run time).
pub fn has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bfloat16 (round to nearest, ties to even), as the upper half of
/// its f32 bits, which is what `vcvtne2ps2bf16` computes.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A weight matrix `[n, k]` packed for the bf16 kernel.
#[derive(Debug, Clone)]
pub(crate) struct Bf16Weights {
    n: usize,
    k: usize,
    /// Input pairs: `ceil(k / 2)`.
    kp: usize,
    /// Panel-major: `data[(panel * kp + p) * PANEL + c]` holds column `c` of the
    /// panel's weights at inputs `2p` (low half) and `2p + 1` (high half).
    data: Vec<u32>,
}

impl Bf16Weights {
    /// Packs the dense rows of `w` (`[n, k]`, row-major).
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> Self {
        debug_assert_eq!(w.len(), n * k);
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u32; panels * kp * PANEL];
        data.par_chunks_mut(kp * PANEL)
            .enumerate()
            .for_each(|(panel, out)| {
                for c in 0..PANEL {
                    let col = panel * PANEL + c;
                    if col >= n {
                        break;
                    }
                    let row = &w[col * k..(col + 1) * k];
                    for p in 0..kp {
                        let lo = to_bf16(row[2 * p]) as u32;
                        let hi = row.get(2 * p + 1).map_or(0, |&x| to_bf16(x) as u32);
                        out[p * PANEL + c] = lo | (hi << 16);
                    }
                }
            });
        Self { n, k, kp, data }
    }

    /// Output width.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// `x [m, k] -> [m, n]` (row-major slices).
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, kp) = (self.n, self.kp);
        let xb = pack_rows(x, m, self.k);
        let mut out = vec![0f32; m * n];
        let panels = n.div_ceil(PANEL);
        let dst = SharedOut(out.as_mut_ptr());
        let native = has_native_bf16();
        // Several panels per job when there are many, so that scheduling stays cheap
        // next to the work; a panel is never split, so results do not depend on it.
        let per_job = (panels / (4 * rayon::current_num_threads().max(1))).max(1);
        (0..panels.div_ceil(per_job))
            .into_par_iter()
            .for_each(|job| {
                let dst = &dst;
                for panel in job * per_job..((job + 1) * per_job).min(panels) {
                    let w = &self.data[panel * kp * PANEL..(panel + 1) * kp * PANEL];
                    let col0 = panel * PANEL;
                    let cols = PANEL.min(n - col0);
                    // SAFETY: each panel writes only its own columns `col0..col0 + cols` of
                    // every row, and panels are distinct across jobs.
                    unsafe {
                        panel_product(native, w, &xb, m, kp, dst.0, n, col0, cols);
                    }
                }
            });
        out
    }
}

/// The output buffer shared by the jobs, each writing its own columns.
struct SharedOut(*mut f32);
// SAFETY: jobs write disjoint columns (see `Bf16Weights::matmul`).
unsafe impl Sync for SharedOut {}

/// Rows of `x [m, k]` as bf16 pairs `[m, ceil(k / 2)]` (a zero pads an odd `k`).
pub(crate) fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; m * kp];
    for (row, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(kp)) {
        for (p, d) in dst.iter_mut().enumerate() {
            let lo = to_bf16(row[2 * p]) as u32;
            let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
            *d = lo | (hi << 16);
        }
    }
    debug_assert_eq!(out.len(), m * kp);
    out
}

/// One panel's columns for all `m` rows, in tiles of at most [`MR`] rows.
///
/// # Safety
/// `out` points at `m` rows of `n` floats; columns `col0..col0 + cols` are this call's
/// alone; `w` holds one panel of `kp` pairs, `xb` `m` rows of `kp` pairs.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    native: bool,
    w: &[u32],
    xb: &[u32],
    m: usize,
    kp: usize,
    out: *mut f32,
    n: usize,
    col0: usize,
    cols: usize,
) {
    let mut r0 = 0;
    while r0 < m {
        let rows = MR.min(m - r0);
        let x = &xb[r0 * kp..(r0 + rows) * kp];
        let o = out.add(r0 * n + col0);
        #[cfg(target_arch = "x86_64")]
        if native {
            match rows {
                1 => simd::tile::<1>(w, x, kp, o, n, cols),
                2 => simd::tile::<2>(w, x, kp, o, n, cols),
                3 => simd::tile::<3>(w, x, kp, o, n, cols),
                4 => simd::tile::<4>(w, x, kp, o, n, cols),
                5 => simd::tile::<5>(w, x, kp, o, n, cols),
                _ => simd::tile::<6>(w, x, kp, o, n, cols),
            }
            r0 += rows;
            continue;
        }
        let _ = native;
        portable_tile(w, x, rows, kp, o, n, cols);
        r0 += rows;
    }
}

/// The tile in portable Rust: the same sums, each pair's two products added to the
/// lane's accumulator, in the same order as the instruction.
unsafe fn portable_tile(
    w: &[u32],
    x: &[u32],
    rows: usize,
    kp: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    for r in 0..rows {
        let mut acc = [0f32; PANEL];
        for p in 0..kp {
            let xv = x[r * kp + p];
            let (xl, xh) = (from_bf16(xv as u16), from_bf16((xv >> 16) as u16));
            for (c, a) in acc.iter_mut().enumerate() {
                let wv = w[p * PANEL + c];
                let (wl, wh) = (from_bf16(wv as u16), from_bf16((wv >> 16) as u16));
                *a += wl * xl + wh * xh;
            }
        }
        for (c, a) in acc.iter().enumerate().take(cols) {
            *out.add(r * n + c) = *a;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// `R` rows x one panel: `R * 4` accumulators in registers.
    ///
    /// # Safety
    /// Needs AVX-512F and AVX512_BF16 (checked by the caller); `w` holds `kp * 64`
    /// pairs, `x` `R * kp`; `out` has `R` rows of stride `n` with `cols` writable
    /// columns each.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize>(
        w: &[u32],
        x: &[u32],
        kp: usize,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for p in 0..kp {
            let base = wp.add(p * PANEL);
            let w0 = _mm512_loadu_si512(base as *const _);
            let w1 = _mm512_loadu_si512(base.add(16) as *const _);
            let w2 = _mm512_loadu_si512(base.add(32) as *const _);
            let w3 = _mm512_loadu_si512(base.add(48) as *const _);
            for (r, a) in acc.iter_mut().enumerate() {
                let b: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xp.add(r * kp + p) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], std::mem::transmute::<__m512i, __m512bh>(w0), b);
                a[1] = _mm512_dpbf16_ps(a[1], std::mem::transmute::<__m512i, __m512bh>(w1), b);
                a[2] = _mm512_dpbf16_ps(a[2], std::mem::transmute::<__m512i, __m512bh>(w2), b);
                a[3] = _mm512_dpbf16_ps(a[3], std::mem::transmute::<__m512i, __m512bh>(w3), b);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let o = out.add(r * n);
            for (t, v) in a.iter().enumerate() {
                let c0 = t * 16;
                if c0 >= cols {
                    break;
                }
                let left = cols - c0;
                if left >= 16 {
                    _mm512_storeu_ps(o.add(c0), *v);
                } else {
                    _mm512_mask_storeu_ps(o.add(c0), ((1u32 << left) - 1) as u16, *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The product of the bf16-rounded operands in f64, and the sum of |terms| (the
    /// scale of the f32 rounding error).
    fn exact(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                for i in 0..k {
                    let t = from_bf16(to_bf16(w[c * k + i])) as f64
                        * from_bf16(to_bf16(x[r * k + i])) as f64;
                    out[r * n + c] += t;
                    mag[r * n + c] += t.abs();
                }
            }
        }
        (out, mag)
    }

    /// Rows 1 to 70 (across the 6-row tiles), widths that are not multiples of the
    /// 64-column panel and odd inputs: each output equals the exact product of the
    /// bf16-rounded operands to f32 summation error (1e-5 of the sum of |terms|), and
    /// each row is bitwise the same as the row multiplied alone.
    #[test]
    fn matches_the_exact_product_of_rounded_operands() {
        let mut seed = 7;
        for &(n, k) in &[(83usize, 96usize), (64, 33), (130, 577), (5, 2)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let packed = Bf16Weights::pack(&w, n, k);
            for m in [1, 2, 5, 6, 7, 13, 16, 31, 64, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
                let got = packed.matmul(&x, m);
                let (want, mag) = exact(&w, &x, m, n, k);
                for i in 0..m * n {
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(
                        err <= 1e-5 * mag[i] + 1e-6,
                        "n={n} k={k} m={m} out {i}: {} vs {}",
                        got[i],
                        want[i]
                    );
                }
                for r in [0, m / 2, m - 1] {
                    let alone = packed.matmul(&x[r * k..(r + 1) * k], 1);
                    assert_eq!(alone, got[r * n..(r + 1) * n], "n={n} k={k} m={m} row {r}");
                }
            }
        }
    }

    /// The portable tile computes the same values as the native one to f32 rounding.
    #[test]
    fn portable_tile_matches() {
        let mut seed = 11;
        let (n, k, m) = (70usize, 41usize, 9usize);
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let packed = Bf16Weights::pack(&w, n, k);
        let xb = pack_rows(&x, m, k);
        let mut out = vec![0f32; m * n];
        for panel in 0..n.div_ceil(PANEL) {
            let kp = packed.kp;
            let wpanel = &packed.data[panel * kp * PANEL..(panel + 1) * kp * PANEL];
            let col0 = panel * PANEL;
            // SAFETY: the buffer has m rows of n columns; one panel at a time.
            unsafe {
                panel_product(
                    false,
                    wpanel,
                    &xb,
                    m,
                    kp,
                    out.as_mut_ptr(),
                    n,
                    col0,
                    PANEL.min(n - col0),
                )
            };
        }
        let (want, mag) = exact(&w, &x, m, n, k);
        for i in 0..m * n {
            assert!(
                (out[i] as f64 - want[i]).abs() <= 1e-5 * mag[i] + 1e-6,
                "out {i}"
            );
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }
}
