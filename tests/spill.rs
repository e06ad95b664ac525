//! Spilling evicted caches to disk (`EngineConfig::spill`): a cache written under KV
//! pressure and read back is the cache that was written, bit for bit, so everything
//! after it equals a run that never evicted; under a tight budget no token is
//! recomputed; the files go when their agents stop; and a spill folder that cannot
//! be written, or a spill file that is missing or corrupt, falls back to recomputing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use troupe::agent::{tool_fn, AgentConfig, Ask, GetAgentStats, Tool, ToolChoice};
use troupe::engine::{Done, Engine, EngineConfig, Generate, Park, Resume};
use troupe::{KvCache, KvDtype};

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Query {
    q: String,
}

fn lookup() -> Vec<Arc<dyn Tool>> {
    vec![tool_fn(
        "lookup",
        "Looks something up.",
        |a: Query| async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
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
        max_tokens: 48,
        ..AgentConfig::default()
    }
}

/// The tiny model with room for a few tool turns.
fn model(dir: &Path) -> troupe::Model {
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

fn spilling(budget: usize, spill: Option<PathBuf>) -> EngineConfig {
    EngineConfig {
        spill,
        ..engine_config(256, 16, budget)
    }
}

/// Files in `dir` (spill files and temporaries alike).
fn files(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Asks the engine for its counters until `ok` holds of them (the spill thread's
/// last removals may still be on their way).
async fn stats_until(e: &Engine, ok: impl Fn(&troupe::Stats) -> bool) -> troupe::Stats {
    for _ in 0..2000 {
        let s = e.stats().await.unwrap();
        if ok(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    e.stats().await.unwrap()
}

/// Per agent: each turn's reply and tool results.
type Replies = Vec<Vec<(String, Vec<String>)>>;

struct Run {
    replies: Replies,
    stats: troupe::Stats,
    recomputed: Vec<u64>,
    restored: u64,
}

/// Eight agents, three turns each: six call the tool every turn, two have no tools.
/// Stops the agents and the engine at the end.
async fn workload(dir: &Path, budget: usize, spill: Option<PathBuf>) -> Run {
    let e = engine(model(dir), spilling(budget, spill.clone()));
    let agents: Vec<_> = (0..8)
        .map(|i| {
            if i < 6 {
                e.agent(config(i), lookup()).unwrap()
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
            for t in 0..3 {
                let r = a.ask(Ask::new(format!("Find item {t}."))).await.unwrap();
                let runs = r.tool_runs.iter().map(|x| x.result.clone()).collect();
                out.push((r.text, runs));
            }
            let s = a.ask(GetAgentStats).await.unwrap();
            (out, (s.recomputed_tokens, s.restored_tokens))
        }
    });
    let (replies, counts): (Vec<_>, Vec<_>) =
        futures::future::join_all(turns).await.into_iter().unzip();
    for a in &agents {
        a.stop_gracefully().await.unwrap();
        a.wait_for_shutdown().await;
    }
    // Every lease ended: no cache is accounted, no file is left (a write still in
    // flight when its agent stopped removes its own file when it ends).
    let stats = stats_until(&e, |s| s.spill_files == 0 && s.kv_live_bytes == 0).await;
    if let Some(dir) = &spill {
        for _ in 0..2000 {
            if files(dir).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            files(dir),
            Vec::<String>::new(),
            "left after the agents stopped"
        );
    }
    e.stop().await;
    Run {
        replies,
        stats,
        recomputed: counts.iter().map(|c| c.0).collect(),
        restored: counts.iter().map(|c| c.1).sum(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_caches_come_back_and_nothing_is_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    let per_token = KvCache::bytes_per_token(model(dir.path()).config().kv_layout(), KvDtype::F16);
    let free = workload(dir.path(), usize::MAX, None).await;
    assert_eq!(free.stats.evictions_requested, 0);
    assert_eq!(free.recomputed, vec![0; 8]);

    // A budget of a few caches: without spill the evictions recompute.
    let budget = per_token * 1400;
    let dropped = workload(dir.path(), budget, None).await;
    assert_eq!(dropped.replies, free.replies, "replies after recomputes");
    assert!(
        dropped.stats.evictions_requested > 0,
        "the budget never bit"
    );
    assert!(dropped.recomputed.iter().sum::<u64>() > 0);
    assert_eq!(dropped.stats.spills, 0);
    eprintln!(
        "no spill: evictions {}, preempted {}, recomputed {:?}",
        dropped.stats.evictions_requested, dropped.stats.preempted, dropped.recomputed
    );

    let got = workload(dir.path(), budget, Some(spill.clone())).await;
    eprintln!(
        "spill: evictions {}, preempted {}, spills {} ({} B), restores {} (+{} in memory), restored tokens {}, recomputed {:?}, restore p50 {:.2} ms",
        got.stats.evictions_requested,
        got.stats.preempted,
        got.stats.spills,
        got.stats.spilled_bytes,
        got.stats.restores,
        got.stats.restores_in_memory,
        got.restored,
        got.recomputed,
        got.stats.restore_ms.p50,
    );
    assert_eq!(got.replies, free.replies, "replies after restores");
    assert!(got.stats.evictions_requested > 0, "the budget never bit");
    assert!(got.stats.spills > 0 && got.stats.restores > 0);
    assert!(got.restored > 0);
    assert_eq!(
        (got.stats.spill_failures, got.stats.restore_failures),
        (0, 0)
    );
    assert!(
        got.stats.kv_peak_bytes <= budget,
        "peak {}",
        got.stats.kv_peak_bytes
    );
    // Idle, parked and queued caches alike were spilled, not dropped.
    assert_eq!(got.recomputed, vec![0; 8], "tokens recomputed with spill");
    // Every file was removed when its agent stopped (or its cache came back).
    assert_eq!(got.stats.spill_files, 0);
    assert_eq!(files(&spill), Vec::<String>::new());
}

/// The greedy request of `n` tokens in `cache` after `tokens`.
fn request(cache: impl Into<troupe::engine::LeasedCache>, tokens: Vec<u32>, n: usize) -> Generate {
    let mut g = Generate::new(cache, tokens, n);
    g.ignore_eos = true;
    g
}

/// What the parked path gave: the resumed request's end, and the engine's counters.
struct Parked {
    done: Done,
    before: Vec<(Vec<f32>, Vec<f32>)>,
    stats: troupe::Stats,
}

/// A parks its cache (a tool call), B needs the room (A's park is evicted: spilled
/// or dropped), then A resumes its park, cut to `keep` tokens when given. `between`
/// runs after B, before the resume.
async fn parked_path(e: &Engine, keep: Option<usize>, between: impl FnOnce()) -> Parked {
    let vocab = e.model().config().vocab_size as u32;
    let fresh = || e.model().new_cache(KvDtype::F16);
    let a = request(fresh(), tokens(50, 1, 3, vocab), 6);
    let a = e.generate(a).await.unwrap().finish().await.unwrap();
    let before = a.cache.to_f32_layers();
    let mut prefix: Vec<u32> = tokens(50, 1, 3, vocab)
        .into_iter()
        .chain(a.tokens[..a.tokens.len() - 1].iter().copied())
        .collect();
    assert_eq!(prefix.len(), a.cache.len());
    let mut parked = e.actor().ask(Park(a.cache)).await.unwrap();
    if let Some(n) = keep {
        parked.truncate(n);
        prefix.truncate(n);
    }
    let b = request(fresh(), tokens(8, 2, 3, vocab), 200);
    let b = e.generate(b).await.unwrap().finish().await.unwrap();
    assert_eq!(b.tokens.len(), 200);
    between();
    let mut g = request(fresh(), vec![*a.tokens.last().unwrap(), 5, 6, 7], 12);
    g.resume = Some(Resume { parked, prefix });
    let done = e.generate(g).await.unwrap().finish().await.unwrap();
    let stats = e.stats().await.unwrap();
    Parked {
        done,
        before,
        stats,
    }
}

/// The budget of the parked path: A's park or B, not both.
fn parked_budget(m: &troupe::Model) -> usize {
    KvCache::bytes_per_token(m.config().kv_layout(), KvDtype::F16) * 230
}

/// The parked cache of a tool call, spilled and read back, is the cache that was
/// parked, and the resumed request computes exactly what it computes from the park
/// never evicted: the same tokens, the same cache, the same next logits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spilled_park_reads_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(Default::default());
    let free = engine(tiny(Default::default()), spilling(usize::MAX, None));
    let free = parked_path(&free, None, || {}).await;
    assert_eq!(free.stats.evictions_requested, 0);
    assert_eq!(free.done.usage.cached_tokens, 56 - 1);

    let spill = dir.path().to_path_buf();
    let e = engine(
        tiny(Default::default()),
        spilling(parked_budget(&m), Some(spill.clone())),
    );
    let got = parked_path(&e, None, || {
        // B could be admitted only once A's park was on disk, out of the budget.
        assert_eq!(files(&spill).len(), 1, "{:?}", files(&spill));
    })
    .await;
    assert_eq!(got.stats.evictions_requested, 1);
    assert_eq!((got.stats.spills, got.stats.restores), (1, 1));
    assert_eq!(got.done.usage.cached_tokens, free.done.usage.cached_tokens);
    assert_eq!(got.done.usage.restored_tokens, got.done.usage.cached_tokens);
    assert_eq!(
        got.done.usage.computed_tokens,
        free.done.usage.computed_tokens
    );
    assert_eq!(got.before, free.before);
    assert_eq!(got.done.tokens, free.done.tokens);
    let (mut ours, mut theirs) = (got.done.cache.into_cache(), free.done.cache.into_cache());
    assert_eq!(ours.to_f32_layers(), theirs.to_f32_layers());
    let next = [*got.done.tokens.last().unwrap()];
    assert_eq!(feed(&m, &mut ours, &next), feed(&m, &mut theirs, &next));
    // The file went when the cache came back.
    assert_eq!(files(&spill), Vec::<String>::new());
    assert_eq!((got.stats.spill_files, got.stats.spill_bytes), (0, 0));
    e.stop().await;

    // A park cut short (the log disagreed past its 30th token) resumes from its
    // first 30 tokens, spilled or not.
    let free_engine = engine(tiny(Default::default()), spilling(usize::MAX, None));
    let free = parked_path(&free_engine, Some(30), || {}).await;
    let e = engine(
        tiny(Default::default()),
        spilling(parked_budget(&m), Some(spill.clone())),
    );
    let got = parked_path(&e, Some(30), || {}).await;
    assert_eq!((got.stats.spills, got.stats.restores), (1, 1));
    assert_eq!(got.done.usage.cached_tokens, 30);
    assert_eq!(free.done.usage.cached_tokens, 30);
    assert_eq!(got.done.tokens, free.done.tokens);
    assert_eq!(
        got.done.cache.to_f32_layers(),
        free.done.cache.to_f32_layers()
    );
    e.stop().await;
}

/// A spill file that is corrupt or gone when its cache is resumed, and a spill folder
/// that cannot be written, each fall back to recomputing the park: the request gives
/// what the free run gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_spill_file_or_folder_falls_back_to_recompute() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(Default::default());
    let free = engine(tiny(Default::default()), spilling(usize::MAX, None));
    let free = parked_path(&free, None, || {}).await;

    for damage in ["corrupt", "missing"] {
        let spill = dir.path().join(damage);
        let e = engine(
            tiny(Default::default()),
            spilling(parked_budget(&m), Some(spill.clone())),
        );
        let got = parked_path(&e, None, || {
            let names = files(&spill);
            assert_eq!(names.len(), 1, "{names:?}");
            let path = spill.join(&names[0]);
            if damage == "corrupt" {
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        })
        .await;
        assert_eq!((got.stats.spills, got.stats.restores), (1, 0), "{damage}");
        assert_eq!(got.stats.restore_failures, 1, "{damage}");
        assert_eq!(got.done.usage.cached_tokens, 0, "{damage}: recomputed");
        assert_eq!(got.done.tokens, free.done.tokens, "{damage}");
        assert_eq!(files(&spill), Vec::<String>::new(), "{damage}");
        e.stop().await;
    }

    // A "folder" under a plain file: every write fails.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let e = engine(
        tiny(Default::default()),
        spilling(parked_budget(&m), Some(blocker.join("spill"))),
    );
    let got = parked_path(&e, None, || {}).await;
    assert_eq!((got.stats.spills, got.stats.spill_failures), (0, 1));
    assert_eq!(got.stats.restores, 0);
    assert_eq!(got.done.usage.cached_tokens, 0, "recomputed");
    assert_eq!(got.done.tokens, free.done.tokens);
    e.stop().await;

    // Agents on such an engine lose nothing either: their turns are the free run's.
    let per_token = KvCache::bytes_per_token(model(dir.path()).config().kv_layout(), KvDtype::F16);
    let free = workload(dir.path(), usize::MAX, None).await;
    let got = workload(dir.path(), per_token * 1400, Some(blocker.join("spill"))).await;
    assert_eq!(got.replies, free.replies);
    assert!(got.stats.spill_failures > 0);
    assert_eq!(got.stats.spills, 0);
    assert!(got.recomputed.iter().sum::<u64>() > 0);
}

/// A request that resumes a park while its spill is still being written takes the
/// cache back from memory (the writer then removes its file); queued behind a
/// request that needs the room, it is preempted, and its cache spilled, read back
/// once it is admitted: what it computes is the free run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_during_its_spill_takes_the_cache_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(Default::default());
    let free = engine(tiny(Default::default()), spilling(usize::MAX, None));
    let free = parked_path(&free, None, || {}).await;

    let gate = troupe::engine::StepGate::held();
    let mut cfg = spilling(parked_budget(&m), Some(dir.path().to_path_buf()));
    cfg.test_hooks.spill_gate = Some(gate.clone());
    let e = engine(tiny(Default::default()), cfg);
    let vocab = e.model().config().vocab_size as u32;
    let fresh = || e.model().new_cache(KvDtype::F16);
    let a = request(fresh(), tokens(50, 1, 3, vocab), 6);
    let a = e.generate(a).await.unwrap().finish().await.unwrap();
    let prefix: Vec<u32> = tokens(50, 1, 3, vocab)
        .into_iter()
        .chain(a.tokens[..a.tokens.len() - 1].iter().copied())
        .collect();
    let parked = e.actor().ask(Park(a.cache)).await.unwrap();
    // B needs the room: A's park starts its spill, held at the gate.
    let b = e
        .generate(request(fresh(), tokens(8, 2, 3, vocab), 200))
        .await
        .unwrap();
    let g2 = gate.clone();
    let waiting = tokio::task::spawn_blocking(move || g2.wait_blocked(Duration::from_secs(60)));
    assert!(waiting.await.unwrap(), "the spill never started");
    let mut g = request(fresh(), vec![*a.tokens.last().unwrap(), 5, 6, 7], 12);
    g.resume = Some(Resume { parked, prefix });
    let resumed = e.generate(g).await.unwrap();
    let s = stats_until(&e, |s| s.restores_in_memory == 1).await;
    assert_eq!((s.restores_in_memory, s.spills), (1, 0));
    gate.open();
    let b = b.finish().await.unwrap();
    let done = resumed.finish().await.unwrap();
    assert_eq!(b.tokens.len(), 200);
    assert_eq!(done.tokens, free.done.tokens);
    assert_eq!(done.usage.cached_tokens, free.done.usage.cached_tokens);
    assert_eq!(done.cache.to_f32_layers(), free.done.cache.to_f32_layers());
    let s = e.stats().await.unwrap();
    eprintln!(
        "spills {}, restores {} (+{} in memory), preempted {}",
        s.spills, s.restores, s.restores_in_memory, s.preempted
    );
    assert_eq!((s.spill_failures, s.restore_failures), (0, 0));
    // The first write found its slot empty: no file; the second is A's preemption.
    assert_eq!(
        (s.restores_in_memory, s.preempted, s.spills, s.restores),
        (1, 1, 1, 1)
    );
    e.stop().await;
    assert_eq!(files(dir.path()), Vec::<String>::new());
}

/// The load test under a small budget with a spill folder recomputes nothing, and
/// its report counts the spills and the restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loadtest_reports_spills_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(tiny(Default::default()));
    let per_token = KvCache::bytes_per_token(model.config().kv_layout(), KvDtype::default());
    let o = troupe::loadtest::LoadtestOptions {
        agents: 12,
        turns: 3,
        system_tokens: 40,
        user_tokens: 8,
        max_tokens: 6,
        kv_budget: 4 * 120 * per_token,
        spill: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let r = troupe::loadtest::run(model, &o).await.unwrap();
    assert_eq!((r.requests, r.errors), (36, 0));
    assert!(r.spill && r.evictions > 0, "{r:?}");
    assert_eq!(r.recomputed_tokens, 0, "{r:?}");
    assert!(
        r.spills > 0 && r.spilled_bytes > 0 && r.restores > 0,
        "{r:?}"
    );
    assert!(r.restored_tokens > 0);
    assert_eq!((r.spill_failures, r.restore_failures), (0, 0));
    assert!(r.kv_peak_bytes <= 4 * 120 * per_token);
    assert_eq!(files(dir.path()), Vec::<String>::new());
}
