//! Cached decoding equals recomputing the prefix; truncation rolls back exactly;
//! forked caches evolve independently.

mod common;

use common::*;
use troupe::model::{Model, WeightsMode};

/// Prefill 100 then decode 20 one by one == prefill all 120 at once (at every one
/// of the 20 positions).
fn incremental_equals_full(model: &Model, hi: u32) {
    incremental_equals_full_in(model, hi, troupe::KvDtype::F32);
}

/// [`incremental_equals_full`] with caches of `dtype` on both sides.
fn incremental_equals_full_in(model: &Model, hi: u32, dtype: troupe::KvDtype) {
    let all = tokens(120, 1, 3, hi);
    let mut inc = model.new_cache(dtype);
    feed(model, &mut inc, &all[..100]);
    for i in 100..120 {
        let step = feed(model, &mut inc, &all[i..=i]);
        let mut full = model.new_cache(dtype);
        let whole = feed(model, &mut full, &all[..=i]);
        let d = max_abs_diff(&step, &whole);
        assert!(d <= 1e-3, "{dtype:?} position {i}: max difference {d}");
    }
    assert_eq!(inc.len(), 120);
}

/// f16 caches on the default model: cached decoding equals recomputing the prefix
/// (in the exact-weights and the bf16 mode), and 32 greedy tokens equal those of an
/// f32 cache.
#[test]
fn default_model_f16_cache_equals_recompute() {
    for mode in [WeightsMode::F32, WeightsMode::Bf16] {
        incremental_equals_full_in(&real(mode), 49_000, troupe::KvDtype::F16);
    }
    let m = real(WeightsMode::F32);
    let prompt = m
        .tokenizer()
        .encode_prompt(
            &m.chat_template()
                .render(&[troupe::Message::user("Name three colours.")], true)
                .unwrap(),
        )
        .unwrap();
    let greedy = |dtype| {
        let mut c = m.new_cache(dtype);
        let s = troupe::sampling::Sampler::new(Default::default()).unwrap();
        let seq = troupe::engine::Sequence::new(prompt.clone(), s, None, &[], 32, false);
        troupe::engine::generate(&m, &mut c, seq, |_| {})
            .unwrap()
            .tokens
    };
    assert_eq!(greedy(troupe::KvDtype::F16), greedy(troupe::KvDtype::F32));
}

/// Decode past a point, truncate back, decode other tokens: the same logits as never
/// having gone past the point.
fn truncate_rolls_back(model: &Model, hi: u32) {
    let prefix = tokens(40, 2, 3, hi);
    let mut c = cache(model);
    feed(model, &mut c, &prefix);
    let mut reference = c.fork();
    feed(model, &mut c, &tokens(15, 3, 3, hi));
    assert_eq!(c.len(), 55);
    c.truncate(40);
    assert_eq!(c.len(), 40);
    let other = tokens(6, 4, 3, hi);
    let after_truncate = feed(model, &mut c, &other);
    let never = feed(model, &mut reference, &other);
    assert_eq!(after_truncate, never);
}

/// A fork diverges without touching its parent.
fn fork_is_independent(model: &Model, hi: u32) {
    let mut parent = cache(model);
    feed(model, &mut parent, &tokens(30, 5, 3, hi));
    let mut child = parent.fork();
    let mut witness = parent.fork();
    feed(model, &mut child, &tokens(10, 6, 3, hi));
    assert_eq!(parent.len(), 30);
    assert_eq!(child.len(), 40);
    let next = tokens(3, 7, 3, hi);
    assert_eq!(
        feed(model, &mut parent, &next),
        feed(model, &mut witness, &next)
    );
}

#[test]
fn tiny_incremental_equals_full_prefill() {
    incremental_equals_full(&tiny(WeightsMode::Native), 270);
    incremental_equals_full(&tiny(WeightsMode::F32), 270);
}

#[test]
fn tiny_truncate_and_fork() {
    let m = tiny(WeightsMode::Native);
    truncate_rolls_back(&m, 270);
    fork_is_independent(&m, 270);
}

#[test]
fn default_model_incremental_equals_full_prefill() {
    incremental_equals_full(&real(WeightsMode::Native), 49_000);
}

#[test]
fn default_model_truncate_and_fork() {
    let m = real(WeightsMode::Native);
    truncate_rolls_back(&m, 49_000);
    fork_is_independent(&m, 49_000);
}

/// An f16 cache stays within 1% of the logits' range of an f32 cache, over a prefill
/// and 20 decode steps that read the f16 keys and values back.
#[test]
fn f16_cache_stays_close_to_f32() {
    // Exact weights: with quantized activations any rounding difference is amplified.
    let m = tiny(WeightsMode::F32);
    let t = tokens(70, 8, 3, 270);
    let mut a = cache(&m);
    let mut b = m.new_cache(troupe::KvDtype::F16);
    let mut worst = 0f32;
    for (i, chunk) in std::iter::once(&t[..50])
        .chain(t[50..].chunks(1))
        .enumerate()
    {
        let la = feed(&m, &mut a, chunk);
        let lb = feed(&m, &mut b, chunk);
        let range = la.iter().copied().fold(f32::MIN, f32::max)
            - la.iter().copied().fold(f32::MAX, f32::min);
        let d = max_abs_diff(&la, &lb) / range;
        assert!(
            d < 0.01,
            "step {i}: f16 cache off by {d} of the logits' range"
        );
        worst = worst.max(d);
    }
    assert_eq!(b.bytes() * 2, a.bytes());
    assert!(
        worst > 0.0,
        "f16 rounding changed nothing: the caches are not f16"
    );
}
