//! `troupe bench perplexity`: the chunked method (second half of each chunk scored
//! from one forward returning every token's logits) equals a direct sum of
//! log-probabilities fed token by token; the report's perplexity is exp of the mean;
//! the command runs; and on the default model every weights mode stays within 1% of
//! the exact f32 weights' perplexity on the shipped text.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use troupe::bench::perplexity::{chunks, nll, score_chunk, PerplexityBench};
use troupe::model::{Model, WeightsMode};
use troupe::KvDtype;

fn text_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/perplexity.txt")
}

/// The scores of one chunk's second half, feeding the chunk one token at a time.
fn direct(model: &Model, chunk: &[u32]) -> (f64, usize) {
    let first = chunk.len() / 2;
    let mut c = cache(model);
    let (mut sum, mut n) = (0f64, 0);
    for j in 0..chunk.len() - 1 {
        let logits = feed(model, &mut c, &chunk[j..=j]);
        if j >= first {
            sum += nll(&logits, chunk[j + 1]);
            n += 1;
        }
    }
    (sum, n)
}

#[test]
fn chunked_scores_equal_a_direct_sum_of_log_probabilities() {
    let text = std::fs::read_to_string(text_path()).unwrap();
    for mode in [WeightsMode::F32, WeightsMode::Bf16] {
        let model = tiny(mode);
        let toks = model.tokenizer().encode(&text).unwrap();
        let cs = chunks(&toks, 48, None);
        assert!(cs.len() >= 4, "the text makes only {} chunks", cs.len());
        let (mut a, mut b, mut n) = (0f64, 0f64, 0);
        for c in cs.iter().take(4) {
            let (s1, n1) = score_chunk(&model, c, KvDtype::F32).unwrap();
            let (s2, n2) = direct(&model, c);
            assert_eq!((n1, n2), (23, 23));
            a += s1;
            b += s2;
            n += n1;
        }
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "{mode}: chunked {a} vs direct {b}"
        );
        // And through the bench: the perplexity is exp of the mean score.
        let r = PerplexityBench {
            ctx: 48,
            max_chunks: 4,
            modes: vec![mode],
            kv_dtype: KvDtype::F32,
        }
        .run(&tiny_model_path(), &text_path(), |_| {})
        .unwrap();
        let ppl = (a / n as f64).exp();
        assert_eq!(r.runs[0].scored_tokens, n);
        assert!(
            (r.runs[0].perplexity - ppl).abs() <= 1e-4 * ppl,
            "{r:?} vs {ppl}"
        );
        // A random-weight model is close to uniform over its small vocabulary.
        assert!(ppl > 50.0, "{ppl}");
    }
}

#[test]
fn the_command_prints_one_row_per_mode() {
    let out = Command::new(common::troupe_bin())
        .args(["--model", tiny_model_path().to_str().unwrap()])
        .args(["bench", "perplexity", text_path().to_str().unwrap()])
        .args([
            "--ctx",
            "64",
            "--max-chunks",
            "2",
            "--modes",
            "f32,bf16,exact",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["f32", "bf16", "exact"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(mode))
            .unwrap_or_else(|| panic!("no row for {mode}: {stdout}"));
        let ppl: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{row}");
    }
}

/// The faster modes are still the same model: perplexity within 1% of f32's
/// (the bar of the batching issue) on two 256-token chunks of the shipped text.
#[test]
fn default_model_modes_stay_within_one_percent_of_f32() {
    let r = PerplexityBench {
        ctx: 256,
        max_chunks: 2,
        modes: vec![
            WeightsMode::F32,
            WeightsMode::Bf16,
            WeightsMode::Auto,
            WeightsMode::Exact,
        ],
        kv_dtype: KvDtype::F16,
    }
    .run(&real_model_path(), &text_path(), |l| eprintln!("{l}"))
    .unwrap();
    let base = r.runs[0].perplexity;
    assert!(base > 1.0 && base < 100.0, "f32 perplexity {base}");
    for run in &r.runs[1..] {
        let rel = run.perplexity / base - 1.0;
        assert!(
            rel.abs() < 0.01,
            "{}: {} vs f32 {base}",
            run.weights,
            run.perplexity
        );
    }
}
