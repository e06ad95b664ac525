//! Shared helpers of the behaviour tests: the tiny generated model, the real
//! default model, and logit comparisons.
#![allow(dead_code)]

pub mod serve;

use std::path::PathBuf;
use std::sync::OnceLock;

use troupe::model::fetch;
use troupe::model::tiny::{write_tiny_model, TinyConfig};
use troupe::model::{LoadOptions, Model, SeqInput, WeightsMode};
use troupe::{KvCache, KvDtype};

/// The tiny random-weight model, written once per test binary.
pub fn tiny_model_path() -> PathBuf {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_model(&path, &TinyConfig::default()).expect("write tiny model");
        (dir, path)
    })
    .1
    .clone()
}

/// The tiny model loaded in `mode`.
pub fn tiny(mode: WeightsMode) -> Model {
    Model::load(&tiny_model_path(), LoadOptions { weights: mode }).expect("load tiny model")
}

/// The default model's file. Tests that need it fail (never skip) when it is
/// missing: `.ci/run` fetches it first.
pub fn real_model_path() -> PathBuf {
    let path = fetch::default_model_path();
    assert!(
        path.exists(),
        "this test needs the default model at {}: run `cargo run -- model fetch` (CI={:?})",
        path.display(),
        std::env::var("CI").ok()
    );
    path
}

/// The default model loaded in `mode`.
pub fn real(mode: WeightsMode) -> Model {
    Model::load(&real_model_path(), LoadOptions { weights: mode }).expect("load default model")
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of the last token after feeding `tokens` to `cache` (one sequence alone).
pub fn feed(model: &Model, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let logits = model
        .forward(&mut [SeqInput { tokens, cache }])
        .expect("forward");
    logits.squeeze(0).unwrap().to_vec1().unwrap()
}

/// Feeds `chunks[i]` into `caches[i]` in one ragged batched forward; returns each
/// sequence's logits row.
pub fn feed_batch<T: AsRef<[u32]>>(
    model: &Model,
    caches: &mut [KvCache],
    chunks: &[T],
) -> Vec<Vec<f32>> {
    let mut seqs: Vec<SeqInput<'_>> = caches
        .iter_mut()
        .zip(chunks)
        .map(|(cache, t)| SeqInput {
            tokens: t.as_ref(),
            cache,
        })
        .collect();
    model.forward(&mut seqs).unwrap().to_vec2().unwrap()
}

/// Deterministic token ids in `[lo, hi)`.
pub fn tokens(n: usize, seed: usize, lo: u32, hi: u32) -> Vec<u32> {
    (0..n)
        .map(|i| lo + ((i * 7919 + seed * 104_729) % (hi - lo) as usize) as u32)
        .collect()
}

/// A new f32 cache for `model`.
pub fn cache(model: &Model) -> KvCache {
    model.new_cache(KvDtype::F32)
}

/// Starts an engine over `model` with `config`.
pub fn engine(model: Model, config: troupe::engine::EngineConfig) -> troupe::engine::Engine {
    troupe::engine::Engine::serve(std::sync::Arc::new(model), config).expect("engine")
}

/// Spawns a model actor over `model` with `config`.
pub fn actor(
    model: Model,
    config: troupe::engine::EngineConfig,
) -> kameo::actor::ActorRef<troupe::engine::ModelActor> {
    engine(model, config).actor().clone()
}

/// The `troupe` binary (built by `cargo test --workspace`, for the CLI package's own
/// tests), next to this test executable's directory.
pub fn troupe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join(format!("troupe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "the CLI tests need the troupe binary at {}: run `cargo test --workspace` or `cargo build -p troupe-cli`",
        bin.display()
    );
    bin
}

/// The Python of the test virtual environment (`target/py`, made by
/// `.ci/setup-python` from `tests/python/requirements.txt`), or `None` with the reason
/// printed. Under `CI` a missing environment fails the test instead.
pub fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let py = root.join("target/py/bin/python");
    if py.exists() {
        return Some(py);
    }
    let why = format!(
        "this test needs the Python test environment at {}: run `bash .ci/setup-python`",
        py.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why} (CI is set)");
    eprintln!("skipped: {why}");
    None
}

/// Indices of the five largest values.
pub fn top5(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[j].total_cmp(&v[i]));
    idx.truncate(5);
    idx
}

/// What `auto` resolves to on this CPU: the bf16 copy where it has avx512_bf16,
/// else the exact path's f32 copy; fails when the model fell back to something else
/// (e.g. native, when memory was short), so an auto test never silently repeats
/// another mode's.
pub fn assert_auto_path(model: &Model) {
    let chosen = &model.info().weights_chosen;
    let want = if troupe::model::has_native_bf16() {
        "a bf16 copy"
    } else {
        "an f32 copy"
    };
    assert!(
        chosen.starts_with("auto") && chosen.contains(want),
        "auto chose: {chosen}"
    );
}

/// An engine config with the given limits.
pub fn engine_config(
    max_step_tokens: usize,
    max_running: usize,
    kv_budget_bytes: usize,
) -> troupe::engine::EngineConfig {
    troupe::engine::EngineConfig {
        scheduler: troupe::engine::SchedulerConfig {
            max_step_tokens,
            max_running,
            kv_budget_bytes,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Prefills `prompt` in our forward (loaded in `mode`) and in candle-transformers'
/// `quantized_llama`, then decodes 8 tokens (the reference's greedy choices) in both,
/// asserting the logits differ by at most `tolerance` at every step.
pub fn compare_with_reference(
    path: &std::path::Path,
    mode: WeightsMode,
    prompt: &[u32],
    tolerance: f32,
) {
    use candle_core::{quantized::gguf_file, Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;
    let ours = Model::load(path, LoadOptions { weights: mode }).unwrap();
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let mut run_reference = |ids: &[u32], pos: usize| -> Vec<f32> {
        let input = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        reference
            .forward(&input, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut c = cache(&ours);
    let mut mine = feed(&ours, &mut c, prompt);
    let mut theirs = run_reference(prompt, 0);
    for step in 0..8 {
        let d = max_abs_diff(&mine, &theirs);
        eprintln!("step {step}: ours vs candle-transformers {d}");
        assert!(
            d <= tolerance,
            "step {step}: max abs difference {d} > {tolerance}"
        );
        // The same choice: each side's most likely token is among the other's five
        // most likely.
        let (a, b) = (
            troupe::sampling::argmax(&mine) as usize,
            troupe::sampling::argmax(&theirs) as usize,
        );
        assert!(
            top5(&theirs).contains(&a) && top5(&mine).contains(&b),
            "step {step}: our argmax {a}, theirs {b}"
        );
        let next = troupe::sampling::argmax(&theirs);
        mine = feed(&ours, &mut c, &[next]);
        theirs = run_reference(&[next], prompt.len() + step);
    }
}

/// An MCP server program installed by `.ci/setup-mcp` (`target/mcp-servers`, npm),
/// or `None` with the reason printed. Under `CI` a missing one fails the test.
pub fn mcp_server_bin(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/mcp-servers/node_modules/.bin").join(name);
    if bin.exists() {
        return Some(bin);
    }
    let why = format!(
        "this test needs the MCP server {} (npm): run `bash .ci/setup-mcp`",
        bin.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why} (CI is set)");
    eprintln!("skipped: {why}");
    None
}
