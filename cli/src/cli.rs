//! The command line's pieces: one module per command family, and the helpers they
//! share (the runtime, starting a model actor, JSON reports, one-line previews).

pub mod bench;
pub mod chat;
pub mod generate;
pub mod info;
pub mod loadtest;
pub mod mcp;
pub mod run;
pub mod serve;
pub mod trace;
pub mod workflow;

use anyhow::Context;
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{LoadOptions, WeightsMode};
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

/// The `--spill` folder of this invocation, for the model actors the commands start.
pub(crate) static SPILL: std::sync::OnceLock<Option<std::path::PathBuf>> =
    std::sync::OnceLock::new();

/// The names of the weights modes, as `--weights` takes them.
pub(crate) const WEIGHTS: &[&str] = &["auto", "native", "f32", "q8_0", "bf16", "exact"];

/// The names of the KV element types.
pub(crate) const KV_DTYPES: &[&str] = &["f16", "f32"];

/// A clap value parser for a library enum, by its serde name: the library knows
/// nothing of clap, and `--help` still lists the choices.
pub(crate) fn named<T>(
    names: &'static [&'static str],
) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names)
        .try_map(|s| serde_json::from_value::<T>(serde_json::Value::String(s)))
}

/// The engine settings the global flags give: the `--kv-dtype` (default f16) and the
/// `--spill` folder.
pub(crate) fn engine_config() -> EngineConfig {
    EngineConfig {
        kv_dtype: KV_DTYPE.get().copied().unwrap_or_default(),
        spill: SPILL.get().cloned().flatten(),
        ..EngineConfig::default()
    }
}

/// Loads the model at `path` and starts its engine (call inside [`runtime`]) with
/// the global flags' settings ([`engine_config`]).
pub(crate) fn start_model(path: &std::path::Path, weights: WeightsMode) -> anyhow::Result<Engine> {
    let config = engine_config();
    Engine::start(path, LoadOptions { weights }, config)
        .with_context(|| format!("loading {}", path.display()))
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
