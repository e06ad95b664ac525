//! The model actor's limits: cancellation frees the slot at once, the KV budget is
//! never exceeded, impossible and malformed requests fail at once with a clear error
//! and the cache handed back, and the actor keeps serving the others.

mod common;

use common::*;
use proptest::prelude::*;
use troupe::engine::{Event, FinishReason, Generate, GetStats};
use troupe::model::WeightsMode;
use troupe::sampling::SamplingParams;
use troupe::{Error, KvCache};

fn greedy(model_cache: KvCache, prompt: Vec<u32>, max_tokens: usize) -> Generate {
    let mut g = Generate::new(model_cache, prompt, max_tokens);
    g.ignore_eos = true;
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_frees_its_slot_within_one_step() {
    let model = tiny(WeightsMode::Native);
    let (ca, cb) = (cache(&model), cache(&model));
    let a = actor(model, engine_config(64, 1, usize::MAX));
    let mut long = a.ask(greedy(ca, tokens(8, 1, 3, 270), 400)).await.unwrap();
    // Wait until the long request is decoding, then queue another one behind it.
    assert!(matches!(long.next().await, Some(Event::Token { .. })));
    let queued = a.ask(greedy(cb, tokens(8, 2, 3, 270), 5)).await.unwrap();
    let before = a.ask(GetStats).await.unwrap();
    assert_eq!((before.running, before.waiting), (1, 1));
    drop(long);
    let at_drop = a.ask(GetStats).await.unwrap().steps;
    let done = queued.finish().await.unwrap();
    assert_eq!(done.finish, FinishReason::Length);
    assert!(
        done.timings.admitted_at_step <= at_drop + 1,
        "admitted at step {} after the drop at step {at_drop}",
        done.timings.admitted_at_step
    );
    let after = a.ask(GetStats).await.unwrap();
    assert_eq!(after.cancelled, 1);
    assert_eq!((after.running, after.waiting), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_fail_at_once_and_the_actor_keeps_serving() {
    let model = tiny(WeightsMode::Native);
    let vocab = model.config().vocab_size as u32;
    let context = model.config().context_length;
    let fresh = || cache(&tiny(WeightsMode::Native));
    // A cache that already holds 12 tokens of an earlier turn: a rejection must hand
    // back exactly these keys and values.
    let feeder = tiny(WeightsMode::Native);
    let fed = || {
        let mut c = cache(&feeder);
        feed(&feeder, &mut c, &tokens(12, 9, 3, 270));
        c
    };
    let a = actor(model, engine_config(64, 8, 1 << 30));
    // A good request in flight while the bad ones arrive.
    let running = a
        .ask(greedy(fresh(), tokens(10, 1, 3, 270), 30))
        .await
        .unwrap();

    let check = |g: Generate, expect: &'static str| {
        let a = a.clone();
        async move {
            let (len, capacity, kv) = (g.cache.len(), g.cache.capacity(), g.cache.to_f32_layers());
            let rejected = match a.ask(g).await {
                Err(kameo::error::SendError::HandlerError(r)) => r,
                other => panic!(
                    "expected a rejection naming {expect:?}, got {:?}",
                    other.map(|_| ())
                ),
            };
            let msg = rejected.error.to_string();
            assert!(msg.contains(expect), "{msg:?} should name {expect:?}");
            assert_eq!(
                (rejected.cache.len(), rejected.cache.capacity()),
                (len, capacity),
                "{expect}: the cache comes back with its length and room"
            );
            assert!(
                rejected.cache.to_f32_layers() == kv,
                "{expect}: the cache comes back with the same keys and values"
            );
        }
    };
    assert_eq!(fed().len(), 12);
    check(greedy(fresh(), vec![], 5), "empty prompt").await;
    check(greedy(fed(), vec![], 5), "no new tokens").await;
    check(
        greedy(fed(), vec![5, vocab + 7], 5),
        "outside the vocabulary",
    )
    .await;
    check(greedy(fed(), vec![5, 6], 0), "max_tokens").await;
    let mut g = greedy(fed(), vec![5, 6], 5);
    g.sampling = SamplingParams::with_temperature(-0.5, 1);
    check(g, "temperature").await;
    // 12 cached + 20 new + `context - 31` to generate: one token past the context.
    check(
        greedy(fed(), tokens(20, 3, 3, 270), context - 31),
        "context",
    )
    .await;
    check(greedy(fresh(), tokens(20, 3, 3, 270), context), "context").await;

    let done = running.finish().await.unwrap();
    assert_eq!(done.usage.generated_tokens, 30);
    let after = a
        .ask(greedy(fresh(), vec![5, 6, 7], 4))
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    assert_eq!(after.usage.generated_tokens, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_budget_fails_and_names_the_numbers() {
    let model = tiny(WeightsMode::Native);
    let per_token = KvCache::bytes_per_token(model.config().kv_layout(), troupe::KvDtype::F32);
    let fresh = || cache(&tiny(WeightsMode::Native));
    // Room for 100 tokens.
    let a = actor(model, engine_config(64, 8, 100 * per_token));
    let ok = a
        .ask(greedy(fresh(), tokens(10, 1, 3, 270), 20))
        .await
        .unwrap();
    let err = match a.ask(greedy(fresh(), tokens(60, 2, 3, 270), 60)).await {
        Err(kameo::error::SendError::HandlerError(r)) => r.error,
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    };
    assert!(
        matches!(err, Error::KvBudgetExceeded { tokens: 120, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&(100 * per_token).to_string()),
        "{err}"
    );
    assert_eq!(ok.finish().await.unwrap().usage.generated_tokens, 20);
}

fn run_budget_workload(lens: Vec<(usize, usize)>, budget_tokens: usize, max_running: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let model = tiny(WeightsMode::Native);
        let per_token = KvCache::bytes_per_token(model.config().kv_layout(), troupe::KvDtype::F32);
        let budget = budget_tokens * per_token;
        let fresh: Vec<KvCache> = lens.iter().map(|_| cache(&model)).collect();
        let a = actor(model, engine_config(48, max_running, budget));
        let mut streams = Vec::new();
        let mut expected = 0;
        for ((prompt, max_tokens), c) in lens.iter().zip(fresh) {
            match a
                .ask(greedy(c, tokens(*prompt, *prompt, 3, 270), *max_tokens))
                .await
            {
                Ok(s) => {
                    expected += 1;
                    streams.push((s, prompt + max_tokens));
                }
                Err(kameo::error::SendError::HandlerError(r)) => {
                    // Only requests that can never fit are refused.
                    assert!(
                        matches!(r.error, Error::KvBudgetExceeded { .. }),
                        "{}",
                        r.error
                    );
                    assert!((prompt + max_tokens) * per_token > budget);
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        let mut finished = 0;
        for (s, reserved_tokens) in streams {
            let done = s.finish().await.unwrap();
            // The bytes the cache really holds never exceed what admission reserved
            // (context + new + max_tokens rows), which is what the budget counts.
            let reserved = reserved_tokens * per_token;
            assert!(
                done.cache.bytes() <= reserved,
                "a cache of {} bytes under a reservation of {reserved}",
                done.cache.bytes()
            );
            finished += 1;
        }
        assert_eq!(finished, expected);
        let stats = a.ask(GetStats).await.unwrap();
        assert!(
            stats.kv_peak_bytes <= budget,
            "peak {} > budget {budget}",
            stats.kv_peak_bytes
        );
        assert_eq!(stats.kv_live_bytes, 0);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Random request sizes against a random budget: the budget is never exceeded,
    /// every request that can fit completes, the others are refused at once.
    #[test]
    fn kv_budget_is_never_exceeded(
        lens in proptest::collection::vec((1usize..40, 1usize..24), 1..14),
        budget_tokens in 20usize..160,
        max_running in 1usize..6,
    ) {
        run_budget_workload(lens, budget_tokens, max_running);
    }
}
