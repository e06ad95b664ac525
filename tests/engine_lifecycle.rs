//! The engine's lifecycle: stopping (or dropping) the model actor fails the requests
//! in flight with their caches and joins the engine thread. Alone in its test binary,
//! because it counts the process's engine threads.

mod common;

use common::*;
use troupe::engine::{Event, Generate, StepGate, TestHooks};
use troupe::model::WeightsMode;
use troupe::Error;

/// Engine threads alive in this process.
fn engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "troupe-engine")
        .count()
}

async fn in_flight_request_fails_with_its_cache(stop: bool) {
    let model = tiny(WeightsMode::Native);
    let prompt = tokens(24, 7, 3, model.config().vocab_size as u32);
    let mut pre = cache(&model);
    feed(&model, &mut pre, &prompt[..10]);
    let before = pre.fork();
    let gate = StepGate::held();
    let mut config = engine_config(256, 8, usize::MAX);
    config.test_hooks = TestHooks {
        step_gate: Some(gate.clone()),
        ..Default::default()
    };
    let engine = engine(model, config);
    let mut g = Generate::new(pre, prompt[10..].to_vec(), 200);
    g.ignore_eos = true;
    let mut stream = engine.generate(g).await.unwrap();
    // One step in: the request is running, mid-generation.
    gate.allow(2);
    let blocked = tokio::task::spawn_blocking({
        let gate = gate.clone();
        move || gate.wait_blocked(std::time::Duration::from_secs(30))
    });
    assert!(blocked.await.unwrap());
    // Waiting at the gate: the thread is running (and has named itself).
    assert_eq!(engine_threads(), 1);
    if stop {
        let stopping = tokio::spawn({
            let engine = engine.clone();
            async move { engine.stop().await }
        });
        drop(engine);
        // The shutdown is taken in between steps: let the engine reach it.
        gate.open();
        stopping.await.unwrap();
        // `stop` returns once the thread is joined.
        assert_eq!(
            engine_threads(),
            0,
            "engine threads after stop (gate passed {})",
            gate.passed()
        );
    } else {
        drop(engine);
        gate.open();
    }
    let mut failed = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token { .. } | Event::Text { .. } => {}
            Event::Done(_) => panic!("the request finished although the engine stopped"),
            Event::Failed { error, cache } => failed = Some((error, cache)),
        }
    }
    let (error, cache) = failed.expect("a failure event");
    assert!(matches!(error, Error::EngineStopped), "{error}");
    // Rolled back to the cache it came with.
    assert_eq!(cache.len(), before.len());
    assert_eq!(cache.to_f32_layers(), before.to_f32_layers());
    if !stop {
        // Dropped: the actor stops on its own and joins the thread.
        for _ in 0..200 {
            if engine_threads() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(engine_threads(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_or_dropping_the_model_actor_fails_in_flight_requests_and_joins_the_thread() {
    in_flight_request_fails_with_its_cache(true).await;
    in_flight_request_fails_with_its_cache(false).await;
}
