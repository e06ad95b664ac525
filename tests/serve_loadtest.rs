//! `troupe loadtest --url` against `troupe serve` and the in-process load test, on
//! the same workload, count the same tokens turn by turn: what each turn was
//! prompted with, what the session's cache reused, and what it generated.

mod common;

use std::sync::Arc;

use troupe::engine::{Engine, EngineConfig};
use troupe::loadtest::{run_url, HttpTarget, LoadtestOptions, RunReport};
use troupe::serve::{ServeConfig, Server};
use troupe::WeightsMode;

fn records(r: &RunReport) -> Vec<(usize, usize, usize, usize, usize)> {
    let mut v: Vec<_> = r
        .turn_records
        .iter()
        .map(|t| {
            (
                t.agent,
                t.turn,
                t.prompt_tokens,
                t.reused_tokens,
                t.generated_tokens,
            )
        })
        .collect();
    v.sort_unstable();
    v
}

async fn both(o: &LoadtestOptions) -> (RunReport, RunReport) {
    // A fixed weights mode: a sequence's logits do not depend on its batch, so both
    // runs sample the same tokens.
    let model = Arc::new(common::tiny(WeightsMode::F32));
    let local = troupe::loadtest::run(model.clone(), o).await.unwrap();
    let engine = Engine::serve(model.clone(), EngineConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ServeConfig {
        model_id: "tiny".into(),
        ..ServeConfig::default()
    };
    let server = Server::start(engine.clone(), config, listener).unwrap();
    let target = HttpTarget {
        url: format!("http://{}", server.addr()),
        api_key: None,
        model: None,
    };
    let http = run_url(&target, model.tokenizer(), o).await.unwrap();
    server.stop().await.unwrap();
    engine.stop().await;
    (local, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_and_in_process_the_same_turns_count_the_same_tokens() {
    let o = LoadtestOptions {
        agents: 4,
        turns: 3,
        system_tokens: 40,
        user_tokens: 10,
        max_tokens: 12,
        ignore_eos: true,
        seed: 7,
        ..LoadtestOptions::default()
    };
    let (local, http) = both(&o).await;
    assert_eq!(
        (local.errors, http.errors),
        (0, 0),
        "{:?}",
        http.first_error
    );
    assert_eq!(records(&local), records(&http));
    assert_eq!(local.generated_tokens, 4 * 3 * 12);
    // Every later turn reused the session's cache over HTTP too.
    assert!(records(&http).iter().filter(|r| r.1 > 0).all(|r| r.3 > 0));
    assert_eq!(http.cache_reported_requests, 12);
}
