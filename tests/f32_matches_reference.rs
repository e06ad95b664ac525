//! With exact dequantized weights (`--weights f32`), our forward matches
//! candle-transformers' `quantized_llama` run with its own dequantize-all switch
//! (`CANDLE_DEQUANTIZE_ALL`), on the default model.
//!
//! This file is its own test binary because the switch is process-wide: it is set
//! before any candle weight is built in this process.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::*;
use troupe::model::WeightsMode;

#[test]
fn default_model_f32_matches_candle_transformers_dequantized() {
    // SAFETY of set_var: this binary has one test, so no other thread reads the
    // environment concurrently.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = real_model_path();
    let ours = real(WeightsMode::F32);
    let prompt = ours
        .tokenizer()
        .encode("<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let mut c = cache(&ours);
    let mut mine = feed(&ours, &mut c, &prompt);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut theirs: Vec<f32> = reference
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for step in 0..8 {
        let d = max_abs_diff(&mine, &theirs);
        eprintln!("step {step}: max abs difference {d}");
        assert!(d <= 1e-3, "step {step}: max abs difference {d}");
        let next = troupe::sampling::argmax(&theirs);
        mine = feed(&ours, &mut c, &[next]);
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        theirs = reference
            .forward(&input, prompt.len() + step)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
}
