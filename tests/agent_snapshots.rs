//! Agent snapshots of agents with tools and an answer grammar: a loaded agent
//! continues exactly as its unsaved twin (text, tool runs, usage, cache reuse), an
//! evicted agent saves and loads without a cache, and a snapshot of a newer format
//! version is refused.

mod common;

use std::sync::Arc;

use common::*;
use kameo::actor::ActorRef;
use troupe::agent::{
    tool_fn, AgentActor, AgentConfig, AgentReply, Ask, Evict, History, Save, TokenLog, Tool,
    ToolChoice,
};
use troupe::engine::Engine;
use troupe::grammar::Grammar;
use troupe::model::WeightsMode;

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct LookupArgs {
    key: u8,
}

fn tools() -> Vec<Arc<dyn Tool>> {
    vec![tool_fn(
        "lookup",
        "Looks a key up.",
        |a: LookupArgs| async move { Ok(format!("value {}", u32::from(a.key) * 7)) },
    )]
}

/// A forced tool call on the first turn, then answers under a regex.
fn config() -> AgentConfig {
    AgentConfig {
        tool_choice: ToolChoice::Tool("lookup".into()),
        max_tool_steps: 1,
        max_tokens: 40,
        grammar: Some(Grammar::Regex("[a-z ]{1,16}\\.".into())),
        ..AgentConfig::new("keeper", "You look things up.")
    }
}

fn spawn(engine: &Engine) -> ActorRef<AgentActor> {
    AgentActor::new(config(), engine.clone(), tools())
        .unwrap()
        .spawn_agent()
}

/// What two agents in the same state must reply alike (a tool run's duration aside).
fn same_turn(x: &AgentReply, y: &AgentReply) {
    assert_eq!(x.text, y.text);
    let runs = |r: &AgentReply| -> Vec<_> {
        r.tool_runs
            .iter()
            .map(|t| (t.call.clone(), t.result.clone(), t.failed))
            .collect()
    };
    assert_eq!(runs(x), runs(y), "the same tool runs");
    assert_eq!(
        x.usage, y.usage,
        "the same prompt, cached, computed and generated tokens"
    );
    assert_eq!(x.recomputed_tokens, y.recomputed_tokens);
}

/// History and token log (with the cache's length).
async fn state(a: &ActorRef<AgentActor>) -> (Vec<troupe::model::Message>, (Vec<u32>, usize)) {
    (
        a.ask(History).await.unwrap(),
        a.ask(TokenLog).await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_round_trip_with_tools_and_answer_grammar() {
    // The default model: the tools prompt alone would fill most of the tiny one's context.
    let model = Arc::new(real(WeightsMode::Native));
    let engine = Engine::serve(model.clone(), engine_config(256, 8, usize::MAX)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, twin) = (spawn(&engine), spawn(&engine));
    let first = a.ask(Ask::new("look up a key")).await.unwrap();
    same_turn(&first, &twin.ask(Ask::new("look up a key")).await.unwrap());
    assert_eq!(first.tool_runs.len(), 1, "a tool turn: {first:?}");
    assert!(!first.tool_runs[0].failed, "{first:?}");

    // Saved after the tool turn, loaded with the same tools: it continues as the twin
    // that was never saved, reusing the cache it came back with.
    let path = dir.path().join("keeper.safetensors");
    a.ask(Save(path.clone())).await.unwrap();
    let loaded = AgentActor::load(&path, engine.clone(), tools())
        .unwrap()
        .spawn_agent();
    assert_eq!(state(&loaded).await, state(&twin).await);
    for q in ["and another", "one more"] {
        let x = loaded.ask(Ask::new(q)).await.unwrap();
        let y = twin.ask(Ask::new(q)).await.unwrap();
        same_turn(&x, &y);
        assert!(x.usage.cached_tokens > 0, "the cache came back: {x:?}");
        assert_eq!(x.recomputed_tokens, 0);
    }
    assert_eq!(state(&loaded).await, state(&twin).await);

    // An evicted agent saves and loads with no cache, and re-prefills like the
    // evicted twin.
    a.tell(Evict::ANY).await.unwrap();
    twin.tell(Evict::ANY).await.unwrap();
    let evicted = dir.path().join("evicted.safetensors");
    a.ask(Save(evicted.clone())).await.unwrap();
    let back = AgentActor::load(&evicted, engine.clone(), tools())
        .unwrap()
        .spawn_agent();
    let (history, (log, cached)) = state(&back).await;
    let log_len = log.len();
    assert_eq!(cached, 0, "no cache in the snapshot");
    assert_eq!((history, log), {
        let (h, (l, _)) = state(&a).await;
        (h, l)
    });
    let x = back.ask(Ask::new("after eviction")).await.unwrap();
    let y = a.ask(Ask::new("after eviction")).await.unwrap();
    assert_eq!((x.text.as_str(), x.usage), (y.text.as_str(), y.usage));
    // Everything the log held was computed again. (Counted through the usage: the
    // `recomputed_tokens` counter of a freshly loaded agent stays 0, a defect reported
    // with issue 17, since it counts only after the agent's own first turn.)
    assert!(x.usage.computed_tokens > log_len, "recomputed: {x:?}");
    assert!(y.recomputed_tokens > 0);

    // A snapshot of a newer format version is refused, naming the versions.
    let bytes = std::fs::read(&path).unwrap();
    let (from, to) = (b"\\\"format\\\":1,", b"\\\"format\\\":2,");
    let at: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "one format field in the header");
    let mut newer = bytes.clone();
    newer[at[0]..at[0] + to.len()].copy_from_slice(to);
    let newer_path = dir.path().join("newer.safetensors");
    std::fs::write(&newer_path, &newer).unwrap();
    let e = AgentActor::load(&newer_path, engine.clone(), tools()).unwrap_err();
    assert!(
        e.to_string().contains("format version 2") && e.to_string().contains("version 1"),
        "{e}"
    );
    // The unpatched file still loads: the refusal is the version, not the patching.
    assert!(AgentActor::load(&path, engine, tools()).is_ok());
}
