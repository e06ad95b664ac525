//! With the exact dequantized weights, greedy chat generation answers
//! "What is the capital of France?" with Paris; the bf16 modes (`bf16`, and `auto`
//! where the CPU has avx512_bf16) answer with the same tokens.

mod common;

use common::*;
use troupe::model::{Message, WeightsMode};
use troupe::sampling::{Sampler, SamplingParams};

/// The greedy reply of the default model in `mode`.
fn answer(mode: WeightsMode) -> Vec<u32> {
    let model = real(mode);
    let prompt = model
        .chat_template()
        .render(&[Message::user("What is the capital of France?")], true)
        .unwrap();
    let ids = model.tokenizer().encode_prompt(&prompt).unwrap();
    let sampler = Sampler::new(SamplingParams::default()).unwrap();
    let mut c = cache(&model);
    let seq = troupe::engine::Sequence::new(ids, sampler, None, &[], 24, false);
    troupe::engine::generate(&model, &mut c, seq, |_| {})
        .unwrap()
        .tokens
}

#[test]
fn bf16_modes_answer_with_the_tokens_of_f32() {
    let exact = answer(WeightsMode::F32);
    assert_eq!(answer(WeightsMode::Bf16), exact, "bf16");
    assert_eq!(answer(WeightsMode::Auto), exact, "auto");
}

#[test]
fn default_model_f32_answers_paris() {
    let model = real(WeightsMode::F32);
    let text = model.tokenizer().decode(&answer(WeightsMode::F32)).unwrap();
    assert!(text.contains("Paris"), "reply: {text:?}");
}
