//! The tool loop: a tool is called with schema-valid arguments, its result reaches the
//! model, the turn ends with a final answer within the step limit; failing, slow and
//! panicking tools each leave the agent healthy; tool_choice narrows the grammar.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use troupe::agent::{tool_fn, AgentActor, AgentConfig, Ask, History, Tool, ToolChoice};
use troupe::engine::Engine;
use troupe::model::{Model, Role, WeightsMode};

#[derive(serde::Deserialize, schemars::JsonSchema, Debug, Clone, PartialEq)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
struct Nothing {}

fn setup() -> (Arc<Model>, Engine) {
    let model = Arc::new(real(WeightsMode::Native));
    let actor = Engine::serve(model.clone(), engine_config(256, 8, usize::MAX)).unwrap();
    (model, actor)
}

fn tools(calls: Arc<Mutex<Vec<AddArgs>>>) -> Vec<Arc<dyn Tool>> {
    vec![
        tool_fn("add", "Adds two integers.", move |args: AddArgs| {
            let calls = calls.clone();
            async move {
                let sum = args.a + args.b;
                calls.lock().unwrap().push(args);
                Ok(format!("{sum}"))
            }
        }),
        tool_fn("broken", "Always fails.", |_: Nothing| async {
            Err("disk on fire".to_string())
        }),
        tool_fn("slow", "Takes forever.", |_: Nothing| async {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            Ok("too late".to_string())
        }),
        tool_fn("crash", "Panics.", |_: Nothing| async {
            if true {
                panic!("tool bug");
            }
            Ok(String::new())
        }),
    ]
}

fn config() -> AgentConfig {
    AgentConfig {
        max_tokens: 48,
        max_tool_steps: 1,
        tool_timeout_secs: 0.5,
        ..AgentConfig::new("calc", "You are a calculator. Use the tools.")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_tool_call_runs_and_its_result_reaches_the_model() {
    let (_, engine) = setup();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let agent = AgentActor::new(
        AgentConfig {
            tool_choice: ToolChoice::Tool("add".into()),
            ..config()
        },
        engine.clone(),
        tools(calls.clone()),
    )
    .unwrap()
    .spawn_agent();
    let r = agent.ask(Ask::new("What is 17 + 25?")).await.unwrap();
    assert_eq!(r.tool_runs.len(), 1, "{r:?}");
    let run = &r.tool_runs[0];
    assert_eq!(run.call.name, "add");
    assert!(!run.failed);
    let args = calls.lock().unwrap().clone();
    assert_eq!(
        args.len(),
        1,
        "the typed arguments deserialized: schema-valid"
    );
    assert_eq!(run.result, format!("{}", args[0].a + args[0].b));
    // The result is in the conversation the model saw, and the turn ended with an
    // answer that is not a tool call.
    let h = agent.ask(History).await.unwrap();
    let tool_msg = h.iter().position(|m| m.role == Role::Tool).unwrap();
    assert_eq!(h[tool_msg].content, run.result);
    assert_eq!(h.last().unwrap().role, Role::Assistant);
    assert!(!r.text.starts_with("<tool_call>"), "{:?}", r.text);
    assert_eq!(h.last().unwrap().content, r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_slow_and_panicking_tools_leave_the_agent_healthy() {
    let (_, engine) = setup();
    // The slow tool meets a short timeout; the others a long one, because a panicking
    // tool's hook may print a symbolized backtrace (RUST_BACKTRACE in CI) that takes
    // longer than the short timeout in a debug build.
    for (timeout, cases) in [
        (0.5, &[("slow", "timed out")][..]),
        (120.0, &[("broken", "disk on fire"), ("crash", "panic")][..]),
    ] {
        let agent = AgentActor::new(
            AgentConfig {
                tool_timeout_secs: timeout,
                ..config()
            },
            engine.clone(),
            tools(Arc::new(Mutex::new(Vec::new()))),
        )
        .unwrap()
        .spawn_agent();
        for (tool, expect) in cases {
            let r = agent
                .ask(
                    Ask::new(format!("Use the {tool} tool."))
                        .tool_choice(ToolChoice::Tool(tool.to_string())),
                )
                .await
                .unwrap();
            assert_eq!(r.tool_runs.len(), 1);
            assert!(r.tool_runs[0].failed);
            assert!(
                r.tool_runs[0].result.contains(expect),
                "{:?}",
                r.tool_runs[0].result
            );
        }
        // Still answering, without tools this time.
        let r = agent
            .ask(Ask::new("Say hello.").tool_choice(ToolChoice::None))
            .await
            .unwrap();
        assert!(r.tool_runs.is_empty());
        assert!(!r.text.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tools_are_refused_at_configuration() {
    let (_, engine) = setup();
    let e = AgentActor::new(
        AgentConfig {
            tools: vec!["nope".into()],
            ..config()
        },
        engine.clone(),
        tools(Arc::new(Mutex::new(Vec::new()))),
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown tool `nope`"), "{e}");
    let e = AgentActor::new(
        AgentConfig {
            tool_choice: ToolChoice::Tool("nope".into()),
            ..config()
        },
        engine,
        tools(Arc::new(Mutex::new(Vec::new()))),
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown tool `nope`"), "{e}");
}
