//! The per-sequence KV cache: the keys and values of every token a sequence has fed
//! through the model, per layer, in buffers that grow by amortised doubling.
//!
//! A [`KvCache`] is owned by exactly one sequence (an agent, or the request in flight
//! for it). The forward appends to it; nothing else writes it. Keys and values are
//! stored per layer as `[n_kv_heads, capacity, head_dim]`, so one head's keys are a
//! contiguous run of rows that the attention reads without copying.

use half::f16;

use crate::{Error, Result};

/// The shape of one model's cache: what a [`KvCache`] must match to be fed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvLayout {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Key/value heads per block.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats one token occupies across all layers, keys and values together.
    pub fn floats_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim
    }
}

impl std::fmt::Display for KvLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layers x {} kv heads x {} dims",
            self.n_layers, self.n_kv_heads, self.head_dim
        )
    }
}

/// Element type of the stored keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 4 bytes per element.
    F32,
    /// 2 bytes per element, converted on read (16 at a time with AVX-512): half the
    /// memory and half the bytes the attention reads, which makes batched decode
    /// faster (`troupe bench forward --kv-dtype f16|f32`). The default.
    #[default]
    F16,
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
    }
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// One buffer of keys or values, `[n_kv_heads, capacity, head_dim]`.
#[derive(Clone, Debug)]
pub(crate) enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// An element the attention can read from a cache buffer.
pub(crate) trait KvElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The slice itself when the element type is f32 (no conversion needed).
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]>;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn as_f32_slice(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl KvBuf {
    fn zeros(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvBuf::F32(vec![0.0; n]),
            KvDtype::F16 => KvBuf::F16(vec![f16::ZERO; n]),
        }
    }

    fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::F16(v) => v.len(),
        }
    }

    /// A buffer of `new_cap` rows per head holding the first `rows` rows of each head.
    fn regrow(&self, heads: usize, old_cap: usize, new_cap: usize, rows: usize, d: usize) -> Self {
        fn go<T: Copy + Default>(
            src: &[T],
            heads: usize,
            old_cap: usize,
            new_cap: usize,
            rows: usize,
            d: usize,
        ) -> Vec<T> {
            let mut dst = vec![T::default(); heads * new_cap * d];
            for h in 0..heads {
                let s = &src[h * old_cap * d..h * old_cap * d + rows * d];
                dst[h * new_cap * d..h * new_cap * d + rows * d].copy_from_slice(s);
            }
            dst
        }
        match self {
            KvBuf::F32(v) => KvBuf::F32(go(v, heads, old_cap, new_cap, rows, d)),
            KvBuf::F16(v) => KvBuf::F16(go(v, heads, old_cap, new_cap, rows, d)),
        }
    }

    /// Writes `src` rows (`[n_tokens, heads, d]`, token-major as the projections
    /// produce them) at row `pos` of each head.
    fn write_rows(&mut self, src: &[f32], pos: usize, heads: usize, cap: usize, d: usize) {
        fn go<T: KvElem>(
            dst: &mut [T],
            src: &[f32],
            pos: usize,
            heads: usize,
            cap: usize,
            d: usize,
        ) {
            let n_tokens = src.len() / (heads * d);
            for t in 0..n_tokens {
                for h in 0..heads {
                    let s = &src[(t * heads + h) * d..(t * heads + h + 1) * d];
                    let o = (h * cap + pos + t) * d;
                    for (x, y) in dst[o..o + d].iter_mut().zip(s) {
                        *x = T::from_f32(*y);
                    }
                }
            }
        }
        match self {
            KvBuf::F32(v) => go(v, src, pos, heads, cap, d),
            KvBuf::F16(v) => go(v, src, pos, heads, cap, d),
        }
    }
}

/// Keys and values of one layer.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: KvBuf,
    pub(crate) v: KvBuf,
}

/// The KV cache of one sequence.
///
/// Invariant: `len <= capacity`, and every layer buffer holds
/// `n_kv_heads * capacity * head_dim` elements of which the first `len` rows of
/// each head are meaningful.
#[derive(Debug)]
pub struct KvCache {
    layout: KvLayout,
    /// Tokens whose keys and values are stored.
    len: usize,
    /// Rows allocated per head.
    capacity: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache; allocates nothing until the first tokens arrive.
    pub fn new(layout: KvLayout, dtype: KvDtype) -> Self {
        Self {
            layout,
            len: 0,
            capacity: 0,
            layers: Self::empty_layers(layout, dtype),
        }
    }

    /// One empty (unallocated) buffer pair per layer: the buffers' variant is the
    /// cache's element type.
    fn empty_layers(layout: KvLayout, dtype: KvDtype) -> Vec<LayerKv> {
        (0..layout.n_layers)
            .map(|_| LayerKv {
                k: KvBuf::zeros(dtype, 0),
                v: KvBuf::zeros(dtype, 0),
            })
            .collect()
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows allocated per head (at least `len`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The model shape this cache belongs to.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Element type of the stored keys and values.
    pub fn dtype(&self) -> KvDtype {
        match self.layers.first().map(|l| &l.k) {
            Some(KvBuf::F16(_)) => KvDtype::F16,
            // A layout of no layers holds nothing, in any type.
            Some(KvBuf::F32(_)) | None => KvDtype::F32,
        }
    }

    /// Bytes the cache really holds: its allocated buffers, not just the used rows.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * self.dtype().size())
            .sum()
    }

    /// Bytes a cache of this layout and dtype holds per allocated token.
    pub fn bytes_per_token(layout: KvLayout, dtype: KvDtype) -> usize {
        layout.floats_per_token() * dtype.size()
    }

    /// Forgets every token from position `n` on (a rollback). Keeps the allocation.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Drops every token and the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
        self.capacity = 0;
        self.layers = Self::empty_layers(self.layout, self.dtype());
    }

    /// An independent copy holding the same tokens, allocated to fit them exactly:
    /// a memory copy, no recomputation.
    pub fn fork(&self) -> Self {
        let heads = self.layout.n_kv_heads;
        let d = self.layout.head_dim;
        let cap = self.len;
        let layers = if cap == 0 {
            Self::empty_layers(self.layout, self.dtype())
        } else {
            self.layers
                .iter()
                .map(|l| LayerKv {
                    k: l.k.regrow(heads, self.capacity, cap, self.len, d),
                    v: l.v.regrow(heads, self.capacity, cap, self.len, d),
                })
                .collect()
        };
        Self {
            layout: self.layout,
            len: self.len,
            capacity: cap,
            layers,
        }
    }

    /// Makes room for `total` tokens, doubling the capacity when it must grow so that
    /// appending one token at a time costs amortised O(1).
    pub fn reserve(&mut self, total: usize) {
        if total > self.capacity {
            self.grow_to(total.max(self.capacity * 2).max(16));
        }
    }

    /// Makes room for exactly `total` tokens when the capacity is smaller (one
    /// reallocation for a whole generation whose length is bounded in advance).
    pub fn reserve_exact(&mut self, total: usize) {
        if total > self.capacity {
            self.grow_to(total);
        }
    }

    fn grow_to(&mut self, new_cap: usize) {
        let heads = self.layout.n_kv_heads;
        let d = self.layout.head_dim;
        if self.capacity == 0 {
            let dtype = self.dtype();
            for l in &mut self.layers {
                l.k = KvBuf::zeros(dtype, heads * new_cap * d);
                l.v = KvBuf::zeros(dtype, heads * new_cap * d);
            }
        } else {
            for l in &mut self.layers {
                l.k = l.k.regrow(heads, self.capacity, new_cap, self.len, d);
                l.v = l.v.regrow(heads, self.capacity, new_cap, self.len, d);
            }
        }
        self.capacity = new_cap;
    }

    /// Checks that the cache fits `layout`.
    pub(crate) fn check_layout(&self, layout: KvLayout) -> Result<()> {
        if self.layout != layout {
            return Err(Error::CacheMismatch {
                expected: layout.to_string(),
                found: self.layout.to_string(),
            });
        }
        Ok(())
    }

    /// Writes the keys and values of tokens `pos..pos + n` of one layer
    /// (`[n, n_kv_heads, head_dim]` each). The caller has reserved the room.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (heads, cap, d) = (self.layout.n_kv_heads, self.capacity, self.layout.head_dim);
        let l = &mut self.layers[layer];
        l.k.write_rows(k, pos, heads, cap, d);
        l.v.write_rows(v, pos, heads, cap, d);
    }

    /// Marks `n` more tokens as held, after every layer was written.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
    }

    /// The buffers of one layer.
    pub(crate) fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    /// A cache holding `len` tokens whose keys and values per layer are given as f32
    /// `[n_kv_heads, len, head_dim]` (what [`to_f32_layers`](Self::to_f32_layers)
    /// returns).
    pub fn from_f32_layers(
        layout: KvLayout,
        dtype: KvDtype,
        len: usize,
        layers: Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        let per = layout.n_kv_heads * len * layout.head_dim;
        check_layer_sizes(&layout, per, layers.iter().map(|(k, v)| (k.len(), v.len())))?;
        if len == 0 {
            return Ok(Self::new(layout, dtype));
        }
        let convert = |x: Vec<f32>| match dtype {
            KvDtype::F32 => KvBuf::F32(x),
            KvDtype::F16 => KvBuf::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
        };
        // With capacity == len the given buffers have exactly the cache's layout.
        Ok(Self {
            layout,
            len,
            capacity: len,
            layers: layers
                .into_iter()
                .map(|(k, v)| LayerKv {
                    k: convert(k),
                    v: convert(v),
                })
                .collect(),
        })
    }

    /// Keys and values of every layer as f32 `[n_kv_heads, len, head_dim]` vectors,
    /// for snapshots and tests.
    pub fn to_f32_layers(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        let (heads, d) = (self.layout.n_kv_heads, self.layout.head_dim);
        let take = |b: &KvBuf| -> Vec<f32> {
            let mut out = Vec::with_capacity(heads * self.len * d);
            for h in 0..heads {
                let r = h * self.capacity * d..(h * self.capacity + self.len) * d;
                match b {
                    KvBuf::F32(v) => out.extend_from_slice(&v[r]),
                    KvBuf::F16(v) => out.extend(v[r].iter().map(|x| x.to_f32())),
                }
            }
            out
        };
        self.layers
            .iter()
            .map(|l| (take(&l.k), take(&l.v)))
            .collect()
    }
}

impl KvCache {
    /// Keys and values of every layer as little-endian bytes of the cache's own
    /// element type, `[n_kv_heads, len, head_dim]` each (what a spill file stores: no
    /// conversion, so a cache read back is bit for bit the one written).
    pub fn to_le_bytes_layers(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let (heads, d) = (self.layout.n_kv_heads, self.layout.head_dim);
        let take = |b: &KvBuf| -> Vec<u8> {
            let mut out = Vec::with_capacity(heads * self.len * d * self.dtype().size());
            for h in 0..heads {
                let r = h * self.capacity * d..(h * self.capacity + self.len) * d;
                match b {
                    KvBuf::F32(v) => v[r].iter().for_each(|x| out.extend(x.to_le_bytes())),
                    KvBuf::F16(v) => v[r].iter().for_each(|x| out.extend(x.to_le_bytes())),
                }
            }
            out
        };
        self.layers
            .iter()
            .map(|l| (take(&l.k), take(&l.v)))
            .collect()
    }

    /// A cache of `dtype` holding `len` tokens, from per-layer keys and values given as
    /// little-endian bytes of `stored` elements (f32 or f16), `[n_kv_heads, len,
    /// head_dim]` each; elements of another type than `dtype` are converted.
    pub fn from_le_bytes_layers(
        layout: KvLayout,
        dtype: KvDtype,
        stored: KvDtype,
        len: usize,
        layers: &[(&[u8], &[u8])],
    ) -> Result<Self> {
        let per = layout.n_kv_heads * len * layout.head_dim * stored.size();
        check_layer_sizes(&layout, per, layers.iter().map(|(k, v)| (k.len(), v.len())))?;
        if len == 0 {
            return Ok(Self::new(layout, dtype));
        }
        let convert = |b: &[u8]| -> KvBuf {
            match (stored, dtype) {
                (KvDtype::F32, KvDtype::F32) => KvBuf::F32(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                (KvDtype::F32, KvDtype::F16) => KvBuf::F16(
                    b.chunks_exact(4)
                        .map(|c| f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                        .collect(),
                ),
                (KvDtype::F16, KvDtype::F16) => KvBuf::F16(
                    b.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ),
                (KvDtype::F16, KvDtype::F32) => KvBuf::F32(
                    b.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                ),
            }
        };
        Ok(Self {
            layout,
            len,
            capacity: len,
            layers: layers
                .iter()
                .map(|(k, v)| LayerKv {
                    k: convert(k),
                    v: convert(v),
                })
                .collect(),
        })
    }
}

/// `Ok` when there is one (keys, values) pair per layer of `layout`, each of `per`
/// elements; otherwise the mismatch, named.
fn check_layer_sizes(
    layout: &KvLayout,
    per: usize,
    lens: impl ExactSizeIterator<Item = (usize, usize)>,
) -> Result<()> {
    let n = lens.len();
    let mut lens = lens;
    if n != layout.n_layers || lens.any(|(k, v)| k != per || v != per) {
        return Err(Error::CacheMismatch {
            expected: layout.to_string(),
            found: format!("{n} layers of other sizes"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
        }
    }

    /// Appends `n` tokens whose every element is `base + token index`.
    fn append(c: &mut KvCache, n: usize, base: f32) {
        let pos = c.len();
        c.reserve(pos + n);
        let per = c.layout().n_kv_heads * c.layout().head_dim;
        let k: Vec<f32> = (0..n * per)
            .map(|i| base + (pos + i / per) as f32)
            .collect();
        for l in 0..c.layout().n_layers {
            c.write(l, pos, &k, &k);
        }
        c.advance(n);
    }

    #[test]
    fn grows_by_doubling_and_keeps_contents() {
        let mut c = KvCache::new(layout(), KvDtype::F32);
        assert_eq!(c.bytes(), 0);
        let mut caps = Vec::new();
        for _ in 0..100 {
            append(&mut c, 1, 0.0);
            caps.push(c.capacity());
        }
        caps.dedup();
        assert_eq!(caps, vec![16, 32, 64, 128]);
        assert_eq!(
            c.bytes(),
            128 * KvCache::bytes_per_token(layout(), KvDtype::F32)
        );
        let (k, _) = &c.to_f32_layers()[1];
        // Head 1, token 57: every element is 57.
        assert_eq!(k[(100 + 57) * 4], 57.0);
    }

    #[test]
    fn fork_is_independent_and_truncate_rolls_back() {
        let mut a = KvCache::new(layout(), KvDtype::F16);
        append(&mut a, 10, 0.0);
        let mut b = a.fork();
        assert_eq!(b.len(), 10);
        assert_eq!(b.to_f32_layers(), a.to_f32_layers());
        append(&mut b, 5, 100.0);
        append(&mut a, 3, 200.0);
        assert_eq!(a.len(), 13);
        assert_eq!(b.len(), 15);
        assert_eq!(a.to_f32_layers()[0].0[10 * 4], 210.0);
        assert_eq!(b.to_f32_layers()[0].0[10 * 4], 110.0);
        a.truncate(4);
        assert_eq!(a.len(), 4);
        assert_eq!(a.to_f32_layers()[0].0.len(), 2 * 4 * 4);
    }
}
