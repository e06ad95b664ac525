//! The command line's pieces: one module per command family, and the helpers they
//! share (the runtime, starting a model actor, JSON reports, one-line previews).

pub mod bench;
pub mod chat;
pub mod info;
pub mod run;
pub mod trace;
pub mod workflow;

use std::sync::Arc;

use anyhow::Context;
use kameo::actor::{ActorRef, Spawn};
use troupe::engine::{EngineConfig, ModelActor};
use troupe::model::{LoadOptions, Model, WeightsMode};
use troupe::KvDtype;

/// The async runtime of the commands that run actors: two workers (the engine's
/// forward runs on its own thread).
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The `--kv-dtype` of this invocation, for the model actors the commands start.
pub(crate) static KV_DTYPE: std::sync::OnceLock<KvDtype> = std::sync::OnceLock::new();

/// Loads the model at `path` and spawns its model actor (call inside [`runtime`]),
/// whose agents' caches take the `--kv-dtype` given (default f16).
pub(crate) fn start_model(
    path: &std::path::Path,
    weights: WeightsMode,
) -> anyhow::Result<(Arc<Model>, ActorRef<ModelActor>)> {
    let model = Arc::new(
        Model::load(path, LoadOptions { weights })
            .with_context(|| format!("loading {}", path.display()))?,
    );
    let config = EngineConfig {
        kv_dtype: KV_DTYPE.get().copied().unwrap_or_default(),
        ..EngineConfig::default()
    };
    let engine = ModelActor::spawn(ModelActor::new(model.clone(), config)?);
    Ok((model, engine))
}

/// `text` on one line (newlines become `sep`), cut after `max` characters with `…`.
pub(crate) fn one_line(text: &str, max: usize, sep: &str) -> String {
    let line = text.replace('\n', sep);
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

/// Writes a report as pretty JSON and says so on stderr.
pub(crate) fn write_json(
    path: &std::path::Path,
    value: &impl serde::Serialize,
) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
