//! Agents own their cache across turns: each turn computes only its new tokens, and
//! replies equal those of an agent that recomputes its history; fork, save/load,
//! eviction under the KV budget, context policies, `Reset` and restarts after a
//! crash behave.

mod common;

use std::sync::Arc;

use common::*;
use kameo::actor::ActorRef;
use troupe::agent::{
    AgentActor, AgentConfig, Ask, ContextPolicy, Evict, Fork, GetAgentStats, History, Save,
};
use troupe::engine::{Engine, EngineConfig};
use troupe::model::{Message, Model, Role, WeightsMode};

fn setup(budget: usize, max_running: usize) -> (Arc<Model>, Engine) {
    let model = Arc::new(tiny(WeightsMode::Native));
    let cfg: EngineConfig = engine_config(256, max_running, budget);
    let actor = Engine::serve(model.clone(), cfg).unwrap();
    (model, actor)
}

fn agent(engine: &Engine, cfg: AgentConfig) -> ActorRef<AgentActor> {
    AgentActor::new(cfg, engine.clone(), vec![])
        .unwrap()
        .spawn_agent()
}

fn config() -> AgentConfig {
    AgentConfig {
        max_tokens: 6,
        ..AgentConfig::new("t", "You are terse.")
    }
}

const QUESTIONS: [&str; 6] = ["hi", "the cat", "is on", "the mat", "what now", "bye"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_compute_only_new_tokens_and_equal_recomputing() {
    let (model, engine) = setup(usize::MAX, 8);
    let cached = agent(&engine, config());
    let recompute = agent(&engine, config());
    let mut prev_log_len = 0usize;
    for (k, q) in QUESTIONS.iter().enumerate() {
        let r = cached.ask(Ask::new(*q)).await.unwrap();
        // The recomputing agent drops its cache before every turn.
        recompute.tell(Evict::ANY).await.unwrap();
        let full = recompute.ask(Ask::new(*q)).await.unwrap();
        assert_eq!(r.text, full.text, "turn {k}");
        // What the turn's prompt holds, tokenized whole, independently of the agent.
        let history = cached.ask(History).await.unwrap();
        let before_reply = &history[..history.len() - 1];
        let text = model.chat_template().render(before_reply, true).unwrap();
        let prompt = model.tokenizer().encode_prompt(&text).unwrap();
        assert_eq!(r.usage.prompt_tokens, prompt.len(), "turn {k}");
        // Reused: everything the previous turns fed (all but their last sampled token).
        assert_eq!(
            r.usage.cached_tokens,
            prev_log_len.saturating_sub(1),
            "turn {k}"
        );
        let computed_prompt = r.usage.prompt_tokens - r.usage.cached_tokens;
        if k > 0 {
            assert_eq!(full.usage.cached_tokens, 0);
            assert!(
                computed_prompt < full.usage.prompt_tokens / 2,
                "turn {k} recomputed too much"
            );
        }
        prev_log_len = r.usage.prompt_tokens + r.usage.generated_tokens;
    }
    let s = cached.ask(GetAgentStats).await.unwrap();
    assert_eq!((s.turns, s.prefix_mismatches, s.evictions), (6, 0, 0));
    assert!(
        recompute
            .ask(GetAgentStats)
            .await
            .unwrap()
            .recomputed_tokens
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_shares_the_state_without_recomputation_and_diverges() {
    let (_, engine) = setup(usize::MAX, 8);
    let parent = agent(&engine, config());
    let twin = agent(&engine, config());
    for q in &QUESTIONS[..2] {
        parent.ask(Ask::new(*q)).await.unwrap();
        twin.ask(Ask::new(*q)).await.unwrap();
    }
    let before = engine.stats().await.unwrap().kv_live_bytes;
    let child = parent.ask(Fork::default()).await.unwrap();
    // Once the child has started, its copy of the cache is accounted as held.
    child.ask(GetAgentStats).await.unwrap();
    let after = engine.stats().await.unwrap().kv_live_bytes;
    assert!(
        after > before,
        "fork's cache accounted: {before} -> {after}"
    );
    let c = child.ask(Ask::new("a different road")).await.unwrap();
    let p = parent.ask(Ask::new("the same road")).await.unwrap();
    let t = twin.ask(Ask::new("the same road")).await.unwrap();
    // The child computed only its new message: the shared prefix came with the fork.
    assert!(c.usage.cached_tokens > 0);
    assert_eq!(c.usage.cached_tokens, p.usage.cached_tokens);
    assert_eq!(c.usage.cached_tokens, t.usage.cached_tokens);
    // The parent is unaffected by the child.
    assert_eq!(p.text, t.text);
    let ph = parent.ask(History).await.unwrap();
    let ch = child.ask(History).await.unwrap();
    assert!(ph.iter().any(|m| m.content == "the same road"));
    assert!(!ph.iter().any(|m| m.content == "a different road"));
    assert!(ch.iter().any(|m| m.content == "a different road"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_and_load_continue_identically_and_corruption_is_named() {
    let (_, engine) = setup(usize::MAX, 8);
    let a = agent(&engine, config());
    for q in &QUESTIONS[..3] {
        a.ask(Ask::new(*q)).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.safetensors");
    a.ask(Save(path.clone())).await.unwrap();
    let loaded = AgentActor::load(&path, engine.clone(), vec![])
        .unwrap()
        .spawn_agent();
    let x = a.ask(Ask::new("next")).await.unwrap();
    let y = loaded.ask(Ask::new("next")).await.unwrap();
    assert_eq!(x.text, y.text);
    assert_eq!(
        x.usage.cached_tokens, y.usage.cached_tokens,
        "the cache came back too"
    );

    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let e = AgentActor::load(&bad, engine.clone(), vec![]).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    // A snapshot of another model is refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other_path = other_dir.path().join("other.gguf");
    troupe::model::tiny::write_tiny_model(
        &other_path,
        &troupe::model::tiny::TinyConfig {
            seed: 99,
            ..Default::default()
        },
    )
    .unwrap();
    let other = Arc::new(Model::load(&other_path, Default::default()).unwrap());
    let other = Engine::serve(other, EngineConfig::default()).unwrap();
    let e = AgentActor::load(&path, other, vec![]).unwrap_err();
    assert!(e.to_string().contains("another model"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_under_a_small_budget_all_finish_identically() {
    let per_token = troupe::KvCache::bytes_per_token(
        tiny(WeightsMode::Native).config().kv_layout(),
        troupe::KvDtype::default(),
    );
    // Room for about five conversations' caches.
    let budget = 5 * 140 * per_token;
    let run = |budget: usize| async move {
        let (_, engine) = setup(budget, 4);
        let agents: Vec<_> = (0..20).map(|_| agent(&engine, config())).collect();
        let mut replies = vec![Vec::new(); 20];
        for turn in 0..3 {
            let mut pending = Vec::new();
            for (i, a) in agents.iter().enumerate() {
                let a = a.clone();
                pending.push(tokio::spawn(async move {
                    a.ask(Ask::new(format!("agent {i} turn {turn}")))
                        .await
                        .unwrap()
                }));
            }
            for (i, p) in pending.into_iter().enumerate() {
                replies[i].push(p.await.unwrap());
            }
        }
        // At rest, the engine accounts for exactly the bytes the agents' caches hold
        // (each agent answers after any eviction already in its mailbox; its lease's
        // release reaches the engine before the stats request does).
        let mut held = 0;
        for a in &agents {
            held += a.ask(troupe::agent::CacheBytes).await.unwrap();
        }
        let stats = engine.stats().await.unwrap();
        assert_eq!(
            held, stats.kv_live_bytes,
            "real bytes vs the engine's accounting"
        );
        assert!(held > 0);
        let mut evictions = 0;
        for a in &agents {
            evictions += a.ask(GetAgentStats).await.unwrap().evictions;
        }
        (replies, stats, evictions)
    };
    let (tight, stats, evictions) = run(budget).await;
    let (free, free_stats, free_evictions) = run(usize::MAX).await;
    assert!(
        stats.kv_peak_bytes <= budget,
        "peak {} > budget {budget}",
        stats.kv_peak_bytes
    );
    assert!(stats.evictions_requested > 0 && evictions > 0, "{stats:?}");
    assert_eq!((free_stats.evictions_requested, free_evictions), (0, 0));
    let recomputed: usize = tight.iter().flatten().map(|r| r.recomputed_tokens).sum();
    assert!(recomputed > 0);
    for i in 0..20 {
        for t in 0..3 {
            assert_eq!(tight[i][t].text, free[i][t].text, "agent {i} turn {t}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_policies() {
    let (model, engine) = setup(usize::MAX, 8);
    let context = model.config().context_length;
    // About a third of the context per message on the tiny vocabulary.
    let long = "ab ".repeat(context / 6);
    // Error: a clear error naming the lengths, conversation untouched.
    let strict = agent(&engine, config());
    strict.ask(Ask::new("hi")).await.unwrap();
    let before = strict.ask(History).await.unwrap();
    let e = strict
        .ask(Ask::new(format!("{long}{long}{long}{long}")))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("context of 512"), "{msg}");
    assert_eq!(strict.ask(History).await.unwrap(), before);
    strict.ask(Ask::new("still here")).await.unwrap();
    // DropOldest: old turns go, the system prompt stays, the agent keeps working.
    let rolling = agent(
        &engine,
        AgentConfig {
            context_policy: ContextPolicy::DropOldest,
            ..config()
        },
    );
    for i in 0..4 {
        let r = rolling.ask(Ask::new(format!("{i} {long}"))).await.unwrap();
        assert!(r.usage.prompt_tokens + 6 <= context);
    }
    let h: Vec<Message> = rolling.ask(History).await.unwrap();
    assert_eq!(h[0].role, Role::System);
    assert!(
        !h.iter().any(|m| m.content.starts_with("0 ")),
        "the oldest turn was dropped"
    );
    assert!(h.iter().any(|m| m.content.starts_with("3 ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_yields_the_reply_token_by_token() {
    let (_, engine) = setup(usize::MAX, 8);
    let a = agent(&engine, config());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let turn = {
        let a = a.clone();
        tokio::spawn(async move { a.ask(Ask::new("stream this").events(tx)).await })
    };
    let mut streamed = String::new();
    let mut pieces = 0;
    while let Some(ev) = rx.recv().await {
        if let troupe::agent::AgentEvent::Token(t) = ev {
            streamed.push_str(&t);
            pieces += 1;
        }
    }
    let reply = turn.await.unwrap().unwrap();
    assert_eq!(streamed, reply.text);
    assert!(pieces >= 2, "{pieces} pieces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_model_actor_fails_asks_clearly() {
    let (_, engine) = setup(usize::MAX, 8);
    let a = agent(&engine, config());
    a.ask(Ask::new("hi")).await.unwrap();
    engine.actor().kill();
    engine.actor().wait_for_shutdown().await;
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        a.ask(Ask::new("still there?")),
    )
    .await
    .expect("the ask must not hang")
    .unwrap_err();
    assert!(e.to_string().contains("model engine stopped"), "{e}");
    // The conversation was kept as it was.
    assert_eq!(a.ask(History).await.unwrap().len(), 3);
}

/// Asks `$agent` with `$message`, sending it again each time the supervised agent's
/// teardown bounces it back (`ActorRestarting`: the restart's own signal that the next
/// incarnation will take it). Any other outcome is returned; bounded, and never sleeps.
macro_rules! ask_across_restart {
    ($agent:expr, $message:expr) => {{
        let mut message = $message;
        let mut bounced = 0;
        loop {
            match $agent.ask(message).await {
                Err(kameo::error::SendError::ActorRestarting(back)) if bounced < 10_000 => {
                    bounced += 1;
                    message = back;
                }
                other => break other,
            }
        }
    }};
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct NoArgs {}

/// A tool that says when it starts, then never returns (the turn hangs inside it).
fn hanging_tool(
    started: tokio::sync::mpsc::UnboundedSender<()>,
) -> Vec<Arc<dyn troupe::agent::Tool>> {
    vec![troupe::agent::tool_fn(
        "wait",
        "Waits.",
        move |_: NoArgs| {
            let started = started.clone();
            async move {
                let _ = started.send(());
                std::future::pending::<()>().await;
                Ok("never".to_string())
            }
        },
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_supervised_agent_restarts_from_its_last_completed_turn() {
    use kameo::actor::Spawn;
    use troupe::agent::{TokenLog, ToolChoice};
    let (_, engine) = setup(usize::MAX, 8);
    let cfg = || AgentConfig {
        max_tokens: 40,
        tool_timeout_secs: 600.0,
        ..config()
    };
    let supervisor = troupe::agent::AgentSupervisor::spawn(());
    let (started, mut tool_started) = tokio::sync::mpsc::unbounded_channel();
    let a = AgentActor::new(cfg(), engine.clone(), hanging_tool(started.clone()))
        .unwrap()
        .spawn_supervised(&supervisor)
        .await;
    // Same tools (the same system prompt), never called.
    let twin = AgentActor::new(cfg(), engine.clone(), hanging_tool(started))
        .unwrap()
        .spawn_agent();
    for q in &QUESTIONS[..2] {
        let plain = || Ask::new(*q).tool_choice(ToolChoice::None);
        a.ask(plain()).await.unwrap();
        twin.ask(plain()).await.unwrap();
    }
    let before = (
        a.ask(History).await.unwrap(),
        a.ask(TokenLog).await.unwrap().0,
    );

    // A third turn that calls the hanging tool; kill the agent while it waits in it.
    let crashed = tokio::spawn({
        let a = a.clone();
        async move {
            a.ask(Ask::new("call it").tool_choice(ToolChoice::Tool("wait".into())))
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        }
    });
    tool_started.recv().await.expect("the tool started");
    a.kill();
    let crashed = crashed.await.unwrap();
    assert!(
        crashed.is_err(),
        "the killed turn cannot complete: {crashed:?}"
    );

    // The restarted agent holds the last completed turn: the half-finished turn's user
    // message, tool call and tokens are gone. (The old incarnation could not have
    // answered: it was stuck in the tool.)
    let history = ask_across_restart!(a, History).expect("the agent came back");
    let (log, cached) = ask_across_restart!(a, TokenLog).unwrap();
    assert_eq!((history, log), before, "back to the last completed turn");
    assert_eq!(cached, 0, "the cache was lost with the crash");
    assert!(tool_started.try_recv().is_err(), "the tool ran once");

    let plain = || Ask::new("after the crash").tool_choice(ToolChoice::None);
    let x = ask_across_restart!(a, plain()).expect("the restarted agent answers");
    let y = twin.ask(plain()).await.unwrap();
    assert_eq!(x.text, y.text, "same state, same reply");
    assert_eq!(
        x.usage.cached_tokens, 0,
        "the cache was lost with the crash: re-prefilled"
    );
    assert_eq!(x.usage.prompt_tokens, y.usage.prompt_tokens);
}

/// `Reset` takes an agent back to its system prompt and few-shot examples with no
/// cache (nothing accounted with the engine); its next turn computes everything and
/// equals a fresh agent's first turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_forgets_the_conversation_and_the_cache() {
    use troupe::agent::{Reset, TokenLog};
    let cfg = || AgentConfig {
        examples: vec![Message::user("ping"), Message::assistant("pong")],
        ..config()
    };
    // Its own engine, so that the engine's live bytes are this agent's alone.
    let (_, engine) = setup(usize::MAX, 8);
    let a = agent(&engine, cfg());
    let initial = a.ask(History).await.unwrap();
    assert_eq!(
        initial.len(),
        3,
        "system prompt and the example: {initial:?}"
    );
    for q in &QUESTIONS[..3] {
        a.ask(Ask::new(*q)).await.unwrap();
    }
    assert!(a.ask(TokenLog).await.unwrap().1 > 0);
    assert!(engine.stats().await.unwrap().kv_live_bytes > 0);

    a.ask(Reset).await.unwrap();
    assert_eq!(a.ask(History).await.unwrap(), initial);
    assert_eq!(
        a.ask(TokenLog).await.unwrap(),
        (vec![], 0),
        "no log, no cache"
    );
    assert_eq!(
        engine.stats().await.unwrap().kv_live_bytes,
        0,
        "the cache is no longer accounted"
    );

    let (_, fresh_engine) = setup(usize::MAX, 8);
    let fresh = agent(&fresh_engine, cfg());
    let x = a.ask(Ask::new("hello again")).await.unwrap();
    let y = fresh.ask(Ask::new("hello again")).await.unwrap();
    assert_eq!(x.text, y.text);
    assert_eq!(x.usage, y.usage);
    assert_eq!(x.usage.cached_tokens, 0, "computed from scratch");
    assert_eq!(
        x.usage.computed_tokens,
        x.usage.prompt_tokens + x.usage.generated_tokens - 1
    );
    assert_eq!(
        a.ask(History).await.unwrap(),
        fresh.ask(History).await.unwrap()
    );
}
