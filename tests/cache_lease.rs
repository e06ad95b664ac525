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

/// How long the tool takes. Long against the waits that compute alone causes on a
/// loaded test machine (up to about 600 ms seen with 300 ms tools), so that a wait
/// for a tool call to end cannot hide among them.
const TOOL_MS: u64 = 2000;

/// A tool that takes [`TOOL_MS`].
fn slow_lookup() -> Vec<Arc<dyn Tool>> {
    vec![tool_fn(
        "lookup",
        "Looks something up.",
        |a: Query| async move {
            tokio::time::sleep(Duration::from_millis(TOOL_MS)).await;
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

/// What a run of the workload gave: each agent's turns (text and tool results), and
/// the engine's counters.
type Run = (Vec<Vec<(String, Vec<String>)>>, troupe::Stats, Vec<usize>);

/// Eight agents, two turns each: six call the slow tool every turn, two have no
/// tools. Returns the replies, the engine's stats and each agent's recomputed tokens.
async fn workload(dir: &std::path::Path, budget: usize) -> Run {
    let e = engine(model(dir), engine_config(256, 16, budget));
    let agents: Vec<_> = (0..8)
        .map(|i| {
            if i < 6 {
                e.agent(config(i), slow_lookup()).unwrap()
            } else {
                let plain = AgentConfig {
                    tools: vec![],
                    tool_choice: ToolChoice::Auto,
                    ..config(i)
                };
                e.agent(plain, vec![]).unwrap()
            }
        })
        .collect();
    let turns = agents.iter().map(|a| {
        let a = a.clone();
        async move {
            let mut out = Vec::new();
            let mut recomputed = 0;
            for t in 0..2 {
                let r = a.ask(Ask::new(format!("Find item {t}."))).await.unwrap();
                recomputed += r.recomputed_tokens;
                let runs = r.tool_runs.iter().map(|x| x.result.clone()).collect();
                out.push((r.text, runs));
            }
            (out, recomputed)
        }
    });
    let (replies, recomputed) = futures::future::join_all(turns).await.into_iter().unzip();
    (replies, e.stats().await.unwrap(), recomputed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_tool_calls_equals_free_run() {
    let dir = tempfile::tempdir().unwrap();
    let per_token = troupe::KvCache::bytes_per_token(
        model(dir.path()).config().kv_layout(),
        troupe::KvDtype::F16,
    );
    let probe = engine(model(dir.path()), engine_config(256, 16, usize::MAX));
    let a = probe.agent(config(0), slow_lookup()).unwrap();
    for t in 0..2 {
        a.ask(Ask::new(format!("Find item {t}."))).await.unwrap();
    }
    let (log, _) = a.ask(TokenLog).await.unwrap();
    let one_cache = per_token * (log.len() + 2 * 64 + 16);

    let (free, free_stats, free_recomputed) = workload(dir.path(), usize::MAX).await;
    // Unbounded, nothing is ever evicted: every call after a tool call (and every
    // later turn) reuses the whole cache.
    assert_eq!(free_stats.evictions_requested, 0);
    assert_eq!(free_recomputed, vec![0; 8]);
    for (i, turns) in free.iter().enumerate() {
        let calls: Vec<usize> = turns.iter().map(|(_, runs)| runs.len()).collect();
        assert_eq!(
            calls,
            if i < 6 { vec![1, 1] } else { vec![0, 0] },
            "agent {i}"
        );
    }

    for (label, budget) in [
        ("three caches", 3 * one_cache),
        ("one cache and a half", one_cache * 3 / 2),
    ] {
        let (got, s, recomputed) = workload(dir.path(), budget).await;
        eprintln!(
            "{label}: budget {budget} B, peak {} B, evictions {}, preempted {}, recomputed {}, queue p50 {:.1} ms, max {:.1} ms",
            s.kv_peak_bytes,
            s.evictions_requested,
            s.preempted,
            recomputed.iter().sum::<usize>(),
            s.queue_ms.p50,
            s.queue_ms_max
        );
        assert_eq!(
            got, free,
            "{label}: replies and tool results differ from the free run"
        );
        assert!(
            s.kv_peak_bytes <= budget,
            "{label}: peak {} > {budget}",
            s.kv_peak_bytes
        );
        assert!(s.evictions_requested > 0, "{label}: the budget never bit");
        assert!(recomputed.iter().sum::<usize>() > 0, "{label}");
        // Had an admission waited for a tool call to end, it would have waited for
        // most of one.
        assert!(
            s.queue_ms_max < TOOL_MS as f64,
            "{label}: an admission waited {:.0} ms",
            s.queue_ms_max
        );
    }
}

/// When nothing idle can make room for the front of the queue, the caches of requests
/// queued behind it are dropped (`Error::Preempted`, the cache handed back empty), and
/// the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_cache_is_preempted_when_nothing_idle_can_make_room() {
    use troupe::engine::{Event, Generate};
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let p = troupe::KvCache::bytes_per_token(m.config().kv_layout(), troupe::KvDtype::F32);
    let vocab = m.config().vocab_size as u32;
    // Pre-feed 50 tokens into the third request's cache.
    let mut third = cache(&m);
    feed(&m, &mut third, &tokens(50, 9, 3, vocab));
    let held = third.bytes();
    // Room for the first request (8 + 200 tokens) and the third's cache, not for the
    // second (8 + 100) on top.
    let budget = 208 * p + held + 20 * p;
    let e = engine(m, engine_config(256, 16, budget));
    let request = |cache: troupe::KvCache, seed: usize, max_tokens: usize| {
        let mut g = Generate::new(cache, tokens(8, seed, 3, vocab), max_tokens);
        g.ignore_eos = true;
        g
    };
    let first = e
        .generate(request(e.model().new_cache(troupe::KvDtype::F32), 1, 200))
        .await
        .unwrap();
    let second = e
        .generate(request(e.model().new_cache(troupe::KvDtype::F32), 2, 100))
        .await
        .unwrap();
    let mut third = e.generate(request(third, 3, 10)).await.unwrap();
    let mut preempted = None;
    while let Some(ev) = third.next().await {
        if let Event::Failed { error, cache } = ev {
            preempted = Some((error, cache.len()));
        }
    }
    let (error, len) = preempted.expect("the third request failed");
    assert!(matches!(error, troupe::Error::Preempted), "{error}");
    assert_eq!(len, 0, "its cache was dropped");
    assert_eq!(first.finish().await.unwrap().tokens.len(), 200);
    assert_eq!(second.finish().await.unwrap().tokens.len(), 100);
    let s = e.stats().await.unwrap();
    assert_eq!(s.preempted, 1);
    assert_eq!(s.kv_live_bytes, 0);
}
