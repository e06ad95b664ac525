//! Agent snapshots: the whole agent (config, conversation, token log, KV cache) in one
//! safetensors file, the cache as tensors and the rest as JSON metadata, written to a
//! uniquely named temporary file in the target's folder, synced, and renamed into
//! place (then the folder is synced): a crash or two concurrent saves leave one
//! whole snapshot, never a mix, and a failed save leaves no temporary file.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::AgentConfig;
use crate::kv::{KvCache, KvDtype};
use crate::model::{Message, Model};
use crate::{Error, Result};

/// Version of the snapshot format; a file of another version is refused.
const FORMAT_VERSION: u32 = 1;

/// The non-tensor part of a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Snapshot {
    pub config: AgentConfig,
    pub messages: Vec<Message>,
    pub log: Vec<u32>,
}

/// What identifies the model a snapshot's cache belongs to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct ModelId {
    name: Option<String>,
    vocab_size: usize,
    layout: crate::kv::KvLayout,
    parameters: u64,
    fingerprint: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Header {
    format: u32,
    model: ModelId,
    cache_len: usize,
    kv_dtype: Option<KvDtype>,
    agent: Snapshot,
}

fn model_id(model: &Model) -> ModelId {
    ModelId {
        name: model.info().name.clone(),
        vocab_size: model.config().vocab_size,
        layout: model.config().kv_layout(),
        parameters: model.info().parameters,
        fingerprint: model.info().fingerprint.clone(),
    }
}

fn write_err(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Snapshot {
        path: path.to_path_buf(),
        what: format!("cannot be written: {why}"),
    }
}

fn corrupt(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Snapshot {
        path: path.to_path_buf(),
        what: format!("corrupt: {why}"),
    }
}

pub(super) fn save(
    path: &Path,
    snap: Snapshot,
    cache: Option<&KvCache>,
    model: &Model,
) -> Result<()> {
    let _span = tracing::info_span!(
        "snapshot_save",
        path = %path.display(),
        cached_tokens = cache.map_or(0, KvCache::len),
    )
    .entered();
    let header = Header {
        format: FORMAT_VERSION,
        model: model_id(model),
        cache_len: cache.map_or(0, KvCache::len),
        kv_dtype: cache.map(KvCache::dtype),
        agent: snap,
    };
    let meta = HashMap::from([(
        "troupe".to_string(),
        serde_json::to_string(&header).map_err(|e| write_err(path, e))?,
    )]);
    let layers = cache.map(KvCache::to_f32_layers).unwrap_or_default();
    let layout = model.config().kv_layout();
    let len = header.cache_len;
    let bytes: Vec<(String, Vec<u8>)> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, (k, v))| {
            [(format!("layer.{i}.k"), k), (format!("layer.{i}.v"), v)].map(|(n, t)| {
                (
                    n,
                    t.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
                )
            })
        })
        .collect();
    let shape = vec![layout.n_kv_heads, len, layout.head_dim];
    let views = bytes
        .iter()
        .map(|(n, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| write_err(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| write_err(path, e))?;
    write_durably(path, &bytes)
}

/// Writes `bytes` to `path` atomically and durably: a unique temporary file in the
/// same folder (removed if anything fails), `sync_all`, a rename over `path`, and a
/// sync of the folder so the rename itself survives a crash.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".troupe-snapshot-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| Error::Io(e.error))?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

pub(super) fn load(path: &Path, model: &Model) -> Result<(Snapshot, Option<KvCache>)> {
    let _span = tracing::info_span!("snapshot_load", path = %path.display()).entered();
    let data = std::fs::read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).map_err(|e| corrupt(path, e))?;
    let header: Header = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("troupe"))
        .ok_or_else(|| corrupt(path, "no troupe header"))
        .and_then(|h| serde_json::from_str(h).map_err(|e| corrupt(path, e)))?;
    if header.format != FORMAT_VERSION {
        return Err(Error::Snapshot {
            path: path.to_path_buf(),
            what: format!(
                "format version {}, this troupe reads version {FORMAT_VERSION}",
                header.format
            ),
        });
    }
    let here = model_id(model);
    if header.model != here {
        return Err(Error::Snapshot {
            path: path.to_path_buf(),
            what: format!(
                "made with another model ({:?}), not the loaded one ({:?})",
                header.model, here
            ),
        });
    }
    let tensors = safetensors::SafeTensors::deserialize(&data).map_err(|e| corrupt(path, e))?;
    let cache = match header.kv_dtype {
        None => None,
        Some(dtype) => {
            let layout = here.layout;
            let mut layers = Vec::with_capacity(layout.n_layers);
            for i in 0..layout.n_layers {
                let read = |n: String| -> Result<Vec<f32>> {
                    let t = tensors
                        .tensor(&n)
                        .map_err(|e| corrupt(path, format!("{n}: {e}")))?;
                    if t.shape() != [layout.n_kv_heads, header.cache_len, layout.head_dim] {
                        return Err(corrupt(path, format!("{n} has shape {:?}", t.shape())));
                    }
                    Ok(t.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect())
                };
                layers.push((read(format!("layer.{i}.k"))?, read(format!("layer.{i}.v"))?));
            }
            Some(KvCache::from_f32_layers(
                layout,
                dtype,
                header.cache_len,
                layers,
            )?)
        }
    };
    if header.cache_len > header.agent.log.len() {
        return Err(corrupt(path, "the cache holds more tokens than the log"));
    }
    Ok((header.agent, cache))
}
