//! The cache lease under KV pressure: agents in a tool call park their caches with
//! the engine, which drops them at once when it needs the room, so no admission
//! waits for a tool call to end, and the budget holds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use troupe::agent::{tool_fn, AgentConfig, Ask, TokenLog, Tool, ToolChoice};

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Query {
    q: String,
}

/// A tool that takes 300 ms.
fn slow_lookup() -> Vec<Arc<dyn Tool>> {
    vec![tool_fn(
        "lookup",
        "Looks something up.",
        |a: Query| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(format!("found {} letters", a.q.len()))
        },
    )]
}

fn config(i: usize) -> AgentConfig {
    AgentConfig {
        name: format!("agent-{i}"),
        system_prompt: "You look things up.".into(),
        tool_choice: ToolChoice::Tool("lookup".into()),
        max_tool_steps: 1,
        max_tokens: 64,
        ..AgentConfig::default()
    }
}

/// The tiny model with room for a few tool turns (the default's context is 512).
fn model(dir: &std::path::Path) -> troupe::Model {
    let path = dir.join("tiny-4k.gguf");
    if !path.exists() {
        let cfg = troupe::model::tiny::TinyConfig {
            context_length: 4096,
            ..Default::default()
        };
        troupe::model::tiny::write_tiny_model(&path, &cfg).unwrap();
    }
    troupe::Model::load(&path, Default::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_with_slow_tools_under_a_budget_for_three_caches() {
    let dir = tempfile::tempdir().unwrap();
    let per_token = troupe::KvCache::bytes_per_token(
        model(dir.path()).config().kv_layout(),
        troupe::KvDtype::F16,
    );
    // How long one agent's cache gets over two turns, alone and unbounded.
    let probe = engine(model(dir.path()), engine_config(256, 16, usize::MAX));
    let a = probe.agent(config(0), slow_lookup()).unwrap();
    for t in 0..2 {
        a.ask(Ask::new(format!("Find item {t}."))).await.unwrap();
    }
    let (log, _) = a.ask(TokenLog).await.unwrap();
    let budget = 3 * per_token * (log.len() + 2 * 64 + 16);

    let e = engine(model(dir.path()), engine_config(256, 16, budget));
    let agents: Vec<_> = (0..8)
        .map(|i| e.agent(config(i), slow_lookup()).unwrap())
        .collect();
    let turns = agents.iter().map(|a| {
        let a = a.clone();
        async move {
            let mut runs = 0;
            for t in 0..2 {
                let r = a.ask(Ask::new(format!("Find item {t}."))).await.unwrap();
                runs += r.tool_runs.len();
            }
            runs
        }
    });
    let runs: Vec<usize> = futures::future::join_all(turns).await;
    // Every turn completed with its tool call.
    assert_eq!(runs, vec![2; 8]);
    let s = e.stats().await.unwrap();
    eprintln!(
        "budget {budget} B, peak {} B, evictions {}, preempted {}, queue p50 {:.1} ms, max {:.1} ms",
        s.kv_peak_bytes, s.evictions_requested, s.preempted, s.queue_ms.p50, s.queue_ms_max
    );
    assert!(
        s.kv_peak_bytes <= budget,
        "peak {} > budget {budget}",
        s.kv_peak_bytes
    );
    assert!(s.evictions_requested > 0, "the budget never bit: {s:?}");
    // Eight agents each making a 300 ms call, three caches of room: had an admission
    // waited for a tool call to end, it would have waited about 300 ms.
    assert!(
        s.queue_ms_max < 300.0,
        "an admission waited {:.0} ms (p99 {:.0} ms)",
        s.queue_ms_max,
        s.queue_ms.p99
    );
}
