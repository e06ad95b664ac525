//! Agent snapshots: the whole agent (config, conversation, token log, KV cache) in one
//! safetensors file, the cache as tensors and the rest as JSON metadata, written to a
//! uniquely named temporary file in the target's folder, synced, and renamed into
//! place (then the folder is synced): a crash or two concurrent saves leave one
//! whole snapshot, never a mix, and a failed save leaves no temporary file. The file
//! format (shared with the engine's spill files) is
//! [`cache_file`](crate::engine::cache_file)'s.

use std::path::Path;

use super::AgentConfig;
use crate::engine::cache_file::{self, Header, ModelId, Stored, FORMAT_VERSION};
use crate::kv::KvCache;
use crate::model::{Message, Model};
use crate::{Error, Result};

/// The non-tensor part of a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Snapshot {
    pub config: AgentConfig,
    pub messages: Vec<Message>,
    pub log: Vec<u32>,
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
        model: ModelId::of(model),
        cache_len: cache.map_or(0, KvCache::len),
        kv_dtype: cache.map(KvCache::dtype),
        agent: snap,
    };
    // As f32 whatever the cache's type, as every version of the format was written.
    let bytes = cache_file::encode(&header, cache, Stored::F32).map_err(|e| write_err(path, e))?;
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
    let (header, cache) =
        cache_file::decode::<Snapshot>(&data, &ModelId::of(model)).map_err(|e| {
            Error::Snapshot {
                path: path.to_path_buf(),
                what: e.to_string(),
            }
        })?;
    if header.cache_len > header.agent.log.len() {
        return Err(corrupt(path, "the cache holds more tokens than the log"));
    }
    Ok((header.agent, cache))
}
