//! With the exact dequantized weights, greedy chat generation answers
//! "What is the capital of France?" with Paris.

mod common;

use common::*;
use troupe::model::{Message, WeightsMode};
use troupe::sampling::{Sampler, SamplingParams};

#[test]
fn default_model_f32_answers_paris() {
    let model = real(WeightsMode::F32);
    let prompt = model
        .chat_template()
        .render(&[Message::user("What is the capital of France?")], true)
        .unwrap();
    let ids = model.tokenizer().encode_prompt(&prompt).unwrap();
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let mut c = cache(&model);
    let (out, _) = model
        .generate(&mut c, &ids, 24, &mut sampler, None, |_| Ok(()))
        .unwrap();
    let text = model.tokenizer().decode(&out).unwrap();
    assert!(text.contains("Paris"), "reply: {text:?}");
}
