//! A fault in one request harms only that request: a sequence whose forward panics
//! fails alone while the others of its batch finish with the tokens they have alone,
//! and an engine thread that dies is restarted by the model actor.

mod common;

use common::*;
use troupe::engine::{EngineConfig, Generate, TestHooks};
use troupe::model::WeightsMode;
use troupe::Error;

/// The token id the hooks fire on: a special token no test prompt holds.
const HOOK_TOKEN: u32 = 1;

fn request(model: &troupe::model::Model, i: usize) -> Generate {
    let mut g = Generate::new(cache(model), tokens(6 + 2 * i, i, 3, 270), 10 + i % 4);
    g.ignore_eos = true;
    g
}

fn hooked(max_running: usize, hooks: TestHooks) -> EngineConfig {
    EngineConfig {
        test_hooks: hooks,
        ..engine_config(256, max_running, usize::MAX)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_forward_fails_only_its_sequence() {
    let hooks = TestHooks {
        panic_in_forward_on_token: Some(HOOK_TOKEN),
        ..TestHooks::default()
    };
    // Each of the 7 good requests alone, on an engine with the same hook.
    let model = tiny(WeightsMode::Native);
    let alone_reqs: Vec<Generate> = (0..7).map(|i| request(&model, i)).collect();
    let single = actor(model, hooked(1, hooks.clone()));
    let mut alone = Vec::new();
    for (i, r) in alone_reqs.into_iter().enumerate() {
        let d = single.ask(r).await.unwrap().finish().await;
        alone.push(
            d.unwrap_or_else(|e| panic!("request {i} alone: {e}"))
                .tokens,
        );
    }

    let model = tiny(WeightsMode::Native);
    let reqs: Vec<Generate> = (0..7).map(|i| request(&model, i)).collect();
    let mut bad_prompt = tokens(9, 99, 3, 270);
    bad_prompt[4] = HOOK_TOKEN;
    let mut bad = Some(Generate::new(cache(&model), bad_prompt, 10));
    let batched = actor(model, hooked(16, hooks));
    let mut streams = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        streams.push(batched.ask(r).await.unwrap());
        if i == 3 {
            // In the middle, so that it shares steps with the others.
            let b = bad.take().unwrap();
            streams.push(batched.ask(b).await.unwrap());
        }
    }
    let bad_stream = streams.remove(4);
    let mut together = Vec::new();
    for s in streams {
        together.push(s.finish().await.expect("a good request failed"));
    }
    let err = bad_stream
        .finish()
        .await
        .expect_err("the bad request finished");
    assert!(
        matches!(err.error, Error::EnginePanic { .. }),
        "unexpected error: {}",
        err.error
    );
    let cache_back = err
        .cache
        .expect("the failed request's cache is handed back");
    assert_eq!(cache_back.len(), 0, "the cache is rolled back");
    for (i, d) in together.iter().enumerate() {
        assert_eq!(d.tokens, alone[i], "request {i}");
    }
    let stats = batched.ask(troupe::engine::GetStats).await.unwrap();
    assert!(stats.failed_steps >= 1, "{stats:?}");
    assert!(
        stats.max_batch() >= 4,
        "requests did not share steps: {stats:?}"
    );

    // The engine serves the next request.
    let model = tiny(WeightsMode::Native);
    let next = batched
        .ask(request(&model, 0))
        .await
        .unwrap()
        .finish()
        .await
        .expect("the next request");
    assert_eq!(next.tokens, alone[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_thread_is_restarted() {
    let hooks = TestHooks {
        crash_engine_on_token: Some(HOOK_TOKEN),
        ..TestHooks::default()
    };
    let model = tiny(WeightsMode::Native);
    let first = request(&model, 1);
    let mut crash_prompt = tokens(5, 3, 3, 270);
    crash_prompt.push(HOOK_TOKEN);
    let crash = Generate::new(cache(&model), crash_prompt, 4);
    let after = request(&model, 1);
    let engine = actor(model, hooked(8, hooks));
    let before = engine.ask(first).await.unwrap().finish().await.unwrap();
    let err = engine
        .ask(crash)
        .await
        .unwrap()
        .finish()
        .await
        .expect_err("the crashing request");
    assert!(
        matches!(err.error, Error::EngineStopped | Error::EnginePanic { .. }),
        "{}",
        err.error
    );
    // Never a hang, never "the model engine stopped" for later requests.
    let again = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        engine.ask(after).await.unwrap().finish().await
    })
    .await
    .expect("the request after the crash hung")
    .expect("the request after the crash");
    assert_eq!(again.tokens, before.tokens);
    let stats = engine.ask(troupe::engine::GetStats).await.unwrap();
    assert_eq!(stats.engine_restarts, 1, "{stats:?}");
}

/// A thread that ends outright (no panic to catch): the request in it sees its
/// stream end, and the model actor starts a new thread for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_actor_restarts_an_engine_thread_that_ended() {
    let hooks = TestHooks {
        exit_engine_on_token: Some(HOOK_TOKEN),
        ..TestHooks::default()
    };
    let model = tiny(WeightsMode::Native);
    let first = request(&model, 2);
    let mut exit_prompt = tokens(5, 3, 3, 270);
    exit_prompt.push(HOOK_TOKEN);
    let exit = Generate::new(cache(&model), exit_prompt, 4);
    let engine = actor(model, hooked(8, hooks));
    let before = engine.ask(first).await.unwrap().finish().await.unwrap();
    let err = engine
        .ask(exit)
        .await
        .unwrap()
        .finish()
        .await
        .expect_err("the request in the thread that ended");
    assert!(matches!(err.error, Error::EngineStopped), "{}", err.error);
    // A request sent before the thread has quite ended is in flight in it and ends
    // the same way (as an agent's turn would); once it has ended, the actor starts
    // a new thread. Never a hang, never a dead runtime.
    let mut again = None;
    for _ in 0..100 {
        let after = request(&tiny(WeightsMode::Native), 2);
        let r = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            engine.ask(after).await.unwrap().finish().await
        })
        .await
        .expect("the request after the thread ended hung");
        match r {
            Ok(done) => {
                again = Some(done);
                break;
            }
            Err(e) => {
                assert!(matches!(e.error, Error::EngineStopped), "{}", e.error);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    let again = again.expect("served after the restart");
    assert_eq!(again.tokens, before.tokens);
    let stats = engine.ask(troupe::engine::GetStats).await.unwrap();
    assert_eq!(stats.engine_restarts, 1, "{stats:?}");
}
