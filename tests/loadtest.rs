//! The loadtest report is consistent: no request is lost, the same conversations give
//! the same prompt tokens with and without cache reuse, the no-cache-reuse ablation
//! reuses nothing, each turn reuses exactly the tokens its agent's previous turn left
//! in the cache, and `--duration` stops the run on time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use troupe::loadtest::{run, LoadtestOptions, RunReport, TurnRecord};
use troupe::model::WeightsMode;

fn opts() -> LoadtestOptions {
    LoadtestOptions {
        agents: 6,
        turns: 3,
        system_tokens: 40,
        user_tokens: 8,
        max_tokens: 6,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_add_up_and_reuse_computes_only_new_tokens() {
    let model = Arc::new(tiny(WeightsMode::Native));
    let r = run(model.clone(), &opts()).await.unwrap();
    assert_eq!(r.errors, 0);
    assert_eq!(r.requests, 6 * 3, "no request lost");
    assert_eq!(r.requests_by_turn, vec![6, 6, 6]);
    assert!(r.generated_tokens > 0 && r.gen_tok_s > 0.0);
    assert!(r.batch_max >= 2, "agents share steps: {}", r.batch_max);
    // Turns after the first reuse everything before them.
    assert!(r.reused_tokens > 0);

    let ablation = run(
        model,
        &LoadtestOptions {
            no_cache_reuse: true,
            ..opts()
        },
    )
    .await
    .unwrap();
    assert_eq!(ablation.requests, 18);
    assert_eq!(ablation.reused_tokens, 0);
    // Same conversations (greedy, bitwise batch-invariant): the same prompts, of which
    // the reuse run computed strictly less.
    assert_eq!(r.prompt_tokens, ablation.prompt_tokens);
    assert!(r.computed_tokens < ablation.computed_tokens);

    // Only new tokens are computed: each turn after the first reuses exactly what the
    // agent's previous turn left in its cache, that turn's prompt and all its generated
    // tokens but the last (sampled, never fed back). The ablation reuses none of it.
    check_reuse(&r, 6, 3, |prev| {
        prev.prompt_tokens + prev.generated_tokens - 1
    });
    check_reuse(&ablation, 6, 3, |_| 0);
}

/// Every agent completed every turn, its first reused nothing, and each later one
/// reused `expected(previous turn)` tokens.
fn check_reuse(
    r: &RunReport,
    agents: usize,
    turns: usize,
    expected: impl Fn(&TurnRecord) -> usize,
) {
    assert_eq!(r.turn_records.len(), agents * turns);
    for agent in 0..agents {
        let mut mine: Vec<&TurnRecord> =
            r.turn_records.iter().filter(|t| t.agent == agent).collect();
        mine.sort_by_key(|t| t.turn);
        assert_eq!(
            mine.iter().map(|t| t.turn).collect::<Vec<_>>(),
            (0..turns).collect::<Vec<_>>()
        );
        assert_eq!(
            mine[0].reused_tokens, 0,
            "agent {agent}: a first turn has nothing to reuse"
        );
        for w in mine.windows(2) {
            assert!(w[0].generated_tokens > 0, "agent {agent}: {:?}", w[0]);
            assert_eq!(
                w[1].reused_tokens,
                expected(w[0]),
                "agent {agent}: {:?} after {:?}",
                w[1],
                w[0]
            );
            assert!(
                w[1].prompt_tokens > w[0].prompt_tokens + w[0].generated_tokens,
                "the history grows by the new message"
            );
        }
    }
    // The totals are these rows' sums.
    let sum = |f: fn(&TurnRecord) -> usize| r.turn_records.iter().map(f).sum::<usize>() as u64;
    assert_eq!(sum(|t| t.prompt_tokens), r.prompt_tokens);
    assert_eq!(sum(|t| t.reused_tokens), r.reused_tokens);
    assert_eq!(sum(|t| t.generated_tokens), r.generated_tokens);
}

/// The engine's steps are held by a gate from the start, so no turn can ever end:
/// the run still ends when the duration is over (its in-flight turns abandoned, the
/// engine stopped), and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_stops_the_run_on_time() {
    let model = Arc::new(tiny(WeightsMode::Native));
    let gate = troupe::engine::StepGate::held();
    let r = run(
        model,
        &LoadtestOptions {
            agents: 4,
            turns: 10_000,
            duration: Some(Duration::from_millis(300)),
            engine_hooks: troupe::engine::TestHooks {
                step_gate: Some(gate.clone()),
                ..Default::default()
            },
            ..opts()
        },
    )
    .await
    .unwrap();
    assert!(r.wall_s >= 0.3, "stopped early: {:.3} s", r.wall_s);
    assert_eq!(r.requests, 0, "no turn could finish");
    assert_eq!(gate.passed(), 0, "the engine never stepped");
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_kv_budget_evicts_and_still_completes() {
    let model = Arc::new(tiny(WeightsMode::Native));
    let per_token =
        // The agents take the engine's default KV dtype.
        troupe::KvCache::bytes_per_token(model.config().kv_layout(), troupe::KvDtype::default());
    let r = run(
        model,
        &LoadtestOptions {
            agents: 12,
            kv_budget: 4 * 120 * per_token,
            ..opts()
        },
    )
    .await
    .unwrap();
    assert_eq!((r.requests, r.errors), (36, 0));
    assert!(r.kv_peak_bytes <= 4 * 120 * per_token);
    assert!(r.evictions > 0 && r.recomputed_tokens > 0, "{r:?}");
}

/// A sequence whose sampling says `ignore_eos` keeps going where the
/// end-of-generation token is the only choice; without it, that token ends it.
#[test]
fn ignore_eos_in_the_sampling_keeps_a_sequence_past_eos() {
    use troupe::engine::{FinishReason, Sequence};
    use troupe::sampling::{Sampler, SamplingParams};
    let model = tiny(WeightsMode::Native);
    let tok = model.tokenizer();
    let eos = tok.eos_token_ids()[0];
    let run = |ignore_eos: bool| {
        let params = SamplingParams {
            ignore_eos,
            ..SamplingParams::greedy()
        };
        let mut seq = Sequence::new(vec![1], Sampler::new(params).unwrap(), None, &[], 5, false);
        for step in 1.. {
            let mut logits = vec![0.0f32; tok.vocab_size()];
            logits[eos as usize] = 10.0;
            let done = seq.sample(&mut logits).unwrap();
            if let Some(f) = seq.advance(tok, done).unwrap().finish {
                return (step, f);
            }
        }
        unreachable!()
    };
    assert_eq!(run(false), (1, FinishReason::Stop));
    assert_eq!(run(true), (5, FinishReason::Length));
}

/// `ignore_eos` in a load test: every reply has exactly `max_tokens` tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_makes_every_reply_max_tokens_long() {
    let model = Arc::new(tiny(WeightsMode::Native));
    let max = 24;
    let fixed = run(
        model,
        &LoadtestOptions {
            max_tokens: max,
            ignore_eos: true,
            ..opts()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (fixed.requests, fixed.errors),
        (18, 0),
        "{:?}",
        fixed.first_error
    );
    assert!(fixed.ignore_eos);
    for t in &fixed.turn_records {
        assert_eq!(t.generated_tokens, max, "{t:?}");
    }
    assert_eq!(fixed.generated_tokens, (18 * max) as u64);
    // The serving figures count the same requests and tokens.
    let s = &fixed.serving;
    assert_eq!((s.completed, s.failed), (18, 0));
    assert_eq!(s.total_output_tokens, fixed.generated_tokens);
    assert_eq!(s.total_input_tokens, fixed.prompt_tokens);
    assert!(s.request_throughput > 0.0 && s.output_throughput > 0.0);
    assert!(fixed.tpot_ms.p50 > 0.0 && fixed.e2el_ms.p50 >= fixed.ttft_ms.p50);
    assert_eq!(fixed.ttft_by_turn_ms.len(), 3);
}
