//! One sequence through our forward matches candle-transformers' `quantized_llama`
//! (native weights: both run candle's quantized kernels on the same tensors).

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::*;
use troupe::model::WeightsMode;

/// Our native forward against candle-transformers, within `tolerance`.
fn check(path: &Path, prompt: &[u32], tolerance: f32) {
    compare_with_reference(path, WeightsMode::Native, prompt, tolerance);
}

#[test]
fn tiny_matches_candle_transformers() {
    check(&tiny_model_path(), &tokens(37, 1, 3, 270), 1e-3);
}

#[test]
fn default_model_matches_candle_transformers() {
    let path = real_model_path();
    let model = real(WeightsMode::Native);
    let prompt = model
        .tokenizer()
        .encode("<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    drop(model);
    // With Q4_1 weights candle quantizes every activation row to 8 bits before each
    // product, so float-level differences in attention flip roundings and grow
    // through 30 layers: candle-transformers disagrees with itself by far more than
    // 1e-3 between prefilling a prompt and decoding its last token from the cache
    // (0.84 measured). Our forward's attention sums in another order, a perturbation
    // of the same kind, so ours and theirs may differ by up to two such spreads (one
    // per side); a wrong forward differs by tens. The 1e-3 check on the default model
    // runs with exact weights in f32_matches_reference.rs (4e-5 measured).
    let self_spread = reference_self_spread(&path, &prompt);
    assert!(self_spread > 1e-3, "{self_spread}");
    // Capped: a spread of several logits would mean the reference itself is off.
    assert!(
        self_spread < 1.5,
        "candle-transformers' own spread {self_spread}"
    );
    check(&path, &prompt, 2.0 * self_spread);
}

/// How far candle-transformers' logits for the last prompt token move between a full
/// prefill and a shorter prefill followed by cached decode steps (the largest of a
/// few split points).
fn reference_self_spread(path: &Path, prompt: &[u32]) -> f32 {
    let load = || {
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap()
    };
    let t = |ids: &[u32]| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let n = prompt.len();
    let full: Vec<f32> = load()
        .forward(&t(prompt), 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    // Split the prompt at several points: prefill the head, then feed the tail one
    // token at a time from the cache.
    let mut spread = 0f32;
    for tail in 1..=4 {
        let mut inc = load();
        inc.forward(&t(&prompt[..n - tail]), 0).unwrap();
        let mut last = Vec::new();
        for i in n - tail..n {
            last = inc
                .forward(&t(&prompt[i..=i]), i)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        let d = max_abs_diff(&full, &last);
        eprintln!("candle-transformers, last {tail} prompt tokens decoded from the cache: {d}");
        spread = spread.max(d);
    }
    spread
}
