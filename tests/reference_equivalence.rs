//! One sequence through our forward matches candle-transformers' `quantized_llama`
//! (native weights: both run candle's quantized kernels on the same tensors).

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::*;
use troupe::model::{LoadOptions, Model, WeightsMode};

/// Prefill a prompt, then decode 8 tokens; compare the logits at each step.
fn check(path: &Path, prompt: &[u32]) {
    let ours = Model::load(path, LoadOptions { weights: WeightsMode::Native }).unwrap();
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();

    let mut c = cache(&ours);
    let mut mine = feed(&ours, &mut c, prompt);
    let input = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut theirs: Vec<f32> = reference.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    for step in 0..8 {
        let d = max_abs_diff(&mine, &theirs);
        assert!(d <= 1e-3, "step {step}: max abs difference {d}");
        let next = troupe::sampling::argmax(&theirs);
        mine = feed(&ours, &mut c, &[next]);
        let input = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        theirs = reference
            .forward(&input, prompt.len() + step)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
}

#[test]
fn tiny_matches_candle_transformers() {
    check(&tiny_model_path(), &tokens(37, 1, 3, 270));
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
    check(&path, &prompt);
}
