//! The file format of a cache on disk, shared by agent snapshots and the engine's
//! spill files: one safetensors file whose tensors `layer.{i}.k` / `layer.{i}.v` are
//! the cache's keys and values (`[n_kv_heads, len, head_dim]`), and whose metadata
//! key `troupe` holds a JSON [`Header`]: the format version, the model the cache
//! belongs to, its length and element type, and what the writer adds (an agent
//! snapshot's conversation; nothing for a spill file).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use crate::kv::{KvCache, KvDtype};
use crate::model::Model;

/// Version of the format; a file of another version is refused.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// What identifies the model a file's cache belongs to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ModelId {
    name: Option<String>,
    vocab_size: usize,
    pub(crate) layout: crate::kv::KvLayout,
    parameters: u64,
    fingerprint: String,
}

impl ModelId {
    /// The loaded model's.
    pub(crate) fn of(model: &Model) -> Self {
        Self {
            name: model.info().name.clone(),
            vocab_size: model.config().vocab_size,
            layout: model.config().kv_layout(),
            parameters: model.info().parameters,
            fingerprint: model.info().fingerprint.clone(),
        }
    }
}

/// The JSON header; `agent` is what the writer adds (an agent snapshot's
/// conversation, `None` in a spill file).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Header<A> {
    pub format: u32,
    pub model: ModelId,
    pub cache_len: usize,
    pub kv_dtype: Option<KvDtype>,
    pub agent: A,
}

/// How the tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// As f32, whatever the cache's type (agent snapshots: readable by any version).
    F32,
    /// In the cache's own element type (spill files: half the bytes for f16, no
    /// conversion).
    Native,
}

/// The file's bytes for `cache` under `header` (whose length and type fields must
/// describe `cache`).
pub(crate) fn encode<A: serde::Serialize>(
    header: &Header<A>,
    cache: Option<&KvCache>,
    stored: Stored,
) -> std::result::Result<Vec<u8>, String> {
    let meta = HashMap::from([(
        "troupe".to_string(),
        serde_json::to_string(header).map_err(|e| e.to_string())?,
    )]);
    let (dtype, layers) = match (cache, stored) {
        (None, _) => (Dtype::F32, Vec::new()),
        (Some(c), Stored::F32) => {
            let layers = c
                .to_f32_layers()
                .into_iter()
                .map(|(k, v)| {
                    let bytes = |t: Vec<f32>| t.iter().flat_map(|x| x.to_le_bytes()).collect();
                    (bytes(k), bytes(v))
                })
                .collect();
            (Dtype::F32, layers)
        }
        (Some(c), Stored::Native) => {
            let dtype = match c.dtype() {
                KvDtype::F32 => Dtype::F32,
                KvDtype::F16 => Dtype::F16,
            };
            (dtype, c.to_le_bytes_layers())
        }
    };
    let layout = header.model.layout;
    let shape = vec![layout.n_kv_heads, header.cache_len, layout.head_dim];
    let mut views = Vec::with_capacity(layers.len() * 2);
    for (i, (k, v)) in layers.iter().enumerate() {
        for (n, t) in [(format!("layer.{i}.k"), k), (format!("layer.{i}.v"), v)] {
            let view =
                TensorView::new(dtype, shape.clone(), t).map_err(|e| format!("tensor {n}: {e}"))?;
            views.push((n, view));
        }
    }
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// Why a file cannot be read back.
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// Not a readable file of this format.
    Corrupt(String),
    /// Another format version.
    Version(u32),
    /// Made with another model (the file's, the loaded one's).
    OtherModel(Box<(ModelId, ModelId)>),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Corrupt(why) => write!(f, "corrupt: {why}"),
            DecodeError::Version(v) => write!(
                f,
                "format version {v}, this troupe reads version {FORMAT_VERSION}"
            ),
            DecodeError::OtherModel(ids) => write!(
                f,
                "made with another model ({:?}), not the loaded one ({:?})",
                ids.0, ids.1
            ),
        }
    }
}

/// Reads a file's header and cache, checked against the model `here`.
pub(crate) fn decode<A: serde::de::DeserializeOwned>(
    data: &[u8],
    here: &ModelId,
) -> std::result::Result<(Header<A>, Option<KvCache>), DecodeError> {
    let corrupt = |why: String| DecodeError::Corrupt(why);
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(data).map_err(|e| corrupt(e.to_string()))?;
    let raw = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("troupe"))
        .ok_or_else(|| corrupt("no troupe header".into()))?;
    #[derive(serde::Deserialize)]
    struct Version {
        format: u32,
    }
    let v: Version = serde_json::from_str(raw).map_err(|e| corrupt(e.to_string()))?;
    if v.format != FORMAT_VERSION {
        return Err(DecodeError::Version(v.format));
    }
    let header: Header<A> = serde_json::from_str(raw).map_err(|e| corrupt(e.to_string()))?;
    if &header.model != here {
        return Err(DecodeError::OtherModel(Box::new((
            header.model,
            here.clone(),
        ))));
    }
    let tensors =
        safetensors::SafeTensors::deserialize(data).map_err(|e| corrupt(e.to_string()))?;
    let Some(dtype) = header.kv_dtype else {
        return Ok((header, None));
    };
    let layout = here.layout;
    let want = [layout.n_kv_heads, header.cache_len, layout.head_dim];
    let mut stored = None;
    let mut layers = Vec::with_capacity(layout.n_layers);
    for i in 0..layout.n_layers {
        let mut read = |n: String| -> std::result::Result<&[u8], DecodeError> {
            let t = tensors
                .tensor(&n)
                .map_err(|e| corrupt(format!("{n}: {e}")))?;
            if t.shape() != want {
                return Err(corrupt(format!("{n} has shape {:?}", t.shape())));
            }
            let ty = match t.dtype() {
                Dtype::F32 => KvDtype::F32,
                Dtype::F16 => KvDtype::F16,
                other => return Err(corrupt(format!("{n} is of type {other:?}"))),
            };
            if *stored.get_or_insert(ty) != ty {
                return Err(corrupt(format!("{n} is of another type than layer 0")));
            }
            Ok(t.data())
        };
        let k = read(format!("layer.{i}.k"))?;
        let v = read(format!("layer.{i}.v"))?;
        layers.push((k, v));
    }
    let cache = KvCache::from_le_bytes_layers(
        layout,
        dtype,
        stored.unwrap_or(dtype),
        header.cache_len,
        &layers,
    )
    .map_err(|e| corrupt(e.to_string()))?;
    Ok((header, Some(cache)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLayout;

    fn id() -> ModelId {
        ModelId {
            name: None,
            vocab_size: 10,
            layout: KvLayout {
                n_layers: 2,
                n_kv_heads: 2,
                head_dim: 4,
            },
            parameters: 1,
            fingerprint: "x".into(),
        }
    }

    fn filled(dtype: KvDtype, n: usize) -> KvCache {
        let layout = id().layout;
        let per = layout.n_kv_heads * n * layout.head_dim;
        let layers = (0..layout.n_layers)
            .map(|l| {
                let k = (0..per).map(|i| (i * 7 + l) as f32 * 0.125).collect();
                let v = (0..per).map(|i| -((i + l) as f32) * 0.5).collect();
                (k, v)
            })
            .collect();
        KvCache::from_f32_layers(layout, dtype, n, layers).unwrap()
    }

    #[test]
    fn native_and_f32_files_read_back_bit_for_bit() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            for stored in [Stored::Native, Stored::F32] {
                let c = filled(dtype, 5);
                let header = Header {
                    format: FORMAT_VERSION,
                    model: id(),
                    cache_len: 5,
                    kv_dtype: Some(dtype),
                    agent: None::<()>,
                };
                let bytes = encode(&header, Some(&c), stored).unwrap();
                let (h, back) = decode::<Option<()>>(&bytes, &id()).unwrap();
                let back = back.unwrap();
                assert_eq!((h.cache_len, back.len(), back.dtype()), (5, 5, dtype));
                assert_eq!(
                    back.to_f32_layers(),
                    c.to_f32_layers(),
                    "{dtype:?} {stored:?}"
                );
            }
        }
        // A cut file is corrupt, not a panic.
        let header = Header {
            format: FORMAT_VERSION,
            model: id(),
            cache_len: 5,
            kv_dtype: Some(KvDtype::F16),
            agent: None::<()>,
        };
        let bytes = encode(&header, Some(&filled(KvDtype::F16, 5)), Stored::Native).unwrap();
        let cut = &bytes[..bytes.len() - 3];
        assert!(matches!(
            decode::<Option<()>>(cut, &id()),
            Err(DecodeError::Corrupt(_))
        ));
    }
}
