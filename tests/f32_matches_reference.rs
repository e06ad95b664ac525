//! With exact dequantized weights (`--weights f32`), our forward matches
//! candle-transformers' `quantized_llama` run with its own dequantize-all switch
//! (`CANDLE_DEQUANTIZE_ALL`), on the default model.
//!
//! This file is its own test binary because the switch is process-wide: it is set
//! before any candle weight is built in this process.

mod common;

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
    drop(ours);
    compare_with_reference(&path, WeightsMode::F32, &prompt, 1e-3);
}
