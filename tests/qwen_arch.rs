//! The Qwen architectures on tiny random-weight GGUFs written here: with exact f32
//! weights our forward equals candle-transformers' `quantized_qwen2` /
//! `quantized_qwen3` within 1e-4 (prefill, then cached decode steps); a sequence's
//! logits do not depend on its batch (bitwise, fixed modes); cached decoding equals
//! recomputing the prefix.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Tensor};
use common::*;
use troupe::model::arch::Arch;
use troupe::model::tiny::{write_tiny_model, TinyConfig};
use troupe::model::{LoadOptions, Model, WeightsMode};
use troupe::KvCache;

/// A tiny model of `arch`: qwen2 with an untied head, qwen3 with a head width of its
/// own (32, while the width over the heads is 16) and its head tied to the embedding.
fn tiny_config(arch: Arch, linear: GgmlDType, embedding: GgmlDType) -> TinyConfig {
    TinyConfig {
        arch,
        linear_dtype: linear,
        embedding_dtype: embedding,
        untied_head: arch == Arch::Qwen2,
        head_dim: (arch == Arch::Qwen3).then_some(32),
        seed: 11,
        ..TinyConfig::default()
    }
}

fn write(dir: &Path, cfg: &TinyConfig) -> PathBuf {
    let path = dir.join(format!("{}-{:?}.gguf", cfg.arch, cfg.linear_dtype));
    write_tiny_model(&path, cfg).unwrap();
    path
}

/// Copies the GGUF at `src` to `dst` with `extra` metadata added and the tensor
/// named `without` (if any) left out.
fn rewrite(src: &Path, dst: &Path, extra: &[(&str, gguf_file::Value)], without: &str) {
    let mut f = std::fs::File::open(src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    meta.extend(extra.iter().map(|(k, v)| (*k, v)));
    let kept: Vec<(String, candle_core::quantized::QTensor)> = ct
        .tensor_infos
        .keys()
        .filter(|n| n.as_str() != without)
        .map(|n| (n.clone(), ct.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        kept.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &meta, &refs).unwrap();
}

fn load(path: &Path, mode: WeightsMode) -> Model {
    Model::load(path, LoadOptions { weights: mode }).unwrap()
}

/// candle-transformers' model of the architecture, one sequence.
enum Reference {
    Qwen2(candle_transformers::models::quantized_qwen2::ModelWeights),
    Qwen3(candle_transformers::models::quantized_qwen3::ModelWeights),
}

impl Reference {
    fn load(path: &Path, arch: Arch) -> Self {
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        match arch {
            Arch::Qwen2 => Self::Qwen2(
                candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
                    ct,
                    &mut f,
                    &Device::Cpu,
                )
                .unwrap(),
            ),
            Arch::Qwen3 => Self::Qwen3(
                candle_transformers::models::quantized_qwen3::ModelWeights::from_gguf(
                    ct,
                    &mut f,
                    &Device::Cpu,
                )
                .unwrap(),
            ),
            Arch::Llama => unreachable!("the llama reference is in reference_equivalence.rs"),
        }
    }

    /// Logits of the last of `ids`, fed at position `pos`.
    fn forward(&mut self, ids: &[u32], pos: usize) -> Vec<f32> {
        let x = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = match self {
            Self::Qwen2(m) => m.forward(&x, pos).unwrap(),
            Self::Qwen3(m) => m.forward(&x, pos).unwrap(),
        };
        out.flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// With exact f32 weights everywhere, our forward and candle-transformers' agree
/// within 1e-4 on a prefill and on 8 decode steps from the cache.
fn check_reference(arch: Arch) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &tiny_config(arch, GgmlDType::F32, GgmlDType::F32),
    );
    // candle-transformers' qwen3 computes its rotary tables in f16 unless the file
    // says its dtype is f32 (`general.dtype` 0): the exact comparison wants f32.
    let exact = dir.path().join("exact.gguf");
    rewrite(
        &path,
        &exact,
        &[("general.dtype", gguf_file::Value::U32(0))],
        "",
    );
    let path = exact;
    let ours = load(&path, WeightsMode::F32);
    assert_eq!(ours.config().arch, arch);
    let mut reference = Reference::load(&path, arch);
    let prompt = tokens(29, 4, 3, 270);
    let mut c = cache(&ours);
    let mut mine = feed(&ours, &mut c, &prompt);
    let mut theirs = reference.forward(&prompt, 0);
    for step in 0..8 {
        let d = max_abs_diff(&mine, &theirs);
        eprintln!("{arch} step {step}: ours vs candle-transformers {d}");
        assert!(d <= 1e-4, "{arch} step {step}: max abs difference {d}");
        // A real difference would show: the logits are not all alike.
        let spread = theirs.iter().cloned().fold(f32::MIN, f32::max)
            - theirs.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 0.5, "{arch}: degenerate logits ({spread})");
        let next = troupe::sampling::argmax(&theirs);
        mine = feed(&ours, &mut c, &[next]);
        theirs = reference.forward(&[next], prompt.len() + step);
    }
}

#[test]
fn qwen2_matches_candle_transformers_on_exact_weights() {
    check_reference(Arch::Qwen2);
}

#[test]
fn qwen3_matches_candle_transformers_on_exact_weights() {
    check_reference(Arch::Qwen3);
}

/// Six sequences at different positions fed ragged chunks together, then one
/// decode step each: every row equals the same sequence fed alone, bitwise.
fn assert_batch_invariant(model: &Model, label: &str) {
    let mut caches: Vec<KvCache> = (0..6)
        .map(|i| {
            let mut c = cache(model);
            feed(model, &mut c, &tokens(2 + 7 * i, i, 3, 270));
            c
        })
        .collect();
    let mut alone: Vec<KvCache> = caches.iter().map(KvCache::fork).collect();
    for round in 0..2 {
        let chunks: Vec<Vec<u32>> = (0..6)
            .map(|i| {
                tokens(
                    if round == 1 || i % 3 == 0 { 1 } else { 3 + i },
                    50 + i,
                    3,
                    270,
                )
            })
            .collect();
        let batched: Vec<Vec<f32>> = feed_batch(model, &mut caches, &chunks);
        for (i, c) in alone.iter_mut().enumerate() {
            let one = feed(model, c, &chunks[i]);
            assert_eq!(one, batched[i], "{label}: round {round}, sequence {i}");
        }
    }
}

#[test]
fn qwen_models_are_bitwise_batch_invariant_in_fixed_modes() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let path = write(
            dir.path(),
            &tiny_config(arch, GgmlDType::Q4_1, GgmlDType::Q8_0),
        );
        for mode in [
            WeightsMode::Native,
            WeightsMode::F32,
            WeightsMode::Q8_0,
            WeightsMode::Bf16,
        ] {
            assert_batch_invariant(&load(&path, mode), &format!("{arch} {mode}"));
        }
    }
}

/// Prefill 40, then decode 12 one by one: each step equals recomputing the whole
/// prefix at once.
#[test]
fn qwen_cached_decoding_equals_recompute() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let path = write(
            dir.path(),
            &tiny_config(arch, GgmlDType::Q4_1, GgmlDType::Q8_0),
        );
        for mode in [WeightsMode::F32, WeightsMode::Auto] {
            let model = load(&path, mode);
            let all = tokens(52, 9, 3, 270);
            let mut inc = cache(&model);
            feed(&model, &mut inc, &all[..40]);
            for i in 40..52 {
                let step = feed(&model, &mut inc, &all[i..=i]);
                let whole = feed(&model, &mut cache(&model), &all[..=i]);
                let d = max_abs_diff(&step, &whole);
                assert!(d <= 1e-3, "{arch} {mode} position {i}: {d}");
            }
        }
    }
}

/// A qwen2 file without its Q bias, or a qwen3 file without its head norms, is a
/// named error (the tensor), not a panic.
#[test]
fn missing_architecture_tensors_are_named_errors() {
    use troupe::Error;
    let dir = tempfile::tempdir().unwrap();
    for (arch, missing) in [
        (Arch::Qwen2, "blk.1.attn_q.bias"),
        (Arch::Qwen3, "blk.0.attn_k_norm.weight"),
    ] {
        let path = write(
            dir.path(),
            &tiny_config(arch, GgmlDType::Q4_1, GgmlDType::Q8_0),
        );
        let cut = dir.path().join(format!("{arch}-cut.gguf"));
        rewrite(&path, &cut, &[], missing);
        match Model::load(&cut, LoadOptions::default()) {
            Err(Error::Tensor { name, reason }) => {
                assert_eq!(name, missing);
                assert_eq!(reason, "missing");
            }
            Err(other) => panic!("{arch}: expected a Tensor error, got {other}"),
            Ok(_) => panic!("{arch}: loaded without {missing}"),
        }
    }
}
