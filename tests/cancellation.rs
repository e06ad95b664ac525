//! Cancellation frees everything: a request dropped while queued, mid prefill or mid
//! decode is counted, its cache is gone from the budget, and the next request gets in
//! at the next step; a tool past its timeout is aborted; a streamed turn whose reader
//! goes away cancels its engine request. The engine's steps are held by a gate, so
//! each drop happens exactly where the test says.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use troupe::agent::{tool_fn, AgentConfig, AgentEvent, Ask, History, Tool, ToolChoice};
use troupe::engine::{Engine, Generate, GenerationStream, StepGate, TestHooks};
use troupe::model::WeightsMode;
use troupe::{Error, Stats};

fn gated(max_step_tokens: usize, max_running: usize) -> (Engine, StepGate) {
    let gate = StepGate::held();
    let mut cfg = engine_config(max_step_tokens, max_running, usize::MAX);
    cfg.test_hooks = TestHooks {
        step_gate: Some(gate.clone()),
        ..Default::default()
    };
    (engine(tiny(WeightsMode::Native), cfg), gate)
}

/// Lets `n` steps run and waits until the engine is held again.
async fn steps(gate: &StepGate, n: u64) {
    gate.allow(n);
    let g = gate.clone();
    let held = tokio::task::spawn_blocking(move || g.wait_blocked(Duration::from_secs(60)));
    assert!(
        held.await.unwrap(),
        "the engine did not come back to the gate"
    );
}

async fn request(e: &Engine, prompt_len: usize, seed: usize) -> GenerationStream {
    let vocab = e.model().config().vocab_size as u32;
    let mut g = Generate::new(e.new_cache(), tokens(prompt_len, seed, 3, vocab), 400);
    g.ignore_eos = true;
    e.generate(g).await.unwrap()
}

async fn stats(e: &Engine) -> Stats {
    e.stats().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_frees_everything() {
    // Steps of at most 16 tokens, one sequence running at a time.
    let (e, gate) = gated(16, 1);
    let a = request(&e, 8, 1).await;
    let b = request(&e, 8, 2).await;
    steps(&gate, 2).await; // A's prefill and one decode; B waits behind it.
    let s = stats(&e).await;
    assert_eq!((s.running, s.waiting, s.cancelled), (1, 1, 0));
    assert!(s.kv_live_bytes > 0);

    // Dropped while queued.
    drop(b);
    let s = stats(&e).await;
    assert_eq!((s.running, s.waiting, s.cancelled), (1, 0, 1));

    // Dropped mid decode: nothing is left.
    drop(a);
    let s = stats(&e).await;
    assert_eq!((s.running, s.cancelled, s.kv_live_bytes), (0, 2, 0));

    // The next request gets in at the next step: a 100-token prompt, 16 per step.
    let before = s.steps;
    let c = request(&e, 100, 3).await;
    steps(&gate, 1).await;
    let s = stats(&e).await;
    assert_eq!(
        (s.running, s.steps),
        (1, before + 1),
        "admitted at the first step"
    );
    steps(&gate, 1).await; // two prefill chunks of seven

    // Dropped mid prefill.
    drop(c);
    let s = stats(&e).await;
    assert_eq!(
        (s.running, s.waiting, s.cancelled, s.kv_live_bytes),
        (0, 0, 3, 0)
    );

    let before = s.steps;
    let d = request(&e, 8, 4).await;
    steps(&gate, 1).await;
    let s = stats(&e).await;
    assert_eq!((s.running, s.steps), (1, before + 1));
    drop(d);
    gate.open();
    assert_eq!(stats(&e).await.cancelled, 4);
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Nothing {}

/// Sends on its channel when the tool's future is dropped (finished or aborted).
struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_past_its_timeout_is_aborted() {
    let e = engine(tiny(WeightsMode::Native), engine_config(256, 8, usize::MAX));
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel();
    let signal = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let slow: Arc<dyn Tool> = tool_fn("slow", "Takes a minute.", move |_: Nothing| {
        let guard = DropSignal(signal.lock().unwrap().take());
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok("done".to_string())
        }
    });
    let config = AgentConfig {
        tool_choice: ToolChoice::Tool("slow".into()),
        max_tool_steps: 1,
        tool_timeout_secs: 0.2,
        max_tokens: 64,
        ..AgentConfig::new("waiter", "You wait.")
    };
    let agent = e.agent(config, vec![slow]).unwrap();
    let reply = agent.ask(Ask::new("Wait for it.")).await.unwrap();
    assert_eq!(reply.tool_runs.len(), 1);
    assert!(
        reply.tool_runs[0].result.contains("timed out"),
        "{:?}",
        reply.tool_runs
    );
    // Aborted, not left sleeping: its future is dropped right after the timeout.
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("the tool was still running after its timeout")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_turn_whose_reader_goes_away_is_cancelled() {
    let (e, gate) = gated(256, 8);
    let agent = e
        .agent(
            AgentConfig {
                max_tokens: 200,
                ..AgentConfig::new("talker", "You talk.")
            },
            vec![],
        )
        .unwrap();
    let before = agent.ask(History).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let turn = tokio::spawn({
        let agent = agent.clone();
        async move { agent.ask(Ask::new("Tell me a story.").events(tx)).await }
    });
    // Let tokens come until one reaches the reader.
    let first = loop {
        steps(&gate, 1).await;
        if let Ok(ev) = rx.try_recv() {
            break ev;
        }
    };
    assert!(matches!(first, AgentEvent::Token(_)));
    drop(rx);
    // One more token: the agent cannot hand it on, and cancels.
    gate.allow(1);
    let result = turn.await.unwrap();
    assert!(
        matches!(
            result,
            Err(kameo::error::SendError::HandlerError(Error::Cancelled))
        ),
        "{result:?}"
    );
    let s = e.stats().await.unwrap();
    assert_eq!((s.cancelled, s.finished, s.kv_live_bytes), (1, 0, 0));
    // The turn is undone.
    assert_eq!(agent.ask(History).await.unwrap(), before);
    gate.open();
}
