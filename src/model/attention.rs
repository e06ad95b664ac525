//! Rotary position embedding and grouped-query attention for one sequence against
//! its own KV cache, in plain Rust over the cache's buffers.
//!
//! Why not candle ops: a decode step for 64 sequences would issue a dozen small
//! tensor ops per sequence per layer, and the `repeat_kv` formulation copies every
//! key and value per step (8-12x slower, measured with `troupe bench forward --profile`). Here the query heads that
//! share a KV head read that head's contiguous key rows directly, nothing is copied,
//! and the result for a sequence never depends on what else is in the batch.

use half::f16;

use crate::kv::{KvBuf, KvElem, LayerKv};

/// Precomputed rotary tables: `cos[p * half + i]`, `sin[p * half + i]` for position
/// `p` and pair `i`, computed as candle-transformers computes them.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    half: usize,
    /// Pairs `i` and `i + half` (Qwen's GGUF layout) instead of `2i` and `2i + 1`.
    neox: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for `max_pos` positions of a head of width `head_dim`; `neox` picks
    /// the pairing (see [`apply`](Self::apply)).
    pub(crate) fn new(
        head_dim: usize,
        freq_base: f32,
        max_pos: usize,
        neox: bool,
    ) -> crate::Result<Self> {
        let half = head_dim / 2;
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / freq_base.powf(i as f32 / head_dim as f32))
            .collect();
        // Fallible: a context length from a file must not abort the process.
        let n = max_pos
            .checked_mul(half)
            .ok_or_else(|| crate::Error::BadRequest {
                what: format!("rotary tables of {max_pos} x {half} overflow"),
            })?;
        let oom = |_| crate::Error::OutOfMemory {
            what: "rotary tables",
            bytes: n.saturating_mul(8),
        };
        let mut cos = Vec::new();
        cos.try_reserve_exact(n).map_err(oom)?;
        let mut sin = Vec::new();
        sin.try_reserve_exact(n).map_err(oom)?;
        for p in 0..max_pos {
            for t in &theta {
                let a = p as f32 * t;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            half,
            neox,
            cos,
            sin,
        })
    }

    /// Rotates `x`, rows of `heads * head_dim` for tokens at `pos0, pos0 + 1, …`, in
    /// place, pairing elements `2i` and `2i + 1` (GGUF llama's layout), or `i` and
    /// `i + head_dim / 2` with `neox` (Qwen's).
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize, pos0: usize) {
        let d = 2 * self.half;
        for (t, row) in x.chunks_exact_mut(heads * d).enumerate() {
            let off = (pos0 + t) * self.half;
            let (cos, sin) = (
                &self.cos[off..off + self.half],
                &self.sin[off..off + self.half],
            );
            for head in row.chunks_exact_mut(d) {
                if self.neox {
                    let (lo, hi) = head.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                    continue;
                }
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[i] - b * sin[i];
                    pair[1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// Shape of the attention of one layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Attention of the query heads that share KV head `kv_head`, for `n` new tokens of
/// a sequence whose first new token sits at `pos0`; the cache already holds the new
/// tokens' keys and values. Each key and value row is read once for the whole group.
///
/// `q`: the sequence's queries `[n, n_head, d]` after rotation; `out`: the group's
/// output `[group, n, d]`; `cap`: rows per head in the cache buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_group(
    q: &[f32],
    kv: &LayerKv,
    cap: usize,
    pos0: usize,
    shape: AttnShape,
    kv_head: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if shape.head_dim.is_multiple_of(16) && super::attention_simd::available() {
        let (d, group) = (shape.head_dim, shape.n_head / shape.n_kv_head);
        let rows = kv_head * cap * d..(kv_head + 1) * cap * d;
        let q = &q[kv_head * group * d..];
        let (nh, buf) = (shape.n_head, &mut scratch.scores);
        // SAFETY: AVX-512F was detected; d is a multiple of 16; the slices are this
        // KV head's rows and the sequence's queries from this group's first head.
        unsafe {
            match (&kv.k, &kv.v) {
                (KvBuf::F32(k), KvBuf::F32(v)) => super::attention_simd::attend(
                    q,
                    &k[rows.clone()],
                    &v[rows],
                    nh,
                    group,
                    d,
                    pos0,
                    buf,
                    out,
                ),
                (KvBuf::F16(k), KvBuf::F16(v)) => super::attention_simd::attend(
                    q,
                    &k[rows.clone()],
                    &v[rows],
                    nh,
                    group,
                    d,
                    pos0,
                    buf,
                    out,
                ),
                _ => unreachable!("keys and values of one cache share a dtype"),
            }
        }
        return;
    }
    match (&kv.k, &kv.v) {
        (KvBuf::F32(k), KvBuf::F32(v)) => {
            attend_typed(q, k, v, cap, pos0, shape, kv_head, scratch, out)
        }
        (KvBuf::F16(k), KvBuf::F16(v)) => {
            attend_typed::<f16>(q, k, v, cap, pos0, shape, kv_head, scratch, out)
        }
        // A cache is built with one dtype for keys and values alike.
        _ => unreachable!("keys and values of one cache share a dtype"),
    }
}

/// Reusable buffers of one attention worker.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    scores: Vec<f32>,
    row: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn attend_typed<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    cap: usize,
    pos0: usize,
    shape: AttnShape,
    kv_head: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let d = shape.head_dim;
    let group = shape.n_head / shape.n_kv_head;
    let first = kv_head * group;
    let n = out.len() / (group * d);
    let keys = &k[kv_head * cap * d..(kv_head + 1) * cap * d];
    let values = &v[kv_head * cap * d..(kv_head + 1) * cap * d];
    let scale = (d as f32).sqrt();
    let Scratch { scores, row } = scratch;
    row.resize(d, 0.0);
    for t in 0..n {
        // The group's query rows for this token are contiguous: [group, d].
        let qs = &q[(t * shape.n_head + first) * d..(t * shape.n_head + first + group) * d];
        // Causal: the token at pos0 + t sees keys 0..=pos0 + t.
        let n_keys = pos0 + t + 1;
        scores.clear();
        scores.resize(group * n_keys, 0.0);
        for (j, key) in keys[..n_keys * d].chunks_exact(d).enumerate() {
            let key = as_f32(key, row);
            for (g, qrow) in qs.chunks_exact(d).enumerate() {
                scores[g * n_keys + j] = dot(qrow, key) / scale;
            }
        }
        for s in scores.chunks_exact_mut(n_keys) {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            s.iter_mut().for_each(|x| *x /= sum);
        }
        for g in 0..group {
            out[(g * n + t) * d..(g * n + t + 1) * d].fill(0.0);
        }
        for (j, val) in values[..n_keys * d].chunks_exact(d).enumerate() {
            let val = as_f32(val, row);
            for g in 0..group {
                let w = scores[g * n_keys + j];
                let o = &mut out[(g * n + t) * d..(g * n + t + 1) * d];
                for (acc, x) in o.iter_mut().zip(val) {
                    *acc += w * x;
                }
            }
        }
    }
}

/// A cache row as f32: the row itself for f32 caches, else converted into `buf`.
#[inline(always)]
fn as_f32<'a, T: KvElem>(row: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    if let Some(r) = T::as_f32_slice(row) {
        return r;
    }
    for (b, x) in buf.iter_mut().zip(row) {
        *b = x.to_f32();
    }
    buf
}

/// Dot product with eight independent accumulators so that it vectorises.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvCache, KvDtype, KvLayout};

    /// Attention of every group against a naive softmax over explicit rows, for
    /// `n` new tokens after `past` cached ones, in the cache's `dtype` (the naive
    /// side reads the same rounded keys and values).
    fn check(n_head: usize, n_kv: usize, d: usize, past: usize, n: usize, dtype: KvDtype) {
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: n_kv,
            head_dim: d,
        };
        let shape = AttnShape {
            n_head,
            n_kv_head: n_kv,
            head_dim: d,
        };
        let total = past + n;
        let val = |i: usize| ((i * 7919 % 113) as f32 / 113.0) - 0.5;
        let round = |x: f32| match dtype {
            KvDtype::F32 => x,
            KvDtype::F16 => f16::from_f32(x).to_f32(),
        };
        let k: Vec<f32> = (0..total * n_kv * d).map(|i| round(val(i))).collect();
        let v: Vec<f32> = (0..total * n_kv * d)
            .map(|i| round(val(i + 1000)))
            .collect();
        let q: Vec<f32> = (0..n * n_head * d).map(|i| val(i + 5000) * 3.0).collect();
        let mut cache = KvCache::new(layout, dtype);
        cache.reserve(total);
        cache.write(0, 0, &k, &v);
        cache.advance(total);
        let group = n_head / n_kv;
        let mut scratch = Scratch::default();
        for kvh in 0..n_kv {
            let mut out = vec![0f32; group * n * d];
            attend_group(
                &q,
                cache.layer(0),
                cache.capacity(),
                past,
                shape,
                kvh,
                &mut scratch,
                &mut out,
            );
            for head in kvh * group..(kvh + 1) * group {
                for t in 0..n {
                    let qr = &q[(t * n_head + head) * d..(t * n_head + head + 1) * d];
                    let s: Vec<f32> = (0..=past + t)
                        .map(|j| {
                            let kr = &k[(j * n_kv + kvh) * d..(j * n_kv + kvh + 1) * d];
                            qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for c in 0..d {
                        let want: f32 = (0..=past + t)
                            .map(|j| e[j] / z * v[(j * n_kv + kvh) * d + c])
                            .sum();
                        let got = out[((head - kvh * group) * n + t) * d + c];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{dtype:?} d={d} group={group} head {head} t {t} c {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Widths 8 (the portable loops) and 16, 64, 80 (the AVX-512 path where the CPU
    /// has it: one, four and five 16-lane chunks), groups of 1, 2, 3 and 5 heads
    /// (blocks of four and a remainder), decode and prefill chunks after a cached
    /// past, f32 and f16 caches.
    #[test]
    fn matches_naive_softmax_attention() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            check(4, 2, 8, 0, 5, dtype);
            check(2, 2, 16, 3, 1, dtype);
            check(9, 3, 64, 37, 1, dtype);
            check(9, 3, 64, 20, 6, dtype);
            check(10, 2, 80, 17, 3, dtype);
        }
    }
}
