//! Nothing a tool or a turn does breaks the agent: huge tool results are capped with
//! a marker, a timed-out tool is stopped, an agent-as-tool cycle is refused, a reply
//! cut inside a tool call fails the turn, and a failed turn (any reason) leaves the
//! conversation, the token log and the cache as they were (a property test over
//! random sequences of turns).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use common::*;
use kameo::actor::ActorRef;
use proptest::prelude::*;
use troupe::agent::{
    tool_fn, AgentActor, AgentConfig, Ask, ContextPolicy, History, TokenLog, Tool, ToolChoice,
};
use troupe::engine::Engine;
use troupe::model::tiny::{write_tiny_model, TinyConfig};
use troupe::model::{LoadOptions, Model, Role, WeightsMode};
use troupe::workflow::agent_tool;

/// A tiny model with room for tool calls (context 4096).
fn roomy() -> Arc<Model> {
    static PATH: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    let path = &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("roomy.gguf");
            write_tiny_model(
                &p,
                &TinyConfig {
                    context_length: 4096,
                    ..TinyConfig::default()
                },
            )
            .unwrap();
            (dir, p)
        })
        .1;
    Arc::new(
        Model::load(
            path,
            LoadOptions {
                weights: WeightsMode::Native,
            },
        )
        .unwrap(),
    )
}

fn engine(model: &Arc<Model>) -> Engine {
    Engine::serve(model.clone(), engine_config(512, 16, usize::MAX)).unwrap()
}

#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
struct Nothing {}

fn spawn(e: &Engine, config: AgentConfig, tools: Vec<Arc<dyn Tool>>) -> ActorRef<AgentActor> {
    AgentActor::new(config, e.clone(), tools)
        .unwrap()
        .spawn_agent()
}

fn forced(tool: &str) -> AgentConfig {
    AgentConfig {
        max_tokens: 64,
        max_tool_steps: 1,
        tool_choice: ToolChoice::Tool(tool.into()),
        ..AgentConfig::new(tool, "")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_tool_result_is_capped_with_a_marker() {
    let model = roomy();
    let e = engine(&model);
    let big = tool_fn("big", "Returns a lot.", |_: Nothing| async {
        Ok("x".repeat(5 << 20))
    });
    let config = AgentConfig {
        // The tiny vocabulary spends about a token per byte.
        max_tool_result_bytes: 1024,
        ..forced("big")
    };
    let a = spawn(&e, config, vec![big]);
    let r = a.ask(Ask::new("go")).await.unwrap();
    let result = &r.tool_runs[0].result;
    assert!(result.len() <= 1024, "{}", result.len());
    assert!(
        result.ends_with(&format!(
            "…[truncated {} bytes]",
            (5 << 20) - result.find('…').unwrap()
        )),
        "{}",
        &result[result.len() - 40..]
    );
    let h = a.ask(History).await.unwrap();
    assert!(h.iter().all(|m| m.content.len() <= 4096));
    // The default cap is a few KB.
    assert_eq!(AgentConfig::default().max_tool_result_bytes, 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_tool_is_stopped() {
    let model = roomy();
    let e = engine(&model);
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    let busy = tool_fn("busy", "Never ends.", move |_: Nothing| {
        let t = t.clone();
        async move {
            loop {
                t.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    });
    let a = spawn(
        &e,
        AgentConfig {
            tool_timeout_secs: 0.2,
            ..forced("busy")
        },
        vec![busy],
    );
    let r = a.ask(Ask::new("go")).await.unwrap();
    assert!(r.tool_runs[0].failed && r.tool_runs[0].result.contains("timed out"));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let after = ticks.load(Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        ticks.load(Ordering::Relaxed),
        after,
        "the tool kept running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_tool_cycle_is_refused() {
    let model = roomy();
    let e = engine(&model);
    // B is built first with a tool that asks A, which does not exist yet: a slot.
    let a_slot: Arc<OnceLock<ActorRef<AgentActor>>> = Arc::new(OnceLock::new());
    let slot = a_slot.clone();
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Msg {
        #[schemars(length(max = 20))]
        message: String,
    }
    let ask_a = tool_fn("ask_a", "Asks A.", move |m: Msg| {
        let a = slot.get().cloned();
        async move {
            let a = a.ok_or("no A")?;
            // The same tool agent_tool makes, built late.
            agent_tool("ask_a", "Asks A.", a)
                .call(serde_json::json!({ "message": m.message }))
                .await
        }
    });
    let b = spawn(
        &e,
        AgentConfig {
            max_tokens: 200,
            ..forced("ask_a")
        },
        vec![ask_a],
    );
    let a = spawn(
        &e,
        AgentConfig {
            max_tokens: 300,
            tool_timeout_secs: 60.0,
            ..forced("ask_b")
        },
        vec![agent_tool("ask_b", "Asks B.", b.clone())],
    );
    a_slot.set(a.clone()).unwrap();
    let started = std::time::Instant::now();
    let r = a.ask(Ask::new("go")).await.unwrap();
    assert!(started.elapsed().as_secs() < 30, "waited for the timeout");
    assert!(!r.tool_runs[0].failed, "{:?}", r.tool_runs[0]);
    let hb = b.ask(History).await.unwrap();
    let tool_msg = hb
        .iter()
        .find(|m| m.role == Role::Tool)
        .expect("B ran its tool");
    assert!(
        tool_msg.content.contains("cycle refused"),
        "{}",
        tool_msg.content
    );
    // An agent asking itself is refused too.
    let me_slot: Arc<OnceLock<ActorRef<AgentActor>>> = Arc::new(OnceLock::new());
    let slot = me_slot.clone();
    let ask_me = tool_fn("ask_me", "Asks me.", move |m: Msg| {
        let me = slot.get().cloned();
        async move {
            agent_tool("ask_me", "Asks me.", me.ok_or("no me")?)
                .call(serde_json::json!({ "message": m.message }))
                .await
        }
    });
    let me = spawn(
        &e,
        AgentConfig {
            max_tokens: 200,
            ..forced("ask_me")
        },
        vec![ask_me],
    );
    me_slot.set(me.clone()).unwrap();
    let r = me.ask(Ask::new("go")).await.unwrap();
    assert!(
        r.tool_runs[0].result.contains("cycle refused"),
        "{:?}",
        r.tool_runs[0]
    );
}

/// What a turn may change.
async fn state(a: &ActorRef<AgentActor>) -> (Vec<troupe::model::Message>, Vec<u32>, usize) {
    let h = a.ask(History).await.unwrap();
    let (log, cache) = a.ask(TokenLog).await.unwrap();
    (h, log, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_inside_a_tool_call_fails_the_turn_and_changes_nothing() {
    let model = roomy();
    let e = engine(&model);
    let echo = tool_fn("echo", "Echoes.", |_: Nothing| async { Ok("echo".into()) });
    let a = spawn(
        &e,
        AgentConfig {
            max_tokens: 3,
            ..AgentConfig::new("cut", "")
        },
        vec![echo],
    );
    a.ask(Ask::new("hello").tool_choice(ToolChoice::None))
        .await
        .unwrap();
    let before = state(&a).await;
    let err = a
        .ask(Ask::new("call it").tool_choice(ToolChoice::Required))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("inside a tool call"), "{msg}");
    assert_eq!(state(&a).await, before);
}

#[derive(Debug, Clone)]
enum Step {
    /// A short message, answered.
    Plain(u8),
    /// A message of about a third of the context (after a few, `drop_oldest` drops
    /// old turns and `error` refuses).
    Medium,
    /// A message longer than the context.
    TooLong,
    /// A forced tool call that `max_tokens` cuts.
    Cut,
    /// A tool that fails, and one that times out (the turn itself succeeds).
    ToolError,
    ToolTimeout,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..20).prop_map(Step::Plain),
        Just(Step::Medium),
        Just(Step::TooLong),
        Just(Step::Cut),
        Just(Step::ToolError),
        Just(Step::ToolTimeout),
    ]
}

/// Arguments no reply of 4 x 40 tokens can hold.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
struct Long {
    #[schemars(length(min = 400))]
    #[allow(dead_code)]
    text: String,
}

async fn run_steps(model: Arc<Model>, e: Engine, policy: ContextPolicy, steps: Vec<Step>) {
    let tools: Vec<Arc<dyn Tool>> = vec![
        tool_fn("long", "Takes a long text.", |_: Long| async {
            Ok(String::new())
        }),
        tool_fn("fail", "Fails.", |_: Nothing| async {
            Err("no".to_string())
        }),
        tool_fn("hang", "Hangs.", |_: Nothing| async {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            Ok(String::new())
        }),
    ];
    let a = spawn(
        &e,
        AgentConfig {
            max_tokens: 40,
            max_tool_steps: 1,
            tool_timeout_secs: 0.05,
            context_policy: policy,
            ..AgentConfig::new("prop", "Be brief.")
        },
        tools,
    );
    let context = model.config().context_length;
    let mut last_good = state(&a).await;
    for s in steps {
        let reply = match &s {
            Step::Plain(i) => {
                a.ask(Ask::new(format!("note {i}")).tool_choice(ToolChoice::None))
                    .await
            }
            Step::Medium => {
                a.ask(Ask::new("ab ".repeat(context / 6)).tool_choice(ToolChoice::None))
                    .await
            }
            Step::TooLong => {
                a.ask(Ask::new("ab ".repeat(context)).tool_choice(ToolChoice::Auto))
                    .await
            }
            Step::Cut => {
                a.ask(Ask::new("long").tool_choice(ToolChoice::Tool("long".into())))
                    .await
            }
            Step::ToolError => {
                a.ask(Ask::new("fail").tool_choice(ToolChoice::Tool("fail".into())))
                    .await
            }
            Step::ToolTimeout => {
                a.ask(Ask::new("hang").tool_choice(ToolChoice::Tool("hang".into())))
                    .await
            }
        };
        let now = state(&a).await;
        eprintln!(
            "{policy:?} {s:?}: {}",
            reply
                .as_ref()
                .map_or_else(|e| format!("failed: {e}"), |_| "ok".into())
        );
        match reply {
            Ok(_) => {
                assert!(
                    now.0.len() > last_good.0.len() || policy == ContextPolicy::DropOldest,
                    "{s:?}"
                );
                last_good = now;
            }
            Err(err) => {
                assert_eq!(now, last_good, "{s:?} failed ({err}) and changed the state");
            }
        }
        // The cache holds a prefix of the log.
        assert!(last_good.2 <= last_good.1.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn a_failed_turn_leaves_the_last_good_state(
        steps in prop::collection::vec(step(), 1..8),
        drop_oldest in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let model = roomy();
        let policy = if drop_oldest { ContextPolicy::DropOldest } else { ContextPolicy::Error };
        rt.block_on(async {
            let e = engine(&model);
            run_steps(model.clone(), e, policy, steps).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_saves_of_one_snapshot_leave_one_whole_file() {
    use troupe::agent::Save;
    let model = roomy();
    let e = engine(&model);
    let config = |name: &str| AgentConfig {
        max_tokens: 8,
        ..AgentConfig::new(name, "")
    };
    let a = spawn(&e, config("a"), vec![]);
    let b = spawn(&e, config("b"), vec![]);
    a.ask(Ask::new("first agent")).await.unwrap();
    b.ask(Ask::new("the second one, longer")).await.unwrap();
    let (ha, hb) = (a.ask(History).await.unwrap(), b.ask(History).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.snapshot");
    for round in 0..10 {
        let (ra, rb) = tokio::join!(a.ask(Save(path.clone())), b.ask(Save(path.clone())));
        ra.unwrap();
        rb.unwrap();
        let loaded = AgentActor::load(&path, e.clone(), vec![])
            .unwrap()
            .spawn_agent();
        let h = loaded.ask(History).await.unwrap();
        assert!(h == ha || h == hb, "round {round}: a mix of two snapshots");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "round {round}: a temporary file was left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_agent_tool_leaves_no_phantom_turn() {
    let model = roomy();
    let e = engine(&model);
    // B's turns take about a second: a required call of a slow tool.
    let slow = tool_fn("slow", "Slow.", |_: Nothing| async {
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        Ok("done".into())
    });
    let b = spawn(&e, forced("slow"), vec![slow]);
    let a = spawn(
        &e,
        AgentConfig {
            max_tokens: 300,
            tool_timeout_secs: 0.3,
            ..forced("ask_b")
        },
        vec![agent_tool("ask_b", "Asks B.", b.clone())],
    );
    // B is busy with a turn of its own while A's call of B waits and times out.
    let busy = {
        let b = b.clone();
        tokio::spawn(async move { b.ask(Ask::new("first")).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = a.ask(Ask::new("go")).await.unwrap();
    assert!(
        r.tool_runs[0].result.contains("timed out"),
        "{:?}",
        r.tool_runs[0]
    );
    busy.await.unwrap().unwrap();
    // Once B is free, A's abandoned ask is skipped: B answered one user message.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let users = b
        .ask(History)
        .await
        .unwrap()
        .iter()
        .filter(|m| m.role == Role::User)
        .count();
    assert_eq!(users, 1, "a phantom turn ran on B");
}
